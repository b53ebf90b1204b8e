"""The fingerprint of a model: which weights and configuration wrote a memory."""

from __future__ import annotations

import dataclasses
import hashlib

import torch

from ..config import KernelOptions


def model_fingerprint(model: torch.nn.Module) -> str:
    """32 hex digits over the method, config, options and every weight (name, dtype, shape, bytes).

    Any change of weights, C, d, mode or backbone changes it, so a stored memory is never
    read back by a model that would interpret it differently; the kernel options do not.
    """
    digest = hashlib.blake2b(digest_size=16)
    # Kernel options (backend, TF32, determinism) change how attention runs, not what a memory means.
    config = dataclasses.replace(model.config, kernels=KernelOptions())
    for part in (getattr(model, "method", type(model).__name__), repr(config), repr(model.options)):
        digest.update(part.encode())
        digest.update(b"\0")
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
