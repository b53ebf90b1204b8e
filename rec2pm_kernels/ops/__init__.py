"""One folder per op: its oracle (test-only reference), and one file per backend."""
