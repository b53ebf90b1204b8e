"""Tile math shared by the Triton kernels of both ops (``segment_attention`` forward and
backward, ``cached_step_attention``).

Scores are ``z = scale * q.k + bias``.  Softmax works in base 2 (``exp2(z * log2 e - lse2)``),
so the saved row statistic ``lse2`` is the base-2 log-sum-exp of ``z * log2 e``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_codes import HSTU_CAUSAL, LOG2E, SOFTMAX
from .triton_patterns import bias_position, bias_tile, hstu_visible_mask, visible_mask
from .triton_time_bias import time_bias_tile

# Row max before any visible key: finite, so exp2(-inf - m) is 0 rather than NaN.
NO_MAX = tl.constexpr(-1.0e30)


@triton.jit
def sequence_options(seq, NUM_TARGETS, SILU_NORMS, contextual_seq_len, max_attn_len, min_full_attn_seq_len, causal,
                     silu_norm, PATTERN: tl.constexpr):  # fmt: skip
    """``(hstu, silu_norm)`` of sequence ``seq``: HSTU's mask tuple (``num_targets``, prefix,
    window, tail, ``causal``: 1 for HSTU's causal masks, 0 for bidirectional) and the
    sequence's own SiLU divisor under ``HSTU_CAUSAL``; zeros and the call's divisor otherwise."""
    if PATTERN == HSTU_CAUSAL:
        num_targets = tl.load(NUM_TARGETS + seq).to(tl.int32)
        silu_norm = tl.load(SILU_NORMS + seq)
    else:
        num_targets = 0
    return (num_targets, contextual_seq_len, max_attn_len, min_full_attn_seq_len, causal), silu_norm


@triton.jit
def program_block(CU_SEQLENS, max_len, BLOCK: tl.constexpr):
    """This program's sequence: ``(first token, length, first row of its block)``.

    Axis 0 of the grid enumerates ``(sequence, block of BLOCK rows)`` pairs, with
    ``cdiv(max_len, BLOCK)`` blocks per sequence; blocks past a sequence's end have
    ``start >= length`` and the caller returns early.
    """
    pid = tl.program_id(0)
    blocks = tl.cdiv(max_len, BLOCK)
    seq = pid // blocks
    token0 = tl.load(CU_SEQLENS + seq).to(tl.int64)
    length = (tl.load(CU_SEQLENS + seq + 1) - token0).to(tl.int32)
    return seq, token0, length, (pid % blocks) * BLOCK


@triton.jit
def load_row_stats(LSE, DELTA, stats, offs_m, row_ok, SCORE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Backward row statistics: softmax reads ``lse2`` and ``delta``; SiLU needs neither (zeros)."""
    if SCORE == SOFTMAX:
        lse2 = tl.load(LSE + stats + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + stats + offs_m, mask=row_ok, other=0.0)
    else:
        lse2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        delta = lse2
    return lse2, delta


@triton.jit
def load_rows(ptr, token0, offs, stride_t, head_offset, n_valid, offs_d, HEAD_DIM: tl.constexpr):
    """``[len(offs), len(offs_d)]`` tile of rows ``token0 + offs`` (zeros past ``n_valid`` or the head dim)."""
    ptrs = ptr + (token0 + offs)[:, None] * stride_t + head_offset + offs_d[None, :]
    return tl.load(ptrs, mask=(offs[:, None] < n_valid) & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def scores(
    q,
    k,
    offs_m,
    offs_n,
    length,
    bias_head_ptr,
    S,
    C,
    hstu,
    NUM_BUCKETS,
    time_bias,
    scale,
    PATTERN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_TIME_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Scores ``z`` (fp32, ``[BM, BN]``), the visibility mask, and the relative and time buckets.

    ``q``: ``[BM, BD]``; ``k``: ``[BN, BD]``.  The mask also hides padded rows and keys, so
    masked entries never reach a sum.
    """
    if HAS_TIME_BIAS:  # first: its int64 gaps are dead before the dot's accumulators live
        z, time_bucket = time_bias_tile(time_bias, offs_m, offs_n, length)
        z += tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scale
    else:
        z = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scale
    if PATTERN == HSTU_CAUSAL:
        mask = hstu_visible_mask(offs_m[:, None], offs_n[None, :], length, hstu)
    else:
        mask = visible_mask(offs_m[:, None], offs_n[None, :], S, C, PATTERN)
    mask = mask & (offs_m[:, None] < length) & (offs_n[None, :] < length)
    bucket = offs_n[None, :] * 0
    if HAS_BIAS:
        lam_r = bias_position(offs_m, S, C, PATTERN)
        lam_c = bias_position(offs_n, S, C, PATTERN)
        b, bucket = bias_tile(bias_head_ptr, lam_r[:, None], lam_c[None, :], NUM_BUCKETS)
        z += b
    if not HAS_TIME_BIAS:
        time_bucket = bucket
    return z, mask, bucket, time_bucket


@triton.jit
def probabilities(z, mask, lse2, silu_norm, SCORE: tl.constexpr):
    """Attention weights of a tile: softmax ``exp2(z log2 e - lse2)`` or ``silu(z) / silu_norm``; 0 where masked."""
    if SCORE == SOFTMAX:
        p = tl.exp2(z * LOG2E - lse2[:, None])
    else:
        p = z * tl.sigmoid(z) / silu_norm
    return tl.where(mask, p, 0.0)


@triton.jit
def accumulate(
    acc, m_i, l_i, z, mask, v, silu_norm, drop, SCORE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Adds one key tile to the unnormalised output ``acc``.

    Softmax is online: ``m_i`` is the running row max and ``l_i`` the running sum (base 2);
    ``acc`` and ``l_i`` are rescaled when the max grows.  SiLU just adds (``m_i``, ``l_i`` unused).
    With dropout, ``drop`` (``dropout_weights``) scales the weights that reach ``acc``; the
    softmax sum stays undropped, so the dropped weights are the normalised probabilities'.
    """
    if SCORE == SOFTMAX:
        z2 = tl.where(mask, z * LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z2, 1))
        p = tl.exp2(z2 - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
    else:
        p = probabilities(z, mask, m_i, silu_norm, SCORE)
    if HAS_DROPOUT:
        p = p * drop
    acc += tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def score_grad(z, mask, p, dp, delta, silu_norm, SCORE: tl.constexpr):
    """dL/dz of a tile from ``dp = dO . V^T``: softmax ``p (dp - delta)``; SiLU ``dp silu'(z) / norm``."""
    if SCORE == SOFTMAX:
        ds = p * (dp - delta[:, None])
    else:
        sig = tl.sigmoid(z)
        ds = dp * (sig * (1.0 + z * (1.0 - sig))) / silu_norm
    return tl.where(mask, ds, 0.0)
