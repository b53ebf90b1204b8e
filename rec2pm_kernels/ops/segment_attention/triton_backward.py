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
from ..triton_tiles import (
    head_rows,
    load_key_tile,
    load_row_stats,
    load_rows,
    probabilities,
    program_biases,
    program_block,
    program_keys,
    score_grad,
    score_grad_tile,
    scores,
    sequence_options,
    store_rows,
)


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
    k = load_rows(head_rows(K, token0, head, stride_kt, stride_kh), offs_n, stride_kt, length, offs_d, HEAD_DIM)
    v = load_rows(head_rows(V, token0, head, stride_vt, stride_vh), offs_n, stride_vt, length, offs_dv, HEAD_DIM_V)
    q_base = head_rows(Q, token0, head, stride_qt, stride_qh)
    do_base = head_rows(DO, token0, head, stride_dot, stride_doh)
    masks = (S, C, hstu)
    biases = program_biases(BIAS, NUM_BUCKETS, TIME_BIAS, TIMESTAMPS, QUERY_TIMESTAMPS, NUM_TIME_BUCKETS, token0, head,
                            HAS_BIAS, HAS_TIME_BIAS)  # fmt: skip
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
            q = load_rows(q_base, offs_m, stride_qt, length, offs_d, HEAD_DIM)
            do = load_rows(do_base, offs_m, stride_dot, length, offs_dv, HEAD_DIM_V)
            z, mask, bucket, _ = scores(
                q, k, offs_m, offs_n, length, masks, biases, scale, PATTERN, HAS_BIAS, HAS_TIME_BIAS, INPUT_PRECISION
            )
            lse2, delta = load_row_stats(LSE, DELTA, stats, offs_m, row_ok, SCORE, BLOCK_M)
            p = probabilities(z, mask, lse2, silu_norm, SCORE)
            dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
            if HAS_DROPOUT:  # the output saw the dropped weights: so do dV and dP
                drop = dropout_weights(token0 + offs_m, offs_n, head, dropout)
                seen = p * drop
                dp = dp * drop
            else:
                seen = p
            dv += tl.dot(tl.trans(seen.to(do.dtype)), do, input_precision=INPUT_PRECISION)
            ds = score_grad(z, mask, p, dp, delta, silu_norm, SCORE)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=INPUT_PRECISION)
            if HAS_BIAS:
                # A predicate rather than a branch: a runtime branch keeps more values live
                # across it, and pushed the largest tiles over 255 registers.
                tl.atomic_add(DBIAS + head * NUM_BUCKETS + bucket, ds, mask=mask & (bias_atomics != 0))
            if COUNT_TILES:
                visited += 1
    store_rows(
        head_rows(DK, token0, head, stride_dkt, stride_dkh), offs_n, stride_dkt, length, offs_d, HEAD_DIM, dk * scale
    )
    store_rows(head_rows(DV, token0, head, stride_dvt, stride_dvh), offs_n, stride_dvt, length, offs_dv, HEAD_DIM_V, dv)
    if COUNT_TILES:
        tl.store(TILE_COUNTS + pid * tl.num_programs(1) + head, visited)


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
    q = load_rows(head_rows(Q, token0, head, stride_qt, stride_qh), offs_m, stride_qt, length, offs_d, HEAD_DIM)
    do = load_rows(head_rows(DO, token0, head, stride_dot, stride_doh), offs_m, stride_dot, length, offs_dv, HEAD_DIM_V)
    stats = head * total_tokens + token0
    lse2, delta = load_row_stats(LSE, DELTA, stats, offs_m, row_ok, SCORE, BLOCK_M)
    keys = program_keys(K, V, token0, head, stride_kt, stride_kh, stride_vt, stride_vh)
    masks = (S, C, hstu)
    biases = program_biases(BIAS, NUM_BUCKETS, TIME_BIAS, TIMESTAMPS, QUERY_TIMESTAMPS, NUM_TIME_BUCKETS, token0, head,
                            HAS_BIAS, HAS_TIME_BIAS)  # fmt: skip
    dropout = (dropout_seed_step, dropout_seed_high, dropout_threshold, dropout_scale)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    visited = 0
    for key_pass in tl.static_range(2):  # PREDICATED_PASS, then PLAIN_PASS
        lo, hi = key_pass_bounds(key_pass, r0, r1, length, S, C, hstu, PATTERN, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            if key_tile_in_pass(key_pass, r0, r1, n0, length, S, C, hstu, PATTERN, BLOCK_N):
                offs_n, k, v = load_key_tile(keys, n0, length, offs_d, offs_dv, HEAD_DIM, HEAD_DIM_V, BLOCK_N)
                ds, _, _, _ = score_grad_tile(
                    q, do, lse2, delta, k, v, offs_m, offs_n, length, masks, biases, scale, silu_norm, token0, head,
                    dropout, PATTERN, SCORE, HAS_BIAS, HAS_TIME_BIAS, HAS_DROPOUT, INPUT_PRECISION,
                )  # fmt: skip
                dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
                if COUNT_TILES:
                    visited += 1
    store_rows(
        head_rows(DQ, token0, head, stride_dqt, stride_dqh), offs_m, stride_dqt, length, offs_d, HEAD_DIM, dq * scale
    )
    if COUNT_TILES:
        tl.store(TILE_COUNTS + pid * tl.num_programs(1) + head, visited)
