"""The benchmark harness: nearest-rank percentiles, the run records it stores, the mode it
takes from the environment, and the thread count a case leaves behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.harness.record import Result, nearest_rank, run_metadata, save_run

ROOT = Path(__file__).resolve().parents[1]


def test_nearest_rank_percentiles():
    samples = [float(x) for x in range(100, 0, -1)]  # 1..100, unsorted
    assert nearest_rank(samples, 0.99) == 99.0
    assert nearest_rank(samples, 0.5) == 50.0
    assert nearest_rank(samples, 1.0) == 100.0
    assert nearest_rank([3.0, 1.0, 2.0], 0.99) == 3.0  # below 100 samples the p99 is the maximum
    assert nearest_rank([7.0], 0.0) == 7.0
    with pytest.raises(ValueError, match="at least one sample"):
        nearest_rank([], 0.99)


def test_two_runs_saved_in_one_second_keep_both_records(tmp_path):
    meta = run_metadata()
    rows = [Result("g", f"case {i}", True, "cpu", 1e-3, 1e-3, 3, None, None, {}, threads=1) for i in range(2)]
    first, second = save_run(rows[:1], meta, tmp_path), save_run(rows[1:], meta, tmp_path)
    assert first != second
    assert [json.loads(p.read_text())["results"][0]["name"] for p in (first, second)] == ["case 0", "case 1"]


def test_a_run_record_names_the_cpu_the_backends_and_whether_the_code_was_committed():
    meta = run_metadata()
    if Path("/proc/cpuinfo").exists():
        assert meta["processor"]  # platform.processor() is empty on Linux
    assert set(meta["backends"]) == {"torch", "triton", "cpp", "cuda"}
    assert meta["git_dirty"] in (True, False, None)
    assert all(key.startswith("REC2PM_") for key in meta["environment"])


def test_a_bench_mode_from_the_environment_is_checked():
    env = dict(os.environ, REC2PM_BENCH_MODE="fast")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "benchmarks/test_data.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    assert "REC2PM_BENCH_MODE must be one of ['full', 'quick'], got 'fast'" in run.stdout + run.stderr


def test_the_one_thread_fixture_gives_the_threads_back():
    from benchmarks.conftest import one_thread  # the benchmarks' own conftest, not this folder's

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        steps = one_thread.__wrapped__()  # the fixture's generator: set up, then tear down
        next(steps)
        assert torch.get_num_threads() == 1
        with pytest.raises(StopIteration):
            next(steps)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
