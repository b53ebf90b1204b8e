"""C++ (CPU) backend of ``cached_step_attention``: the cache append and the attention in one call.

The kernel is ``csrc/cpu/attention_cpu.cpp`` (``rec2pm_kernels._C.cached_step_forward``):
fp32 and fp64 caches are appended and read in place.  For fp16 and bf16 caches the new K/V
are appended here (in the cache's dtype) and the kernel reads an fp32 copy of the filled
prefix.  Registered as the custom op ``rec2pm::cpp_cached_step_attention`` (it writes
``k_cache`` and ``v_cache``), with a fake implementation.
"""

from __future__ import annotations

import torch

from ... import _extension
from ...patterns import SCORES
from ..segment_attention.cpp_backend import KERNEL_DTYPES, math_dtype
from .compiled import compiled_cached_step
from .torch_backend import append_to_cache


def run_cpp_cached_step(
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
    """Launcher (``silu_norm = 1`` for softmax)."""
    dtype = math_dtype(q_new.dtype)
    cu = cu_seqlens_new.to(torch.int64).contiguous()
    seqlens = cache_seqlens.to(torch.int64).contiguous()
    bias = rel_bias.detach().to(dtype).contiguous() if rel_bias is not None else None
    q, k, v = (t.to(dtype).contiguous() for t in (q_new, k_new, v_new))
    if k_cache.dtype in KERNEL_DTYPES:
        keys, values, append = k_cache, v_cache, True
    else:  # 16-bit caches: append in their dtype, attend over an fp32 copy of the filled prefix
        append_to_cache(k_new, v_new, cu_seqlens_new, k_cache, v_cache, cache_seqlens)
        filled = int((seqlens + cu.diff()).max()) if seqlens.numel() else 0
        keys, values, append = k_cache[:, :filled].to(dtype), v_cache[:, :filled].to(dtype), False
    return _extension.C.cached_step_forward(
        q_new=q,
        k_new=k,
        v_new=v,
        cu_seqlens_new=cu,
        k_cache=keys,
        v_cache=values,
        cache_seqlens=seqlens,
        append=append,
        score=SCORES.index(score),
        scale=scale,
        rel_bias=bias,
        silu_norm=silu_norm,
    )


# The custom op is what torch.compile traces; eager calls skip its dispatch (see the
# segment_attention cpp backend).
cpp_cached_step_op = torch.library.custom_op("rec2pm::cpp_cached_step_attention", mutates_args=("k_cache", "v_cache"))(
    run_cpp_cached_step
)


@cpp_cached_step_op.register_fake
def _cpp_cached_step_fake(
    q_new, k_new, v_new, cu_seqlens_new, k_cache, v_cache, cache_seqlens, score, scale, rel_bias, silu_norm
):
    return q_new.new_empty((q_new.shape[0], q_new.shape[1], v_new.shape[2]), dtype=math_dtype(q_new.dtype))


cached_step_cpp = compiled_cached_step(cpp_cached_step_op, run_cpp_cached_step)
