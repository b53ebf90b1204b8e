"""The attention patterns as Triton device functions: element masks, λ positions, tile ranges.

The Triton twin of ``rec2pm_kernels.patterns``; ``PATTERN`` is one of the named codes of
``ops/triton_codes.py`` (``CAUSAL``, ``GLOBAL``, ``KV_MEMORY_OVERWRITE``; the last ``else``
branch of every function is ``KV_MEMORY_APPEND``).  Positions are indices inside one
sequence; ``S`` and ``C`` are runtime integers (``causal`` ignores them).  The kernels' tile
ranges take them as ``masks = (S, C, hstu)`` (``ops/triton_tiles.py``).

Tile skipping.  Kernels walk a fixed grid of tiles (rows in blocks of ``BLOCK_M``, keys in
blocks of ``BLOCK_N``, both starting at the sequence's first token) and visit exactly the
tiles holding at least one visible entry:

* a row block ``[r0, r1]`` visits key tiles in a *plain* range, where every tile is known to
  be visible, and a *predicated* range, where a scalar test (``tile_visible``) decides;
* a key block ``[c0, c1]`` (backward) visits row tiles in one plain range.

Why the plain ranges are exact, with ``own`` the first position of ``r0``'s unit:
every key in ``[own, r1]`` is visible to some row of the block (an item or a write token
of a row's own unit, or the row itself), and for ``kv_memory_overwrite`` so is the
previous unit's write block ``[own - C, own)``.  Before ``own``, ``global`` sees the items
only and ``kv_memory_append`` the write tokens only, so those tiles are tested one by one
(for ``global`` only when a tile fits inside a write block, ``C >= BLOCK_N``).
The cost that follows: ``causal`` and ``global`` visit about ``L^2 / 2`` entries (``global``
is causal attention over ``L (1 + C / S)`` tokens); ``kv_memory_overwrite`` visits about
``2 (S + C)`` keys per row, linear in the number of units; ``kv_memory_append`` visits its
own unit plus one tile per earlier write block, so it grows with the square of the number
of units but not of the tokens.

HSTU's masks (``HSTU_CAUSAL``) take a tuple ``hstu = (num_targets, contextual_seq_len,
max_attn_len, min_full_attn_seq_len)`` of the program's sequence.  Their tiles are all
predicated, each by an exact scalar test (``hstu_tile_visible``): a row block visits the key
tiles up to its last row (to the sequence's end when it holds contextual rows), a key block
the row tiles from its own (from the first when there is a prefix) to the sequence's end.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_codes import CAUSAL, GLOBAL, HSTU_CAUSAL, KV_MEMORY_OVERWRITE


@triton.jit
def visible_mask(rows, cols, S, C, PATTERN: tl.constexpr):
    """Boolean tile: may position ``rows`` (e.g. ``[BM, 1]``) see position ``cols`` (``[1, BN]``)?"""
    causal = cols <= rows
    if PATTERN == CAUSAL:
        mask = causal
    else:
        U = S + C
        row_unit = rows // U
        col_unit = cols // U
        col_is_write = (cols % U) >= S
        same_unit = col_unit == row_unit
        if PATTERN == GLOBAL:
            mask = causal & ((col_is_write == 0) | same_unit)
        elif PATTERN == KV_MEMORY_OVERWRITE:
            mask = causal & (same_unit | (col_is_write & (col_unit == row_unit - 1)))
        else:
            mask = causal & (same_unit | (col_is_write & (col_unit < row_unit)))
    return mask


@triton.jit
def _rank(p, shift, last):
    """HSTU's rank of position ``p``: 0 in the prefix, counting on after it, ``last`` from the candidates on."""
    return tl.minimum(tl.maximum(p - shift, 0), last)


@triton.jit
def hstu_ranks(p, length, hstu):
    """``(rank(p), m)`` of ``rec2pm_kernels.hstu_masks``: the prefix shares rank 0, the
    candidates rank ``m``."""
    num_targets, contextual, _, _, _ = hstu
    shift = tl.maximum(contextual - 1, 0)
    last = length - shift - num_targets
    return _rank(p, shift, last), last


@triton.jit
def hstu_visible_mask(rows, cols, length, hstu):
    """Boolean tile of HSTU's masks for positions ``rows`` (``[BM, 1]``) and ``cols`` (``[1, BN]``)."""
    _, contextual, window, tail, causal = hstu
    row_rank, last = hstu_ranks(rows, length, hstu)
    col_rank, _ = hstu_ranks(cols, length, hstu)
    distance = row_rank - col_rank
    distance = tl.where(causal == 0, tl.abs(distance), distance)
    near = (distance <= window) | (window == 0) | ((tail > 0) & (row_rank >= last - tail))
    seen = ((cols == rows) | (distance > 0)) & near
    return seen | ((contextual > 0) & (row_rank == 0) & (col_rank < last))


@triton.jit
def _spans_meet(a0, a1, b0, b1):
    """Do the closed ranges ``[a0, a1]`` and ``[b0, b1]`` share a position?  (Empty when ``a0 > a1``.)"""
    return (a0 <= a1) & (b0 <= b1) & (a0 <= b1) & (b0 <= a1)


@triton.jit
def _first_of_rank(rank, shift, last, length):
    """First position whose HSTU rank is at least ``rank`` (``length`` when none)."""
    return tl.where(rank > last, length, tl.where(rank <= 0, 0, rank + shift))


@triton.jit
def _rank_pairs_reach(r0, r1, c0, c1, reach, causal, shift, last):
    """Do rows ``[r0, r1]`` and keys ``[c0, c1]`` hold a pair whose rank distance
    ``d = rank(row) - rank(key)`` has ``1 <= d <= reach`` (or ``1 <= |d| <= reach`` when
    not ``causal``)?  Ranks of a range of positions are a range of integers, so the
    distances of the block are the integers of ``[rank(r0) - rank(c1), rank(r1) - rank(c0)]``."""
    low = _rank(r0, shift, last) - _rank(c1, shift, last)
    high = _rank(r1, shift, last) - _rank(c0, shift, last)
    ahead = (high >= 1) & (low <= reach)
    behind = (causal == 0) & (low <= -1) & (high >= -reach)
    return (r0 <= r1) & (c0 <= c1) & (ahead | behind)


@triton.jit
def hstu_tile_visible(r0, r1, c0, c1, length, hstu):
    """Does any row in ``[r0, r1]`` see any key in ``[c0, c1]`` under HSTU's masks?  Exact,
    from the rules of ``rec2pm_kernels.hstu_masks``: the diagonal, the prefix rows' keys of
    rank below ``m``, and the pairs of other ranks within reach, split into windowed rows
    and full-attention rows (the tail and candidates, or all rows without a window)."""
    num_targets, contextual, window, tail, causal = hstu
    shift = tl.maximum(contextual - 1, 0)
    last = length - shift - num_targets
    ok = _spans_meet(r0, r1, c0, c1)
    prefix_end = _first_of_rank(1, shift, last, length)  # rows of rank 0 (the prefix)
    history_end = _first_of_rank(last, shift, last, length)  # keys of rank below m
    ok = ok | ((contextual > 0) & (r0 <= tl.minimum(r1, prefix_end - 1)) & (c0 <= tl.minimum(c1, history_end - 1)))
    full_from = tl.where(window == 0, 0, tl.where(tail > 0, _first_of_rank(last - tail, shift, last, length), length))
    f0 = tl.maximum(r0, full_from)
    ok = ok | _rank_pairs_reach(f0, r1, c0, c1, length, causal, shift, last)
    return ok | _rank_pairs_reach(r0, tl.minimum(r1, f0 - 1), c0, c1, window, causal, shift, last)


@triton.jit
def bias_position(p, S, C, PATTERN: tl.constexpr):
    """λ(p): the history index for ``global`` (items keep it, write token c of unit h is (h+1)S + c), else p."""
    if PATTERN == GLOBAL:
        lam = p - C * (p // (S + C))
    else:
        lam = p
    return lam


@triton.jit
def bias_tile(bias_head_ptr, lam_rows, lam_cols, NUM_BUCKETS):
    """``table[min(max(λr - λc, 0), NUM_BUCKETS - 1)]`` for one head, as fp32, and the buckets."""
    bucket = tl.minimum(tl.maximum(lam_rows - lam_cols, 0), NUM_BUCKETS - 1)
    return tl.load(bias_head_ptr + bucket).to(tl.float32), bucket


@triton.jit
def has_write(a, b, S, U):
    """Is there a write token in positions ``[a, b]``?"""
    first = tl.where(a % U >= S, a, (a // U) * U + S)
    return first <= b


@triton.jit
def has_item(a, b, S, U):
    """Is there an item in positions ``[a, b]``?"""
    first = tl.where(a % U < S, a, (a // U + 1) * U)
    return first <= b


@triton.jit
def tile_visible(r0, r1, c0, c1, S, C, PATTERN: tl.constexpr):
    """Does any row in ``[r0, r1]`` see any key in ``[c0, c1]``?  (Closed ranges, inside the sequence.)"""
    last = tl.minimum(c1, r1)  # keys after the last row are hidden by causality
    if PATTERN == CAUSAL:
        ok = c0 <= last
    else:
        U = S + C
        own = (r0 // U) * U
        if PATTERN == GLOBAL:
            # Items are seen by every later row; write tokens by the rows of their unit.
            ok = has_item(c0, last, S, U) | has_write(tl.maximum(c0, own), last, S, U)
        elif PATTERN == KV_MEMORY_OVERWRITE:
            ok = (tl.maximum(c0, own) <= last) | has_write(tl.maximum(c0, own - U), last, S, U)
        else:
            ok = (tl.maximum(c0, own) <= last) | has_write(c0, last, S, U)
    return ok


@triton.jit
def key_ranges(r0, r1, S, C, PATTERN: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles of the row block ``[r0, r1]``: ``(pred_lo, pred_hi, plain_lo, plain_hi)``.

    Tiles starting in ``[pred_lo, pred_hi)`` need ``tile_visible``; those in
    ``[plain_lo, plain_hi)`` are all visible.  Bounds are multiples of ``BLOCK_N`` except
    ``plain_hi = r1 + 1``.
    """
    hi = r1 + 1
    if PATTERN == CAUSAL:
        pred_hi = 0
        plain_lo = 0
    else:
        U = S + C
        own_tile = ((r0 // U) * U) // BLOCK_N * BLOCK_N
        if PATTERN == GLOBAL:
            # A tile can miss every item only if it fits inside one write block.
            pred_hi = tl.where(C >= BLOCK_N, own_tile, 0)
            plain_lo = pred_hi
        elif PATTERN == KV_MEMORY_OVERWRITE:
            pred_hi = 0
            plain_lo = tl.maximum((r0 // U) * U - C, 0) // BLOCK_N * BLOCK_N
        else:
            pred_hi = own_tile
            plain_lo = own_tile
    return 0, pred_hi, plain_lo, hi


# The two passes of a row block over its key tiles (``key_pass_bounds``): the predicated
# tiles, each tested with ``tile_visible``, then the plain ones, all visible.  Kernels unroll
# them with ``tl.static_range(2)``: the plain pass then has no branch in its loop, so the
# compiler pipelines its K/V loads.
PREDICATED_PASS = tl.constexpr(0)
PLAIN_PASS = tl.constexpr(1)


@triton.jit
def key_pass_bounds(KEY_PASS: tl.constexpr, r0, r1, length, masks, PATTERN: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(lo, hi)``: the key tiles of ``KEY_PASS`` start at ``range(lo, hi, BLOCK_N)``."""
    S, C, hstu = masks
    if PATTERN == HSTU_CAUSAL:  # every tile predicated; prefix and bidirectional rows see past their block
        _, contextual, _, _, causal = hstu
        pred_hi = tl.where((r0 < contextual) | (causal == 0), length, r1 + 1)
        pred_lo, plain_lo, plain_hi = 0, pred_hi, pred_hi
    else:
        pred_lo, pred_hi, plain_lo, plain_hi = key_ranges(r0, r1, S, C, PATTERN, BLOCK_N)
    if KEY_PASS == PREDICATED_PASS:
        lo, hi = pred_lo, pred_hi
    else:
        lo, hi = plain_lo, plain_hi
    return lo, hi


@triton.jit
def key_tile_in_pass(KEY_PASS: tl.constexpr, r0, r1, n0, length, masks, PATTERN: tl.constexpr, BLOCK_N: tl.constexpr):
    """Whether the key tile at ``n0`` is visited: tested in the predicated pass, always in the plain one."""
    S, C, hstu = masks
    if KEY_PASS == PREDICATED_PASS:
        c1 = tl.minimum(n0 + BLOCK_N, length) - 1
        if PATTERN == HSTU_CAUSAL:
            visible = hstu_tile_visible(r0, r1, n0, c1, length, hstu)
        else:
            visible = tile_visible(r0, r1, n0, c1, S, C, PATTERN)
    else:
        visible = True
    return visible


@triton.jit
def row_range_start(c0, masks, PATTERN: tl.constexpr, BLOCK_M: tl.constexpr):
    """First row tile that may see a key at or after ``c0``: ``c0``'s own, or the first
    under HSTU's masks with a prefix or bidirectional (those rows see ahead)."""
    _, _, hstu = masks
    start = c0 // BLOCK_M * BLOCK_M
    if PATTERN == HSTU_CAUSAL:
        _, contextual, _, _, causal = hstu
        start = tl.where((contextual > 0) | (causal == 0), 0, start)
    return start


@triton.jit
def row_tile_visible(m0, m1, c0, c1, length, masks, PATTERN: tl.constexpr):
    """Whether a key block visits the row tile ``[m0, m1]``: always inside the exact row
    range of the patterns, tested under HSTU's masks."""
    _, _, hstu = masks
    if PATTERN == HSTU_CAUSAL:
        visible = hstu_tile_visible(m0, m1, c0, c1, length, hstu)
    else:
        visible = True
    return visible


@triton.jit
def row_range_end(c0, c1, length, masks, PATTERN: tl.constexpr):
    """End (exclusive) of the rows that see some key in ``[c0, c1]``; every row tile from
    ``c0``'s tile up to it holds a visible entry (see the module docstring), except under
    HSTU's masks, whose tiles are tested one by one."""
    S, C, _ = masks
    if PATTERN == CAUSAL or PATTERN == HSTU_CAUSAL:
        end = length
    else:
        U = S + C
        if PATTERN == GLOBAL:
            # Items are seen by all later rows; a block of write tokens only by its unit.
            end = tl.where(has_item(c0, c1, S, U), length, tl.minimum(length, (c0 // U + 1) * U))
        elif PATTERN == KV_MEMORY_OVERWRITE:
            # Own unit; plus the next unit when the block holds write tokens of its last unit.
            extra = tl.where(c1 % U >= S, 1, 0)
            end = tl.minimum(length, (c1 // U + 1 + extra) * U)
        else:
            end = tl.where(has_write(c0, c1, S, U), length, tl.minimum(length, (c1 // U + 1) * U))
    return end
