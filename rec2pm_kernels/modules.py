"""``nn.Module`` wrappers of the kernels, for dropping into other GenRec code bases."""

from __future__ import annotations

import torch
from torch import nn

from . import validation as check
from .backends import BACKENDS
from .interface import segment_attention
from .patterns import PatternSpec


class SegmentAttention(nn.Module):
    """Attention over packed variable-length sequences with a Rec2PM pattern.

    Owns the relative-position bias table when ``num_buckets`` is given; everything else
    is ``rec2pm_kernels.segment_attention`` (see its docstring for patterns and scores).

    Replacing an HSTU attention call of a jagged-tensor code base, where ``q, k, v`` are
    ``(total_tokens, heads, dim)`` and ``seq_offsets`` is ``(batch + 1,)`` int64::

        attn = SegmentAttention(num_heads, score="silu", silu_norm=max_seq_len, scale=alpha,
                                num_buckets=128)
        out = attn(q, k, v, seq_offsets, max_seq_len)           # causal, as before
        # Rec2PM Stage 1 over interleaved [S_0 w S_1 w ... tail] streams:
        stage1 = SegmentAttention(num_heads, pattern="global", segment_len=200,
                                  num_memory_tokens=4, score="silu", silu_norm=max_seq_len)

    Inputs may also be ``(total_tokens, heads * dim)``; the output then has that form too.
    """

    def __init__(
        self,
        num_heads: int,
        *,
        pattern: str | PatternSpec = "causal",
        segment_len: int | None = None,
        num_memory_tokens: int | None = None,
        score: str = "softmax",
        scale: float | None = None,
        silu_norm: float | None = None,
        num_buckets: int | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        # The options are checked here, so a bad module fails where it is built, not at its first call.
        check.check_positive_int("num_heads", num_heads)
        self.pattern = check.check_pattern(pattern, segment_len, num_memory_tokens)
        check.check_choice("backend", backend, BACKENDS)
        if num_buckets is not None:
            check.check_positive_int("num_buckets", num_buckets)
        check.check_score_options(score, scale, silu_norm, None, num_heads, torch.empty(0, num_heads, 1))
        self.num_heads = num_heads
        self.options = dict(
            pattern=self.pattern,
            score=score,
            scale=scale,
            silu_norm=silu_norm,
            backend=backend,
        )
        self.rel_bias = nn.Parameter(torch.zeros(num_heads, num_buckets)) if num_buckets else None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        flat = isinstance(q, torch.Tensor) and q.dim() == 2
        if flat:
            for name, x in (("q", q), ("k", k), ("v", v)):
                if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[-1] % self.num_heads:
                    raise ValueError(
                        f"{name} must be (total_tokens, heads * dim) with a last dim divisible by "
                        f"num_heads={self.num_heads} (like q), got {tuple(getattr(x, 'shape', ()))}"
                    )
            q, k, v = (x.unflatten(-1, (self.num_heads, -1)) for x in (q, k, v))
        out = segment_attention(q, k, v, cu_seqlens, max_seqlen, rel_bias=self.rel_bias, **self.options)
        return out.flatten(1) if flat else out

    def extra_repr(self) -> str:
        options = {**self.pattern.kwargs(), **self.options}
        opts = ", ".join(f"{k}={v!r}" for k, v in options.items() if v is not None)
        return f"num_heads={self.num_heads}, {opts}, rel_bias={self.rel_bias is not None}"
