"""pytest-benchmark harness shared by every benchmark file.

Modes: ``--bench-mode quick`` (default: small sizes, 3 timed rounds, seconds in all) and
``--bench-mode full`` (every size, 10 rounds); ``REC2PM_BENCH_MODE`` sets the default.
With ``--benchmark-disable`` every case runs once, untimed (a smoke test).

Each case calls the ``measure`` fixture with its group and whether it is the group's
baseline; at the end the run prints one ratio table per group and stores every result
with the machine, device and versions in ``benchmarks/results/run-<time>.json``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from rec2pm.config import KernelOptions
from rec2pm_kernels.backends import BACKENDS

from .harness import kernel_options
from .harness.measure import peak_memory_bytes, synchronized
from .harness.record import Result, nearest_rank, ratio_tables, run_metadata, save_run

RESULTS_DIR = Path(__file__).parent / "results"
ROUNDS = {"quick": 3, "full": 10}
_results: list[Result] = []


def pytest_addoption(parser):
    group = parser.getgroup("rec2pm benchmarks")
    group.addoption(
        "--bench-mode",
        choices=sorted(ROUNDS),
        default=os.environ.get("REC2PM_BENCH_MODE", "quick"),
        help="quick: small sizes, few rounds (default); full: every size",
    )
    group.addoption("--bench-results", default=str(RESULTS_DIR), help="folder for the run's JSON record")
    group.addoption(
        "--kernel-backend",
        choices=BACKENDS,
        default="auto",
        help="ModelConfig.kernels.backend of every benchmarked model (the kernel benchmarks name theirs)",
    )
    group.addoption("--allow-tf32", action="store_true", help="ModelConfig.kernels.allow_tf32 of the models")
    group.addoption("--deterministic", action="store_true", help="ModelConfig.kernels.deterministic of the models")


def pytest_configure(config):
    mode = config.getoption("--bench-mode")
    if mode not in ROUNDS:  # argparse checks the choices of a flag, not of its default from the environment
        raise pytest.UsageError(f"REC2PM_BENCH_MODE must be one of {sorted(ROUNDS)}, got {mode!r}")
    kernel_options.configure(
        KernelOptions(
            backend=config.getoption("--kernel-backend"),
            allow_tf32=config.getoption("--allow-tf32"),
            deterministic=True if config.getoption("--deterministic") else None,
        )
    )


@pytest.fixture(scope="session")
def bench_mode(request) -> str:
    return request.config.getoption("--bench-mode")


@pytest.fixture
def one_thread():
    """torch on one thread for this case, as it was before afterwards (a case that left it at
    one ran every later file on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def measure(benchmark, bench_mode, request):
    """``measure(fn, group=..., name=..., device=..., baseline=False, flops=None, params=None, rounds=None,
    bytes_moved=None)``.

    Times ``fn`` (synchronised on CUDA) with pytest-benchmark, then takes its peak memory
    in one more call, and records the result for the ratio tables: the median and the p99
    (nearest rank) of ``rounds`` timed calls (default: the mode's rounds; latency cases ask
    for more, so that a p99 means something).
    """
    disabled = request.config.getoption("benchmark_disable", False)

    def run(
        fn,
        *,
        group: str,
        name: str,
        device: torch.device,
        baseline: bool = False,
        flops: float | None = None,
        params: dict | None = None,
        rounds: int | None = None,
        bytes_moved: float | None = None,
    ):
        call = synchronized(fn, device)
        rounds = rounds or ROUNDS[bench_mode]
        benchmark.group = group
        benchmark.extra_info.update(
            case=name, baseline=baseline, flops=flops, bytes_moved=bytes_moved, **(params or {})
        )
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)
        stats = getattr(benchmark, "stats", None)
        median = None if disabled or stats is None else stats.stats.median
        p99 = None if median is None else nearest_rank(stats.stats.data, 0.99)
        peak = None if disabled else peak_memory_bytes(call, device)
        _results.append(
            Result(
                group=group,
                name=name,
                baseline=baseline,
                device=str(device),
                median_s=median,
                p99_s=p99,
                rounds=0 if median is None else rounds,
                flops=flops,
                peak_bytes=peak,
                params=params or {},
                bytes_moved=bytes_moved,
                threads=torch.get_num_threads(),
            )
        )

    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(rec2pm=run_metadata())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _results:
        return
    meta = run_metadata()
    meta["bench_mode"] = config.getoption("--bench-mode")
    meta["model_kernels"] = dataclasses.asdict(kernel_options.kernel_options())
    terminalreporter.section("rec2pm: time relative to each group's baseline")
    terminalreporter.write_line(
        f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | "
        f"{meta['torch_threads']} threads | mode {meta['bench_mode']} | rev {meta['git_revision']}"
    )
    terminalreporter.write_line(ratio_tables(_results))
    path = save_run(_results, meta, Path(config.getoption("--bench-results")))
    terminalreporter.write_line(f"\nsaved {path}")
