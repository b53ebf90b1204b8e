"""Tile configurations of the Triton kernels: one pure function for the autotuner and the tests.

``configs(kernel, dtype, head_dim, arch)`` lists the ``triton.Config``s of a kernel for one
dtype, head dim and GPU architecture (compute capability as ``major * 10 + minor``, e.g.
80 or 90).  The launchers use them (through the autotuner on CUDA), the interpreter tests
run every one, and the ahead-of-time compile check (``python -m rec2pm_kernels.aot``)
compiles every one, with every pattern, score and bias switch, for ``sm_80`` and ``sm_90``.

Why a measured table rather than a register estimate: whether a tile spills depends on
how ptxas allocates registers, and that is not a smooth function of the tile size.  fp32
inputs default to exact (``ieee``) products, which Triton compiles to FMA loops rather
than tensor-core MMAs and which need far smaller tiles than 16-bit inputs; sm_90 (wgmma)
and sm_80 (mma) differ; and near the 255-register cap one switch of sixteen decides.  So
each (kernel, fp32 or 16-bit, head dim, architecture) has the largest candidate tile that
compiled for *every* switch combination within shared memory and without a
register-pressure spill, measured with triton 3.6 by the compile check.  Only one tile per
cell: the full product already has 12,320 specialisations (about 1.2 s each, so two hours
on 2 cores; CI compiles the covering subset), and every extra tile multiplies it.  After a
kernel change, run
``python -m rec2pm_kernels.aot``; a config it reports as spilling goes down to the next
smaller tile here.

Heavier variants (HSTU's masks, its timestamp bias, dropout) hold more per score tile:
their rank, int64 time-gap and hash tiles.  For them (``heavy >= HEAVY``) a measured tile of
32 x 32 or more is halved along the score tile's inner side (keys for the row-block
kernels, rows for ``segment_bwd_dkdv``), which the compile check showed is what the largest
head dims need.  With the timestamp bias (``heavy == HEAVIEST``) a tile of 64 x 64 or more is
halved twice, and a tile too small to halve runs on 8 warps instead of 4: the 16-bit
forward tile at head dim 128 on sm_80, the fp32 dK/dV tile at head dim 64 and the
bias-gradient kernel's 16 x 16 (its sort of the time buckets) spilled at the register cap
otherwise.
"""

from __future__ import annotations

import os

import torch
import triton

KERNELS = ("segment_fwd", "segment_bwd_dkdv", "segment_bwd_dq", "segment_bwd_bias", "cached_step")  # launch order

# Largest dynamic shared memory one block may use (bytes), by compute capability.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DEFAULT_SHARED_MEMORY_LIMIT = 99 * 1024

# A bucket window of the deterministic bias kernel: covers every bucket of a 16 x 16 tile.
BIAS_WINDOW = 32

# Measured tiles (BLOCK_M, BLOCK_N, num_warps, num_stages): kernel -> inputs -> head dim ->
# (sm_80, sm_90).  fp16 and bf16 measure alike ("16-bit").  The deterministic bias kernel
# is 16 x 16 by design (its per-bucket sums build a (16, 16, BIAS_WINDOW) one-hot tile).
MEASURED_HEAD_DIMS = (8, 16, 32, 64, 128)
_MEASURED = {
    "segment_fwd": {
        "fp32": {
            8: ((64, 64, 8, 2), (128, 64, 8, 2)),
            16: ((128, 64, 8, 2), (128, 64, 8, 2)),
            32: ((32, 32, 4, 2), (32, 32, 4, 2)),
            64: ((32, 32, 4, 2), (32, 16, 4, 2)),
            128: ((32, 16, 4, 2), (16, 16, 4, 2)),
        },
        "16-bit": {
            8: ((128, 64, 8, 2), (128, 64, 8, 2)),
            16: ((128, 64, 8, 2), (128, 64, 8, 2)),
            32: ((128, 64, 8, 2), (128, 64, 8, 2)),
            64: ((64, 64, 8, 2), (128, 64, 8, 2)),
            128: ((64, 64, 8, 2), (64, 64, 8, 2)),
        },
    },
    "segment_bwd_dq": {
        "fp32": {
            8: ((64, 64, 8, 2), (64, 64, 8, 2)),
            16: ((64, 64, 8, 2), (64, 64, 8, 2)),
            32: ((32, 32, 4, 2), (32, 32, 4, 2)),
            64: ((32, 32, 4, 2), (16, 16, 4, 2)),
            128: ((32, 16, 4, 2), (16, 16, 4, 2)),
        },
        "16-bit": {
            8: ((64, 64, 4, 2), (64, 64, 4, 2)),
            16: ((64, 64, 4, 2), (64, 64, 4, 2)),
            32: ((64, 64, 4, 2), (64, 64, 4, 2)),
            64: ((64, 32, 4, 2), (64, 64, 4, 2)),
            128: ((32, 32, 4, 2), (64, 64, 8, 2)),
        },
    },
    "segment_bwd_dkdv": {
        "fp32": {
            8: ((16, 32, 4, 2), (16, 32, 4, 2)),
            16: ((32, 32, 4, 2), (32, 32, 4, 2)),
            # 16 x 32 spilled at the register cap with tf32 and a bias (SiLU on sm_80; the
            # timestamp bias with dropout on sm_90); 16 x 16 peaks at 168 registers
            32: ((16, 16, 4, 2), (16, 16, 4, 2)),
            # one stage, at 64 and 128: two left the global-pattern bias softmax at 255
            # registers and spilling on sm_90; one stage peaks at 168 (d64)
            64: ((16, 16, 4, 1), (16, 16, 4, 1)),
            128: ((16, 16, 8, 1), (16, 16, 8, 1)),
        },
        "16-bit": {
            8: ((64, 32, 4, 2), (32, 64, 4, 2)),
            16: ((64, 32, 4, 2), (32, 64, 4, 2)),
            32: ((32, 32, 4, 2), (32, 64, 4, 2)),
            64: ((32, 32, 4, 2), (32, 32, 4, 2)),
            128: ((16, 32, 4, 2), (32, 32, 4, 2)),
        },
    },
    "segment_bwd_bias": {
        inputs: {dim: ((16, 16, 4, 1), (16, 16, 4, 1)) for dim in MEASURED_HEAD_DIMS} for inputs in ("fp32", "16-bit")
    },
    "cached_step": {
        "fp32": {
            8: ((16, 128, 4, 2), (16, 128, 4, 2)),
            16: ((16, 128, 4, 2), (16, 128, 4, 2)),
            32: ((16, 128, 4, 2), (16, 128, 4, 2)),
            64: ((16, 64, 4, 2), (16, 64, 4, 2)),
            128: ((16, 64, 4, 2), (16, 64, 4, 2)),
        },
        "16-bit": {dim: ((16, 128, 4, 2), (16, 128, 4, 2)) for dim in MEASURED_HEAD_DIMS},
    },
}

# The smallest tile of each kernel: the fallback where the measured one cannot fit the
# shared memory of an architecture that was not measured (sm_86 / sm_89: 99 KiB).
_SMALLEST = {
    "segment_fwd": (16, 16, 4, 2),
    "segment_bwd_dq": (16, 16, 4, 2),
    "segment_bwd_dkdv": (16, 16, 8, 2),
    "segment_bwd_bias": (16, 16, 4, 1),
    "cached_step": (16, 64, 4, 2),
}


def padded_head_dim(head_dim: int) -> int:
    """Head dims are padded to a power of two, at least 16 (the smallest ``tl.dot`` size)."""
    return max(16, triton.next_power_of_2(head_dim))


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def shared_memory_estimate(
    kernel: str, block_m: int, block_n: int, stages: int, dtype: torch.dtype, head_dim: int
) -> int:
    """Upper bound on the bytes of shared memory a config needs: pipelined K/V (or Q/dO)
    tiles plus the staged operands.  The compiled kernels measure below it (the check
    reads ``metadata.shared``); it guards the architectures that were not measured."""
    e = _element_size(dtype)
    d = padded_head_dim(head_dim)
    if kernel == "segment_bwd_dkdv":
        # Q and dO tiles are pipelined; K and V stay in registers/shared once.
        return e * (stages * block_m * 2 * d + block_n * 2 * d + block_m * block_n)
    # Q (and dO) once; K and V pipelined; the probabilities staged for the second dot.
    return e * (block_m * 2 * d + stages * block_n * 2 * d + block_m * block_n)


def _measured_tile(kernel: str, dtype: torch.dtype, head_dim: int, arch: int) -> tuple[int, int, int, int]:
    """The measured tile of the nearest measured cell: the smallest measured head dim at
    least ``head_dim`` (so the same or a larger padded head dim), sm_90 for arch >= 90."""
    inputs = "fp32" if dtype == torch.float32 else "16-bit"
    dim = next((d for d in MEASURED_HEAD_DIMS if d >= head_dim), MEASURED_HEAD_DIMS[-1])
    return _MEASURED[kernel][inputs][dim][1 if arch >= 90 else 0]


def bias_grad_precision(precision: str, block_d: int, has_bias: bool, has_time_bias: bool) -> str:
    """The dot precision of the bias-gradient kernel for a call made at ``precision``.

    tf32 at a padded head dim of 128 or more runs in exact fp32 (``ieee``): there the
    kernel's 16 x 16 tile on tf32 tensor cores spilled at the register cap on sm_80 and
    sm_90 (255 registers, 8 to 32 bytes of stack, patterns that read the memory tokens),
    with both tables and, as the full compile check showed, with either table alone, while
    its exact-fp32 dots took 108 to 142 registers and no spill.  The kernel only recomputes
    scores for the tables' gradients, which exact fp32 makes no worse.  (It runs only with a
    table, so ``has_bias`` and ``has_time_bias`` no longer decide.)
    """
    if precision == "tf32" and (has_bias or has_time_bias) and block_d >= 128:
        return "ieee"
    return precision


# Tiles at least this large are halved for the heavy variants (see the module docstring).
HEAVY_HALVING_ELEMENTS = 32 * 32
# How heavy a variant is: plain; HSTU's masks or dropout; HSTU's timestamp bias.
LIGHT, HEAVY, HEAVIEST = 0, 1, 2


def heaviness(hstu_masks: bool, dropout: bool, time_bias: bool) -> int:
    """The ``heavy`` level of a variant with these switches, as the launchers pass it."""
    if time_bias:
        return HEAVIEST
    return HEAVY if hstu_masks or dropout else LIGHT


def configs(
    kernel: str, dtype: torch.dtype, head_dim: int, arch: int | None = None, heavy: int = LIGHT
) -> list[triton.Config]:
    """Configs of ``kernel`` for ``dtype`` and ``head_dim`` (the larger of the q/k and v
    head dims) on compute capability ``arch`` (default 90): the measured tile, or the
    kernel's smallest one where the measured tile's shared memory exceeds ``arch``'s limit.
    Head dims above 128 were not measured and reuse the head-dim-128 tile.  ``heavy``: the
    tile of a heavier variant (``LIGHT``, ``HEAVY`` or ``HEAVIEST``; see the module docstring).
    """
    if kernel not in _MEASURED:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    arch = 90 if arch is None else arch
    limit = SHARED_MEMORY_LIMIT.get(arch, DEFAULT_SHARED_MEMORY_LIMIT)
    block_m, block_n, warps, stages = _measured_tile(kernel, dtype, head_dim, arch)
    if arch not in (80, 90) and shared_memory_estimate(kernel, block_m, block_n, stages, dtype, head_dim) > limit:
        block_m, block_n, warps, stages = _SMALLEST[kernel]
    # HEAVY halves a tile of 32 x 32 or more once; HEAVIEST once more while it has 64 x 32.
    halvings = 0
    if heavy >= HEAVY and block_m * block_n >= HEAVY_HALVING_ELEMENTS:
        halvings = 2 if heavy == HEAVIEST and block_m * block_n >= 4 * HEAVY_HALVING_ELEMENTS else 1
    elif heavy == HEAVIEST and kernel != "cached_step":
        warps = max(warps, 8)
    for _ in range(halvings):
        if kernel == "segment_bwd_dkdv":
            block_m //= 2
        else:
            block_n //= 2
    return [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)]


def autotune_configs(
    kernel: str, dtype: torch.dtype, head_dim: int, arch: int, heavy: int = LIGHT
) -> list[triton.Config]:
    """``configs`` cut to the first ``REC2PM_AUTOTUNE_MAX_CONFIGS`` (if set): bounds tuning time."""
    out = configs(kernel, dtype, head_dim, arch, heavy)
    limit = os.environ.get("REC2PM_AUTOTUNE_MAX_CONFIGS")
    return out[: max(1, int(limit))] if limit else out


def config_key(config: triton.Config) -> str:
    kw = config.kwargs
    return f"M{kw['BLOCK_M']}_N{kw['BLOCK_N']}_w{config.num_warps}_s{config.num_stages}"
