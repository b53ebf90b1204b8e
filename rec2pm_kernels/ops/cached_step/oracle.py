"""Test-only reference for ``cached_step_attention``; leaves the cache untouched.

User ``b`` with ``c = cache_seqlens[b]`` cached slots and ``n`` new rows: new row ``t``
sees slots ``[0, c)`` and new rows ``0..t``; for the bias λ(new row t) = c + t and
λ(slot j) = j.
"""

from __future__ import annotations

import torch

from ...patterns import bias_bucket
from ..dense_reference import compute_dtype, dense_attention


def cached_step_oracle(
    q_new: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cu_seqlens_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    score: str = "softmax",
    scale: float | None = None,
    rel_bias: torch.Tensor | None = None,
    silu_norm: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Reference output ``(total_new, heads, head_dim_v)`` in ``v_new``'s dtype."""
    dtype = compute_dtype(q_new.dtype, upcast)
    scale = q_new.shape[-1] ** -0.5 if scale is None else scale
    bounds = cu_seqlens_new.tolist()
    outs = []
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        c, n = int(cache_seqlens[b]), end - start
        keys = torch.cat([k_cache[b, :c], k_new[start:end]]).to(dtype)
        values = torch.cat([v_cache[b, :c], v_new[start:end]]).to(dtype)
        row = c + torch.arange(n, device=q_new.device)
        col = torch.arange(c + n, device=q_new.device)
        mask = col[None, :] <= row[:, None]
        bias = None
        if rel_bias is not None:
            bias = rel_bias.to(dtype)[:, bias_bucket(row[:, None], col[None, :], rel_bias.shape[1])]
        outs.append(
            dense_attention(
                q_new[start:end].to(dtype), keys, values, mask, bias, score=score, scale=scale, silu_norm=silu_norm
            )
        )
    if not outs:
        return v_new.new_empty(v_new.shape)
    return torch.cat(outs).to(v_new.dtype)
