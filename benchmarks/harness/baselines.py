"""The device a benchmark runs on, and the reference attention implementations it is compared with.

* device and dtype: CUDA in bf16 when a GPU is present, else CPU in fp32.
* SDPA: ``F.scaled_dot_product_attention``, forced onto the FlashAttention backend for
  fp16/bf16 CUDA tensors (plain SDPA otherwise).
* flash-attn: its varlen and KV-cache functions, when the package is importable.
* FlexAttention: ``flex_attention`` compiled with ``torch.compile``, with a ``mask_mod`` that
  is ``rec2pm_kernels.patterns.visible`` itself, so it applies exactly the library's rule.
  CUDA only (see ``flex_skip_reason``).
* the ``triton`` backend: CUDA only, never the interpreter (see ``triton_skip_reason``).

Each ``*_skip_reason`` returns ``None`` when the implementation can run, else the reason a
case passes to ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import importlib.util
from functools import cache, lru_cache

import torch
import torch.nn.functional as F

from rec2pm_kernels import backends
from rec2pm_kernels.patterns import visible

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLEX_RECOMPILE_LIMIT = 128  # one compiled kernel per (pattern, length, head dim, batch, grad) of a full run


def bench_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def bench_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def sdpa_backend_name(device: torch.device, dtype: torch.dtype) -> str:
    return "flash" if device.type == "cuda" and dtype in HALF_DTYPES else "default"


def sdpa_context(device: torch.device, dtype: torch.dtype):
    """Force SDPA's FlashAttention kernel for fp16/bf16 on CUDA; leave SDPA's own choice otherwise."""
    if sdpa_backend_name(device, dtype) == "flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    return contextlib.nullcontext()


def sdpa(q, k, v, *, is_causal: bool) -> torch.Tensor:
    """SDPA on ``(batch, heads, tokens, head_dim)`` tensors (see ``sdpa_context``)."""
    with sdpa_context(q.device, q.dtype):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def flash_attn_skip_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"flash-attn runs on CUDA only (device here: {device.type})"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    return None


def triton_skip_reason(device: torch.device) -> str | None:
    status = backends()["triton"]
    if device.type != "cuda":
        if status.available:  # CPU tensors under TRITON_INTERPRET=1: not a timing
            return "triton: benchmarks time compiled kernels on CUDA only, never the interpreter (TRITON_INTERPRET=1)"
        return f"triton backend unavailable: {status.reason}"
    if not status.available:
        return f"triton backend unavailable: {status.reason}"
    return None


def flex_skip_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        # Measured on a 2-core CPU with torch 2.13: compiling one forward shape takes ~30 s, and
        # flex_attention refuses inputs that require grad on CPU.
        return "FlexAttention runs on CUDA only here: on CPU it has no backward and torch.compile takes ~30 s per shape"
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    return None


@cache
def compiled_flex_attention():
    """``torch.compile(flex_attention)``, static shapes, with room for every shape of a full run."""
    import torch._dynamo.config as dynamo_config
    from torch.nn.attention.flex_attention import flex_attention

    for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), FLEX_RECOMPILE_LIMIT))
            break
    return torch.compile(flex_attention, dynamic=False)


def pattern_mask_mod(pattern: str, segment_len: int | None, num_memory_tokens: int | None):
    """FlexAttention ``mask_mod`` of a Rec2PM pattern: the library's own rule, on in-sequence positions."""

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(pattern, q_idx, kv_idx, segment_len, num_memory_tokens)

    mask_mod.__name__ = f"rec2pm_{pattern}"
    return mask_mod


@lru_cache(maxsize=32)
def flex_block_mask(pattern: str, length: int, segment_len: int | None, num_memory_tokens: int | None, device: str):
    """Block mask of one pattern over sequences of ``length`` tokens (shared by every batch row and head)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(
        pattern_mask_mod(pattern, segment_len, num_memory_tokens), None, None, length, length, device=device
    )
