"""Which backends this installation can run, and the choice behind ``backend="auto"``."""

from __future__ import annotations

import os
from dataclasses import dataclass
import torch

from . import _extension

BACKENDS = ("auto", "torch", "triton", "cpp")
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
        return BackendStatus("triton", False, (),
                             f"triton {triton.__version__} needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)")
    where = "CUDA" if cuda else "CPU tensors through the interpreter (TRITON_INTERPRET=1)"
    return BackendStatus("triton", True, OPS, f"triton {triton.__version__} on {where}")


def _cpp_status() -> BackendStatus:
    if _extension.C is None:
        return BackendStatus("cpp", False, (), f"the extension rec2pm_kernels._C is not built: {_extension.IMPORT_ERROR}")
    return BackendStatus("cpp", False, (),
                         "rec2pm_kernels._C is built (utility ops: " + ", ".join(_extension.utility_ops())
                         + ") but has no attention kernels yet")


def backends() -> dict[str, BackendStatus]:
    """Status of every backend: ``{"torch": BackendStatus(...), "triton": ..., "cpp": ...}``.

    >>> rec2pm_kernels.backends()["cpp"].reason
    """
    return {
        "torch": BackendStatus("torch", True, OPS, f"torch {torch.__version__}"),
        "triton": _triton_status(torch.cuda.is_available(), triton_interpreting()),
        "cpp": _cpp_status(),
    }


def resolve_backend(requested: str, op: str, device: torch.device, needs_grad: bool,
                    dtype: torch.dtype = torch.float32) -> str:
    """The backend that runs ``op``: the requested one if it can, else a clear ``ValueError``.

    ``auto`` picks ``triton`` for CUDA tensors of fp16, bf16 or fp32 when Triton is
    installed, else ``torch`` (the C++ extension has no attention kernels yet).
    ``triton`` takes CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        fast_dtype = dtype in (torch.float16, torch.bfloat16, torch.float32)
        if device.type == "cuda" and fast_dtype and backends()["triton"].available:
            return "triton"
        return "torch"
    status = backends()[requested]
    if op not in status.ops:
        raise ValueError(f"backend={requested!r} cannot run {op} here: {status.reason}")
    if requested == "triton" and not (device.type == "cuda" or (device.type == "cpu" and triton_interpreting())):
        raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                         f"got tensors on {device}")
    return requested
