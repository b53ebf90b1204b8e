"""Rec2PM: two-stage self-referential teacher forcing (``docs/method.md``).

Stage 1: one ``global`` pass over ``[S_0 w S_1 w ... tail]`` gives the reference memories
``m_h^ref`` at the write tokens (item rows equal the Full model's).  Stage 2: one
``causal`` pass over all blocks ``[S_0 w] [m_0^ref S_1 w] ... [m_{K-1}^ref tail]`` at once
gives the item predictions and the updated memories ``m_h^upd``.
``L = L_AR + λ L_con``, ``L_con = Σ_{h>=1} ||m_h^upd - m_h^ref||² / (C d #terms)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import WRITE, cached_layout, stage2_layout
from .base import LossOutput
from .token_memory import TokenMemoryModel


class Rec2PM(TokenMemoryModel):
    method = "rec2pm"

    def stage2(self, items: torch.Tensor, lengths: torch.Tensor, bank: torch.Tensor, timestamps=None, bank_times=None):
        """All Stage 2 blocks in one pass; memory tokens read ``bank`` at Stage 1 rows (and,
        with a timestamp bias, their times from ``bank_times``, the Stage 1 key times)."""
        S, C = self.config.segment_len, self.config.num_memory_tokens
        layout = cached_layout(stage2_layout, lengths, S, C, self.options.mode)
        x = layout.embed(self.item_embedding(items), self.write_tokens, self.memory_input(bank))
        times = layout.token_times(timestamps, memory_times=bank_times) if timestamps is not None else None
        return layout, self.run(layout, x, times=times)

    def forward(self, items: torch.Tensor, cu_seqlens: torch.Tensor, timestamps=None) -> LossOutput:
        lengths = self.check_history(items, cu_seqlens)
        timestamps = self.check_times(timestamps, items)
        layout1, out1, bank_times = self.stage1_with_times(items, lengths, timestamps)
        prefix = out1.detach() if self.options.detach_prefix else out1
        layout2, out2 = self.stage2(items, lengths, prefix, timestamps, bank_times)
        ar, n = self.ar_loss(layout2, out2, items)
        if self.options.stage1_ar:
            ar1, n1 = self.ar_loss(layout1, out1, items)
            ar = (ar * n + ar1 * n1) / max(n + n1, 1)
            n += n1
        rows = torch.nonzero((layout2.role == WRITE) & (layout2.segment >= 1)).flatten()
        con = None
        if rows.numel():
            target = out1.detach() if self.options.detach_target else out1
            updated = out2[rows.to(out2.device)]
            reference = target[layout2.reference_index[rows].to(out1.device)]
            con = F.mse_loss(updated, reference)  # mean over C*d*terms entries
        return self.loss_output(ar, con, n)
