"""Which backends this installation can run, and the choice behind ``backend="auto"``."""

from __future__ import annotations

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


def _triton_status() -> BackendStatus:
    try:
        import triton
    except ImportError as exc:
        return BackendStatus("triton", False, (), f"triton is not importable ({exc})")
    return BackendStatus("triton", False, (),
                         f"triton {triton.__version__} is importable, but this build has no Triton attention kernels yet")


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
        "triton": _triton_status(),
        "cpp": _cpp_status(),
    }


def resolve_backend(requested: str, op: str, device: torch.device, needs_grad: bool) -> str:
    """The backend that runs ``op``: the requested one if it can, else a clear ``ValueError``.

    ``auto`` picks the fastest available backend for the device and for whether gradients
    are needed; in this build that is always ``torch``.
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        return "torch"
    status = backends()[requested]
    if op not in status.ops:
        raise ValueError(f"backend={requested!r} cannot run {op} here: {status.reason}")
    return requested
