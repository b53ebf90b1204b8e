"""CUDA backend of ``cached_step_attention``: the cache append and the attention, fp32 /
fp16 / bf16 caches read in place with fp32 math.

The kernels are ``csrc/cuda/attention_kernels.cu`` (``rec2pm_kernels._C.cached_step_forward_cuda``):
an append kernel, then one program per (new row, head, chunk of 256 slots), and a merge of
the chunks of long caches in order (split-K, by the rule of ``csrc/include/rec2pm/split_keys.h``
that the C++ CPU step shares).  Registered as the custom op ``rec2pm::cuda_cached_step_attention``
(it writes ``k_cache`` and ``v_cache``), with a fake implementation.
"""

from __future__ import annotations

import torch

from ... import _extension
from ...patterns import SCORES
from ..segment_attention.cuda_backend import unit_dim_stride
from .compiled import compiled_cached_step


def run_cuda_cached_step(
    q_new: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cu_seqlens_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    score: str,
    scale: float,
    rel_bias: torch.Tensor | None,
    silu_norm: float,
) -> torch.Tensor:
    """Launcher (``silu_norm = 1`` for softmax): new rows in the caches' dtype."""
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("backend='cuda' needs caches with a unit head_dim stride; use backend='triton'")
    dtype = k_cache.dtype
    return _extension.C.cached_step_forward_cuda(
        q_new=unit_dim_stride(q_new.to(dtype)),
        k_new=unit_dim_stride(k_new.to(dtype)),
        v_new=unit_dim_stride(v_new.to(dtype)),
        cu_seqlens_new=cu_seqlens_new.to(torch.int64).contiguous(),
        k_cache=k_cache,
        v_cache=v_cache,
        cache_seqlens=cache_seqlens.to(torch.int64).contiguous(),
        score=SCORES.index(score),
        scale=scale,
        rel_bias=None if rel_bias is None else rel_bias.detach().float().contiguous(),
        silu_norm=silu_norm,
    )


cuda_cached_step_op = torch.library.custom_op(
    "rec2pm::cuda_cached_step_attention", mutates_args=("k_cache", "v_cache")
)(run_cuda_cached_step)


@cuda_cached_step_op.register_fake
def _cuda_cached_step_fake(q_new, k_new, v_new, cu_seqlens_new, k_cache, *args, **kwargs):
    return q_new.new_empty((q_new.shape[0], q_new.shape[1], v_new.shape[2]), dtype=k_cache.dtype)


cached_step_cuda = compiled_cached_step(cuda_cached_step_op, run_cuda_cached_step)
