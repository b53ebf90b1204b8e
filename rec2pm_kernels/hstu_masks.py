"""The masks of production HSTU models, as rules on token positions: candidates, a
contextual prefix, a local window, and HSTU's bidirectional form (``causal=False``).

They refine ``causal`` (no interleaved pattern takes them).  Sequence ``b`` has ``n``
tokens; with ``T = num_targets[b]``, ``X = contextual_seq_len``, ``W = max_attn_len`` and
``F = min_full_attn_seq_len`` every token gets a *rank*:

* ``rank(p) = max(p - max(X - 1, 0), 0)``: the ``X`` contextual tokens share rank 0 and the
  tokens after them count on from 1 (without a prefix, ``rank(p) = p``);
* with targets, ranks stop at ``m = n - max(X - 1, 0) - T``: the last ``T`` tokens (the
  candidates) all have rank ``m``, one more than the last history token.  Without targets
  ``m = n - max(X - 1, 0)``, past every rank.

With ``d = rank(row) - rank(col)`` (``|rank(row) - rank(col)|`` when not ``causal``), a row
sees a column when

1. ``col == row``, or ``d > 0`` (so candidates see the whole history and themselves, not
   each other; history rows never see candidates), and
2. with ``W > 0``: ``d <= W``, unless ``F > 0`` and ``rank(row) >= m - F`` (the last ``F``
   history tokens and every candidate keep full attention);
3. or, with ``X > 0``: the row is contextual (``rank(row) == 0``) and ``rank(col) < m``: the
   prefix sees every non-candidate token of the sequence, later ones included.

Bidirectional (``causal=False``, HSTU's ``causal`` argument) makes rules 1 and 2 symmetric:
a row sees every column of another rank within the window, before or after it; tokens of
one rank (the candidates, the prefix) still see only themselves among each other, so
history rows see the candidates and the prefix sees them too (within the window).

Under a window, a contextual column is as far from a row as its rank says (``rank(row)``),
so rows more than ``W`` tokens past the prefix no longer see it.  These are the masks of
the generative-recommenders HSTU code (``num_targets``, ``contextual_seq_len``,
``max_attn_len``, ``min_full_attn_seq_len``); ``docs/patterns.md`` has worked examples.
Every function here works elementwise on broadcastable integer tensors, like
``rec2pm_kernels.patterns``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HSTUMask:
    """The sizes of the HSTU masks that are the same for every sequence (``num_targets``,
    one count per sequence, is passed as a tensor beside it), and whether they are causal.
    All zero and causal: plain causal."""

    contextual_seq_len: int = 0
    max_attn_len: int = 0
    min_full_attn_seq_len: int = 0
    causal: bool = True

    def __post_init__(self):
        from .validation import check_hstu_mask_fields  # validation imports this module

        check_hstu_mask_fields(self)

    def as_kwargs(self) -> dict:
        """The four fields by name, as the launchers and ``segment_attention`` take them (not
        ``dataclasses.asdict``, whose deep copy cost 30 us on every attention call)."""
        return dict(
            contextual_seq_len=self.contextual_seq_len,
            max_attn_len=self.max_attn_len,
            min_full_attn_seq_len=self.min_full_attn_seq_len,
            causal=self.causal,
        )

    @property
    def active(self) -> bool:
        return bool(self.contextual_seq_len or self.max_attn_len or not self.causal)

    def _plain_window(self, has_targets: bool) -> bool:
        """A window over positions: no prefix, candidates or full-attention tail, whose
        ranks or full rows would reach past it."""
        return bool(self.max_attn_len) and not (self.contextual_seq_len or self.min_full_attn_seq_len or has_targets)

    def first_visible_column(self, row: int, has_targets: bool) -> int:
        """Smallest column any row at or after ``row`` can see.  Only a plain window forgets
        the past: candidates count distances in ranks, which skip the other candidates."""
        if self._plain_window(has_targets):
            return max(row - self.max_attn_len, 0)
        return 0

    def column_end(self, row_start: int, row_end: int, length: int, has_targets: bool) -> int:
        """One past the last column rows ``[row_start, row_end)`` can see: contextual rows see
        ahead, and bidirectional rows up to the window's end (the sequence's without one)."""
        if not self.causal:
            return min(row_end + self.max_attn_len, length) if self._plain_window(has_targets) else length
        return length if row_start < self.contextual_seq_len else row_end


def ranks(p: torch.Tensor, length: torch.Tensor, num_targets: torch.Tensor | None, contextual_seq_len: int):
    """``(rank(p), m)``: see the module docstring.  ``length`` and ``num_targets`` broadcast with ``p``."""
    shift = max(contextual_seq_len - 1, 0)
    rank = (p - shift).clamp(min=0)
    last = length - shift
    if num_targets is not None:
        last = last - num_targets
        rank = torch.minimum(rank, last)
    return rank, last


def hstu_visible(
    row: torch.Tensor,
    col: torch.Tensor,
    length: torch.Tensor,
    num_targets: torch.Tensor | None,
    mask: HSTUMask,
) -> torch.Tensor:
    """Boolean tensor: may query position ``row`` see key position ``col`` of a sequence of
    ``length`` tokens with ``num_targets`` candidates?  All arguments broadcast; positions
    at or past ``length`` are never visible."""
    row_rank, last = ranks(row, length, num_targets, mask.contextual_seq_len)
    col_rank, _ = ranks(col, length, num_targets, mask.contextual_seq_len)
    distance = row_rank - col_rank
    if not mask.causal:
        distance = distance.abs()
    seen = (col == row) | (distance > 0)
    if mask.max_attn_len:
        near = distance <= mask.max_attn_len
        if mask.min_full_attn_seq_len:
            near = near | (row_rank >= last - mask.min_full_attn_seq_len)
        seen = seen & near
    if mask.contextual_seq_len:
        seen = seen | ((row_rank == 0) & (col_rank < last))
    return seen & (col < length) & (row < length)
