"""Which backends this installation can run, and the choice behind ``backend="auto"``."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import _extension

BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")
OPS = ("segment_attention", "cached_step_attention")


@dataclass(frozen=True)
class BackendStatus:
    """``ops`` lists the public ops this backend implements here; ``reason`` says why not, if not."""

    name: str
    available: bool
    ops: tuple[str, ...]
    reason: str


def triton_interpreting() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors through the interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# Filled once per (cuda, interpreting); a plain dict rather than lru_cache so that
# torch.compile traces the lookup without warnings.
_TRITON_STATUS: dict[tuple[bool, bool], BackendStatus] = {}


def _triton_status(cuda: bool, interpreting: bool) -> BackendStatus:
    key = (cuda, interpreting)
    if key not in _TRITON_STATUS:
        _TRITON_STATUS[key] = _probe_triton(cuda, interpreting)
    return _TRITON_STATUS[key]


def _probe_triton(cuda: bool, interpreting: bool) -> BackendStatus:
    try:
        import triton
    except ImportError as exc:
        return BackendStatus("triton", False, (), f"triton is not importable ({exc})")
    if not (cuda or interpreting):
        return BackendStatus(
            "triton",
            False,
            (),
            f"triton {triton.__version__} needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)",
        )
    where = "CUDA" if cuda else "CPU tensors through the interpreter (TRITON_INTERPRET=1)"
    return BackendStatus("triton", True, OPS, f"triton {triton.__version__} on {where}")


_CPP_STATUS: list[BackendStatus] = []  # the extension does not change within a process


def _cpp_status() -> BackendStatus:
    if not _CPP_STATUS:
        _CPP_STATUS.append(_probe_cpp())
    return _CPP_STATUS[0]


def _probe_cpp() -> BackendStatus:
    if _extension.C is None:
        return BackendStatus(
            "cpp", False, (), f"the extension rec2pm_kernels._C is not built: {_extension.IMPORT_ERROR}"
        )
    if not hasattr(_extension.C, "segment_attention_forward"):
        return BackendStatus(
            "cpp",
            False,
            (),
            "rec2pm_kernels._C is built without attention kernels (rebuild it: pip install --no-build-isolation -e .)",
        )
    return BackendStatus(
        "cpp",
        True,
        OPS,
        "rec2pm_kernels._C on CPU tensors: forward only (no gradients), fp32/fp64 "
        "math (fp16/bf16 inputs computed in fp32)",
    )


_CUDA_STATUS: dict[bool, BackendStatus] = {}  # by whether a CUDA device is present


def _cuda_status(device_present: bool) -> BackendStatus:
    if device_present not in _CUDA_STATUS:
        _CUDA_STATUS[device_present] = _probe_cuda(device_present)
    return _CUDA_STATUS[device_present]


def _probe_cuda(device_present: bool) -> BackendStatus:
    if _extension.C is None or not getattr(_extension.C, "with_cuda", False):
        return BackendStatus(
            "cuda",
            False,
            (),
            "rec2pm_kernels._C is built without CUDA kernels (they build where torch has CUDA and nvcc is found)",
        )
    if not device_present:
        return BackendStatus("cuda", False, (), "rec2pm_kernels._C has CUDA kernels, but no CUDA device is present")
    return BackendStatus(
        "cuda",
        True,
        OPS,
        "rec2pm_kernels._C CUDA kernels: forward only; segment_attention without HSTU's masks, ts_bias "
        "or dropout (short blocks such as the memory update); auto keeps triton on CUDA",
    )


_TORCH_STATUS = BackendStatus("torch", True, OPS, f"torch {torch.__version__}")


def _status(name: str) -> BackendStatus:
    """One backend's status, from the per-process caches (every attention call asks)."""
    if name == "triton":
        return _triton_status(torch.cuda.is_available(), triton_interpreting())
    if name == "cuda":
        return _cuda_status(torch.cuda.is_available())
    return _cpp_status() if name == "cpp" else _TORCH_STATUS


def backends() -> dict[str, BackendStatus]:
    """Status of every backend: ``{"torch": BackendStatus(...), "triton": ..., "cpp": ..., "cuda": ...}``.

    >>> rec2pm_kernels.backends()["cpp"].reason
    """
    return {name: _status(name) for name in BACKENDS[1:]}


# Softmax over long causal-like sequences (causal, global) is faster through SDPA's fused
# kernel (the torch backend) than through the C++ row kernel, and the sooner the wider the
# heads; everything else without gradients is faster in C++.  Measured side by side on 2
# CPU cores (fp32, 2 sequences x 4 heads, forward only), the row kernel's speed-up over torch
# for causal softmax:
#   head dim 8:   2.9x at 204 tokens, 2.1x at 512, 1.8x at 1k;
#   head dim 16:  2.2x at 204, 1.2x at 512, 0.96-1.2x at 1k, 0.95x at 2k, 0.65-0.77x at 4k;
#   head dim 32:  1.4x at 256-384, 0.87x at 512, 0.58x at 1k;
#   head dim 64:  1.9x at 256, 1.4x at 384, 0.79x at 512, 0.52x at 1k;
#   head dim 128: 1.1x at 256, 1.0x at 384.
# kv_memory_* at head dim 64: 1.9x at 1k, 2.9x at 4k; SiLU: 2.5x at head dim 16, 1.0x at 64
# (1k tokens).  The [M ; 200] serving blocks (HSTU 8 x 8, SASRec 4 x 16) are well inside.
# Plain causal attention computed in fp32 at head dims 8 and 16 takes the lane kernel
# (csrc/cpu/causal_lanes.cpp) instead.  Its AVX-512 build is faster than torch at every
# length measured (same setup, causal softmax): head dim 8 4.3x at 204 tokens, 3.0x at 1k,
# 2.9x at 4k; head dim 16 3.5x at 204, 1.7x at 1k, 1.5x at 2k and 4k.  Its portable build
# (CPUs without AVX-512) is about half as fast, so there the row kernel's limits stand.
CPP_SOFTMAX_MAX_LEN = 512  # head dims up to CPP_NARROW_HEAD_DIM
CPP_NARROW_HEAD_DIM = 16
CPP_SOFTMAX_MAX_LEN_WIDE = 384  # wider heads
CPP_LANE_HEAD_DIMS = (8, 16)  # causal_lanes_support in csrc/cpu/causal_lanes.cpp (a test ties the two)


def cpp_row_lanes(pattern: str, head_dim: int, value_dim: int, dtype: torch.dtype, plain: bool = True) -> bool:
    """Whether a C++ ``segment_attention`` call runs the lane kernel: the causal pattern
    without HSTU's masks or timestamp bias (``plain``), computed in fp32 (fp32, fp16 and
    bf16 inputs), equal query and value head dims of 8 or 16."""
    return (
        plain
        and pattern == "causal"
        and dtype in (torch.float32, torch.float16, torch.bfloat16)
        and head_dim == value_dim
        and head_dim in CPP_LANE_HEAD_DIMS
    )


def cpp_lanes_use_avx512() -> bool:
    """Whether the lane kernel runs its AVX-512 build here (asked on every call: tests can
    force the portable one)."""
    C = _extension.C
    return C is not None and hasattr(C, "causal_lanes_use_avx512") and C.causal_lanes_use_avx512()


def cpp_preferred(score: str, pattern: str, max_seqlen: int, head_dim: int, *, row_lanes: bool = False) -> bool:
    """Whether ``auto`` runs a forward-only CPU ``segment_attention`` call in C++.
    ``head_dim``: the wider of the query/key and value head dims; ``row_lanes``: the call
    takes the lane kernel (``cpp_row_lanes``)."""
    if score == "silu" or pattern.startswith("kv_memory") or (row_lanes and cpp_lanes_use_avx512()):
        return True
    limit = CPP_SOFTMAX_MAX_LEN if head_dim <= CPP_NARROW_HEAD_DIM else CPP_SOFTMAX_MAX_LEN_WIDE
    return max_seqlen <= limit


def _auto_choice(device: torch.device, needs_grad: bool, dtype: torch.dtype, prefer_cpp: bool) -> str:
    fast_dtype = dtype in (torch.float16, torch.bfloat16, torch.float32)
    if device.type == "cuda" and fast_dtype and _status("triton").available:
        return "triton"
    if device.type == "cpu" and not needs_grad and prefer_cpp and _cpp_status().available:
        return "cpp"
    return "torch"


# The compiled forward-only backends: the device type each runs on, and the backend that
# gives gradients there.
FORWARD_ONLY = {"cpp": ("cpu", "torch"), "cuda": ("cuda", "triton")}


def resolve_backend(
    requested: str,
    op: str,
    device: torch.device,
    needs_grad: bool,
    dtype: torch.dtype = torch.float32,
    prefer_cpp: bool = True,
) -> str:
    """The backend that runs ``op``: the requested one if it can, else a clear ``ValueError``.

    ``auto`` picks ``triton`` for CUDA tensors of fp16, bf16 or fp32 when Triton is
    installed; on the CPU ``cpp`` when no gradient is needed, the extension is built and
    ``prefer_cpp`` (see ``cpp_preferred``), else ``torch``.  ``triton`` takes CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1``; ``cpp`` takes CPU tensors and no gradients; ``cuda`` (the compiled
    CUDA kernels) CUDA tensors and no gradients.  ``auto`` does not pick ``cuda``: its kernels are
    checked against the oracle by ``benchmarks/gpu.sh`` on a GPU, and ``auto`` keeps ``triton``
    until that check has passed and its timings favour them.
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        return _auto_choice(device, needs_grad, dtype, prefer_cpp)
    status = _status(requested)
    if op not in status.ops:
        raise ValueError(f"backend={requested!r} cannot run {op} here: {status.reason}")
    if requested in FORWARD_ONLY:
        device_type, gradients_on = FORWARD_ONLY[requested]
        if device.type != device_type:
            raise ValueError(f"backend={requested!r} runs on {device_type.upper()} tensors, got tensors on {device}")
        if needs_grad:
            raise ValueError(
                f"backend={requested!r} is forward only, but an input of {op} requires grad; use "
                f"backend={gradients_on!r} (or 'auto', which picks it) for gradients, or call it under torch.no_grad()"
            )
    if requested == "cuda" and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"backend='cuda' takes float32, float16 or bfloat16 tensors, got {dtype}")
    if requested == "triton" and not (device.type == "cuda" or (device.type == "cpu" and triton_interpreting())):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got tensors on {device}"
        )
    return requested
