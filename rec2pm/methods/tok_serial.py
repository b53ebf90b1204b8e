"""Tok-Serial-O/A: the same token memory, trained serially (RMT / AutoCompressor style).

Segment by segment, ``[M ; S_h ; w]`` runs through the decoder and the outputs at ``w``
become the next ``M``; gradients flow back through the whole loop, or through at most
``serial_truncation`` steps.  Inference is shared with Rec2PM (``TokenMemoryModel``).
"""

from __future__ import annotations

import torch

from ..layout import WRITE, block_layout, cached_layout, history_shape
from .base import LossOutput
from .token_memory import TokenMemoryModel


class TokSerial(TokenMemoryModel):
    method = "tok-serial"
    supports_time_bias = False  # its serial loop carries no memory times (docs/timestamps.md)

    def serial_pass(self, items: torch.Tensor, lengths: torch.Tensor):
        """Yields ``(layout, outputs)`` of each step; step ``h`` holds block ``h`` of every
        user with at least ``h`` archived segments."""
        S, C = self.config.segment_len, self.config.num_memory_tokens
        archived, _ = history_shape(lengths, S)
        embeddings = self.item_embedding(items)
        batch, d = lengths.numel(), self.config.d_model
        memory = embeddings.new_zeros((batch, 0, d))  # every active user holds the same count
        for h in range(int(archived.max()) + 1):
            users = torch.nonzero(archived >= h).flatten()
            writes = archived[users] > h
            counts = torch.where(writes, S, lengths[users] - h * S)
            layout = cached_layout(
                block_layout,
                torch.full_like(users, memory.shape[1]),
                counts,
                C,
                with_write=writes,
                users=users,
                item_first=torch.full_like(users, h * S),
                history_lengths=lengths,
            )
            active = memory[users.to(memory.device)].reshape(-1, d)
            out = self.run(layout, layout.embed(embeddings, self.write_tokens, self.memory_input(active)))
            yield layout, out
            new = memory.new_zeros((batch, C, d)).index_put(
                (users[writes].to(memory.device),), out[layout.to(out.device).rows(WRITE)].view(-1, C, d)
            )
            memory = new if self.options.mode == "overwrite" else torch.cat([memory, new], dim=1)
            if self.options.serial_truncation and (h + 1) % self.options.serial_truncation == 0:
                memory = memory.detach()

    def forward(self, items: torch.Tensor, cu_seqlens: torch.Tensor) -> LossOutput:
        lengths = self.check_history(items, cu_seqlens)
        total, count = None, 0
        for layout, out in self.serial_pass(items, lengths):
            ar, n = self.ar_loss(layout, out, items)
            total = ar * n if total is None else total + ar * n
            count += n
        return self.loss_output(total / max(count, 1), None, count)
