"""CUDA backend of ``segment_attention``: forward only, for short blocks such as the memory
update ``[M ; S_h ; w]``: every pattern, both scores and the relative bias, fp32 / fp16 /
bf16 with fp32 math.

The kernels are ``csrc/cuda/attention_kernels.cu`` (``rec2pm_kernels._C.segment_attention_forward_cuda``):
one program per (row, head, chunk of 256 visible keys), the chunks merged in order by the
rule the CPU cached step also uses (``csrc/include/rec2pm/split_keys.h``).  HSTU's masks, the
timestamp bias, per-sequence SiLU divisors and dropout stay on the ``triton`` backend.
Registered as the custom op ``rec2pm::cuda_segment_attention`` with a fake implementation.
"""

from __future__ import annotations

import torch

from ... import _extension
from ...hstu_masks import HSTUMask
from ...patterns import PATTERN_CODES, SCORES, PatternSpec


def unit_dim_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is contiguous (what the kernels index), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def check_cuda_options(hstu_mask: HSTUMask | None, num_targets, ts_bias, silu_norm) -> None:
    """A named ``ValueError`` for an option the CUDA kernels do not implement (``segment_attention``
    refuses ``dropout_p`` with this backend before it gets here)."""
    refused = [
        ("HSTU's masks (contextual_seq_len, max_attn_len, causal=False)", hstu_mask is not None and hstu_mask.active),
        ("num_targets", num_targets is not None),
        ("ts_bias", ts_bias is not None),
        ("a per-sequence silu_norm tensor", isinstance(silu_norm, torch.Tensor)),
    ]
    for name, given in refused:
        if given:
            raise ValueError(f"backend='cuda' does not implement {name}; use backend='triton' (or 'auto')")


def run_cuda_segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    pattern: str,
    segment_len: int,
    num_memory_tokens: int,
    score: str,
    scale: float,
    rel_bias: torch.Tensor | None,
    silu_norm: float,
) -> torch.Tensor:
    """Launcher (``segment_len = 1, num_memory_tokens = 0`` for ``causal``, ``silu_norm = 1``
    for softmax)."""
    return _extension.C.segment_attention_forward_cuda(
        q=q,
        k=k,
        v=v,
        cu_seqlens=cu_seqlens.to(torch.int64).contiguous(),
        max_seqlen=max_seqlen,
        pattern=PATTERN_CODES[pattern],
        segment_len=segment_len,
        num_memory_tokens=num_memory_tokens,
        score=SCORES.index(score),
        scale=scale,
        rel_bias=None if rel_bias is None else rel_bias.detach().float().contiguous(),
        silu_norm=silu_norm,
    )


cuda_segment_attention_op = torch.library.custom_op("rec2pm::cuda_segment_attention", mutates_args=())(
    run_cuda_segment_attention
)


@cuda_segment_attention_op.register_fake
def _cuda_segment_attention_fake(q, k, v, *args, **kwargs):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2]))


def segment_attention_cuda(
    q,
    k,
    v,
    cu_seqlens,
    max_seqlen,
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
    """Arguments as ``rec2pm_kernels.segment_attention`` after validation; no autograd."""
    check_cuda_options(hstu_mask, num_targets, ts_bias, silu_norm)
    run = cuda_segment_attention_op if torch.compiler.is_compiling() else run_cuda_segment_attention
    return run(
        *(unit_dim_stride(t) for t in (q, k, v)),  # of one dtype: validated
        cu_seqlens,
        int(max_seqlen),
        pattern.name,
        pattern.segment_len or 1,
        pattern.num_memory_tokens or 0,
        score,
        float(scale),
        rel_bias,
        float(silu_norm) if silu_norm is not None else 1.0,
    )
