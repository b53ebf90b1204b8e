"""Triton backward kernels of ``segment_attention`` (FlashAttention-2 style, no atomics for q/k/v).

* ``segment_bwd_dkdv_kernel``: one program per (sequence, key block, head) owns ``dK`` and
  ``dV`` of its keys and streams the row tiles that see them (``row_range_end``).  By
  default it also adds each tile's score gradient into the fp32 bias gradient with
  atomics; with ``deterministic=True`` that is left to ``triton_bias_grad.py``.
* ``segment_bwd_dq_kernel``: one program per (sequence, row block, head) owns ``dQ`` and
  streams the same key tiles as the forward kernel.

Softmax needs the forward's base-2 log-sum-exp ``LSE`` and ``DELTA = rowsum(dO * O)``
(both ``(H, T)`` fp32); SiLU needs neither.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..triton_dropout import dropout_weights
from ..triton_launch import SEGMENT_RUNTIME_INTS
from ..triton_patterns import key_pass_bounds, key_tile_in_pass, row_range_end, row_range_start, row_tile_visible
from ..triton_tiles import load_row_stats, load_rows, probabilities, program_block, score_grad, scores, sequence_options
from ..triton_time_bias import time_bias_inputs


@triton.jit(do_not_specialize=SEGMENT_RUNTIME_INTS + ["bias_atomics"])
def segment_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    DBIAS,
    CU_SEQLENS,
    BIAS,
    TIME_BIAS,
    TIMESTAMPS,
    QUERY_TIMESTAMPS,
    TILE_COUNTS,
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
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
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
    bias_atomics,
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
    COUNT_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """DK ``(T, H, D)``, DV ``(T, H, Dv)``; DBIAS ``(H, NUM_BUCKETS)`` fp32 when ``bias_atomics != 0``.
    Grid: ``(batch * col_blocks, H)``; ``BLOCK_N`` keys per program, rows in tiles of ``BLOCK_M``.

    ``bias_atomics`` is a runtime flag, not a compile-time switch, so the default and the
    deterministic bias gradient share one compiled kernel (the branch is uniform)."""
    pid = tl.program_id(0)
    head = tl.program_id(1)
    seq, token0, length, c0 = program_block(CU_SEQLENS, max_seqlen, BLOCK_N)
    if c0 >= length:
        return
    hstu, silu_norm = sequence_options(
        seq, NUM_TARGETS, SILU_NORMS, contextual_seq_len, max_attn_len, min_full_attn_seq_len, causal, silu_norm,
        PATTERN,
    )  # fmt: skip
    c1 = tl.minimum(c0 + BLOCK_N, length) - 1
    offs_n = c0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = load_rows(K, token0, offs_n, stride_kt, head * stride_kh, length, offs_d, HEAD_DIM)
    v = load_rows(V, token0, offs_n, stride_vt, head * stride_vh, length, offs_dv, HEAD_DIM_V)
    if HAS_BIAS:
        bias_head_ptr = BIAS + head * NUM_BUCKETS
    else:
        bias_head_ptr = BIAS  # None: no bias table
    time_bias = time_bias_inputs(TIME_BIAS, TIMESTAMPS, QUERY_TIMESTAMPS, token0, head, NUM_TIME_BUCKETS, HAS_TIME_BIAS)
    stats = head * total_tokens + token0
    dropout = (dropout_seed_step, dropout_seed_high, dropout_threshold, dropout_scale)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    visited = 0
    m_end = row_range_end(c0, c1, length, S, C, PATTERN)
    for m0 in range(row_range_start(c0, hstu, PATTERN, BLOCK_M), m_end, BLOCK_M):
        if row_tile_visible(m0, tl.minimum(m0 + BLOCK_M, length) - 1, c0, c1, length, hstu, PATTERN):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < length
            q = load_rows(Q, token0, offs_m, stride_qt, head * stride_qh, length, offs_d, HEAD_DIM)
            do = load_rows(DO, token0, offs_m, stride_dot, head * stride_doh, length, offs_dv, HEAD_DIM_V)
            z, mask, bucket, _ = scores(
                q, k, offs_m, offs_n, length, bias_head_ptr, S, C, hstu, NUM_BUCKETS, time_bias, scale, PATTERN,
                HAS_BIAS, HAS_TIME_BIAS, INPUT_PRECISION,
            )  # fmt: skip
            lse2, delta = load_row_stats(LSE, DELTA, stats, offs_m, row_ok, SCORE, BLOCK_M)
            p = probabilities(z, mask, lse2, silu_norm, SCORE)
            dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
            if HAS_DROPOUT:  # the output saw the dropped weights: so do dV and dP
                drop = dropout_weights(token0 + offs_m, offs_n, head, dropout)
                dv += tl.dot(tl.trans((p * drop).to(do.dtype)), do, input_precision=INPUT_PRECISION)
                dp = dp * drop
            else:
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=INPUT_PRECISION)
            ds = score_grad(z, mask, p, dp, delta, silu_norm, SCORE)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=INPUT_PRECISION)
            if HAS_BIAS:
                # A predicate rather than a branch: a runtime branch keeps more values live
                # across it, and pushed the largest tiles over 255 registers.
                tl.atomic_add(DBIAS + head * NUM_BUCKETS + bucket, ds, mask=mask & (bias_atomics != 0))
            if COUNT_TILES:
                visited += 1
    col_ok = offs_n < length
    dk_ptrs = DK + (token0 + offs_n)[:, None] * stride_dkt + head * stride_dkh + offs_d[None, :]
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    dv_ptrs = DV + (token0 + offs_n)[:, None] * stride_dvt + head * stride_dvh + offs_dv[None, :]
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    if COUNT_TILES:
        tl.store(TILE_COUNTS + pid * tl.num_programs(1) + head, visited)


@triton.jit
def _dq_key_tile(
    dq,
    q,
    do,
    lse2,
    delta,
    n0,
    K,
    V,
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
):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = load_rows(K, token0, offs_n, stride_kt, key_head, length, offs_d, HEAD_DIM)
    v = load_rows(V, token0, offs_n, stride_vt, value_head, length, offs_dv, HEAD_DIM_V)
    z, mask, _, _ = scores(
        q, k, offs_m, offs_n, length, bias_head_ptr, S, C, hstu, NUM_BUCKETS, time_bias, scale, PATTERN, HAS_BIAS,
        HAS_TIME_BIAS, INPUT_PRECISION,
    )  # fmt: skip
    p = probabilities(z, mask, lse2, silu_norm, SCORE)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    if HAS_DROPOUT:
        dp = dp * dropout_weights(token0 + offs_m, offs_n, head, dropout)
    ds = score_grad(z, mask, p, dp, delta, silu_norm, SCORE)
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)


@triton.jit(do_not_specialize=SEGMENT_RUNTIME_INTS)
def segment_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    CU_SEQLENS,
    BIAS,
    TIME_BIAS,
    TIMESTAMPS,
    QUERY_TIMESTAMPS,
    TILE_COUNTS,
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
    stride_dqt,
    stride_dqh,
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
    COUNT_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """DQ ``(T, H, D)``.  Grid: ``(batch * row_blocks, H)``; same key tiles as the forward."""
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
    if HAS_BIAS:
        bias_head_ptr = BIAS + head * NUM_BUCKETS
    else:
        bias_head_ptr = BIAS  # None: no bias table
    time_bias = time_bias_inputs(TIME_BIAS, TIMESTAMPS, QUERY_TIMESTAMPS, token0, head, NUM_TIME_BUCKETS, HAS_TIME_BIAS)
    dropout = (dropout_seed_step, dropout_seed_high, dropout_threshold, dropout_scale)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    visited = 0
    for key_pass in tl.static_range(2):  # PREDICATED_PASS, then PLAIN_PASS
        lo, hi = key_pass_bounds(key_pass, r0, r1, length, S, C, hstu, PATTERN, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            if key_tile_in_pass(key_pass, r0, r1, n0, length, S, C, hstu, PATTERN, BLOCK_N):
                dq = _dq_key_tile(
                    dq, q, do, lse2, delta, n0, K, V, token0, head * stride_kh, head * stride_vh, stride_kt,
                    stride_vt, offs_m, offs_d, offs_dv, length, bias_head_ptr, S, C, hstu, NUM_BUCKETS, time_bias,
                    scale, silu_norm, head, dropout, HEAD_DIM, HEAD_DIM_V, PATTERN, SCORE, HAS_BIAS, HAS_TIME_BIAS,
                    HAS_DROPOUT, INPUT_PRECISION, BLOCK_N,
                )  # fmt: skip
                if COUNT_TILES:
                    visited += 1
    dq_ptrs = DQ + (token0 + offs_m)[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    if COUNT_TILES:
        tl.store(TILE_COUNTS + pid * tl.num_programs(1) + head, visited)
