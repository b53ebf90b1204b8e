"""Deterministic gradients of the bias tables (no atomics): relative-position and timestamp.

One program per (sequence, row block of 16, head) recomputes the score gradient of every
visible 16 x 16 tile, sums it per bucket and adds the sums into its own row of a float64
partial buffer ``(programs, H, NUM_BUCKETS)``; the launcher then sums the rows in a fixed
order.  float64 because a softmax's score gradients cancel (every row sums to 0): fp32
running sums over tiles and programs lost up to 4x what the oracle's fp32 sum loses.

A 16 x 16 tile holds at most 31 distinct relative buckets (λ moves by at most one per
position), so a window of ``BIAS_WINDOW = 32`` buckets starting at the tile's smallest
covers it, and the per-bucket sums are a one-hot reduction over a ``(16, 16, 32)`` tile.
The timestamp bias (``ops/triton_time_bias.py``) has no such bound: its tile's
(bucket, gradient) pairs are sorted by bucket and summed per run of equal buckets.  The
sums, and so the gradients, come out bit-identical from run to run.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..triton_dropout import dropout_weights
from ..triton_launch import SEGMENT_RUNTIME_INTS
from ..triton_patterns import key_pass_bounds, key_tile_in_pass
from ..triton_tiles import load_row_stats, load_rows, probabilities, program_block, score_grad, scores, sequence_options
from ..triton_time_bias import add_time_bias_grad, time_bias_inputs


@triton.jit
def _bias_key_tile(
    q,
    do,
    lse2,
    delta,
    n0,
    K,
    V,
    PARTIAL_ROW,
    TIME_PARTIAL_ROW,
    token0,
    key_head,
    value_head,
    stride_kt,
    stride_vt,
    offs_m,
    offs_d,
    offs_dv,
    length,
    bias_head_ptr,
    S,
    C,
    hstu,
    NUM_BUCKETS,
    time_bias,
    scale,
    silu_norm,
    head,
    dropout,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    PATTERN: tl.constexpr,
    SCORE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_TIME_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = load_rows(K, token0, offs_n, stride_kt, key_head, length, offs_d, HEAD_DIM)
    v = load_rows(V, token0, offs_n, stride_vt, value_head, length, offs_dv, HEAD_DIM_V)
    z, mask, bucket, time_bucket = scores(
        q, k, offs_m, offs_n, length, bias_head_ptr, S, C, hstu, NUM_BUCKETS, time_bias, scale, PATTERN, HAS_BIAS,
        HAS_TIME_BIAS, INPUT_PRECISION,
    )  # fmt: skip
    p = probabilities(z, mask, lse2, silu_norm, SCORE)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    if HAS_DROPOUT:
        dp = dp * dropout_weights(token0 + offs_m, offs_n, head, dropout)
    ds = score_grad(z, mask, p, dp, delta, silu_norm, SCORE)
    if HAS_BIAS:
        first = tl.min(tl.where(mask, bucket, NUM_BUCKETS), axis=None)
        window = tl.arange(0, WINDOW)
        hit = (bucket - first)[:, :, None] == window[None, None, :]
        # Over the rows in fp32, then over the keys in fp64 (the cancelling sums of a softmax).
        sums = tl.sum(tl.sum(tl.where(hit, ds[:, :, None], 0.0), axis=0).to(tl.float64), axis=0)
        ptrs = PARTIAL_ROW + first + window
        ok = first + window < NUM_BUCKETS
        tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + sums, mask=ok)
        # The next tile's window may overlap this one and be handled by other threads of the
        # program: make these stores visible to them first.
        tl.debug_barrier()
    if HAS_TIME_BIAS:
        add_time_bias_grad(TIME_PARTIAL_ROW, ds, mask, time_bucket)


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
    q = load_rows(Q, token0, offs_m, stride_qt, head * stride_qh, length, offs_d, HEAD_DIM)
    do = load_rows(DO, token0, offs_m, stride_dot, head * stride_doh, length, offs_dv, HEAD_DIM_V)
    stats = head * total_tokens + token0
    lse2, delta = load_row_stats(LSE, DELTA, stats, offs_m, row_ok, SCORE, BLOCK_M)
    program_row = (pid * tl.num_programs(1) + head).to(tl.int64)
    if HAS_BIAS:
        bias_head_ptr = BIAS + head * NUM_BUCKETS
        partial_row = PARTIAL + program_row * NUM_BUCKETS
    else:
        bias_head_ptr = BIAS  # None: no relative bias
        partial_row = PARTIAL
    time_bias = time_bias_inputs(TIME_BIAS, TIMESTAMPS, QUERY_TIMESTAMPS, token0, head, NUM_TIME_BUCKETS, HAS_TIME_BIAS)
    if HAS_TIME_BIAS:
        time_partial_row = TIME_PARTIAL + program_row * (NUM_TIME_BUCKETS + 1)
    else:
        time_partial_row = TIME_PARTIAL  # None
    dropout = (dropout_seed_step, dropout_seed_high, dropout_threshold, dropout_scale)
    for key_pass in tl.static_range(2):  # PREDICATED_PASS, then PLAIN_PASS
        lo, hi = key_pass_bounds(key_pass, r0, r1, length, S, C, hstu, PATTERN, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            if key_tile_in_pass(key_pass, r0, r1, n0, length, S, C, hstu, PATTERN, BLOCK_N):
                _bias_key_tile(
                    q, do, lse2, delta, n0, K, V, partial_row, time_partial_row, token0, head * stride_kh,
                    head * stride_vh, stride_kt, stride_vt, offs_m, offs_d, offs_dv, length, bias_head_ptr, S, C,
                    hstu, NUM_BUCKETS, time_bias, scale, silu_norm, head, dropout, HEAD_DIM, HEAD_DIM_V, PATTERN,
                    SCORE, HAS_BIAS, HAS_TIME_BIAS, HAS_DROPOUT, INPUT_PRECISION, BLOCK_N, WINDOW,
                )  # fmt: skip
