"""Test-only reference for ``segment_attention``: one dense mask per sequence.

Slow on purpose and obviously right: the mask comes straight from the pattern rule of
``rec2pm_kernels.patterns`` over all (row, column) pairs, the bias table is gathered
densely, and the math runs in float64 for fp32 inputs and fp32 for fp16/bf16
(``upcast=False`` runs it in the input dtype instead, which is the "same-dtype PyTorch"
error baseline of ``rec2pm_kernels.testing``).  It is differentiable, so it also gives the
reference gradients.
"""

from __future__ import annotations

import math

import torch

from ...patterns import bias_bucket, bias_positions, visible
from ..dense_reference import compute_dtype, dense_attention

# HSTU's divisor of the log time gap, restated here so the oracle does not share the kernels' code.
HSTU_LOG_GAP_DIVISOR = 0.301


def dense_mask(
    pattern: str, n: int, segment_len: int | None = None, num_memory_tokens: int | None = None, device=None
) -> torch.Tensor:
    """``(n, n)`` boolean mask of one sequence of ``n`` tokens: ``mask[row, col]``."""
    p = torch.arange(n, device=device)
    return visible(pattern, p[:, None], p[None, :], segment_len, num_memory_tokens)


def dense_hstu_mask(
    n: int,
    num_targets: int | None,
    contextual_seq_len: int,
    max_attn_len: int,
    min_full_attn_seq_len: int,
    causal: bool = True,
) -> torch.Tensor:
    """``(n, n)`` HSTU mask, one pair at a time from the rules in ``docs/patterns.md``."""
    first = n - (num_targets or 0)  # first candidate
    shift = max(contextual_seq_len - 1, 0)
    history_end_rank = n - shift - (num_targets or 0)

    def rank(p: int) -> int:
        if p < contextual_seq_len:
            return 0
        return history_end_rank if p >= first else p - shift

    mask = torch.zeros(n, n, dtype=torch.bool)
    for row in range(n):
        for col in range(n):
            distance = rank(row) - rank(col)
            if not causal:
                distance = abs(distance)
            seen = col == row or distance > 0
            if max_attn_len > 0:
                tail = min_full_attn_seq_len > 0 and rank(row) >= history_end_rank - min_full_attn_seq_len
                seen = seen and (distance <= max_attn_len or tail)
            if row < contextual_seq_len:  # the prefix sees every non-candidate token
                seen = seen or col < first
            mask[row, col] = seen
    return mask


def dense_time_bias(query_times: list[int], key_times: list[int], ts_bias: torch.Tensor) -> torch.Tensor:
    """``(H, n, n)``: ``ts_bias[h, min(floor(log(max(|Δ|, 1)) / 0.301), buckets)]`` with the
    logarithm in float32, one pair at a time."""
    buckets = ts_bias.shape[1] - 1
    index = torch.zeros(len(query_times), len(key_times), dtype=torch.int64)
    for row, tq in enumerate(query_times):
        for col, tk in enumerate(key_times):
            gap = torch.tensor(float(max(abs(tq - tk), 1)), dtype=torch.float32)
            index[row, col] = min(math.floor(float(torch.log(gap) / HSTU_LOG_GAP_DIVISOR)), buckets)
    return ts_bias[:, index.to(ts_bias.device)]


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
    silu_norm: float | torch.Tensor | None = None,
    num_targets: torch.Tensor | None = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    min_full_attn_seq_len: int = 0,
    causal: bool = True,
    ts_bias: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    query_timestamps: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Reference output ``(total_tokens, heads, head_dim_v)`` in ``v``'s dtype (no dropout).

    Bias tables may have one row shared by all heads; ``query_timestamps`` defaults to the
    next token's timestamp (the last token's own)."""
    dtype = compute_dtype(q.dtype, upcast)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bounds = cu_seqlens.tolist()
    hstu = num_targets is not None or contextual_seq_len or max_attn_len or not causal
    outs = []
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        n = end - start
        if hstu:
            targets = None if num_targets is None else int(num_targets[b])
            mask = dense_hstu_mask(n, targets, contextual_seq_len, max_attn_len, min_full_attn_seq_len, causal)
            mask = mask.to(q.device)
        else:
            mask = dense_mask(pattern, n, segment_len, num_memory_tokens, device=q.device)
        bias = None
        if rel_bias is not None:
            bias = dense_bias(pattern, n, segment_len, num_memory_tokens, rel_bias.to(dtype))
        if ts_bias is not None:
            keys = timestamps[start:end].tolist()
            queries = keys[1:] + keys[-1:] if query_timestamps is None else query_timestamps[start:end].tolist()
            by_time = dense_time_bias(queries, keys, ts_bias.to(dtype))
            bias = by_time if bias is None else bias + by_time
        norm = float(silu_norm[b]) if isinstance(silu_norm, torch.Tensor) else silu_norm
        outs.append(
            dense_attention(
                q[start:end].to(dtype),
                k[start:end].to(dtype),
                v[start:end].to(dtype),
                mask,
                bias,
                score=score,
                scale=scale,
                silu_norm=norm,
            )
        )
    if not outs:
        return v.new_empty(v.shape)
    return torch.cat(outs).to(v.dtype)
