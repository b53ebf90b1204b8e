"""C++ (CPU) backend of ``segment_attention``: forward only, every pattern, score and bias,
and HSTU's masks (candidates, prefix, window, bidirectional), timestamp bias and per-sequence SiLU divisors.

The kernel is ``csrc/cpu/attention_cpu.cpp`` (``rec2pm_kernels._C.segment_attention_forward``;
plain causal attention in fp32 at head dims 8 and 16 runs ``csrc/cpu/causal_lanes.cpp``):
fp32 and fp64 math; fp16 and bf16 inputs are computed in fp32 and the output cast back.
Registered as the custom op ``rec2pm::cpp_segment_attention`` with a fake implementation, so
``torch.compile`` traces through it.
"""

from __future__ import annotations

import torch

from ... import _extension
from ...hstu_masks import HSTUMask
from ...patterns import PATTERN_CODES, SCORES, PatternSpec

KERNEL_DTYPES = (torch.float32, torch.float64)


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernel computes in: the input's for fp32/fp64, fp32 for 16-bit inputs."""
    return dtype if dtype in KERNEL_DTYPES else torch.float32


def run_cpp_segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pattern: str,
    segment_len: int,
    num_memory_tokens: int,
    score: str,
    scale: float,
    rel_bias: torch.Tensor | None,
    silu_norm: float,
    num_targets: torch.Tensor | None = None,
    silu_norms: torch.Tensor | None = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    min_full_attn_seq_len: int = 0,
    causal: bool = True,
    ts_bias: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    query_timestamps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launcher (``segment_len = 1, num_memory_tokens = 0`` for ``causal``, ``silu_norm = 1`` for
    softmax; ``silu_norms``, one per sequence, replaces ``silu_norm`` when given)."""
    dtype = math_dtype(q.dtype)
    q, k, v = (t.to(dtype).contiguous() for t in (q, k, v))
    bias = rel_bias.detach().to(dtype).contiguous() if rel_bias is not None else None
    out = _extension.C.segment_attention_forward(
        q=q,
        k=k,
        v=v,
        cu_seqlens=cu_seqlens.to(torch.int64).contiguous(),
        pattern=PATTERN_CODES[pattern],
        segment_len=segment_len,
        num_memory_tokens=num_memory_tokens,
        score=SCORES.index(score),
        scale=scale,
        rel_bias=bias,
        silu_norm=silu_norm,
        num_targets=None if num_targets is None else num_targets.to(torch.int64).contiguous(),
        silu_norms=None if silu_norms is None else silu_norms.detach().to(dtype).contiguous(),
        contextual_seq_len=contextual_seq_len,
        max_attn_len=max_attn_len,
        min_full_attn_seq_len=min_full_attn_seq_len,
        causal=causal,
        ts_bias=None if ts_bias is None else ts_bias.detach().to(dtype).contiguous(),
        timestamps=None if ts_bias is None else timestamps.to(torch.int64).contiguous(),
        query_timestamps=None if ts_bias is None else query_timestamps.to(torch.int64).contiguous(),
    )
    return out


# The custom op is what torch.compile traces; eager calls skip its dispatch, whose first use
# imports torch._dynamo (about a second per process).
cpp_segment_attention_op = torch.library.custom_op("rec2pm::cpp_segment_attention", mutates_args=())(
    run_cpp_segment_attention
)


@cpp_segment_attention_op.register_fake
def _cpp_segment_attention_fake(
    q,
    k,
    v,
    cu_seqlens,
    pattern,
    segment_len,
    num_memory_tokens,
    score,
    scale,
    rel_bias,
    silu_norm,
    num_targets=None,
    silu_norms=None,
    contextual_seq_len=0,
    max_attn_len=0,
    min_full_attn_seq_len=0,
    causal=True,
    ts_bias=None,
    timestamps=None,
    query_timestamps=None,
):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2]), dtype=math_dtype(q.dtype))


def segment_attention_cpp(
    q,
    k,
    v,
    cu_seqlens,
    *,
    pattern: PatternSpec,
    score,
    scale,
    rel_bias,
    silu_norm,
    hstu_mask: HSTUMask | None = None,
    num_targets: torch.Tensor | None = None,
    ts_bias: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    query_timestamps: torch.Tensor | None = None,
):
    """Arguments as ``rec2pm_kernels.segment_attention`` after validation (``query_timestamps``
    filled in with ``ts_bias``); no autograd."""
    run = cpp_segment_attention_op if torch.compiler.is_compiling() else run_cpp_segment_attention
    hstu_mask = hstu_mask or HSTUMask()
    per_sequence = silu_norm if isinstance(silu_norm, torch.Tensor) else None
    out = run(
        q,
        k,
        v,
        cu_seqlens,
        pattern=pattern.name,
        segment_len=pattern.segment_len or 1,
        num_memory_tokens=pattern.num_memory_tokens or 0,
        score=score,
        scale=float(scale),
        rel_bias=rel_bias,
        silu_norm=float(silu_norm) if silu_norm is not None and per_sequence is None else 1.0,
        num_targets=num_targets,
        silu_norms=per_sequence,
        **hstu_mask.as_kwargs(),
        ts_bias=ts_bias,
        timestamps=timestamps,
        query_timestamps=query_timestamps,
    )
    return out.to(v.dtype)
