"""Baselines without memory: Full (causal over the whole history) and Recent-only.

Both carry HSTU's timestamp bias when the model has one: ``timestamps`` (one per item)
in training and scoring, and optionally ``request_times`` (one per user) in scoring.
"""

from __future__ import annotations

import torch

from rec2pm_kernels.varlen import expand_lengths

from ..layout import block_layout, cached_layout, history_shape, split_history
from .base import LossOutput, RecModel


def _whole_history_layout(lengths: torch.Tensor):
    """One causal block per user holding the whole history."""
    return block_layout(torch.zeros_like(lengths), lengths, 1)


def _times(layout, timestamps, request_times=None):
    return None if timestamps is None else layout.token_times(timestamps, request_times=request_times)


class FullAttention(RecModel):
    """Causal attention over the whole history; serving recomputes it per request."""

    method = "full"
    supports_time_bias = True

    def hidden(
        self, items, cu_seqlens, timestamps=None, request_times=None, *, last_rows_only: bool = False
    ) -> tuple[torch.Tensor, object]:
        lengths = self.check_history(items, cu_seqlens)
        timestamps = self.check_times(timestamps, items)
        request_times = self.check_request_times(request_times, lengths.numel())
        layout = cached_layout(_whole_history_layout, lengths)
        times = _times(layout, timestamps, request_times)
        return self.run(layout, self.item_embedding(items), times=times, last_rows_only=last_rows_only), layout

    def forward(self, items: torch.Tensor, cu_seqlens: torch.Tensor, timestamps=None) -> LossOutput:
        h, layout = self.hidden(items, cu_seqlens, timestamps)
        ar, n = self.ar_loss(layout, h, items)
        return self.loss_output(ar, None, n)

    def score_history(self, items: torch.Tensor, cu_seqlens: torch.Tensor, timestamps=None, request_times=None):
        h, _ = self.hidden(items, cu_seqlens, timestamps, request_times, last_rows_only=True)
        return self.logits(h)


class RecentOnly(RecModel):
    """Trained on segment blocks ``[S_h]`` without memory; served on the recent items only."""

    method = "recent"
    supports_time_bias = True

    def forward(self, items: torch.Tensor, cu_seqlens: torch.Tensor, timestamps=None) -> LossOutput:
        lengths = self.check_history(items, cu_seqlens)
        timestamps = self.check_times(timestamps, items)
        S = self.config.segment_len
        archived, _ = history_shape(lengths, S)
        users, h_index = expand_lengths(archived + 1)  # block h of each user
        first = h_index * S
        counts = torch.minimum(lengths[users] - first, torch.full_like(first, S))
        layout = cached_layout(
            block_layout, torch.zeros_like(counts), counts, 1, users=users, item_first=first, history_lengths=lengths
        )
        h = self.run(layout, layout.embed(self.item_embedding(items)), times=_times(layout, timestamps))
        ar, n = self.ar_loss(layout, h, items)
        return self.loss_output(ar, None, n)

    def score_history(self, items: torch.Tensor, cu_seqlens: torch.Tensor, timestamps=None, request_times=None):
        lengths = self.check_history(items, cu_seqlens)
        timestamps = self.check_times(timestamps, items)
        request_times = self.check_request_times(request_times, lengths.numel())
        _, recent, recent_cu = split_history(items, lengths, self.config.segment_len)
        tail = recent_cu.diff()
        layout = cached_layout(_whole_history_layout, tail)
        recent_times = None if timestamps is None else split_history(timestamps, lengths, self.config.segment_len)[1]
        h = self.run(
            layout, self.item_embedding(recent), times=_times(layout, recent_times, request_times), last_rows_only=True
        )
        return self.logits(h)
