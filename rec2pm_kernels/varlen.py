"""Helpers for packed variable-length batches: one home for expanding ``cu_seqlens``.

A batch of ``B`` sequences is packed into one token dimension with offsets ``cu_seqlens``
``(B + 1,)``: sequence ``b`` is tokens ``[cu_seqlens[b], cu_seqlens[b + 1])``.  These
functions turn offsets or per-sequence lengths into per-token indices without a Python
loop.  Results are int64 on the device of their input; pass ``total`` (the token count)
on CUDA to skip the device-to-host sync that sizing the output needs otherwise.
"""

from __future__ import annotations

import torch


def prepare_lens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``(B,)`` sequence lengths of offsets ``(B + 1,)``."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).long()


def prepare_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """``(B + 1,)`` int64 offsets of sequences of ``lengths`` tokens (the inverse of ``prepare_lens``)."""
    return torch.cat([lengths.new_zeros(1, dtype=torch.int64), lengths.long().cumsum(0)])


def prepare_sequence_ids(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """``(T,)``: the sequence each packed token belongs to."""
    lengths = prepare_lens(cu_seqlens)
    ids = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(ids, lengths, output_size=total)


def prepare_position_ids(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """``(T,)``: each packed token's index inside its own sequence (0 at every sequence start)."""
    sequence = prepare_sequence_ids(cu_seqlens, total)
    return torch.arange(sequence.numel(), device=cu_seqlens.device) - cu_seqlens[:-1].long()[sequence]


def prepare_sequence_and_position_ids(
    cu_seqlens: torch.Tensor, total: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both of the above, sharing the one expansion."""
    sequence = prepare_sequence_ids(cu_seqlens, total)
    return sequence, torch.arange(sequence.numel(), device=cu_seqlens.device) - cu_seqlens[:-1].long()[sequence]


def expand_lengths(lengths: torch.Tensor, total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``prepare_sequence_and_position_ids`` of sequences given by their ``lengths``."""
    return prepare_sequence_and_position_ids(prepare_offsets(lengths), total)


def range_rows(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row indices of the ranges ``[starts[i], starts[i] + counts[i])``, concatenated in order.

    Gathers (parts of) packed sequences in one indexing op: tails, windows, chosen users.
    """
    sequence, position = expand_lengths(counts.to(starts.device))
    return starts.long()[sequence] + position
