"""Triton backward kernels of ``segment_attention`` (FlashAttention-2 style, no atomics for q/k/v).

* ``segment_bwd_dkdv_kernel``: one program per (sequence, key block, head) owns ``dK`` and
  ``dV`` of its keys and streams the row tiles that see them (``row_range_end``).  By
  default it also adds each tile's score gradient into the float64 bias gradient with
  atomics; with ``deterministic=True`` that is left to the row-block kernel.
* ``segment_bwd_rows_kernel``: one program per (sequence, row block, head) streams the same
  key tiles as the forward kernel and recomputes each tile's score gradient; ``WRITES``
  says what it makes of them:

  - ``WRITES_DQ``: ``dQ``, owned by the program;
  - ``WRITES_BIAS_SUMS``: the bias tables' deterministic gradients (relative-position and
    timestamp, no atomics).  Row blocks of 16 and 16 x 16 tiles: each program sums its
    tiles' gradients per bucket into its own row of a float64 partial buffer ``(programs,
    H, NUM_BUCKETS)``, and the launcher sums the rows in a fixed order.  float64 because a
    softmax's score gradients cancel (every row sums to 0): fp32 running sums over tiles
    and programs lost up to 4x what the oracle's fp32 sum loses.  The per-bucket sums
    (``ops/triton_bucket_sums.py``): where λ moves by one per position (``causal`` and the
    kv-memory patterns, λ(p) = p) a 16 x 16 tile holds at most 31 distinct relative
    buckets, so the relative bias alone takes a one-hot reduction over a window of
    ``BIAS_WINDOW = 32`` buckets.  ``global``'s λ steps back by C - 1 at every unit
    boundary, so its tiles span up to C + 14 buckets (past the window from C = 18 on, where
    the window dropped them), and the timestamp bias has no bound at all: both sort the
    tile's (bucket, gradient) pairs, and with both tables the relative one is summed that
    way too (the one-hot tile beside the sort spilled registers).  The sums, and so the
    gradients, come out bit-identical from run to run.

  One kernel for both because they differ only in the reduction of each tile; the two
  launches compile two binaries (``WRITES`` is a compile-time switch).

Softmax needs the forward's base-2 log-sum-exp ``LSE`` and ``DELTA = rowsum(dO * O)``
(both ``(H, T)`` fp32); SiLU needs neither.  The tuple arguments are those of
``ops/triton_args.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..triton_bucket_sums import add_sorted_bucket_sums, add_windowed_bucket_sums
from ..triton_codes import GLOBAL, WRITES_BIAS_SUMS, WRITES_DQ
from ..triton_dropout import dropout_weights
from ..triton_launch import SEGMENT_RUNTIME_INTS
from ..triton_patterns import key_pass_bounds, key_tile_in_pass, row_range_end, row_range_start, row_tile_visible
from ..triton_tiles import (
    head_rows,
    load_key_tile,
    load_row_grads,
    load_row_stats,
    load_rows,
    open_row_block,
    open_sequence_block,
    probabilities,
    score_grad,
    score_grad_tile,
    scores,
    store_rows,
)


@triton.jit(do_not_specialize=SEGMENT_RUNTIME_INTS + ["bias_atomics"])
def segment_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DBIAS, CU_SEQLENS, TILE_COUNTS,
    sizes, rel_bias, time_bias, hstu, dropout, scale, silu_norm,
    total_tokens, max_seqlen, dropout_seed_step, dropout_seed_high, SEQ_BUCKET, bias_atomics,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PATTERN: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TIME_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    COUNT_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """DK ``(T, H, D)``, DV ``(T, H, Dv)``; DBIAS ``(H, NUM_BUCKETS)`` fp64 when ``bias_atomics != 0``
    (``rel_bias = (BIAS, NUM_BUCKETS)``).
    Grid: ``(batch * col_blocks, H)``; ``BLOCK_N`` keys per program, rows in tiles of ``BLOCK_M``.

    ``bias_atomics`` is a runtime flag, not a compile-time switch, so the default and the
    deterministic bias gradient share one compiled kernel (the branch is uniform)."""
    head, token0, length, c0, c1, offs_n, masks, biases, silu_norm = open_sequence_block(
        CU_SEQLENS, max_seqlen, sizes, rel_bias, time_bias, hstu, silu_norm, PATTERN, HAS_BIAS, HAS_TIME_BIAS, BLOCK_N
    )
    if c0 >= length:
        return
    k = load_rows(head_rows(K, token0, head), offs_n, length, HEAD_DIM, BLOCK_D)
    v = load_rows(head_rows(V, token0, head), offs_n, length, HEAD_DIM_V, BLOCK_DV)
    q_rows = head_rows(Q, token0, head)
    do_rows = head_rows(DO, token0, head)
    stats = head * total_tokens + token0
    dropout = (dropout_seed_step, dropout_seed_high) + dropout
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    visited = 0
    m_end = row_range_end(c0, c1, length, masks, PATTERN)
    for m0 in range(row_range_start(c0, masks, PATTERN, BLOCK_M), m_end, BLOCK_M):
        if row_tile_visible(m0, tl.minimum(m0 + BLOCK_M, length) - 1, c0, c1, length, masks, PATTERN):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q = load_rows(q_rows, offs_m, length, HEAD_DIM, BLOCK_D)
            do = load_rows(do_rows, offs_m, length, HEAD_DIM_V, BLOCK_DV)
            z, mask, bucket, _ = scores(
                q, k, offs_m, offs_n, length, masks, biases, scale, PATTERN, HAS_BIAS, HAS_TIME_BIAS, INPUT_PRECISION
            )
            lse2, delta = load_row_stats(LSE, DELTA, stats, offs_m, offs_m < length, SCORE, BLOCK_M)
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
            if HAS_BIAS and not HAS_TIME_BIAS:  # with a timestamp bias, both tables' gradients are partial sums
                # Added one score gradient at a time, so in float64: an fp32 running sum of a
                # bucket's thousands of terms lost 4x the error budget by 1k tokens.  A predicate
                # rather than a branch: a runtime branch keeps more values live across it, and
                # pushed the largest tiles over 255 registers.
                tl.atomic_add(DBIAS + head * rel_bias[1] + bucket, ds.to(tl.float64), mask=mask & (bias_atomics != 0))
            if COUNT_TILES:
                visited += 1
    store_rows(head_rows(DK, token0, head), offs_n, length, HEAD_DIM, BLOCK_D, dk * scale)
    store_rows(head_rows(DV, token0, head), offs_n, length, HEAD_DIM_V, BLOCK_DV, dv)
    if COUNT_TILES:
        tl.store(TILE_COUNTS + tl.program_id(0) * tl.num_programs(1) + head, visited)


@triton.jit(do_not_specialize=SEGMENT_RUNTIME_INTS)
def segment_bwd_rows_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, PARTIAL, TIME_PARTIAL, CU_SEQLENS, TILE_COUNTS,
    sizes, rel_bias, time_bias, hstu, dropout, scale, silu_norm,
    total_tokens, max_seqlen, dropout_seed_step, dropout_seed_high, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PATTERN: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TIME_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, WRITES: tl.constexpr,
    COUNT_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr,
):  # fmt: skip
    """``WRITES_DQ``: DQ ``(T, H, D)``.  ``WRITES_BIAS_SUMS``: PARTIAL ``(programs, H,
    NUM_BUCKETS)`` and TIME_PARTIAL ``(programs, H, NUM_TIME_BUCKETS + 1)`` float64, zeroed
    (each present with its bias).  Grid: ``(batch * row_blocks, H)``."""
    head, token0, length, r0, r1, offs_m, q, keys, masks, biases, silu_norm = open_row_block(
        Q, K, V, CU_SEQLENS, max_seqlen, sizes, rel_bias, time_bias, hstu, silu_norm, PATTERN, HAS_BIAS,
        HAS_TIME_BIAS, HEAD_DIM, BLOCK_D, BLOCK_M,
    )  # fmt: skip
    if r0 >= length:
        return
    do, lse2, delta = load_row_grads(DO, LSE, DELTA, token0, head, total_tokens, offs_m, length, SCORE, HEAD_DIM_V,
                                     BLOCK_DV, BLOCK_M)  # fmt: skip
    dropout = (dropout_seed_step, dropout_seed_high) + dropout
    if WRITES == WRITES_DQ:
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if WRITES == WRITES_BIAS_SUMS:
        program_row = (tl.program_id(0) * tl.num_programs(1) + head).to(tl.int64)
        _, NUM_BUCKETS = rel_bias
        NUM_TIME_BUCKETS = time_bias[3]  # (TIME_BIAS, TIMESTAMPS, QUERY_TIMESTAMPS, NUM_TIME_BUCKETS)
        partial_row = PARTIAL + program_row * NUM_BUCKETS if HAS_BIAS else PARTIAL  # else None
        time_partial_row = TIME_PARTIAL + program_row * (NUM_TIME_BUCKETS + 1) if HAS_TIME_BIAS else TIME_PARTIAL
    visited = 0
    for key_pass in tl.static_range(2):  # PREDICATED_PASS, then PLAIN_PASS
        lo, hi = key_pass_bounds(key_pass, r0, r1, length, masks, PATTERN, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            if key_tile_in_pass(key_pass, r0, r1, n0, length, masks, PATTERN, BLOCK_N):
                offs_n, k, v = load_key_tile(keys, n0, length, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N)
                ds, mask, bucket, time_bucket = score_grad_tile(
                    q, do, lse2, delta, k, v, offs_m, offs_n, length, masks, biases, scale, silu_norm, token0, head,
                    dropout, PATTERN, SCORE, HAS_BIAS, HAS_TIME_BIAS, HAS_DROPOUT, INPUT_PRECISION,
                )  # fmt: skip
                if WRITES == WRITES_DQ:
                    dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
                if WRITES == WRITES_BIAS_SUMS:
                    if HAS_BIAS:
                        # Sorted: global's tiles span more buckets than the window; beside the
                        # time sums the one-hot tile spilled registers (16-bit d128).
                        if HAS_TIME_BIAS or PATTERN == GLOBAL:
                            add_sorted_bucket_sums(partial_row, ds, mask, bucket)
                        else:
                            add_windowed_bucket_sums(partial_row, ds, mask, bucket, NUM_BUCKETS, WINDOW)
                    if HAS_TIME_BIAS:
                        add_sorted_bucket_sums(time_partial_row, ds, mask, time_bucket)
                if COUNT_TILES:
                    visited += 1
    if WRITES == WRITES_DQ:
        store_rows(head_rows(DQ, token0, head), offs_m, length, HEAD_DIM, BLOCK_D, dq * scale)
    if COUNT_TILES:
        tl.store(TILE_COUNTS + tl.program_id(0) * tl.num_programs(1) + head, visited)
