"""The attention patterns as Triton device functions: element masks, λ positions, tile ranges.

The Triton twin of ``rec2pm_kernels.patterns``; ``PATTERN`` is one of the named codes of
``ops/triton_codes.py`` (``CAUSAL``, ``GLOBAL``, ``KV_MEMORY_OVERWRITE``; the last ``else``
branch of every function is ``KV_MEMORY_APPEND``).  Positions are indices inside one
sequence; ``S`` and ``C`` are runtime integers (``causal`` ignores them).

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
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_codes import CAUSAL, GLOBAL, KV_MEMORY_OVERWRITE


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
def key_pass_bounds(KEY_PASS: tl.constexpr, r0, r1, S, C, PATTERN: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(lo, hi)``: the key tiles of ``KEY_PASS`` start at ``range(lo, hi, BLOCK_N)``."""
    pred_lo, pred_hi, plain_lo, plain_hi = key_ranges(r0, r1, S, C, PATTERN, BLOCK_N)
    if KEY_PASS == PREDICATED_PASS:
        lo, hi = pred_lo, pred_hi
    else:
        lo, hi = plain_lo, plain_hi
    return lo, hi


@triton.jit
def key_tile_in_pass(KEY_PASS: tl.constexpr, r0, r1, n0, length, S, C, PATTERN: tl.constexpr, BLOCK_N: tl.constexpr):
    """Whether the key tile at ``n0`` is visited: tested in the predicated pass, always in the plain one."""
    if KEY_PASS == PREDICATED_PASS:
        visible = tile_visible(r0, r1, n0, tl.minimum(n0 + BLOCK_N, length) - 1, S, C, PATTERN)
    else:
        visible = True
    return visible


@triton.jit
def row_range_end(c0, c1, length, S, C, PATTERN: tl.constexpr):
    """End (exclusive) of the rows that see some key in ``[c0, c1]``; every row tile from
    ``c0``'s tile up to it holds a visible entry (see the module docstring)."""
    if PATTERN == CAUSAL:
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
