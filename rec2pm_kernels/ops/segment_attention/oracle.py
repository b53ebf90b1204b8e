"""Test-only reference for ``segment_attention``: one dense mask per sequence.

Slow on purpose and obviously right: the mask comes straight from the pattern rule of
``rec2pm_kernels.patterns`` over all (row, column) pairs, the bias table is gathered
densely, and the math runs in float64 for fp32 inputs and fp32 for fp16/bf16
(``upcast=False`` runs it in the input dtype instead, which is the "same-dtype PyTorch"
error baseline of ``rec2pm_kernels.testing``).  It is differentiable, so it also gives the
reference gradients.
"""

from __future__ import annotations

import torch

from ...patterns import bias_bucket, bias_positions, visible
from ..dense_reference import compute_dtype, dense_attention


def dense_mask(
    pattern: str, n: int, segment_len: int | None = None, num_memory_tokens: int | None = None, device=None
) -> torch.Tensor:
    """``(n, n)`` boolean mask of one sequence of ``n`` tokens: ``mask[row, col]``."""
    p = torch.arange(n, device=device)
    return visible(pattern, p[:, None], p[None, :], segment_len, num_memory_tokens)


def dense_bias(
    pattern: str, n: int, segment_len: int | None, num_memory_tokens: int | None, rel_bias: torch.Tensor
) -> torch.Tensor:
    """``(H, n, n)`` bias of one sequence: ``rel_bias[h, bucket(λ(row) - λ(col))]``."""
    lam = bias_positions(pattern, torch.arange(n, device=rel_bias.device), segment_len, num_memory_tokens)
    bucket = bias_bucket(lam[:, None], lam[None, :], rel_bias.shape[1])
    return rel_bias[:, bucket]


def segment_attention_oracle(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    pattern: str = "causal",
    segment_len: int | None = None,
    num_memory_tokens: int | None = None,
    score: str = "softmax",
    scale: float | None = None,
    rel_bias: torch.Tensor | None = None,
    silu_norm: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Reference output ``(total_tokens, heads, head_dim_v)`` in ``v``'s dtype."""
    dtype = compute_dtype(q.dtype, upcast)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        n = end - start
        mask = dense_mask(pattern, n, segment_len, num_memory_tokens, device=q.device)
        bias = None
        if rel_bias is not None:
            bias = dense_bias(pattern, n, segment_len, num_memory_tokens, rel_bias.to(dtype))
        outs.append(
            dense_attention(
                q[start:end].to(dtype),
                k[start:end].to(dtype),
                v[start:end].to(dtype),
                mask,
                bias,
                score=score,
                scale=scale,
                silu_norm=silu_norm,
            )
        )
    if not outs:
        return v.new_empty(v.shape)
    return torch.cat(outs).to(v.dtype)
