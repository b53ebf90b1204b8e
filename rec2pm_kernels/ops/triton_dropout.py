"""Attention dropout inside the Triton kernels: the counter-based draw of
``ops/torch_math.dropout_keep``, bit for bit, so the Triton and ``torch`` backends drop the
same weights for the same seed.

The draw of a weight is MurmurHash3's 32-bit finaliser applied in turn to the packed row
index, the key position and the head, each step mixed with the seed; a weight is kept when
the hash is at least ``threshold = floor(dropout_p * 2**32)``.  The kernels hash in uint32,
whose products wrap to the same low 32 bits the PyTorch version keeps from int64 (and hold
half the registers an int64 tile would).  Kernels take the draw's inputs as ``dropout =
(seed_step, seed_high, threshold, scale)`` (``dropout_args`` on the host: the three words
as int32 of the same bits, one binary for every seed).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import torch_math

GOLDEN32 = tl.constexpr(torch_math.GOLDEN32)
MIX_1 = tl.constexpr(torch_math.MIX_1)
MIX_2 = tl.constexpr(torch_math.MIX_2)


def _int32_bits(word: int) -> int:
    """A 32-bit word as the int32 of the same bits.  Triton types a Python int by its value
    (int32 below 2**31, int64 above), so words passed as they are compiled a second binary of
    every kernel for half the seeds; the kernels read the words' bits as uint32 either way."""
    return word - (1 << 32) if word >= 1 << 31 else word


def dropout_args(dropout_p: float, seed: int) -> dict:
    """The kernels' runtime dropout scalars, by parameter name (all zero without dropout);
    the three words are int32 (``_int32_bits``) for every seed and rate."""
    if dropout_p <= 0:
        return dict(dropout_seed_step=0, dropout_seed_high=0, dropout_threshold=0, dropout_scale=1.0)
    step, high = torch_math.dropout_seed_words(seed)
    return dict(
        dropout_seed_step=_int32_bits(step),
        dropout_seed_high=_int32_bits(high),
        dropout_threshold=_int32_bits(torch_math.dropout_threshold(dropout_p)),
        dropout_scale=1.0 / (1.0 - dropout_p),
    )


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * tl.full([], MIX_1, tl.uint32)
    x = x ^ (x >> 13)
    x = x * tl.full([], MIX_2, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def dropout_weights(row_tokens, cols, head, dropout):
    """``[BM, BN]`` fp32 factors of a tile: ``scale`` where the weight is kept, 0 where dropped.
    ``row_tokens``: packed row indices ``[BM]``; ``cols``: key positions ``[BN]``."""
    seed_step, seed_high, threshold, scale = dropout
    golden = tl.full([], GOLDEN32, tl.uint32)
    h = _mix32(row_tokens.to(tl.uint32) ^ seed_step.to(tl.uint32))[:, None]
    h = _mix32((h + golden) ^ cols.to(tl.uint32)[None, :])
    h = _mix32((h + golden) ^ head.to(tl.uint32) ^ seed_high.to(tl.uint32))
    return tl.where(h >= threshold.to(tl.uint32), scale, 0.0)
