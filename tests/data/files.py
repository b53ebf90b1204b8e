"""Helpers for the data tests: small files in tmp_path and the shared data folder beside the checkout."""

import gzip
from pathlib import Path

import pytest

# The shared folder sits beside the checkout: <parent>/main (this repository) and <parent>/shared.
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, gzip-compressed when the name ends with ``.gz``."""
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def shared_file(relative: str) -> Path:
    """The shared data file, or skip the test saying where it was looked for."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"shared data file not found: {path} (the data folder beside the checkout)")
    return path
