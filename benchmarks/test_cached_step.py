"""cached_step_attention (serving) against SDPA over the same cache.

A batch of users each brings 1 new event; every user's cache holds N filled slots
(N = 1k, 4k, 16k; 4 heads of d).  One timed call appends the new K/V into slot N and lets
the new row attend to slots 0..N.  The baseline does the same work with PyTorch: the same
append, then SDPA of a 1-row query over the N + 1 keys (forced onto the FlashAttention
kernel for bf16 on CUDA).  flash-attn's ``flash_attn_with_kvcache`` (the same append and
attention in one kernel) runs when installed.

Devices: CUDA in bf16 with 128 users, where the compiled CUDA kernels (``cuda``) run beside
Triton when the extension is built with CUDA; CPU in fp32 with 8 users, where the ``torch``
and ``cpp`` backends and SDPA run (``triton``, ``cuda`` and flash-attn are skipped, with the reason).
Quick mode: N = 1k, d = 16.  Full mode: N = 1k, 4k, 16k and d = 16, 64.
"""

from __future__ import annotations

import pytest
import torch

from rec2pm_kernels import cached_step_attention

from .harness.baselines import (
    bench_device,
    bench_dtype,
    flash_attn_skip_reason,
    sdpa,
    sdpa_backend_name,
    triton_skip_reason,
)
from .harness.flops import attention_flops

HEADS = 4
USERS = {"cpu": 8, "cuda": 128}
SLOTS = {"quick": [1024], "full": [1024, 4096, 16384]}
HEAD_DIMS = {"quick": [16], "full": [16, 64]}
CASES = [
    "sdpa/cache",
    "flash_attn/kvcache",
    "torch/cached_step",
    "triton/cached_step",
    "cpp/cached_step",
    "cuda/cached_step",
]


def cuda_kernels_skip_reason(device: torch.device) -> str | None:
    """Why the compiled CUDA kernels (``backend="cuda"``) do not run here, or ``None``."""
    from rec2pm_kernels import backends

    status = backends()["cuda"]
    if not status.available:
        return status.reason
    return None if device.type == "cuda" else "backend='cuda' runs on CUDA tensors"


def make_call(case: str, users: int, slots: int, head_dim: int, device: torch.device, dtype: torch.dtype):
    """The timed call: one new row per user over ``slots`` filled cache slots (the cache has room for it)."""
    backend = case.split("/")[0]
    randn = dict(device=device, dtype=dtype)
    q, k, v = (torch.randn(users, HEADS, head_dim, **randn) for _ in range(3))  # packed: 1 row per user
    k_cache = torch.randn(users, slots + 1, HEADS, head_dim, **randn)
    v_cache = torch.randn(users, slots + 1, HEADS, head_dim, **randn)
    cache_seqlens = torch.full((users,), slots, device=device, dtype=torch.int32)
    # Every call writes the same slot (cache_seqlens is not advanced), so repeated calls do identical work.
    if backend == "sdpa":

        def call():
            k_cache[:, slots] = k
            v_cache[:, slots] = v
            return sdpa(q[:, :, None], k_cache.transpose(1, 2), v_cache.transpose(1, 2), is_causal=False)
    elif backend == "flash_attn":
        from flash_attn import flash_attn_with_kvcache

        def call():
            return flash_attn_with_kvcache(
                q[:, None], k_cache, v_cache, k=k[:, None], v=v[:, None], cache_seqlens=cache_seqlens, causal=True
            )
    else:
        cu = torch.arange(users + 1, device=device, dtype=torch.int32)

        def call():
            return cached_step_attention(q, k, v, cu, 1, k_cache, v_cache, cache_seqlens, backend=backend)

    def run():
        with torch.inference_mode():
            return call()

    return run


def size_params():
    return [
        pytest.param(slots, head_dim, case, id=f"N{slots}-d{head_dim}-{case}")
        for slots in SLOTS["full"]
        for head_dim in HEAD_DIMS["full"]
        for case in CASES
    ]


@pytest.mark.parametrize("slots, head_dim, case", size_params())
def test_cached_step(measure, bench_mode, slots, head_dim, case):
    if slots not in SLOTS[bench_mode]:
        pytest.skip(f"{slots} cache slots run in --bench-mode full")
    if head_dim not in HEAD_DIMS[bench_mode]:
        pytest.skip(f"head dim {head_dim} runs in --bench-mode full")
    device = bench_device()
    backend = case.split("/")[0]
    from .test_segment_attention import cpp_skip_reason

    reason = {
        "triton": triton_skip_reason,
        "flash_attn": flash_attn_skip_reason,
        "cpp": cpp_skip_reason,
        "cuda": cuda_kernels_skip_reason,
    }.get(backend, lambda d: None)(device)
    if reason:
        pytest.skip(reason)
    dtype = bench_dtype(device)
    users = USERS[device.type]
    torch.manual_seed(0)
    call = make_call(case, users, slots, head_dim, device, dtype)
    params = dict(
        users=users, slots=slots, heads=HEADS, head_dim=head_dim, new_rows=1, dtype=str(dtype).removeprefix("torch.")
    )
    if backend == "sdpa":
        params["sdpa_backend"] = sdpa_backend_name(device, dtype)
    # Each new row sees its N cached slots and itself.
    measure(
        call,
        group=f"cached_step users={users} slots={slots} H={HEADS} d={head_dim}",
        name=case,
        baseline=backend == "sdpa",
        device=device,
        flops=attention_flops(users * (slots + 1), HEADS, head_dim, head_dim, "fwd"),
        params=params,
    )
