"""Run metadata, result rows, the ratio tables and the saved JSON."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rec2pm_kernels.backends import backends


@dataclass
class Result:
    group: str
    name: str
    baseline: bool
    device: str
    median_s: float | None  # None when timing is disabled (--benchmark-disable)
    p99_s: float | None  # nearest-rank 99th percentile of the rounds (their maximum below 100 rounds)
    rounds: int
    flops: float | None
    peak_bytes: int | None
    params: dict
    # Bytes the case must move through memory at least (read + written), for the cases whose
    # speed is bound by memory bandwidth rather than arithmetic; None where not counted.
    bytes_moved: float | None = None
    threads: int | None = None  # torch's intra-op threads while the case ran

    @property
    def tflops(self) -> float | None:
        if self.median_s is None or not self.flops:
            return None
        return self.flops / self.median_s / 1e12

    @property
    def gbps(self) -> float | None:
        if self.median_s is None or not self.bytes_moved:
            return None
        return self.bytes_moved / self.median_s / 1e9


def run_metadata() -> dict:
    """Machine, device and versions, stored with every run."""
    meta = {
        "time_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),  # at the end of the run; each result has its own
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    for module in ("triton", "flash_attn"):
        try:
            meta[module] = __import__(module).__version__
        except ImportError:
            meta[module] = None
    # Which kernel backends this machine has (the C++ extension built or not, and why not).
    meta["backends"] = {name: {"available": s.available, "reason": s.reason} for name, s in backends().items()}
    meta["environment"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("REC2PM_")}
    meta["git_revision"] = _git("rev-parse", "--short", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    meta["git_dirty"] = None if status is None else bool(status)  # results of uncommitted code
    return meta


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu_model() -> str:
    """The CPU's model name (``platform.processor()`` is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1e3:.3f} ms" if seconds < 10 else f"{seconds:.2f} s"


def _fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def nearest_rank(samples, fraction: float) -> float:
    """The ``fraction`` percentile by nearest rank: the smallest sample with at least that
    fraction of the samples at or below it (no interpolation between samples)."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("nearest_rank needs at least one sample")
    return ordered[max(math.ceil(fraction * len(ordered)), 1) - 1]


def ratio_tables(results: list[Result]) -> str:
    """One table per group: each case's median and p99 time, the median's ratio to the
    baseline's, the rounds timed, TFLOP/s, GB/s of memory traffic (where counted) and peak memory."""
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.group, []).append(r)
    lines = []
    for group, rows in groups.items():
        base = next((r for r in rows if r.baseline), None)
        lines.append(f"\n{group}  (baseline: {base.name if base else 'none'})")
        header = f"  {'case':<34} {'median':>12} {'p99':>12} {'rounds':>6} {'x baseline':>11} "
        header += f"{'TFLOP/s':>9} {'GB/s':>7} {'peak mem':>12}"
        lines += [header, "  " + "-" * (len(header) - 2)]
        for r in sorted(rows, key=lambda r: (not r.baseline, r.name)):
            ratio = "n/a"
            if base is not None and base.median_s and r.median_s is not None:
                ratio = f"{r.median_s / base.median_s:.2f}x"
            tflops = "n/a" if r.tflops is None else f"{r.tflops:.4f}"
            gbps = "n/a" if r.gbps is None else f"{r.gbps:.1f}"
            lines.append(
                f"  {r.name:<34} {_fmt_time(r.median_s):>12} {_fmt_time(r.p99_s):>12} {r.rounds:>6} {ratio:>11} "
                f"{tflops:>9} {gbps:>7} {_fmt_bytes(r.peak_bytes):>12}"
            )
    return "\n".join(lines)


def save_run(results: list[Result], meta: dict, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = meta["time_utc"].replace(":", "").replace("-", "").replace("+0000", "Z")
    rows = [dict(asdict(r), tflops=r.tflops, gbps=r.gbps) for r in results]
    text = json.dumps({"metadata": meta, "results": rows}, indent=2)
    for attempt in itertools.count():  # two runs in one second each keep their own file
        path = directory / (f"run-{stamp}.json" if attempt == 0 else f"run-{stamp}-{attempt}.json")
        try:
            with path.open("x") as handle:
                handle.write(text)
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")
