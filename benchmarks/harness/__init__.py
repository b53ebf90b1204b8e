"""The benchmark harness: timing, peak memory, mask-aware FLOPs, ratio tables and run records.

Cases live in ``benchmarks/test_*.py`` and use the ``measure`` fixture of
``benchmarks/conftest.py``; each case belongs to a group with exactly one baseline, and the
end of the run prints one table per group with every case's time relative to it.
"""
