"""Triton forward kernel of ``segment_attention``: one program per (sequence, row block, head).

Each program loads its query rows once and streams the key tiles its pattern can see
(``key_ranges`` / ``tile_visible`` in ``ops/triton_patterns.py``), with an online softmax
(running max and sum in base 2; the row log-sum-exp is saved for backward) or a SiLU sum.
Pattern, score, the biases (relative, timestamp), dropout and the interpreter-only tile
counter are compile-time switches of this one kernel; lengths, ``S``, ``C`` and the bucket
counts are runtime values.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..triton_codes import SOFTMAX
from ..triton_dropout import dropout_weights
from ..triton_launch import SEGMENT_RUNTIME_INTS
from ..triton_patterns import key_pass_bounds, key_tile_in_pass
from ..triton_tiles import NO_MAX, accumulate, head_rows, load_key_tile, open_row_block, scores, store_rows


@triton.jit(do_not_specialize=SEGMENT_RUNTIME_INTS)
def segment_fwd_kernel(
    Q, K, V, OUT, LSE, CU_SEQLENS, TILE_COUNTS,
    sizes, rel_bias, time_bias, hstu, dropout, scale, silu_norm,
    total_tokens, max_seqlen, dropout_seed_step, dropout_seed_high, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PATTERN: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TIME_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    COUNT_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """OUT ``(T, H, Dv)``; LSE ``(H, T)`` fp32 (softmax only).  Grid: ``(batch * row_blocks, H)``.

    ``Q``, ``K``, ``V``, ``OUT``: ``(pointer, token stride, head stride)``; ``sizes``,
    ``rel_bias``, ``time_bias``, ``hstu``, ``dropout``: the tuples of ``ops/triton_args.py``.
    ``SEQ_BUCKET`` (the max length rounded up to a power of two) is unused in the body: it
    is the autotuner's key, so lengths within one bucket share a tuned config.
    """
    head, token0, length, r0, r1, offs_m, q, keys, masks, biases, silu_norm = open_row_block(
        Q, K, V, CU_SEQLENS, max_seqlen, sizes, rel_bias, time_bias, hstu, silu_norm, PATTERN, HAS_BIAS,
        HAS_TIME_BIAS, HEAD_DIM, BLOCK_D, BLOCK_M,
    )  # fmt: skip
    if r0 >= length:
        return
    dropout = (dropout_seed_step, dropout_seed_high) + dropout
    m_i = tl.full([BLOCK_M], NO_MAX, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    visited = 0
    for key_pass in tl.static_range(2):  # PREDICATED_PASS, then PLAIN_PASS
        lo, hi = key_pass_bounds(key_pass, r0, r1, length, masks, PATTERN, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            if key_tile_in_pass(key_pass, r0, r1, n0, length, masks, PATTERN, BLOCK_N):
                offs_n, k, v = load_key_tile(keys, n0, length, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N)
                z, mask, _, _ = scores(
                    q, k, offs_m, offs_n, length, masks, biases, scale, PATTERN, HAS_BIAS, HAS_TIME_BIAS,
                    INPUT_PRECISION,
                )  # fmt: skip
                if HAS_DROPOUT:
                    drop = dropout_weights(token0 + offs_m, offs_n, head, dropout)
                else:
                    drop = 0.0
                acc, m_i, l_i = accumulate(
                    acc, m_i, l_i, z, mask, v, silu_norm, drop, SCORE, HAS_DROPOUT, INPUT_PRECISION
                )
                if COUNT_TILES:
                    visited += 1
    row_ok = offs_m < length
    if SCORE == SOFTMAX:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        acc = acc / l_safe[:, None]
        tl.store(LSE + head * total_tokens + token0 + offs_m, m_i + tl.log2(l_safe), mask=row_ok)
    store_rows(head_rows(OUT, token0, head), offs_m, length, HEAD_DIM_V, BLOCK_DV, acc)
    if COUNT_TILES:
        tl.store(TILE_COUNTS + tl.program_id(0) * tl.num_programs(1) + head, visited)
