"""The attention patterns of Rec2PM, as rules on token positions.

A token's role comes from its position ``p`` inside its sequence alone: with
``S = segment_len`` and ``C = num_memory_tokens`` a *unit* is ``S`` items followed by
``C`` write tokens, token ``p`` is a write token iff ``p % (S + C) >= S`` and belongs to
unit ``p // (S + C)``.  A row (query) may see a column (key) when:

=======================  ===================================================================
``causal``               ``col <= row``
``global``               ``col <= row`` and the column is an item, or a write token of the
                         row's own unit
``kv_memory_overwrite``  ``col <= row`` and the column is in the row's unit, or is a write
                         token of the previous unit
``kv_memory_append``     ``col <= row`` and the column is in the row's unit, or is a write
                         token of any earlier unit
=======================  ===================================================================

Every function here works elementwise on broadcastable integer tensors, so the oracle
builds whole dense masks with it and the ``torch`` backend builds one row chunk at a time
with the very same rule.  The C++ header ``csrc/include/rec2pm/patterns.h`` implements the
same rule for the compiled kernels; ``tests/kernels/test_patterns.py`` keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PATTERNS = ("causal", "global", "kv_memory_overwrite", "kv_memory_append")
INTERLEAVED_PATTERNS = PATTERNS[1:]
SCORES = ("softmax", "silu")

# Integer codes shared with the C++ header (``rec2pm::Pattern``); keep them in step.
PATTERN_CODES = {name: code for code, name in enumerate(PATTERNS)}
SCORE_CODES = {name: code for code, name in enumerate(SCORES)}


def is_write_token(p: torch.Tensor, segment_len: int, num_memory_tokens: int) -> torch.Tensor:
    """True where position ``p`` holds a write token."""
    return p % (segment_len + num_memory_tokens) >= segment_len


def unit_of(p: torch.Tensor, segment_len: int, num_memory_tokens: int) -> torch.Tensor:
    """The unit (segment followed by its write block) that position ``p`` belongs to."""
    return torch.div(p, segment_len + num_memory_tokens, rounding_mode="floor")


def visible(
    pattern: str,
    row: torch.Tensor,
    col: torch.Tensor,
    segment_len: int | None = None,
    num_memory_tokens: int | None = None,
) -> torch.Tensor:
    """Boolean tensor: may query position ``row`` see key position ``col``?

    ``row`` and ``col`` are integer tensors that broadcast against each other, for example
    ``row[:, None]`` and ``col[None, :]`` for a dense mask.
    """
    causal = col <= row
    if pattern == "causal":
        return causal
    S, C = segment_len, num_memory_tokens
    row_unit = unit_of(row, S, C)
    col_unit = unit_of(col, S, C)
    col_is_write = is_write_token(col, S, C)
    same_unit = col_unit == row_unit
    if pattern == "global":
        return causal & (~col_is_write | same_unit)
    if pattern == "kv_memory_overwrite":
        return causal & (same_unit | (col_is_write & (col_unit == row_unit - 1)))
    if pattern == "kv_memory_append":
        return causal & (same_unit | (col_is_write & (col_unit < row_unit)))
    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")


def bias_positions(
    pattern: str,
    p: torch.Tensor,
    segment_len: int | None = None,
    num_memory_tokens: int | None = None,
) -> torch.Tensor:
    """The positions λ(p) that the relative-position bias compares.

    ``λ(p) = p`` for ``causal`` and the kv-memory patterns.  For ``global``,
    ``λ(p) = p - C * (p // (S + C))``: items carry their index in the history and write
    token ``c`` of unit ``h`` carries ``(h + 1) * S + c``, so that ``global`` item rows are
    exactly ``causal`` attention over the items alone, bias included.
    """
    if pattern != "global":
        return p
    return p - num_memory_tokens * unit_of(p, segment_len, num_memory_tokens)


def bias_bucket(lambda_row: torch.Tensor, lambda_col: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bucket of the relative-position bias table: ``min(max(λ(row) - λ(col), 0), B - 1)``."""
    return (lambda_row - lambda_col).clamp(min=0, max=num_buckets - 1)


def first_visible_column(pattern: str, row: int, segment_len: int | None, num_memory_tokens: int | None) -> int:
    """Smallest column any row at or after ``row`` can see (a lower bound for key ranges).

    Used to skip keys that a whole chunk of rows masks out.  Only ``kv_memory_overwrite``
    forgets the past: its rows see their own unit and the write block just before it.
    """
    if pattern != "kv_memory_overwrite":
        return 0
    U = segment_len + num_memory_tokens
    unit = row // U
    return max(unit * U - num_memory_tokens, 0)


def ends_inside_write_block(length: torch.Tensor, segment_len: int, num_memory_tokens: int) -> torch.Tensor:
    """True for sequence lengths whose last token is a write token but not its block's last."""
    rem = length % (segment_len + num_memory_tokens)
    return rem > segment_len


@dataclass(frozen=True)
class PatternSpec:
    """A pattern with its ``S`` and ``C``: the one value the kernels, their backends and
    the layouts pass around instead of the ``pattern`` / ``segment_len`` /
    ``num_memory_tokens`` trio.  Checked when built: an interleaved pattern needs both
    sizes (>= 1, ``S + C`` within 32-bit positions), ``causal`` takes neither.

    The public functions keep their keyword form (``pattern="global", segment_len=200,
    num_memory_tokens=4``) and also accept a ``PatternSpec`` as ``pattern``.
    """

    name: str = "causal"
    segment_len: int | None = None
    num_memory_tokens: int | None = None

    def __post_init__(self):
        from .validation import check_pattern_fields  # validation imports this module

        check_pattern_fields(self.name, self.segment_len, self.num_memory_tokens)

    @classmethod
    def of(cls, pattern, segment_len=None, num_memory_tokens=None) -> PatternSpec:
        """The spec of the keyword form, or ``pattern`` itself when it is one (then without sizes)."""
        if isinstance(pattern, cls):
            if segment_len is not None or num_memory_tokens is not None:
                raise ValueError("pass segment_len and num_memory_tokens inside the PatternSpec, not beside it")
            return pattern
        return cls(pattern, segment_len, num_memory_tokens)

    @property
    def interleaved(self) -> bool:
        return self.name != "causal"

    def kwargs(self) -> dict:
        """The keyword form: ``{"pattern", "segment_len", "num_memory_tokens"}``."""
        return {"pattern": self.name, "segment_len": self.segment_len, "num_memory_tokens": self.num_memory_tokens}

    def visible(self, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        return visible(self.name, row, col, self.segment_len, self.num_memory_tokens)

    def bias_positions(self, p: torch.Tensor) -> torch.Tensor:
        return bias_positions(self.name, p, self.segment_len, self.num_memory_tokens)

    def first_visible_column(self, row: int) -> int:
        return first_visible_column(self.name, row, self.segment_len, self.num_memory_tokens)

    def ends_inside_write_block(self, lengths: torch.Tensor) -> torch.Tensor:
        """True for lengths ending inside a write block (never for ``causal``)."""
        if not self.interleaved:
            return torch.zeros_like(lengths, dtype=torch.bool)
        return ends_inside_write_block(lengths, self.segment_len, self.num_memory_tokens)
