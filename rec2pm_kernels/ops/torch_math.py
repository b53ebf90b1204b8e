"""Batched masked attention math shared by the PyTorch backends."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9  # a step constant that keeps zero inputs from hashing to zero
MIX_1, MIX_2 = 0x85EBCA6B, 0xC2B2AE35  # MurmurHash3's finaliser multipliers


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2**32).  The
    products wrap, and the low 32 bits they keep are exact whatever the sign."""
    x = x ^ (x >> 16)
    x = (x * MIX_1) & MASK32
    x = x ^ (x >> 13)
    x = (x * MIX_2) & MASK32
    return x ^ (x >> 16)


def dropout_seed_words(seed: int) -> tuple[int, int]:
    """``(step, high)``: the 32-bit words the draw mixes in, from the low and high halves of the seed."""
    return ((seed & MASK32) + GOLDEN32) & MASK32, (seed >> 32) & MASK32


def dropout_threshold(dropout_p: float) -> int:
    """A weight is kept when its 32-bit hash is at least this."""
    return int(dropout_p * 2**32)


def dropout_keep(seed: int, row_tokens: torch.Tensor, cols: torch.Tensor, heads: int, dropout_p: float) -> torch.Tensor:
    """``(G, heads, R, K)`` bool: which attention weights dropout keeps.

    A counter-based draw, a hash of (seed, packed row index, key position, head), so the mask
    of a weight is the same however rows are grouped and chunked, and recomputing a chunk in
    backward redraws it exactly.  ``row_tokens (G, R)``: packed indices of the rows; ``cols
    (K,)``: key positions inside the sequence.
    """
    step, high = dropout_seed_words(seed)
    h = _mix32((row_tokens.to(torch.int64) ^ step) & MASK32)[:, None, :, None]
    h = _mix32(((h + GOLDEN32) ^ cols.to(torch.int64)) & MASK32)
    head = torch.arange(heads, device=cols.device, dtype=torch.int64)[None, :, None, None]
    h = _mix32(((h + GOLDEN32) ^ head ^ high) & MASK32)
    return h >= dropout_threshold(dropout_p)


def masked_attention(
    q,
    k,
    v,
    mask,
    bias,
    *,
    score: str,
    scale: float,
    silu_norm: float | torch.Tensor | None,
    keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    fused: bool = True,
) -> torch.Tensor:
    """``q (..., H, R, D)``, ``k (..., H, K, D)``, ``v (..., H, K, Dv)``; ``mask`` (bool; ``None``:
    every key visible), ``bias`` and ``silu_norm`` (a number or a tensor) broadcast to
    ``(..., H, R, K)``; ``keep`` (bool, that shape) drops the weights where it is False and
    scales the rest by ``1 / (1 - dropout_p)``.  Returns ``(..., H, R, Dv)``.

    Softmax runs through ``scaled_dot_product_attention`` with an additive mask (0 / -inf,
    plus the bias) built from the boolean one: SDPA on CPU converts boolean masks to that
    form on every call, which costs ~1.5x.  ``fused=False`` asks SDPA for its math backend,
    whose probabilities autograd keeps (SDPA picks it anyway when the mask needs a gradient).
    With dropout it is explicit, since SDPA's dropout cannot be seeded.  SiLU is two einsums
    with masked entries zeroed.
    """
    if score == "softmax":
        additive = bias
        if mask is not None:
            base = bias if bias is not None else q.new_zeros(())
            additive = torch.where(mask, base, float("-inf")).to(q.dtype)
        if keep is None:
            if fused:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=scale)
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=scale)
        s = torch.einsum("...rd,...kd->...rk", q, k) * scale
        p = torch.softmax(s if additive is None else s + additive, dim=-1)
    else:
        s = torch.einsum("...rd,...kd->...rk", q, k) * scale
        if bias is not None:
            s = s + bias
        p = F.silu(s) / silu_norm
        if mask is not None:
            p = p.masked_fill(~mask, 0.0) if mask.shape == p.shape else torch.where(mask, p, 0.0)
    if keep is not None:
        p = torch.where(keep, p, 0.0) / (1 - dropout_p)
    return torch.einsum("...rk,...kd->...rd", p, v)
