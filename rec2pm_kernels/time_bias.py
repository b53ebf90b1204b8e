"""HSTU's timestamp bias: a learned weight per log-spaced bucket of the time between the
query and the key.

Row ``i`` of a sequence is scored at its *query time* (by default the timestamp of token
``i + 1``, the event it predicts; the last token uses its own) against each key's own
timestamp.  The bucket of a gap ``Δ`` is::

    bucket(Δ) = min(floor(log(max(|Δ|, 1)) / 0.301), num_buckets)

with the logarithm taken in float32 on ``|Δ|`` converted to float32, as HSTU does (0.301
is ``log10(2)``: with natural logarithms the buckets grow by ``e ** 0.301 ≈ 1.35``).  A
table of ``num_buckets + 1`` weights (``ts_bias[h, bucket]``) is added to the score of
every (row, key) pair, beside the relative-position bias.
"""

from __future__ import annotations

import torch

# HSTU's divisor of the log gap.
LOG_GAP_DIVISOR = 0.301


def time_bucket(query_time: torch.Tensor, key_time: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Buckets ``0 .. num_buckets`` of ``query_time - key_time`` (int64 tensors that broadcast)."""
    gap = (query_time - key_time).abs().clamp(min=1).to(torch.float32)
    return (torch.log(gap) / LOG_GAP_DIVISOR).to(torch.int64).clamp(min=0, max=num_buckets)


def next_timestamps(timestamps: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Default query times of packed tokens: the timestamp of the next token of the same
    sequence, or the token's own for the last one."""
    following = torch.roll(timestamps, -1) if timestamps.numel() else timestamps
    is_last = torch.zeros(timestamps.shape[0], dtype=torch.bool, device=timestamps.device)
    ends = cu_seqlens[1:].long() - 1
    is_last[ends[ends >= cu_seqlens[:-1].long()]] = True
    return torch.where(is_last, timestamps, following)
