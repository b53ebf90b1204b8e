"""Mask-aware FLOP counts: only the (row, column) pairs a pattern lets through count."""

from __future__ import annotations

from functools import lru_cache

import torch

from rec2pm_kernels.patterns import visible

BACKWARD_FLOPS_FACTOR = 2.5  # backward = 2.5 x forward matmul work (FlashAttention's convention)


@lru_cache(maxsize=256)
def visible_pairs(
    pattern: str,
    length: int,
    segment_len: int | None = None,
    num_memory_tokens: int | None = None,
    rows_per_chunk: int = 1024,
) -> int:
    """Number of visible (row, column) pairs in one sequence of ``length`` tokens."""
    if pattern == "causal":
        return length * (length + 1) // 2
    cols = torch.arange(length)
    total = 0
    for r0 in range(0, length, rows_per_chunk):
        rows = torch.arange(r0, min(r0 + rows_per_chunk, length))
        total += int(visible(pattern, rows[:, None], cols[None, :], segment_len, num_memory_tokens).sum())
    return total


def attention_flops(pairs: int, heads: int, head_dim: int, head_dim_v: int, direction: str) -> float:
    """FLOPs of attention over ``pairs`` visible pairs per head: 2*D for q.k and 2*Dv for p.v."""
    forward = 2.0 * pairs * heads * (head_dim + head_dim_v)
    factor = {"fwd": 1.0, "bwd": BACKWARD_FLOPS_FACTOR, "fwd+bwd": 1.0 + BACKWARD_FLOPS_FACTOR}[direction]
    return forward * factor
