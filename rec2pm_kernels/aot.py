"""Ahead-of-time compile check of every Triton kernel specialisation, without a GPU.

Why: the kernels are checked for numbers under ``TRITON_INTERPRET=1``, and the interpreter
forgives what a real compile does not (non-constexpr globals, dtype mismatches in
``tl.dot``), and says nothing about shared memory or registers.  ``triton.compile`` with a
``GPUTarget`` needs no GPU, so this module compiles every specialisation the public
functions can launch for ``sm_80`` and ``sm_90`` and fails on

* a compile error,
* shared memory (``metadata.shared``, which the compiler does not check) above the
  architecture's per-block limit (``SHARED_MEMORY_LIMIT`` in ``ops/triton_configs.py``),
* register spills (``STACK`` / ``LOCAL`` in ``cuobjdump -res-usage`` of the cubin), except
  ptxas's occupancy spills (below).

Occupancy spills.  Triton declares the block size (``.reqntid``), and the bundled ptxas
then aims at a register count that fits one more block per SM (e.g. 168, 128, 96, 80 or
72 registers at 4 warps) and may spill a few bytes to get there: the same PTX without the
block-size bound, or with another ``--register-usage-level``, compiles with more
registers and no spill.  Which configs get one is chaotic (one pattern of 16 at one head
dim), so no tile choice avoids them everywhere; they are reported and counted, and fail
the check only with ``--strict-spills``.  A spill is an occupancy spill when the kernel
stays below the 255-register cap and its stack is at most ``OCCUPANCY_SPILL_BYTES``;
anything else (the cap reached, or ptxas trading kilobytes for occupancy) is a
register-pressure spill and fails.

Usage::

    python -m rec2pm_kernels.aot [--subset] [--arch 80 90] [--jobs N] [--json FILE] [--strict-spills]
                                 [--shard I/N] [--order-from FILE [FILE ...]]
    python -m rec2pm_kernels.aot --merge FILE [FILE ...]

``--subset`` compiles a covering subset (every pattern, score, relative and timestamp bias
on/off, dropout on/off, precision, split count, dtype, head dim and config at least once
per architecture and kernel) instead of the full product.  Compiling is CPU bound, so
specialisations run in a process pool (``--jobs``, default: the CPU count).  Unless ``TRITON_CACHE_DIR`` is set, each
specialisation compiles into a scratch cache deleted right after: every specialisation is
really compiled, and neither the user's cache nor the disk fills with thousands of
kernels (about 0.6 MB each) this machine never runs.

The full product takes hours on a small machine.  ``--shard I/N`` compiles every N-th
specialisation from the I-th on (shards of one product are disjoint and together are all
of it), so that N machines or N runs share it; ``--merge`` reads their ``--json`` reports,
checks that they are the N shards of one product, each once, and prints the summary of
the whole.  The pool starts the slowest compiles first, so that its last minutes are not
one long compile after another on one process: by a tile-size heuristic, or, with
``--order-from``, by the seconds earlier reports measured for each kernel, target,
dtype, head dim and config (a later shard learns from an earlier one).

The arguments mirror the launchers (``ops/*/triton_backend.py``), packed into the kernels'
tuple parameters as ``ops/triton_args.py`` packs them: an absent pointer is a constexpr
``None``, ``cu_seqlens`` is int32 and the relative-position bias has the inputs' dtype.
Pointers carry the 16-byte alignment hint of fresh allocations, and strides the
divisibility-by-16 hint that a contiguous ``(tokens, heads, head_dim)`` layout gives when
``head_dim % 16 == 0``; that is the specialisation the launchers compile for the usual
contiguous inputs.  The sizes a model fixes (pattern sizes, bucket counts, HSTU's mask
sizes) compile as plain integers: the check covers the code for every value, where a run
may also fold a value of 1.  The dK/dV kernel's choice between atomic and deterministic
bias gradients is a runtime flag, so one binary serves both.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import torch

from .ops.triton_args import TUPLE_ARGS
from .ops.triton_codes import HSTU_CAUSAL_CODE, WRITES_BIAS_SUMS, WRITES_DQ
from .ops.triton_configs import (
    BIAS_WINDOW,
    MEASURED_HEAD_DIMS,
    SHARED_MEMORY_LIMIT,
    bias_grad_precision,
    configs,
    heaviness,
    padded_head_dim,
)
from .ops.triton_configs import KERNELS as TUNED_KERNELS
from .patterns import PATTERN_CODES, SCORE_CODES

ARCHS = (80, 90)
# The codes the launchers pass as PATTERN: the patterns, and causal refined by HSTU's masks.
PATTERNS = (*PATTERN_CODES.values(), HSTU_CAUSAL_CODE)
SCORES = tuple(SCORE_CODES.values())
SCORE_NAMES = {code: name for name, code in SCORE_CODES.items()}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HEAD_DIMS = MEASURED_HEAD_DIMS  # every head dim with a measured tile table
# The cached step compiles one binary without split-K and one with it (SPLIT_K); the number
# of splits is the grid's third dimension at run time, so 2 stands for every count > 1.
NUM_SPLITS = (1, 2)
KERNELS = TUNED_KERNELS  # every kernel that has a tile table
SEGMENT_KERNELS = tuple(kernel for kernel in KERNELS if kernel.startswith("segment_"))
# The switches a covering subset must show every value of, per architecture and kernel.
SWITCHES = ("pattern", "score", "has_bias", "has_time_bias", "has_dropout", "precision", "num_splits")

# Registers a thread can hold; a spill at this count is register pressure, not an occupancy choice.
REGISTER_CAP = 255
# Largest stack of an occupancy spill; the ones seen are 8 to 40 bytes, pressure spills reach kilobytes.
OCCUPANCY_SPILL_BYTES = 64

_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclasses.dataclass(frozen=True)
class Specialisation:
    """One compiled variant: kernel, compile-time switches, dtype, head dim, tile config, target."""

    kernel: str
    arch: int
    dtype: str
    head_dim: int
    pattern: int | None  # None for the cached step, which has no pattern
    score: int
    has_bias: bool
    has_time_bias: bool | None  # None for the cached step, which has no timestamp bias
    has_dropout: bool | None  # None for the cached step, which has no dropout
    precision: str
    num_splits: int | None  # cached step only
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @property
    def config(self) -> str:
        return f"M{self.block_m}_N{self.block_n}_w{self.num_warps}_s{self.num_stages}"

    def describe(self) -> str:
        switches = [
            f"pattern={self.pattern}" if self.pattern is not None else f"splits={self.num_splits}",
            f"score={SCORE_NAMES[self.score]}",
            f"bias={int(self.has_bias)}"
            + (f" time={int(self.has_time_bias)} drop={int(self.has_dropout)}" if self.has_dropout is not None else ""),
            self.precision,
        ]
        return (
            f"{self.kernel:<16} {' '.join(switches):<40} {self.dtype} d{self.head_dim:<3} "
            f"{self.config:<15} sm_{self.arch}"
        )


# ---------------------------------------------------------------------------------------
# Which specialisations exist


def _precisions(dtype: str) -> tuple[str, ...]:
    """``ieee`` always; fp32 may also opt in to TF32 (16-bit inputs ignore the flag)."""
    return ("ieee", "tf32") if dtype == "fp32" else ("ieee",)


def all_specialisations(archs=ARCHS) -> list[Specialisation]:
    """The full product the public functions can launch, every config ``configs()`` keeps."""
    out = []
    for arch, kernel, dtype, head_dim in itertools.product(archs, KERNELS, DTYPES, HEAD_DIMS):
        if kernel == "cached_step":
            biases = [(False, None), (True, None)]
            switches = itertools.product([None], SCORES, biases, [None], _precisions(dtype), NUM_SPLITS)
        else:
            # (relative bias, timestamp bias); the bias-gradient kernel runs only with one of them.
            biases = list(itertools.product((False, True), (False, True)))
            if kernel == "segment_bwd_bias":
                biases.remove((False, False))
            switches = itertools.product(PATTERNS, SCORES, biases, (False, True), _precisions(dtype), [None])
        for pattern, score, (has_bias, has_time_bias), has_dropout, precision, splits in switches:
            heavy = heaviness(pattern == HSTU_CAUSAL_CODE, bool(has_dropout), bool(has_time_bias))  # as the launchers
            for config in configs(kernel, DTYPES[dtype], head_dim, arch, heavy):
                tile = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
                out.append(
                    Specialisation(
                        kernel,
                        arch,
                        dtype,
                        head_dim,
                        pattern,
                        score,
                        has_bias,
                        has_time_bias,
                        has_dropout,
                        precision,
                        splits,
                        *tile,
                    )
                )
    return out


def covering_subset(specs: list[Specialisation]) -> list[Specialisation]:
    """A few specialisations that still show every dtype, head dim and config (each
    (dtype, head dim, config) at least once, since those decide shared memory and
    registers) and every switch value, per architecture and kernel.

    Greedy: for each (arch, kernel, dtype, head dim, config) take the variant that adds the
    most switch values not yet seen for its (arch, kernel), trying the variants from a
    rotating start so that ties spread over the combinations.  Then every variant
    ``at_the_register_edge``.
    """
    groups: dict[tuple, list[Specialisation]] = defaultdict(list)
    for spec in specs:
        groups[(spec.arch, spec.kernel, spec.dtype, spec.head_dim, spec.config)].append(spec)
    seen: dict[tuple, set] = defaultdict(set)
    chosen = []
    for index, (key, members) in enumerate(groups.items()):
        covered = seen[key[:2]]
        start = index % len(members)
        rotated = members[start:] + members[:start]
        best = max(rotated, key=lambda s: len(_switch_values(s) - covered))
        chosen.append(best)
        covered |= _switch_values(best)
    # Values only some groups offer (e.g. tf32, fp32 only) could in principle be missed.
    for spec in specs:
        missing = _switch_values(spec) - seen[(spec.arch, spec.kernel)]
        if missing:
            chosen.append(spec)
            seen[(spec.arch, spec.kernel)] |= missing
    return chosen + [spec for spec in specs if at_the_register_edge(spec) and spec not in chosen]


def at_the_register_edge(spec: Specialisation) -> bool:
    """The heaviest variants of the segment kernels: the largest head dim, the global pattern
    with SiLU, both biases and dropout, in 16-bit and in both fp32 precisions.  They sit near
    the register cap (249 to 255 registers), so a kernel change spills there first: the
    bias-gradient kernel did, and a subset that only covers switch values had missed it."""
    return (
        spec.kernel in SEGMENT_KERNELS
        and spec.head_dim == max(HEAD_DIMS)
        and spec.pattern == PATTERN_CODES["global"]
        and spec.score == SCORE_CODES["silu"]
        and spec.has_bias
        and spec.has_time_bias
        and spec.has_dropout
        and spec.dtype in ("fp32", "fp16")
    )


def _switch_values(spec: Specialisation) -> set:
    return {(name, getattr(spec, name)) for name in SWITCHES}


# ---------------------------------------------------------------------------------------
# Kernel arguments, mirroring the launchers


def _kernel_function(kernel: str):
    """The ``@triton.jit`` function; imported late so ``TRITON_INTERPRET`` is checked first."""
    if kernel == "cached_step":
        from .ops.cached_step.triton_kernel import cached_step_kernel

        return cached_step_kernel
    from .ops.segment_attention import triton_backward, triton_forward

    return {
        "segment_fwd": triton_forward.segment_fwd_kernel,
        "segment_bwd_dkdv": triton_backward.segment_bwd_dkdv_kernel,
        "segment_bwd_dq": triton_backward.segment_bwd_rows_kernel,  # WRITES_DQ
        "segment_bwd_bias": triton_backward.segment_bwd_rows_kernel,  # WRITES_BIAS_SUMS
    }[kernel]


def _pointer_types(spec: Specialisation) -> dict[str, str | None]:
    """Pointer arguments and their element types as the launchers pass them; ``None`` for a
    pointer the launcher leaves out (compiled as a constexpr ``None``)."""
    t = f"*{spec.dtype}"
    bias = t if spec.has_bias else None
    stats = "*fp32" if spec.score == SCORE_CODES["softmax"] else None  # SiLU has no row statistics
    if spec.kernel != "cached_step":
        segment = _segment_pointer_types(spec, t, bias, stats)
        return dict(segment, **_hstu_pointer_types(spec), **_time_pointer_types(spec))
    partial = "*fp32" if spec.num_splits > 1 else None  # one split writes OUT directly
    return dict(
        Q=t,
        K_CACHE=t,
        V_CACHE=t,
        OUT=t,
        PARTIAL_ACC=partial,
        PARTIAL_STATS=partial,
        CU_NEW="*i32",
        CACHE_SEQLENS="*i32",
        BIAS=bias,
    )


def _hstu_pointer_types(spec: Specialisation) -> dict[str, str | None]:
    """Candidate counts and per-sequence SiLU divisors: passed only under HSTU's masks."""
    hstu = spec.pattern == HSTU_CAUSAL_CODE
    return dict(NUM_TARGETS="*i32" if hstu else None, SILU_NORMS="*fp32" if hstu else None)


def _time_pointer_types(spec: Specialisation) -> dict[str, str | None]:
    """The timestamp table (the inputs' dtype) and the int64 timestamps, with a timestamp bias."""
    on = spec.has_time_bias
    return dict(
        TIME_BIAS=f"*{spec.dtype}" if on else None,
        TIMESTAMPS="*i64" if on else None,
        QUERY_TIMESTAMPS="*i64" if on else None,
        TIME_PARTIAL="*fp64" if on and spec.kernel == "segment_bwd_bias" else None,
    )


def _segment_pointer_types(spec: Specialisation, t: str, bias: str | None, stats: str | None) -> dict:
    if spec.kernel == "segment_fwd":
        return dict(Q=t, K=t, V=t, OUT=t, LSE=stats, CU_SEQLENS="*i32", BIAS=bias, TILE_COUNTS=None)
    if spec.kernel == "segment_bwd_dkdv":
        dbias = "*fp64" if spec.has_bias else None
        return dict(
            Q=t,
            K=t,
            V=t,
            DO=t,
            LSE=stats,
            DELTA=stats,
            DK=t,
            DV=t,
            DBIAS=dbias,
            CU_SEQLENS="*i32",
            BIAS=bias,
            TILE_COUNTS=None,
        )
    # The row-block kernel: dQ, or the bias tables' float64 partial sums (see the launcher).
    writes_dq = spec.kernel == "segment_bwd_dq"
    partial = "*fp64" if spec.has_bias and not writes_dq else None
    rows = dict(Q=t, K=t, V=t, DO=t, LSE=stats, DELTA=stats, CU_SEQLENS="*i32", BIAS=bias, TILE_COUNTS=None)
    return dict(rows, DQ=t if writes_dq else None, PARTIAL=partial)


def _constexprs(spec: Specialisation) -> dict:
    block_d = padded_head_dim(spec.head_dim)
    values = dict(
        HEAD_DIM=spec.head_dim,
        HEAD_DIM_V=spec.head_dim,
        BLOCK_D=block_d,
        BLOCK_DV=block_d,
        SCORE=spec.score,
        INPUT_PRECISION=spec.precision,
        BLOCK_M=spec.block_m,
        BLOCK_N=spec.block_n,
    )
    if spec.kernel == "cached_step":
        return dict(values, HAS_BIAS=spec.has_bias, SPLIT_K=spec.num_splits > 1)
    values.update(
        PATTERN=spec.pattern, HAS_BIAS=spec.has_bias, HAS_TIME_BIAS=spec.has_time_bias, HAS_DROPOUT=spec.has_dropout
    )
    values.update(COUNT_TILES=False)
    if spec.kernel == "segment_bwd_dq":
        return dict(values, WRITES=WRITES_DQ, WINDOW=BIAS_WINDOW)
    if spec.kernel == "segment_bwd_bias":  # compiled at the precision its launcher runs it at
        precision = bias_grad_precision(spec.precision, block_d, spec.has_bias, spec.has_time_bias)
        return dict(values, WRITES=WRITES_BIAS_SUMS, WINDOW=BIAS_WINDOW, INPUT_PRECISION=precision)
    return values


def _argument_type(name: str, pointers: dict, aligned_strides: bool) -> tuple[str, list | None]:
    """The type of one runtime value the launchers pass (by its flat name, ``ops/triton_args.py``)
    and its alignment hint: pointers carry the 16-byte hint of fresh allocations, strides the
    multiple-of-16 hint of a contiguous layout with ``head_dim % 16 == 0``."""
    if name in pointers:
        if pointers[name] is None:  # an absent pointer: a constexpr None
            return "constexpr", None
        return pointers[name], [["tt.divisibility", 16]]
    if name in ("scale", "silu_norm", "dropout_scale"):
        return "fp32", None
    # Every other value is an int32; the dropout words too (ops/triton_dropout.py passes them as int32 bits).
    return "i32", ([["tt.divisibility", 16]] if name.startswith("stride_") and aligned_strides else None)


def compile_source(spec: Specialisation):
    """``triton.compiler.ASTSource`` of ``spec``: signature, constexpr values and alignment hints.

    A tuple parameter (``ops/triton_args.py``) gets the tuple of its members' types; hints and
    absent pointers inside it are keyed by ``(parameter index, member index)``.
    """
    from triton.compiler import ASTSource

    fn = _kernel_function(spec.kernel)
    pointers = _pointer_types(spec)
    constexprs = _constexprs(spec)
    aligned_strides = spec.head_dim % 16 == 0
    signature, attrs, values = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            values[name] = constexprs[name]
            continue
        members = TUPLE_ARGS.get(name)
        kinds = []
        for member_index, member in enumerate(members or (name,)):
            key = (index, member_index) if members else (index,)
            kind, hint = _argument_type(member, pointers, aligned_strides)
            kinds.append(kind)
            if kind == "constexpr":
                values[key] = None
            if hint:
                attrs[key] = hint
        signature[name] = tuple(kinds) if members else kinds[0]
    missing = set(constexprs) - set(fn.arg_names)
    if missing:
        raise ValueError(f"{spec.kernel} has no constexpr {sorted(missing)}")
    return ASTSource(fn=fn, signature=signature, constexprs=values, attrs=attrs)


# ---------------------------------------------------------------------------------------
# Compiling and checking one specialisation (runs in the worker processes)


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``REG``, ``STACK`` and ``LOCAL`` of the kernel, from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        report = subprocess.run(
            [_cuobjdump(), "-res-usage", handle.name], capture_output=True, text=True, check=True
        ).stdout
    match = _RES_USAGE.search(report)
    if match is None:
        raise RuntimeError(f"no resource usage in cuobjdump output:\n{report}")
    return dict(registers=int(match[1]), stack=int(match[2]), local=int(match[4]))


def classify_spill(registers: int, stack: int, local: int) -> str | None:
    """``None`` without a spill, else ``"occupancy"`` or ``"pressure"`` (see the module docstring)."""
    if not stack and not local:
        return None
    if registers < REGISTER_CAP and stack <= OCCUPANCY_SPILL_BYTES and not local:
        return "occupancy"
    return "pressure"


def compile_and_measure(spec: Specialisation, scratch_cache: bool = False, strict_spills: bool = False) -> dict:
    """Compile ``spec``; returns its figures and the reasons it fails the check (if any).

    ``scratch_cache``: compile into a temporary ``TRITON_CACHE_DIR`` removed afterwards.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    result = dict(
        dataclasses.asdict(spec),
        config=spec.config,
        shared=None,
        registers=None,
        stack=None,
        local=None,
        spill=None,
        seconds=None,
        failures=[],
    )
    started = time.perf_counter()
    scratch = tempfile.TemporaryDirectory(prefix="rec2pm-aot-") if scratch_cache else None
    try:
        if scratch is not None:
            os.environ["TRITON_CACHE_DIR"] = scratch.name
        compiled = triton.compile(
            compile_source(spec),
            target=GPUTarget("cuda", spec.arch, 32),
            options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages),
        )
        result.update(shared=compiled.metadata.shared, **resource_usage(compiled.asm["cubin"]))
    except Exception as error:  # a compile error is a finding, not a crash of the check
        lines = [line for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
        result["failures"].append(f"compile error: {type(error).__name__}: {lines[-1].strip()}")
        result["error"] = str(error)
    finally:
        if scratch is not None:
            scratch.cleanup()
    result["seconds"] = round(time.perf_counter() - started, 2)
    if result["shared"] is not None:
        limit = SHARED_MEMORY_LIMIT[spec.arch]
        if result["shared"] > limit:
            result["failures"].append(f"shared memory {result['shared']} B > sm_{spec.arch} limit {limit} B")
        result["spill"] = classify_spill(result["registers"], result["stack"], result["local"])
        if result["spill"] == "pressure" or (result["spill"] and strict_spills):
            result["failures"].append(f"{result['spill']} spill: STACK {result['stack']} B, LOCAL {result['local']} B")
    return result


def format_result(spec: Specialisation, result: dict) -> str:
    if result["shared"] is None:
        figures = "-"
    else:
        figures = (
            f"shared {result['shared']:>6} B  regs {result['registers']:>3}  "
            f"stack {result['stack']}  local {result['local']}"
        )
    if result["failures"]:
        verdict = "FAIL: " + "; ".join(result["failures"])
    else:
        verdict = "ok (occupancy spill)" if result["spill"] else "ok"
    return f"{spec.describe()}  {figures}  {result['seconds']:5.1f}s  {verdict}"


# ---------------------------------------------------------------------------------------
# Driver


def _expected_cost(spec: Specialisation) -> float:
    """Rough compile cost, to start the slow compiles first and keep the pool busy to the end."""
    tile = spec.block_m * spec.block_n * padded_head_dim(spec.head_dim) / spec.num_warps
    return tile * (4 if spec.dtype == "fp32" and spec.precision == "ieee" else 1)


def _compile_class(spec: Specialisation) -> tuple:
    """What a compile's time depends on (the switches move it little; the kernel and tile a lot:
    ``segment_bwd_bias`` at M16_N16 with 8 warps takes 3-14 s, most others about 1 s)."""
    return (spec.kernel, spec.arch, spec.dtype, spec.head_dim, spec.config)


def _read_report(path: str, read):
    """``read(report)`` of one ``--json`` report; a file that is not one, or lacks what
    ``read`` takes from it, is a ``ValueError`` naming the file."""
    try:
        with open(path) as handle:
            return read(json.load(handle))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a report of `python -m rec2pm_kernels.aot --json` ({error})") from error


def measured_costs(paths: list[str]) -> dict[tuple, float]:
    """Median compile seconds per compile class in earlier ``--json`` reports (any shard,
    any product). Raises ``ValueError`` naming a file that is not such a report."""
    seconds: dict[tuple, list[float]] = defaultdict(list)

    def timed(report: dict) -> list[tuple[tuple, float]]:
        return [(_compile_class(_spec_of(row)), float(row["seconds"])) for row in report["results"]]

    for path in paths:
        for compile_class, spent in _read_report(path, timed):
            seconds[compile_class].append(spent)
    # The median: a compile that ran while the machine was busy or paused reads far too long.
    return {key: statistics.median(values) for key, values in seconds.items()}


def compile_order(specs: list[Specialisation], costs: dict[tuple, float] | None = None) -> list[Specialisation]:
    """The slowest compiles first, so that the pool's last minutes are not one long compile
    after another. With ``costs`` (``measured_costs``), by the measured seconds of each
    compile class, classes never measured first of all; without, by ``_expected_cost``."""
    if not costs:
        return sorted(specs, key=_expected_cost, reverse=True)
    return sorted(specs, key=lambda spec: costs.get(_compile_class(spec), math.inf), reverse=True)


def run_all(
    specs: list[Specialisation],
    jobs: int,
    scratch_cache: bool = False,
    strict_spills: bool = False,
    costs: dict[tuple, float] | None = None,
) -> list[dict]:
    """Compile ``specs`` in a pool of ``jobs`` processes, printing each line as it finishes."""
    ordered = compile_order(specs, costs)
    results: dict[Specialisation, dict] = {}
    context = multiprocessing.get_context("spawn")  # fresh workers: no forked torch/triton state
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(compile_and_measure, spec, scratch_cache, strict_spills): spec for spec in ordered}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            spec = futures[future]
            results[spec] = future.result()
            print(f"[{done:>4}/{len(specs)}] {format_result(spec, results[spec])}", flush=True)
    return [results[spec] for spec in specs]


def summarise(results: list[dict], wall_seconds: float) -> dict:
    """Per architecture: count, worst shared memory (and which), max registers, spills, failures."""
    by_arch = {}
    for arch in sorted({r["arch"] for r in results}):
        rows = [r for r in results if r["arch"] == arch]
        measured = [r for r in rows if r["shared"] is not None]
        worst_shared = max(measured, key=lambda r: r["shared"], default=None)
        most_registers = max(measured, key=lambda r: r["registers"], default=None)
        by_arch[arch] = dict(
            specialisations=len(rows),
            worst_shared=worst_shared and worst_shared["shared"],
            worst_shared_of=worst_shared and _label(worst_shared),
            shared_limit=SHARED_MEMORY_LIMIT[arch],
            max_registers=most_registers and most_registers["registers"],
            max_registers_of=most_registers and _label(most_registers),
            pressure_spills=sum(1 for r in measured if r["spill"] == "pressure"),
            occupancy_spills=sum(1 for r in measured if r["spill"] == "occupancy"),
            largest_occupancy_spill=max((r["stack"] for r in measured if r["spill"] == "occupancy"), default=0),
            compile_errors=sum(1 for r in rows if r["shared"] is None),
            failures=sum(1 for r in rows if r["failures"]),
        )
    return dict(
        archs=by_arch,
        specialisations=len(results),
        wall_seconds=round(wall_seconds, 1),
        failures=sum(1 for r in results if r["failures"]),
    )


def _spec_of(result: dict) -> Specialisation:
    """The specialisation a row of a ``--json`` report (or of ``run_all``) measured."""
    return Specialisation(**{field.name: result[field.name] for field in dataclasses.fields(Specialisation)})


def _label(result: dict) -> str:
    return _spec_of(result).describe()


def print_summary(summary: dict, failed: list[str]) -> None:
    print("\n=== summary ===")
    for arch, s in summary["archs"].items():
        print(
            f"sm_{arch}: {s['specialisations']} specialisations, worst shared memory {s['worst_shared']} B "
            f"of {s['shared_limit']} B ({s['worst_shared_of']}), max registers {s['max_registers']} "
            f"({s['max_registers_of']}), register-pressure spills {s['pressure_spills']}, occupancy spills "
            f"{s['occupancy_spills']} (largest {s['largest_occupancy_spill']} B), "
            f"compile errors {s['compile_errors']}"
        )
    print(
        f"total: {summary['specialisations']} specialisations, {summary['failures']} failing, "
        f"wall time {summary['wall_seconds']} s"
    )
    if failed:
        print(f"\n=== {len(failed)} failures ===")
        print("\n".join(failed))


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``1 <= I <= N``."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise argparse.ArgumentTypeError(f"--shard must be I/N with 1 <= I <= N (e.g. 2/4), got {text!r}")
    return int(match[1]), int(match[2])


def shard_of(specs: list[Specialisation], shard: tuple[int, int]) -> list[Specialisation]:
    """The specialisations of shard ``(I, N)``: every N-th from the I-th (the product's order
    interleaves kernels and configs, so each shard gets a share of the slow compiles)."""
    index, count = shard
    return specs[index - 1 :: count]


def merge_reports(paths: list[str]) -> tuple[dict, list[str]]:
    """The ``--json`` reports of the N shards of one product -> (summary, failure lines).

    Raises ``ValueError`` naming the file when a report is unreadable, comes from another
    product (architectures, subset) or shard count, repeats a shard, or when shards are
    missing or do not hold the specialisations their shard should."""

    def shard_fields(report: dict) -> tuple[tuple, list[dict], float]:
        run = report["run"]
        key = (tuple(run["archs"]), bool(run["subset"]), tuple(run["shard"]))
        return key, report["results"], float(report["summary"]["wall_seconds"])

    reports = [(path, *_read_report(path, shard_fields)) for path in paths]
    (first, (archs, subset, (_, count)), _, _) = reports[0]
    seen: dict[int, str] = {}
    for path, (other_archs, other_subset, (index, other_count)), _, _ in reports:
        if (other_archs, other_subset, other_count) != (archs, subset, count):
            raise ValueError(
                f"{path} is a shard of another run than {first}: archs {list(other_archs)}, subset "
                f"{other_subset}, {other_count} shards (against {list(archs)}, {subset}, {count})"
            )
        if index in seen:
            raise ValueError(f"{path} and {seen[index]} are both shard {index}/{count}")
        seen[index] = path
    missing = sorted(set(range(1, count + 1)) - set(seen))
    if missing:
        raise ValueError(f"shards {', '.join(f'{i}/{count}' for i in missing)} are missing")
    product = all_specialisations(archs)
    if subset:
        product = covering_subset(product)
    results = []
    for path, (_, _, shard), rows, _ in reports:
        expected = shard_of(product, shard)
        if [_spec_of(row) for row in rows] != expected:
            raise ValueError(f"{path}: its results are not the specialisations of shard {shard[0]}/{shard[1]}")
        results += rows
    summary = summarise(results, sum(wall for *_, wall in reports))  # the shards' wall times, added
    failed = [format_result(_spec_of(row), row) for row in results if row["failures"]]
    return summary, failed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rec2pm_kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", action="store_true", help="a covering subset instead of the full product")
    parser.add_argument(
        "--arch",
        type=int,
        nargs="+",
        default=list(ARCHS),
        choices=sorted(SHARED_MEMORY_LIMIT),
        help="compute capabilities to compile for (default: 80 90)",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPUs)")
    parser.add_argument("--json", metavar="FILE", help="write every result and the summary to FILE")
    parser.add_argument(
        "--strict-spills",
        action="store_true",
        help="fail on occupancy spills too (a few bytes ptxas spills to fit one more block per SM)",
    )
    parser.add_argument(
        "--shard", type=parse_shard, default=(1, 1), metavar="I/N", help="compile only shard I of N (default: 1/1)"
    )
    parser.add_argument(
        "--order-from",
        nargs="+",
        metavar="FILE",
        help="order the compiles by the seconds measured in earlier --json reports (e.g. another shard's)",
    )
    parser.add_argument(
        "--merge", nargs="+", metavar="FILE", help="summarise the --json reports of a run's N shards; compile nothing"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(
            "rec2pm_kernels.aot: TRITON_INTERPRET is set. @triton.jit reads it when the kernels are "
            "imported, so they would be interpreter functions that cannot be compiled; run this "
            "check in a process without TRITON_INTERPRET.",
            file=sys.stderr,
        )
        return 2
    if args.merge:
        try:
            summary, failed = merge_reports(args.merge)
        except ValueError as error:
            print(f"rec2pm_kernels.aot --merge: {error}", file=sys.stderr)
            return 2
        print_summary(summary, failed)
        return 1 if failed else 0
    try:
        costs = measured_costs(args.order_from) if args.order_from else None
    except ValueError as error:
        print(f"rec2pm_kernels.aot --order-from: {error}", file=sys.stderr)
        return 2
    specs = all_specialisations(tuple(args.arch))
    if args.subset:
        specs = covering_subset(specs)
    specs = shard_of(specs, args.shard)
    print(
        f"compiling {len(specs)} specialisations (shard {args.shard[0]}/{args.shard[1]}) for "
        f"{', '.join(f'sm_{a}' for a in args.arch)} with {args.jobs} processes",
        flush=True,
    )
    started = time.perf_counter()
    results = run_all(
        specs,
        max(1, args.jobs),
        scratch_cache=not os.environ.get("TRITON_CACHE_DIR"),
        strict_spills=args.strict_spills,
        costs=costs,
    )
    summary = summarise(results, time.perf_counter() - started)
    failed = [format_result(spec, result) for spec, result in zip(specs, results, strict=True) if result["failures"]]
    print_summary(summary, failed)
    if args.json:
        with open(args.json, "w") as handle:
            run = dict(archs=list(args.arch), subset=args.subset, shard=list(args.shard))
            json.dump(dict(run=run, summary=summary, results=results), handle, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
