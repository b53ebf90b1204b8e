"""Deterministic gradients of the bias tables (no atomics): relative-position and timestamp.

One program per (sequence, row block of 16, head) recomputes the score gradient of every
visible 16 x 16 tile, sums it per bucket and adds the sums into its own row of a float64
partial buffer ``(programs, H, NUM_BUCKETS)``; the launcher then sums the rows in a fixed
order.  float64 because a softmax's score gradients cancel (every row sums to 0): fp32
running sums over tiles and programs lost up to 4x what the oracle's fp32 sum loses.

The per-bucket sums (``ops/triton_bucket_sums.py``): a 16 x 16 tile holds at most 31
distinct relative buckets (λ moves by at most one per position), so the relative bias
alone takes a one-hot reduction over a window of ``BIAS_WINDOW = 32`` buckets; the
timestamp bias has no such bound and sorts the tile's (bucket, gradient) pairs, and with
both tables the relative one is summed that way too (the one-hot tile beside the sort
spilled registers).  The sums, and so the gradients, come out bit-identical from run to run.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..triton_bucket_sums import add_sorted_bucket_sums, add_windowed_bucket_sums
from ..triton_launch import SEGMENT_RUNTIME_INTS
from ..triton_patterns import key_pass_bounds, key_tile_in_pass
from ..triton_tiles import (
    head_rows,
    load_key_tile,
    load_row_stats,
    load_rows,
    program_biases,
    program_block,
    program_keys,
    score_grad_tile,
    sequence_options,
)


@triton.jit(do_not_specialize=SEGMENT_RUNTIME_INTS)
def segment_bwd_bias_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    PARTIAL,
    TIME_PARTIAL,
    CU_SEQLENS,
    BIAS,
    TIME_BIAS,
    TIMESTAMPS,
    QUERY_TIMESTAMPS,
    NUM_TARGETS,
    SILU_NORMS,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    total_tokens,
    max_seqlen,
    S,
    C,
    NUM_BUCKETS,
    NUM_TIME_BUCKETS,
    scale,
    silu_norm,
    contextual_seq_len,
    max_attn_len,
    min_full_attn_seq_len,
    causal,
    dropout_seed_step,
    dropout_seed_high,
    dropout_threshold,
    dropout_scale,
    SEQ_BUCKET,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PATTERN: tl.constexpr,
    SCORE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_TIME_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """PARTIAL ``(batch * row_blocks, H, NUM_BUCKETS)`` and TIME_PARTIAL ``(batch * row_blocks,
    H, NUM_TIME_BUCKETS + 1)`` float64, zeroed (each present with its bias).  Grid: ``(batch *
    row_blocks, H)``."""
    pid = tl.program_id(0)
    head = tl.program_id(1)
    seq, token0, length, r0 = program_block(CU_SEQLENS, max_seqlen, BLOCK_M)
    if r0 >= length:
        return
    hstu, silu_norm = sequence_options(
        seq, NUM_TARGETS, SILU_NORMS, contextual_seq_len, max_attn_len, min_full_attn_seq_len, causal, silu_norm,
        PATTERN,
    )  # fmt: skip
    r1 = tl.minimum(r0 + BLOCK_M, length) - 1
    offs_m = r0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < length
    q = load_rows(head_rows(Q, token0, head, stride_qt, stride_qh), offs_m, stride_qt, length, offs_d, HEAD_DIM)
    do = load_rows(head_rows(DO, token0, head, stride_dot, stride_doh), offs_m, stride_dot, length, offs_dv, HEAD_DIM_V)
    stats = head * total_tokens + token0
    lse2, delta = load_row_stats(LSE, DELTA, stats, offs_m, row_ok, SCORE, BLOCK_M)
    keys = program_keys(K, V, token0, head, stride_kt, stride_kh, stride_vt, stride_vh)
    masks = (S, C, hstu)
    biases = program_biases(BIAS, NUM_BUCKETS, TIME_BIAS, TIMESTAMPS, QUERY_TIMESTAMPS, NUM_TIME_BUCKETS, token0, head,
                            HAS_BIAS, HAS_TIME_BIAS)  # fmt: skip
    program_row = (pid * tl.num_programs(1) + head).to(tl.int64)
    if HAS_BIAS:
        partial_row = PARTIAL + program_row * NUM_BUCKETS
    else:
        partial_row = PARTIAL  # None: no relative bias
    if HAS_TIME_BIAS:
        time_partial_row = TIME_PARTIAL + program_row * (NUM_TIME_BUCKETS + 1)
    else:
        time_partial_row = TIME_PARTIAL  # None
    dropout = (dropout_seed_step, dropout_seed_high, dropout_threshold, dropout_scale)
    for key_pass in tl.static_range(2):  # PREDICATED_PASS, then PLAIN_PASS
        lo, hi = key_pass_bounds(key_pass, r0, r1, length, S, C, hstu, PATTERN, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            if key_tile_in_pass(key_pass, r0, r1, n0, length, S, C, hstu, PATTERN, BLOCK_N):
                offs_n, k, v = load_key_tile(keys, n0, length, offs_d, offs_dv, HEAD_DIM, HEAD_DIM_V, BLOCK_N)
                ds, mask, bucket, time_bucket = score_grad_tile(
                    q, do, lse2, delta, k, v, offs_m, offs_n, length, masks, biases, scale, silu_norm, token0, head,
                    dropout, PATTERN, SCORE, HAS_BIAS, HAS_TIME_BIAS, HAS_DROPOUT, INPUT_PRECISION,
                )  # fmt: skip
                if HAS_BIAS:
                    if HAS_TIME_BIAS:  # the one-hot tile beside the time sums spilled registers (16-bit d128)
                        add_sorted_bucket_sums(partial_row, ds, mask, bucket)
                    else:
                        add_windowed_bucket_sums(partial_row, ds, mask, bucket, NUM_BUCKETS, WINDOW)
                if HAS_TIME_BIAS:
                    add_sorted_bucket_sums(time_partial_row, ds, mask, time_bucket)
