"""SASRec block: softmax multi-head self-attention and a feed-forward layer, pre-norm."""

from __future__ import annotations

import torch
from torch import nn


class SASRecBlock(nn.Module):
    """``x + Attn(LN(x))``, then ``+ FFN(LN(.))``; attention is delegated to ``attend``.

    ``attend(q, k, v, **score_options)`` receives ``(T, H, D)`` tensors and returns
    ``(T, H, D)``; the decoder binds it to ``segment_attention`` (with the pattern of the
    stream) or to the cached step.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.attn_norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.attn_out = nn.Linear(d_model, d_model)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(d_model, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attend) -> torch.Tensor:
        tokens, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(tokens, 3, self.num_heads, d // self.num_heads).unbind(1)
        a = attend(q, k, v, score="softmax")
        x = x + self.dropout(self.attn_out(a.reshape(tokens, d)))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))
