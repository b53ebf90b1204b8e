"""HSTU's masks per backend against plain causal attention on the same backend.

One group per (length, backend, direction): HSTU's reference head shape (8 heads of 8, SiLU),
2 users of L tokens, forward on every backend (the ``cpp`` kernel is forward only) and
forward + backward where gradients exist.  Rows: ``causal`` (the baseline), 64 candidates
per user (``num_targets``), a contextual prefix of 8, and a local window of 256 (with and
without a full-attention tail of 64), HSTU's timestamp bias (a table of 129 buckets and
epoch-second timestamps), and HSTU's bidirectional masks (``causal=False``, alone and with
the window).  A window should cost about ``W / (L / 2)`` of causal attention
where a backend skips masked keys (``cpp`` spans, Triton tiles); candidates and the prefix
should cost about the same as causal; the timestamp bias adds a gather per score;
bidirectional attention visits every key, about twice causal (a window: ``2W / (L / 2)``).

Quick mode: L = 1k.  Full mode: L = 1k and 4k.
"""

from __future__ import annotations

import pytest
import torch

from rec2pm_kernels import segment_attention

from .harness.baselines import bench_device, bench_dtype
from .test_segment_attention import skip_reason

HEADS, HEAD_DIM, USERS = 8, 8, 2
SIZES = {"quick": [1024], "full": [1024, 4096]}
MASKS = {
    "causal": {},
    "targets_64": {"num_targets": 64},
    "prefix_8": {"contextual_seq_len": 8},
    "window_256": {"max_attn_len": 256},
    "window_256_tail_64": {"max_attn_len": 256, "min_full_attn_seq_len": 64},
    "timestamp_bias_128": {"ts_bias": 128},
    "bidirectional": {"causal": False},
    "bidirectional_window_256": {"causal": False, "max_attn_len": 256},
}
BACKENDS = ["torch", "cpp", "triton"]
DIRECTIONS = ["fwd", "fwd+bwd"]


@pytest.mark.parametrize("length", SIZES["full"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("mask", list(MASKS))
def test_hstu_masks(measure, bench_mode, length, backend, direction, mask):
    if length not in SIZES[bench_mode]:
        pytest.skip(f"L={length} runs in --bench-mode full")
    device = bench_device()
    reason = skip_reason(backend, device, "fwd" if direction == "fwd" else "bwd")
    if reason:
        pytest.skip(reason)
    dtype = bench_dtype(device)
    torch.manual_seed(0)
    total = USERS * length
    grad = direction != "fwd"
    q, k, v = (torch.randn(total, HEADS, HEAD_DIM, device=device, dtype=dtype, requires_grad=grad) for _ in range(3))
    cu = torch.arange(USERS + 1, device=device, dtype=torch.int32) * length
    options = dict(MASKS[mask])
    if "num_targets" in options:
        options["num_targets"] = torch.full((USERS,), options["num_targets"], device=device)
    if "ts_bias" in options:  # HSTU's default table size, times a few seconds to days apart
        options["ts_bias"] = 0.1 * torch.randn(1, options["ts_bias"] + 1, device=device, dtype=dtype)
        gaps = (10 ** (5 * torch.rand(total, device=device))).long()
        options["timestamps"] = 1_700_000_000 + gaps.view(USERS, length).cumsum(1).flatten()
    options.update(score="silu", silu_norm=float(length), scale=1.0, backend=backend)

    if grad:
        grad_out = torch.randn(total, HEADS, HEAD_DIM, device=device, dtype=dtype)

        def call():
            out = segment_attention(q, k, v, cu, length, **options)
            return torch.autograd.grad(out, (q, k, v), grad_out)
    else:

        def call():
            with torch.no_grad():
                return segment_attention(q, k, v, cu, length, **options)

    measure(
        call,
        group=f"hstu masks {direction} L={length} B={USERS} H={HEADS} d={HEAD_DIM} {backend}",
        name=mask,
        baseline=mask == "causal",
        device=device,
        params=dict(length=length, users=USERS, backend=backend, direction=direction, mask=mask),
    )
