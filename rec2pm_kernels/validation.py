"""Argument checks for the public functions.

Two levels:

* *structure* checks (types, ranks, shapes, dtypes, devices, option names) are free and
  always run;
* *value* checks read tensor contents (``cu_seqlens`` order, ``max_seqlen``, complete write
  blocks, cache capacity, finiteness).  On CPU they always run.  On CUDA they would force a
  device synchronisation, so they run only with ``validate=True`` or the environment
  variable ``REC2PM_VALIDATE=1``.  They never run while ``torch.compile`` traces.

Every error names the argument and says what was expected.
"""

from __future__ import annotations

import math
import os
from numbers import Real

import torch

from .patterns import INTERLEAVED_PATTERNS, PATTERNS, SCORES, ends_inside_write_block

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def should_check_values(device: torch.device, validate: bool | None) -> bool:
    """Whether value checks (which read tensor contents) run for this call."""
    if torch.compiler.is_compiling():
        return False
    if validate is not None:
        return bool(validate)
    if device.type == "cpu":
        return True
    return os.environ.get("REC2PM_VALIDATE", "0") not in ("", "0")


def check_tensor(name: str, x, *, rank: int, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")


def check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], what: str) -> None:
    """All tensors share ``what`` ('dtype' or 'device')."""
    first = getattr(tensors[0], what)
    for name, t in zip(names[1:], tensors[1:]):
        if getattr(t, what) != first:
            raise (TypeError if what == "dtype" else ValueError)(
                f"{name} must have the same {what} as {names[0]} ({first}), got {getattr(t, what)}"
            )


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_qkv(names: tuple[str, str, str], q, k, v) -> None:
    """``q, k``: ``(tokens, heads, head_dim)``; ``v``: ``(tokens, heads, head_dim_v)``."""
    for name, x in zip(names, (q, k, v)):
        check_tensor(name, x, rank=3)
    check_same(names, (q, k, v), "dtype")
    check_same(names, (q, k, v), "device")
    if k.shape != q.shape:
        raise ValueError(f"{names[1]} must have the shape of {names[0]} {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"{names[2]} must have shape ({q.shape[0]}, {q.shape[1]}, head_dim_v) to match {names[0]} "
            f"(tokens, heads), got {tuple(v.shape)}"
        )
    if q.shape[1] < 1 or q.shape[2] < 1 or v.shape[2] < 1:
        raise ValueError(f"heads and head dims must be >= 1, got {names[0]} {tuple(q.shape)}, {names[2]} {tuple(v.shape)}")


def check_score_options(score, scale, silu_norm, rel_bias, heads: int, q: torch.Tensor) -> tuple[float, float | None]:
    """Returns ``(scale, silu_norm)`` with the default scale filled in."""
    check_choice("score", score, SCORES)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite number or None, got {scale!r}")
    if score == "silu":
        if silu_norm is None:
            raise ValueError("silu_norm is required for score='silu' (HSTU uses its maximum sequence length)")
        if isinstance(silu_norm, bool) or not isinstance(silu_norm, Real) or not math.isfinite(silu_norm) or silu_norm <= 0:
            raise ValueError(f"silu_norm must be a finite number > 0, got {silu_norm!r}")
        silu_norm = float(silu_norm)
    elif silu_norm is not None:
        raise ValueError(f"silu_norm applies only to score='silu', got silu_norm={silu_norm!r} with score={score!r}")
    if rel_bias is not None:
        check_tensor("rel_bias", rel_bias, rank=2)
        if rel_bias.shape[0] != heads or rel_bias.shape[1] < 1:
            raise ValueError(f"rel_bias must have shape (heads={heads}, num_buckets>=1), got {tuple(rel_bias.shape)}")
        if rel_bias.device != q.device:
            raise ValueError(f"rel_bias must be on {q.device}, got {rel_bias.device}")
    return float(scale), silu_norm


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device) -> None:
    check_tensor(name, cu, rank=1, dtypes=INDEX_DTYPES)
    if cu.device != device:
        raise ValueError(f"{name} must be on {device}, got {cu.device}")
    if cu.numel() < 1:
        raise ValueError(f"{name} must have shape (batch + 1,) with at least one entry, got shape (0,)")


def check_cu_seqlens_values(name: str, cu: torch.Tensor, total: int, tensor_name: str) -> torch.Tensor:
    """Returns the sequence lengths (on ``cu``'s device)."""
    if int(cu[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(cu[0])}")
    lengths = cu[1:] - cu[:-1]
    if lengths.numel() and bool((lengths < 0).any()):
        bad = int(torch.nonzero(lengths < 0)[0, 0])
        raise ValueError(f"{name} must be non-decreasing, but {name}[{bad + 1}] < {name}[{bad}]")
    if int(cu[-1]) != total:
        raise ValueError(f"{name}[-1] must equal the number of tokens in {tensor_name} ({total}), got {int(cu[-1])}")
    return lengths


def check_max_seqlen(name: str, max_seqlen, lengths: torch.Tensor | None) -> int:
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"{name} must be an int, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"{name} must be >= 0, got {max_seqlen}")
    if lengths is not None and lengths.numel():
        longest = int(lengths.max())
        if longest > max_seqlen:
            raise ValueError(f"{name}={max_seqlen} is smaller than the longest sequence ({longest})")
    return max_seqlen


def check_finite(names: tuple[str, ...], tensors: tuple[torch.Tensor | None, ...]) -> None:
    for name, t in zip(names, tensors):
        if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf")


def check_pattern(pattern, segment_len, num_memory_tokens) -> None:
    check_choice("pattern", pattern, PATTERNS)
    if pattern in INTERLEAVED_PATTERNS:
        if segment_len is None or num_memory_tokens is None:
            raise ValueError(f"pattern={pattern!r} needs segment_len (S) and num_memory_tokens (C)")
        check_positive_int("segment_len", segment_len)
        check_positive_int("num_memory_tokens", num_memory_tokens)
    elif segment_len is not None or num_memory_tokens is not None:
        raise ValueError(
            "segment_len and num_memory_tokens apply only to the interleaved patterns "
            f"{INTERLEAVED_PATTERNS}; pass None with pattern='causal'"
        )


def check_write_blocks(lengths: torch.Tensor, segment_len: int, num_memory_tokens: int) -> None:
    bad = ends_inside_write_block(lengths, segment_len, num_memory_tokens)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"cu_seqlens: sequence {i} (length {int(lengths[i])}) ends inside a write block "
            f"(segment_len={segment_len}, num_memory_tokens={num_memory_tokens}); a sequence must end "
            "on an item or after a complete write block"
        )
