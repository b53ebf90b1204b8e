"""Baselines without memory: Full (causal over the whole history) and Recent-only."""

from __future__ import annotations

import torch

from rec2pm_kernels.varlen import expand_lengths

from ..layout import block_layout, history_shape, split_history
from .base import LossOutput, RecModel


def _whole_history_layout(lengths: torch.Tensor):
    """One causal block per user holding the whole history."""
    return block_layout(torch.zeros_like(lengths), lengths, 1)


class FullAttention(RecModel):
    """Causal attention over the whole history; serving recomputes it per request."""

    method = "full"

    def hidden(self, items: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, object]:
        lengths = self.check_history(items, cu_seqlens)
        layout = _whole_history_layout(lengths)
        return self.run(layout, self.item_embedding(items)), layout

    def forward(self, items: torch.Tensor, cu_seqlens: torch.Tensor) -> LossOutput:
        h, layout = self.hidden(items, cu_seqlens)
        ar, n = self.ar_loss(layout, h, items)
        return self.loss_output(ar, None, n)

    def score_history(self, items: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        h, layout = self.hidden(items, cu_seqlens)
        return self.logits(h[layout.last_rows.to(h.device)])


class RecentOnly(RecModel):
    """Trained on segment blocks ``[S_h]`` without memory; served on the recent items only."""

    method = "recent"

    def forward(self, items: torch.Tensor, cu_seqlens: torch.Tensor) -> LossOutput:
        lengths = self.check_history(items, cu_seqlens)
        S = self.config.segment_len
        archived, _ = history_shape(lengths, S)
        users, h_index = expand_lengths(archived + 1)  # block h of each user
        first = h_index * S
        counts = torch.minimum(lengths[users] - first, torch.full_like(first, S))
        layout = block_layout(
            torch.zeros_like(counts), counts, 1, users=users, item_first=first, history_lengths=lengths
        )
        h = self.run(layout, layout.embed(self.item_embedding(items)))
        ar, n = self.ar_loss(layout, h, items)
        return self.loss_output(ar, None, n)

    def score_history(self, items: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        lengths = self.check_history(items, cu_seqlens)
        _, recent, recent_cu = split_history(items, lengths, self.config.segment_len)
        tail = recent_cu.diff()
        layout = block_layout(torch.zeros_like(tail), tail, 1)
        h = self.run(layout, self.item_embedding(recent))
        return self.logits(h[layout.last_rows.to(h.device)])
