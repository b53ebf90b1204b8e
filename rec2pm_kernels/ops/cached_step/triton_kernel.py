"""Triton kernel of ``cached_step_attention``: new rows over the per-user K/V cache, split-K.

The launcher first appends the new K/V into the cache, so new row ``t`` of user ``b`` (at
position ``L_b + t`` with ``L_b = cache_seqlens[b]``) attends to cache slots ``[0, L_b + t]``.
One program per (user, block of new rows, head, split): with ``SPLIT_K`` the key
range is cut into as many pieces as the grid has splits, each program writes its unnormalised sum and row
statistics, and the launcher combines the pieces (so a small serving batch still fills
the GPU).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..triton_codes import SOFTMAX
from ..triton_launch import CACHED_STEP_RUNTIME_INTS
from ..triton_tiles import NO_MAX, accumulate, head_rows, load_rows, program_block, store_rows


@triton.jit
def cache_rows(cache, user, head):
    """``rows = (base, slot stride)`` of one user's head of a ``(batch, slots, H, D)`` cache;
    ``cache`` is the kernel argument ``(pointer, batch stride, slot stride, head stride)``."""
    pointer, stride_b, stride_s, stride_h = cache
    return pointer + user.to(tl.int64) * stride_b + head * stride_h, stride_s


@triton.jit(do_not_specialize=CACHED_STEP_RUNTIME_INTS)
def cached_step_kernel(
    Q, K_CACHE, V_CACHE, OUT, PARTIAL_ACC, PARTIAL_STATS, CU_NEW, CACHE_SEQLENS,
    rel_bias, scale, silu_norm, total_new, max_new, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """OUT ``(total_new, H, Dv)`` without ``SPLIT_K``; else PARTIAL_ACC ``(splits, total_new, H, Dv)``
    and PARTIAL_STATS ``(splits, total_new, H, 2)`` (running max and sum, base 2), fp32.
    Grid: ``(batch * cdiv(max_new, BLOCK_M), H, splits)``.  The number of splits is the grid's
    third dimension, a runtime value: one binary serves every count.  ``Q`` and ``OUT`` are
    ``(pointer, token stride, head stride)``, ``rel_bias`` is ``(BIAS, NUM_BUCKETS)``."""
    head = tl.program_id(1)
    split = tl.program_id(2)
    user, token0, n_new, t0 = program_block(CU_NEW, max_new, BLOCK_M)
    if t0 >= n_new:
        return
    cached = tl.load(CACHE_SEQLENS + user).to(tl.int32)
    offs_m = t0 + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < n_new
    position = cached + offs_m
    q = load_rows(head_rows(Q, token0, head), offs_m, n_new, HEAD_DIM, BLOCK_D)
    k_rows = cache_rows(K_CACHE, user, head)
    v_rows = cache_rows(V_CACHE, user, head)
    BIAS, NUM_BUCKETS = rel_bias
    keys = cached + tl.minimum(t0 + BLOCK_M, n_new)
    piece = tl.cdiv(tl.cdiv(keys, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    lo = split * piece
    hi = tl.minimum(lo + piece, keys)
    m_i = tl.full([BLOCK_M], NO_MAX, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = load_rows(k_rows, offs_n, hi, HEAD_DIM, BLOCK_D)
        v = load_rows(v_rows, offs_n, hi, HEAD_DIM_V, BLOCK_DV)
        z = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scale
        if HAS_BIAS:
            bucket = tl.minimum(tl.maximum(position[:, None] - offs_n[None, :], 0), NUM_BUCKETS - 1)
            z += tl.load(BIAS + head * NUM_BUCKETS + bucket).to(tl.float32)
        mask = (offs_n[None, :] <= position[:, None]) & (offs_n[None, :] < hi) & row_ok[:, None]
        acc, m_i, l_i = accumulate(acc, m_i, l_i, z, mask, v, silu_norm, 0.0, SCORE, False, INPUT_PRECISION)
    heads = tl.num_programs(1)
    store_mask = row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    if not SPLIT_K:
        if SCORE == SOFTMAX:
            acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        store_rows(head_rows(OUT, token0, head), offs_m, n_new, HEAD_DIM_V, BLOCK_DV, acc)
    else:
        row = (split * total_new + token0 + offs_m) * heads + head
        tl.store(PARTIAL_ACC + row[:, None] * BLOCK_DV + offs_dv[None, :], acc, mask=store_mask)
        if SCORE == SOFTMAX:
            tl.store(PARTIAL_STATS + row * 2, m_i, mask=row_ok)
            tl.store(PARTIAL_STATS + row * 2 + 1, l_i, mask=row_ok)
