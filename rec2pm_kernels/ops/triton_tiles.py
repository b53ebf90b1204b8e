"""Tile math shared by the Triton kernels of both ops (``segment_attention`` forward and
backward, ``cached_step_attention``).

Scores are ``z = scale * q.k + bias``.  Softmax works in base 2 (``exp2(z * log2 e - lse2)``),
so the saved row statistic ``lse2`` is the base-2 log-sum-exp of ``z * log2 e``.

The kernels take tuple arguments (``ops/triton_args.py``): a ``(T, H, D)`` tensor comes as
``(pointer, token stride, head stride)``, the pattern sizes as ``sizes = (S, C)``, and the
bias tables, HSTU's inputs and dropout's constants as one tuple each.  Each program opens
its sequence once (``open_sequence_block``, or ``open_row_block`` for a row block) and
hands the tile helpers small tuples instead of pointer, offset and stride lists:

* ``rows = (base, token stride)`` from ``head_rows``: its head of a tensor at its sequence's
  first token, which ``load_rows`` and ``store_rows`` read;
* ``keys = (k_rows, v_rows)`` from ``program_keys``, which ``load_key_tile`` reads;
* ``masks = (S, C, hstu)``: what the pattern's visibility rule reads (``hstu``: HSTU's mask
  tuple from ``sequence_options``, zeros for the other patterns);
* ``biases = (bias_row, NUM_BUCKETS, time_bias)`` from ``program_biases``: this head's row of
  the relative-bias table and the timestamp-bias inputs (``ops/triton_time_bias.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_codes import HSTU_CAUSAL, LOG2E, SOFTMAX
from .triton_dropout import dropout_weights
from .triton_patterns import bias_position, bias_tile, hstu_visible_mask, visible_mask
from .triton_time_bias import time_bias_inputs, time_bias_tile

# Row max before any visible key: finite, so exp2(-inf - m) is 0 rather than NaN.
NO_MAX = tl.constexpr(-1.0e30)


@triton.jit
def sequence_options(seq, hstu, silu_norm, PATTERN: tl.constexpr):
    """``(hstu_masks, silu_norm)`` of sequence ``seq``: HSTU's mask tuple (``num_targets``,
    prefix, window, tail, ``causal``: 1 for HSTU's causal masks, 0 for bidirectional) and the
    sequence's own SiLU divisor under ``HSTU_CAUSAL``; zeros and the call's divisor otherwise.
    ``hstu``: the kernel argument ``(NUM_TARGETS, SILU_NORMS, prefix, window, tail, causal)``."""
    NUM_TARGETS, SILU_NORMS, contextual_seq_len, max_attn_len, min_full_attn_seq_len, causal = hstu
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
def open_sequence_block(CU_SEQLENS, max_len, sizes, rel_bias, time_bias, hstu, silu_norm, PATTERN: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_TIME_BIAS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """``(head, token0, length, start, last, offs, masks, biases, silu_norm)`` of this program's
    head, sequence and block (``program_block``): the block holds positions ``offs = start +
    arange(BLOCK)``, the last of them inside the sequence ``last``.  A block with ``start >=
    length`` lies past its sequence's end and the kernel returns.  The dK/dV kernel opens its
    key block with this call, the row-block kernels through ``open_row_block``."""
    seq, token0, length, start = program_block(CU_SEQLENS, max_len, BLOCK)
    S, C = sizes
    hstu_masks, silu_norm = sequence_options(seq, hstu, silu_norm, PATTERN)
    head = tl.program_id(1)
    biases = program_biases(rel_bias, time_bias, token0, head, HAS_BIAS, HAS_TIME_BIAS)
    last = tl.minimum(start + BLOCK, length) - 1
    return head, token0, length, start, last, start + tl.arange(0, BLOCK), (S, C, hstu_masks), biases, silu_norm


@triton.jit
def open_row_block(Q, K, V, CU_SEQLENS, max_len, sizes, rel_bias, time_bias, hstu, silu_norm, PATTERN: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_TIME_BIAS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """``(head, token0, length, r0, r1, offs_m, q, keys, masks, biases, silu_norm)`` of a row-block
    program (the forward and the row-block backward): ``open_sequence_block``, then its query
    rows and its ``keys`` tuple.  Past the sequence's end every row of ``q`` is masked, so the
    load costs the returning programs no memory traffic."""
    head, token0, length, r0, r1, offs_m, masks, biases, silu_norm = open_sequence_block(
        CU_SEQLENS, max_len, sizes, rel_bias, time_bias, hstu, silu_norm, PATTERN, HAS_BIAS, HAS_TIME_BIAS, BLOCK_M
    )
    q = load_rows(head_rows(Q, token0, head), offs_m, length, HEAD_DIM, BLOCK_D)
    return head, token0, length, r0, r1, offs_m, q, program_keys(K, V, token0, head), masks, biases, silu_norm


@triton.jit
def load_row_grads(DO, LSE, DELTA, token0, head, total_tokens, offs_m, length, SCORE: tl.constexpr,
                   HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """``(do, lse2, delta)`` of a row block, for the row-block backward (``load_row_stats``)."""
    do = load_rows(head_rows(DO, token0, head), offs_m, length, HEAD_DIM_V, BLOCK_DV)
    lse2, delta = load_row_stats(LSE, DELTA, head * total_tokens + token0, offs_m, offs_m < length, SCORE, BLOCK_M)
    return do, lse2, delta


@triton.jit
def load_row_stats(LSE, DELTA, stats, offs_m, row_ok, SCORE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Backward row statistics: softmax reads ``lse2`` and ``delta`` at ``stats + offs_m`` (this
    head's row of the ``(H, T)`` buffers, at the sequence's first token); SiLU needs neither (zeros)."""
    if SCORE == SOFTMAX:
        lse2 = tl.load(LSE + stats + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + stats + offs_m, mask=row_ok, other=0.0)
    else:
        lse2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        delta = lse2
    return lse2, delta


@triton.jit
def head_rows(tensor, token0, head):
    """``rows = (base, token stride)``: this program's head of a ``(T, H, D)`` tensor at its
    sequence's first token; ``tensor`` is the kernel argument ``(pointer, token stride, head stride)``."""
    pointer, stride_t, stride_h = tensor
    return pointer + token0 * stride_t + head * stride_h, stride_t


@triton.jit
def _row_tile(rows, offs, n_valid, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers and mask of the ``[len(offs), BLOCK_D]`` tile of rows ``offs`` of ``rows``
    (rows past ``n_valid`` and columns past the head dim masked).

    Row offsets are widened to int64 before the stride: no overflow on long sequences, and
    the compile check measured fewer registers than with int32 offsets (up to 37 fewer).
    """
    base, stride_t = rows
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + offs.to(tl.int64)[:, None] * stride_t + offs_d[None, :]
    return ptrs, (offs[:, None] < n_valid) & (offs_d[None, :] < HEAD_DIM)


@triton.jit
def load_rows(rows, offs, n_valid, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The tile of rows ``offs`` of ``rows`` (``_row_tile``), zeros where masked."""
    ptrs, mask = _row_tile(rows, offs, n_valid, HEAD_DIM, BLOCK_D)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def store_rows(rows, offs, n_valid, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, tile):
    """Stores ``tile`` (cast to the tensor's type) into rows ``offs`` of ``rows``, as ``load_rows`` reads them."""
    ptrs, mask = _row_tile(rows, offs, n_valid, HEAD_DIM, BLOCK_D)
    tl.store(ptrs, tile.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def program_keys(K, V, token0, head):
    """This program's ``keys`` tuple, which ``load_key_tile`` reads."""
    return head_rows(K, token0, head), head_rows(V, token0, head)


@triton.jit
def load_key_tile(keys, n0, length, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """``(offs_n, k, v)`` of the key tile starting at ``n0``."""
    k_rows, v_rows = keys
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = load_rows(k_rows, offs_n, length, HEAD_DIM, BLOCK_D)
    v = load_rows(v_rows, offs_n, length, HEAD_DIM_V, BLOCK_DV)
    return offs_n, k, v


@triton.jit
def program_biases(rel_bias, time_bias, token0, head, HAS_BIAS: tl.constexpr, HAS_TIME_BIAS: tl.constexpr):
    """This program's ``biases`` tuple from the kernel arguments ``rel_bias = (BIAS, NUM_BUCKETS)``
    and ``time_bias`` (zeros stand for absent tables: a jit function cannot return ``None``)."""
    BIAS, NUM_BUCKETS = rel_bias
    if HAS_BIAS:
        bias_row = BIAS + head * NUM_BUCKETS
    else:
        bias_row = 0
    return bias_row, NUM_BUCKETS, time_bias_inputs(time_bias, token0, head, HAS_TIME_BIAS)


@triton.jit
def scores(q, k, offs_m, offs_n, length, masks, biases, scale, PATTERN: tl.constexpr, HAS_BIAS: tl.constexpr,
           HAS_TIME_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr):  # fmt: skip
    """Scores ``z`` (fp32, ``[BM, BN]``), the visibility mask, and the relative and time buckets.

    ``q``: ``[BM, BD]``; ``k``: ``[BN, BD]``.  The mask also hides padded rows and keys, so
    masked entries never reach a sum.
    """
    S, C, hstu = masks
    bias_row, NUM_BUCKETS, time_bias = biases
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
        b, bucket = bias_tile(bias_row, lam_r[:, None], lam_c[None, :], NUM_BUCKETS)
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


@triton.jit
def score_grad_tile(q, do, lse2, delta, k, v, offs_m, offs_n, length, masks, biases, scale, silu_norm, token0,
                    head, dropout, PATTERN: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_TIME_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr):  # fmt: skip
    """``(ds, mask, bucket, time_bucket)`` of a tile for the row-block backward kernels (dQ and
    the bias tables' gradients): scores, weights, ``dp = dO . V^T`` (dropped as the forward
    dropped the weights) and ``dL/dz``."""
    z, mask, bucket, time_bucket = scores(
        q, k, offs_m, offs_n, length, masks, biases, scale, PATTERN, HAS_BIAS, HAS_TIME_BIAS, INPUT_PRECISION
    )
    p = probabilities(z, mask, lse2, silu_norm, SCORE)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    if HAS_DROPOUT:
        dp = dp * dropout_weights(token0 + offs_m, offs_n, head, dropout)
    return score_grad(z, mask, p, dp, delta, silu_norm, SCORE), mask, bucket, time_bucket
