"""HSTU block (Zhai et al., 2024): pointwise SiLU attention with a relative bias, gated by U.

``U, V, Q, K = split(silu(f1(LN(x))))``;
``A = silu(Q.K^T * scale + rab) / silu_norm`` on visible pairs, where ``rab`` is the
relative-position bias plus, with ``num_time_buckets > 0``, HSTU's timestamp bias
(``rec2pm_kernels.time_bias``; one table shared by the heads, as HSTU has it);
``out = x + f2(LN(A V) * U)``.
"""

from __future__ import annotations

import torch
from torch import nn


class HSTUBlock(nn.Module):
    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dropout: float,
        num_buckets: int,
        silu_norm: float,
        num_time_buckets: int = 0,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.silu_norm = silu_norm
        self.input_norm = nn.LayerNorm(d_model)
        self.f1 = nn.Linear(d_model, 4 * d_model)  # U, V, Q, K
        self.rel_bias = nn.Parameter(torch.zeros(num_heads, num_buckets))
        self.ts_bias = nn.Parameter(torch.zeros(1, num_time_buckets + 1)) if num_time_buckets else None
        self.output_norm = nn.LayerNorm(d_model)
        self.f2 = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attend) -> torch.Tensor:
        """``attend(q, k, v, **score_options)`` runs the attention; it adds the token
        timestamps when it receives ``ts_bias``."""
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
            **({"ts_bias": self.ts_bias} if self.ts_bias is not None else {}),
        )
        return x + self.dropout(self.f2(self.output_norm(a.reshape(tokens, d)) * u))
