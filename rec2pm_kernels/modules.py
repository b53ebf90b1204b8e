"""``nn.Module`` wrappers of the kernels, for dropping into other GenRec code bases."""

from __future__ import annotations

import torch
from torch import nn

from . import validation as check
from .backends import BACKENDS
from .hstu_masks import HSTUMask
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

    HSTU's masks that a model fixes (``contextual_seq_len``, ``max_attn_len``,
    ``min_full_attn_seq_len``, ``causal``) are set here; what changes per batch (``num_targets``, the
    timestamps, a per-call ``silu_norm``) is passed to ``forward``.  ``shared_bias`` makes
    the position table ``(1, num_buckets)`` for all heads, as HSTU's; ``num_time_buckets``
    adds HSTU's timestamp table; ``dropout`` is attention dropout while training.

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
        shared_bias: bool = False,
        num_time_buckets: int | None = None,
        contextual_seq_len: int = 0,
        max_attn_len: int = 0,
        min_full_attn_seq_len: int = 0,
        causal: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        # The options are checked here, so a bad module fails where it is built, not at its first call.
        check.check_positive_int("num_heads", num_heads)
        self.pattern = check.check_pattern(pattern, segment_len, num_memory_tokens)
        check.check_choice("backend", backend, BACKENDS)
        for name, count in (("num_buckets", num_buckets), ("num_time_buckets", num_time_buckets)):
            if count is not None:
                check.check_positive_int(name, count)
        check.check_flag("shared_bias", shared_bias)
        # Without a silu_norm here, SiLU modules take one per call (HSTU's production models
        # divide by the batch's longest sequence); the rest is checked now.
        per_call_norm = score == "silu" and silu_norm is None
        placeholder = 1.0 if per_call_norm else silu_norm
        check.check_score_options(score, scale, placeholder, None, num_heads, torch.empty(0, num_heads, 1))
        mask = HSTUMask(contextual_seq_len, max_attn_len, min_full_attn_seq_len, causal)
        rel_bias = torch.empty(1, num_buckets) if num_buckets else None  # only its presence is checked
        check.check_hstu_options(self.pattern, mask, None, 0, torch.device("cpu"), rel_bias=rel_bias)
        check.check_dropout(dropout, None)
        self.num_heads = num_heads
        self.dropout = float(dropout)
        self.options = dict(
            pattern=self.pattern,
            score=score,
            scale=scale,
            contextual_seq_len=contextual_seq_len,
            max_attn_len=max_attn_len,
            min_full_attn_seq_len=min_full_attn_seq_len,
            causal=causal,
            backend=backend,
        )
        self.silu_norm = silu_norm
        table_heads = 1 if shared_bias else num_heads
        self.rel_bias = nn.Parameter(torch.zeros(table_heads, num_buckets)) if num_buckets else None
        self.ts_bias = nn.Parameter(torch.zeros(table_heads, num_time_buckets + 1)) if num_time_buckets else None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        *,
        silu_norm: float | torch.Tensor | None = None,
        num_targets: torch.Tensor | None = None,
        timestamps: torch.Tensor | None = None,
        query_timestamps: torch.Tensor | None = None,
        dropout_seed: int | None = None,
    ) -> torch.Tensor:
        """``silu_norm`` overrides the module's for this call (required if it has none);
        ``timestamps`` are required when the module has a timestamp table."""
        flat = isinstance(q, torch.Tensor) and q.dim() == 2
        if flat:
            for name, x in (("q", q), ("k", k), ("v", v)):
                if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[-1] % self.num_heads:
                    raise ValueError(
                        f"{name} must be (total_tokens, heads * dim) with a last dim divisible by "
                        f"num_heads={self.num_heads} (like q), got {tuple(getattr(x, 'shape', ()))}"
                    )
            q, k, v = (x.unflatten(-1, (self.num_heads, -1)) for x in (q, k, v))
        if self.ts_bias is None and timestamps is not None:
            raise ValueError("timestamps were given, but the module has no timestamp table (num_time_buckets=None)")
        if self.ts_bias is not None and timestamps is None:  # the table would be silently unused
            raise ValueError("this module has a timestamp table (num_time_buckets): pass timestamps= to forward")
        norm = self.silu_norm if silu_norm is None else silu_norm
        if norm is None and self.options["score"] == "silu":
            raise ValueError("this module was built without silu_norm: pass silu_norm= to forward")
        out = segment_attention(
            q,
            k,
            v,
            cu_seqlens,
            max_seqlen,
            rel_bias=self.rel_bias,
            silu_norm=norm,
            num_targets=num_targets,
            ts_bias=self.ts_bias,
            timestamps=timestamps,
            query_timestamps=query_timestamps,
            dropout_p=self.dropout if self.training else 0.0,
            dropout_seed=dropout_seed,
            **self.options,
        )
        return out.flatten(1) if flat else out

    def extra_repr(self) -> str:
        options = {**self.pattern.kwargs(), **self.options, "silu_norm": self.silu_norm, "dropout": self.dropout}
        opts = ", ".join(f"{k}={v!r}" for k, v in options.items() if v is not None and v != 0)
        tables = f"rel_bias={self.rel_bias is not None}, ts_bias={self.ts_bias is not None}"
        return f"num_heads={self.num_heads}, {opts}, {tables}"
