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
        self.query = nn.Linear(d_model, d_model)
        # No key bias: under softmax it adds a constant to each query's scores, so its true
        # gradient is zero and Adam would only amplify rounding noise in it.
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model)
        self.attn_out = nn.Linear(d_model, d_model)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, d_model), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_model, d_model)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attend) -> torch.Tensor:
        tokens, d = x.shape
        h = self.attn_norm(x)
        shape = (tokens, self.num_heads, d // self.num_heads)
        q, k, v = self.query(h).view(shape), self.key(h).view(shape), self.value(h).view(shape)
        a = attend(q, k, v, score="softmax")
        x = x + self.dropout(self.attn_out(a.reshape(tokens, d)))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))
