"""Launching the Triton kernels: fixed config, or the autotuner on CUDA.

The autotuner runs only on CUDA (under ``TRITON_INTERPRET=1`` several configs cannot be
benchmarked), over ``configs(kernel, dtype, head_dim, arch)``, keyed on the power-of-two
bucket of the longest sequence plus the compile-time switches; so ragged batches reuse
both the compiled kernels and the tuning result.  ``REC2PM_AUTOTUNE_MAX_CONFIGS`` bounds
how many configs it tries.
"""

from __future__ import annotations

import os

import torch
import triton

from .triton_args import pack
from .triton_configs import autotune_configs, configs

# Autotune keys: the length bucket and every switch that changes the compiled code.
AUTOTUNE_KEY = [
    "SEQ_BUCKET",
    "HEAD_DIM",
    "HEAD_DIM_V",
    "PATTERN",
    "SCORE",
    "HAS_BIAS",
    "HAS_TIME_BIAS",
    "HAS_DROPOUT",
    "INPUT_PRECISION",
    "SPLIT_K",
]

# Runtime integers that change from batch to batch.  Triton would otherwise specialise
# them (separate binaries for a value of 1 or a multiple of 16), so a ragged batch could
# recompile.  Strides and the sizes a model fixes are specialised: they sit in the kernels'
# tuple arguments (``triton_args``), where ``do_not_specialize`` cannot reach.
SEGMENT_RUNTIME_INTS = ["total_tokens", "max_seqlen", "dropout_seed_step", "dropout_seed_high", "SEQ_BUCKET"]
CACHED_STEP_RUNTIME_INTS = ["total_new", "max_new", "SEQ_BUCKET"]


def input_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``tl.dot`` precision: exact fp32 products unless TF32 is asked for (16-bit inputs ignore it)."""
    return "tf32" if allow_tf32 and dtype == torch.float32 else "ieee"


_autotuned: dict[tuple, object] = {}
# While a list, every launch appends ``(kernel name, path notes)``: tests assert the path
# taken (which kernels ran, atomics on or off), which equal outputs alone cannot show.
launch_log: list[tuple[str, dict]] | None = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def length_bucket(max_len: int) -> int:
    """The autotuner's length key: ``max_len`` rounded up to a power of two (at least 16)."""
    return max(16, triton.next_power_of_2(max(int(max_len), 1)))


def device_arch(device: torch.device) -> int:
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def launch(
    kernel,
    name: str,
    grid,
    args: dict,
    constexprs: dict,
    *,
    dtype: torch.dtype,
    head_dim: int,
    device: torch.device,
    config: triton.Config | None = None,
    reset_to_zero: tuple[str, ...] = (),
    notes: dict | None = None,
    heavy: int = 0,
):
    """Run ``kernel[grid](**args, **constexprs)`` with ``config``, or the autotuned choice.

    ``args`` names every runtime argument (pointers, strides, lengths) flat, by the names
    ``triton_args.pack`` groups into the kernel's tuple parameters, so no launcher depends
    on the order of a kernel's signature.

    ``grid`` is a function of the config's meta-parameters (``BLOCK_M`` / ``BLOCK_N``).
    Without an explicit config, off CUDA the first of ``configs(...)`` runs.  ``notes``
    (runtime choices such as ``bias_atomics``) go to ``launch_log`` when it is recording.
    ``heavy``: how heavy the variant is (``triton_configs.heaviness``: HSTU's masks, its
    timestamp bias, dropout get ``configs``' smaller tiles or more warps).
    """
    if launch_log is not None:
        launch_log.append((name, dict(notes or {})))
    args = pack(kernel.arg_names, args)
    if config is None and device.type == "cuda" and not interpreting():
        arch = device_arch(device)
        key = (name, dtype, head_dim, arch, reset_to_zero, heavy)
        tuned = _autotuned.get(key)
        if tuned is None:
            keys = [k for k in AUTOTUNE_KEY if k in kernel.arg_names]
            tuned = triton.autotune(
                configs=autotune_configs(name, dtype, head_dim, arch, heavy),
                key=keys,
                reset_to_zero=list(reset_to_zero) or None,
            )(kernel)
            _autotuned[key] = tuned
        return tuned[grid](**args, **constexprs)
    if config is None:
        config = configs(name, dtype, head_dim, device_arch(device), heavy)[0]
    meta = dict(config.kwargs)
    return kernel[grid(meta)](**args, **constexprs, **meta, num_warps=config.num_warps, num_stages=config.num_stages)
