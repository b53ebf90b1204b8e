"""KV-Mask-O/A (PerSRec style): one pass with the kv-memory patterns; the memory is the
per-layer K/V of the write tokens (2 * layers * C * d floats per user in overwrite mode).

Positions are stream positions ``p`` (λ(p) = p for these patterns).  Serving prefills the
cached step with the write-token K/V and runs the tail items after it.  With overwrite the
relative distances are exactly those of training; with append and a relative bias (HSTU)
the cache compresses the distances to earlier write blocks (each counts C slots, not a
whole unit), so only SASRec serves KV-Mask-A exactly as it trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbones.decoder import caches_from_kv
from ..layout import ITEM, cached_layout, split_history, stage1_layout
from .base import LossOutput, RecModel
from .token_memory import memory_rows


@dataclass
class KVMemory:
    """Per layer ``(k, v)``, each ``(sum(counts), H, D)`` packed user after user."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    counts: torch.Tensor


class KVMask(RecModel):
    method = "kv-mask"

    uses_write_tokens = True

    @property
    def pattern(self) -> str:
        return "kv_memory_overwrite" if self.options.mode == "overwrite" else "kv_memory_append"

    def stream(self, items: torch.Tensor, lengths: torch.Tensor, collect_kv: bool = False):
        S, C = self.config.segment_len, self.config.num_memory_tokens
        layout = cached_layout(stage1_layout, lengths, S, C)
        positions = torch.arange(layout.num_tokens) - layout.cu_seqlens[:-1].long()[layout.user]
        x = layout.embed(self.item_embedding(items), self.write_tokens)
        result = self.decoder(
            x,
            positions.to(x.device),
            layout.to(x.device).cu_seqlens,
            layout.max_seqlen,
            pattern=self.pattern,
            segment_len=S,
            num_memory_tokens=C,
            collect_kv=collect_kv,
            max_position=layout.max_seqlen - 1 if layout.num_tokens else None,  # positions restart per user
        )
        return layout, result

    def forward(self, items: torch.Tensor, cu_seqlens: torch.Tensor) -> LossOutput:
        lengths = self.check_history(items, cu_seqlens)
        layout, out = self.stream(items, lengths)
        ar, n = self.ar_loss(layout, out, items)
        return self.loss_output(ar, None, n)

    @torch.no_grad()
    def encode(self, items: torch.Tensor, cu_seqlens: torch.Tensor):
        """History -> ``(KVMemory, tail_items, tail_cu, tail_positions)``."""
        lengths = self.check_history(items, cu_seqlens)
        S, C = self.config.segment_len, self.config.num_memory_tokens
        archived, tail_items, tail_cu = split_history(items, lengths, S)
        layout, (_, kv) = self.stream(items, lengths, collect_kv=True)
        rows, counts = memory_rows(layout, archived, self.options.mode, C)
        tail_rows = torch.nonzero((layout.role == ITEM) & (layout.segment == archived[layout.user])).flatten()
        tail_positions = tail_rows - layout.cu_seqlens[:-1].long()[layout.user[tail_rows]]
        rows = rows.to(items.device)  # once for every layer's keys and values
        memory = KVMemory([(k[rows], v[rows]) for k, v in kv], counts)
        return memory, tail_items, tail_cu, tail_positions

    @torch.no_grad()
    def tail_hidden(self, memory: KVMemory, tail_items, tail_cu, tail_positions) -> torch.Tensor:
        """Decoder outputs of the tail items served over the cached write-token K/V."""
        device = tail_items.device
        tail_counts = (tail_cu[1:] - tail_cu[:-1]).cpu()
        memory_cu = torch.cat([memory.counts.new_zeros(1), memory.counts.cumsum(0)]).to(device)
        caches, cache_seqlens = caches_from_kv(memory.layers, memory_cu, int((memory.counts + tail_counts).max()))
        return self.decoder.step(
            self.item_embedding(tail_items),
            tail_positions.to(device),
            tail_cu.to(device),
            int(tail_counts.max()),
            caches,
            cache_seqlens,
        )

    def score_history(self, items: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        memory, tail, tail_cu, positions = self.encode(items, cu_seqlens)
        h = self.tail_hidden(memory, tail, tail_cu, positions)
        return self.logits(h[(tail_cu[1:] - 1).long().to(h.device)])
