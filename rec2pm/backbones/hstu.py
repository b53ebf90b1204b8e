"""HSTU block (Zhai et al., 2024): pointwise SiLU attention with a relative bias, gated by U.

``U, V, Q, K = split(silu(f1(LN(x))))``;
``A = silu(Q.K^T * scale + rab) / silu_norm`` on visible pairs;
``out = x + f2(LN(A V) * U)``.
"""

from __future__ import annotations

import torch
from torch import nn


class HSTUBlock(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float, num_buckets: int, silu_norm: float):
        super().__init__()
        self.num_heads = num_heads
        self.silu_norm = silu_norm
        self.input_norm = nn.LayerNorm(d_model)
        self.f1 = nn.Linear(d_model, 4 * d_model)  # U, V, Q, K
        self.rel_bias = nn.Parameter(torch.zeros(num_heads, num_buckets))
        self.output_norm = nn.LayerNorm(d_model)
        self.f2 = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attend) -> torch.Tensor:
        tokens, d = x.shape
        u, v, q, k = torch.nn.functional.silu(self.f1(self.input_norm(x))).split(d, dim=-1)
        shape = (tokens, self.num_heads, d // self.num_heads)
        a = attend(
            q.reshape(shape),
            k.reshape(shape),
            v.reshape(shape),
            score="silu",
            rel_bias=self.rel_bias,
            silu_norm=self.silu_norm,
        )
        return x + self.dropout(self.f2(self.output_norm(a.reshape(tokens, d)) * u))
