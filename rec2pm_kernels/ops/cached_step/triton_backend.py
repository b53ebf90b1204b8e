"""Triton backend of ``cached_step_attention``: cache append, split-K launch, combine.

Registered as the custom op ``rec2pm::cached_step_attention`` (it writes ``k_cache`` and
``v_cache`` in place), with a fake implementation for ``torch.compile``.
"""

from __future__ import annotations

import functools

import torch
import triton

from ...patterns import SCORE_CODES
from ..outputs import new_output
from ..triton_configs import configs, padded_head_dim
from ..triton_launch import device_arch, input_precision, launch, length_bucket
from .torch_backend import append_to_cache
from .triton_kernel import cached_step_kernel

MAX_SPLITS = 16
# Keys each split should at least have, so combining costs less than it saves.
MIN_KEYS_PER_SPLIT = 256

_sm_counts: dict[int, int] = {}


@functools.cache
def smallest_block_m(dtype: torch.dtype, head_dim: int, arch: int) -> int:
    """The smallest row block of any config of the kernel: it sizes the program count that
    decides the split (cached: the serving step asks on every call)."""
    return min(tile.kwargs["BLOCK_M"] for tile in configs("cached_step", dtype, head_dim, arch))


def default_num_splits(programs: int, capacity: int, device: torch.device) -> int:
    """Split the keys when the (user, row block, head) programs cannot fill the GPU.

    A power of two (so the compiled variants stay few): enough splits for about two
    programs per SM, at most ``MAX_SPLITS`` and at least ``MIN_KEYS_PER_SPLIT`` keys each.
    Off CUDA it is 1.
    """
    if device.type != "cuda" or programs == 0:
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    wanted = triton.cdiv(2 * _sm_counts[index], programs)
    by_length = max(1, capacity // MIN_KEYS_PER_SPLIT)
    splits = min(wanted, by_length, MAX_SPLITS)
    return 1 << (max(splits, 1).bit_length() - 1)


def cached_step_forward(
    q_new,
    k_new,
    v_new,
    cu_seqlens_new,
    max_new,
    k_cache,
    v_cache,
    cache_seqlens,
    score,
    scale,
    rel_bias,
    silu_norm,
    allow_tf32=False,
    num_splits: int | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Append the new K/V to the cache, then attend; returns ``(total_new, H, Dv)``."""
    total, heads, dim_v = v_new.shape
    batch = cu_seqlens_new.numel() - 1
    append_to_cache(k_new, v_new, cu_seqlens_new, k_cache, v_cache, cache_seqlens)
    out = new_output(v_new.shape, dtype=v_new.dtype, device=v_new.device)
    if total == 0 or batch == 0 or max_new == 0:
        return out
    q_new = q_new if q_new.stride(-1) == 1 else q_new.contiguous()
    capacity = k_cache.shape[1]
    tune_dim = max(q_new.shape[2], dim_v)  # configs are chosen by the larger head dim
    if num_splits is None:
        block_m = smallest_block_m(q_new.dtype, tune_dim, device_arch(q_new.device))
        num_splits = default_num_splits(batch * triton.cdiv(max_new, block_m) * heads, capacity, q_new.device)
    block_dv = padded_head_dim(dim_v)
    if num_splits > 1:
        partial_acc = new_output((num_splits, total, heads, block_dv), dtype=torch.float32, device=q_new.device)
        partial_stats = new_output((num_splits, total, heads, 2), dtype=torch.float32, device=q_new.device)
    else:  # one split writes OUT directly
        partial_acc = partial_stats = None
    args = dict(
        Q=q_new,
        K_CACHE=k_cache,
        V_CACHE=v_cache,
        OUT=out,
        PARTIAL_ACC=partial_acc,
        PARTIAL_STATS=partial_stats,
        CU_NEW=cu_seqlens_new,
        CACHE_SEQLENS=cache_seqlens,
        BIAS=rel_bias,
        stride_qt=q_new.stride(0),
        stride_qh=q_new.stride(1),
        stride_kb=k_cache.stride(0),
        stride_ks=k_cache.stride(1),
        stride_kh=k_cache.stride(2),
        stride_vb=v_cache.stride(0),
        stride_vs=v_cache.stride(1),
        stride_vh=v_cache.stride(2),
        stride_ot=out.stride(0),
        stride_oh=out.stride(1),
        total_new=total,
        max_new=max_new,
        NUM_BUCKETS=rel_bias.shape[1] if rel_bias is not None else 1,
        scale=float(scale),
        silu_norm=float(silu_norm) if silu_norm is not None else 1.0,
        SEQ_BUCKET=length_bucket(capacity),
    )
    switches = dict(
        HEAD_DIM=q_new.shape[2],
        HEAD_DIM_V=dim_v,
        BLOCK_D=padded_head_dim(q_new.shape[2]),
        BLOCK_DV=block_dv,
        SCORE=SCORE_CODES[score],
        HAS_BIAS=rel_bias is not None,
        INPUT_PRECISION=input_precision(q_new.dtype, allow_tf32),
        SPLIT_K=num_splits > 1,
    )
    launch(
        cached_step_kernel,
        "cached_step",
        lambda meta: (batch * triton.cdiv(max_new, meta["BLOCK_M"]), heads, num_splits),
        args,
        switches,
        dtype=q_new.dtype,
        head_dim=tune_dim,
        device=q_new.device,
        config=config,
    )
    if num_splits == 1:
        return out
    acc = partial_acc[..., :dim_v]
    if score == "silu":
        return acc.sum(0).to(out.dtype)
    row_max, row_sum = partial_stats[..., 0], partial_stats[..., 1]
    weight = torch.exp2(row_max - row_max.amax(0, keepdim=True))
    combined = (acc * weight[..., None]).sum(0) / (row_sum * weight).sum(0).clamp_min(1e-30)[..., None]
    return combined.to(out.dtype)


@torch.library.custom_op("rec2pm::cached_step_attention", mutates_args=("k_cache", "v_cache"))
def cached_step_op(
    q_new: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cu_seqlens_new: torch.Tensor,
    max_new: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    score: str,
    scale: float,
    rel_bias: torch.Tensor | None,
    silu_norm: float,
    allow_tf32: bool,
) -> torch.Tensor:
    """Launcher of ``cached_step_attention`` (``silu_norm = 1`` for softmax)."""
    return cached_step_forward(
        q_new,
        k_new,
        v_new,
        cu_seqlens_new,
        max_new,
        k_cache,
        v_cache,
        cache_seqlens,
        score,
        scale,
        rel_bias,
        silu_norm,
        allow_tf32,
    )


@cached_step_op.register_fake
def _cached_step_fake(q_new, k_new, v_new, *options, **keyword_options):
    return v_new.new_empty(v_new.shape)


def cached_step_triton(
    q_new,
    k_new,
    v_new,
    cu_seqlens_new,
    max_new,
    k_cache,
    v_cache,
    cache_seqlens,
    *,
    score,
    scale,
    rel_bias,
    silu_norm,
    allow_tf32=False,
):
    """Arguments as ``rec2pm_kernels.cached_step_attention`` after validation."""
    if q_new.dtype == torch.float64:
        raise ValueError("backend='triton' supports fp32, fp16 and bf16 inputs, got q_new of dtype torch.float64")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        # Appended in place, so never copied: the kernel steps over the head dim one element at a time.
        if cache.shape[-1] > 1 and cache.stride(-1) != 1:
            raise ValueError(
                f"backend='triton' needs {name}'s last (head_dim) dim contiguous (stride 1), got strides "
                f"{tuple(cache.stride())}; any other strides are fine (backend='torch' takes any)"
            )
    rel_bias = rel_bias.contiguous() if rel_bias is not None else None
    # The kernel reads both by raw pointer, element after element.
    cu_seqlens_new, cache_seqlens = cu_seqlens_new.contiguous(), cache_seqlens.contiguous()
    return cached_step_op(
        q_new,
        k_new,
        v_new,
        cu_seqlens_new,
        int(max_new),
        k_cache,
        v_cache,
        cache_seqlens,
        score,
        float(scale),
        rel_bias,
        float(silu_norm) if silu_norm is not None else 1.0,
        bool(allow_tf32),
    )
