"""HSTU's timestamp bias inside the Triton kernels: ``rec2pm_kernels.time_bias`` per tile.

The bucket of a (row, key) pair is ``min(floor(log(max(|Δ|, 1)) / 0.301), num_buckets)``
with ``Δ = query_time(row) - key_time(key)`` subtracted in int64 (epoch timestamps do not
fit float32) and the logarithm taken in float32, as the ``torch`` and C++ backends do.
Kernels take the inputs as ``time_bias = (table_row, query_times, key_times,
num_buckets)``: this head's row of the ``(H, num_buckets + 1)`` table and the sequence's
first query and key timestamps (``time_bias_inputs``, base pointers computed once).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..time_bias import LOG_GAP_DIVISOR as _LOG_GAP_DIVISOR

LOG_GAP_DIVISOR = tl.constexpr(_LOG_GAP_DIVISOR)


@triton.jit
def time_bias_inputs(time_bias_args, token0, head, HAS_TIME_BIAS: tl.constexpr):
    """This program's ``time_bias`` tuple (zeros without a timestamp bias), from the kernel
    argument ``(TIME_BIAS, TIMESTAMPS, QUERY_TIMESTAMPS, NUM_TIME_BUCKETS)``."""
    TIME_BIAS, TIMESTAMPS, QUERY_TIMESTAMPS, NUM_TIME_BUCKETS = time_bias_args
    if HAS_TIME_BIAS:
        time_bias = (
            TIME_BIAS + head * (NUM_TIME_BUCKETS + 1),
            QUERY_TIMESTAMPS + token0,
            TIMESTAMPS + token0,
            NUM_TIME_BUCKETS,
        )
    else:
        time_bias = (0, 0, 0, 0)
    return time_bias


@triton.jit
def time_bias_tile(time_bias, offs_m, offs_n, length):
    """``[BM, BN]`` fp32 weights ``table[bucket(row, key)]`` and the int32 buckets."""
    table_row, query_times, key_times, num_buckets = time_bias
    row_times = tl.load(query_times + offs_m, mask=offs_m < length, other=0)
    key_times = tl.load(key_times + offs_n, mask=offs_n < length, other=0)
    gap = tl.abs(row_times[:, None] - key_times[None, :])
    gap = tl.maximum(gap, 1).to(tl.float32)
    # log(gap) >= 0, so truncation is the floor.
    bucket = tl.minimum((tl.log(gap) / LOG_GAP_DIVISOR).to(tl.int32), num_buckets)
    return tl.load(table_row + bucket).to(tl.float32), bucket
