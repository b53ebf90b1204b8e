"""segment_attention per pattern and backend against full causal attention over the same history.

Every group is one direction, history length L, batch, 4 heads and head dim d; its baseline
is SDPA causal attention over the L items (forced onto the FlashAttention kernel for bf16
on CUDA).  The same group holds flash-attn's varlen function over the items (when
installed), and for each pattern FlexAttention (``torch.compile``d, with the pattern's rule as
``mask_mod``) and the library's ``torch`` and ``triton`` backends.  The interleaved patterns
run over the L + K*C tokens of the Stage 1 stream (S = 200, C = 4, the paper's reference
setting); TFLOP/s count only the (row, column) pairs each pattern lets through.

Directions:

* ``fwd``: the forward alone, inputs not requiring grad (no graph is recorded).
* ``bwd``: the backward alone.  The forward runs once, untimed, and its graph is kept; each
  timed call is ``torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)``.  The
  peak memory is what the backward allocates on top of the saved forward state.
* ``fwd+bwd``: forward then ``torch.autograd.grad``, timed together.

The ``cpp`` rows (forward only, CPU) run where the extension is built.  A second group, the
serving block ``[M ; 200 recent]`` (C = 4 memory tokens, causal), puts the CPU backends side
by side at the reference head shapes (SASRec 4 x 16, HSTU 8 x 8), for 1 and 64 users, with
the ``torch`` backend as its baseline.

Devices: CUDA in bf16 with ``32768 / L`` users per batch (32, 8, 2: the same number of
tokens in every group); CPU in fp32 with 2 users.  On CPU the ``triton`` rows (no
interpreter timings), FlexAttention and flash-attn are skipped, with the reason.

Quick mode: L = 1k, d = 16.  Full mode: L = 1k, 4k, 16k and d = 16, 64.
"""

from __future__ import annotations

import functools

import pytest
import torch

from rec2pm_kernels import segment_attention
from rec2pm_kernels.patterns import PATTERNS

from .harness.baselines import (
    bench_device,
    bench_dtype,
    compiled_flex_attention,
    flash_attn_skip_reason,
    flex_block_mask,
    flex_skip_reason,
    sdpa,
    sdpa_backend_name,
    triton_skip_reason,
)
from .harness.flops import attention_flops, visible_pairs

SEGMENT_LEN, MEMORY_TOKENS = 200, 4
HEADS = 4
CPU_BATCH = 2
CUDA_TOKENS_PER_BATCH = 32768
SIZES = {"quick": [1024], "full": [1024, 4096, 16384]}
HEAD_DIMS = {"quick": [16], "full": [16, 64]}
DIRECTIONS = ["fwd", "bwd", "fwd+bwd"]
CASES = (
    ["sdpa/causal", "flash_attn/causal"]
    + [f"flex/{p}" for p in PATTERNS]
    + [f"torch/{p}" for p in PATTERNS]
    + [f"triton/{p}" for p in PATTERNS]
    + [f"cpp/{p}" for p in PATTERNS]
)


def stream_length(items: int) -> int:
    archived = (items - 1) // SEGMENT_LEN
    return items + archived * MEMORY_TOKENS


def batch_size(items: int, device: torch.device) -> int:
    return max(1, CUDA_TOKENS_PER_BATCH // items) if device.type == "cuda" else CPU_BATCH


def pattern_kwargs(pattern: str) -> dict:
    return {} if pattern == "causal" else dict(segment_len=SEGMENT_LEN, num_memory_tokens=MEMORY_TOKENS)


def cpp_skip_reason(device: torch.device, direction: str = "fwd") -> str | None:
    from rec2pm_kernels import backends

    status = backends()["cpp"]
    if not status.available:
        return status.reason
    if device.type != "cpu":
        return "backend='cpp' runs on CPU tensors"
    if direction != "fwd":
        return "backend='cpp' is forward only"
    return None


def skip_reason(backend: str, device: torch.device, direction: str = "fwd") -> str | None:
    if backend == "cpp":
        return cpp_skip_reason(device, direction)
    if backend == "triton":
        return triton_skip_reason(device)
    if backend == "flex":
        return flex_skip_reason(device)
    if backend == "flash_attn":
        return flash_attn_skip_reason(device)
    return None


def make_forward(backend: str, pattern: str, batch: int, n: int, head_dim: int, grad: bool, device, dtype):
    """``(inputs, forward)``: the leaf tensors q, k, v (each in its implementation's own layout) and a closure."""
    kw = pattern_kwargs(pattern)
    if backend == "flex":  # (batch, heads, tokens, dim): FlexAttention's layout
        shape = (batch, HEADS, n, head_dim)
    else:  # (batch, tokens, heads, dim): packed varlen rows, and FlashAttention's layout
        shape = (batch, n, HEADS, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype).requires_grad_(grad) for _ in range(3))
    cu = torch.arange(batch + 1, device=device, dtype=torch.int32) * n

    if backend == "sdpa":

        def forward():
            return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    elif backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        flat = [x.flatten(0, 1) for x in (q, k, v)]

        def forward():
            return flash_attn_varlen_func(*flat, cu, cu, n, n, causal=True)
    elif backend == "flex":
        flex = compiled_flex_attention()
        block_mask = flex_block_mask(pattern, n, kw.get("segment_len"), kw.get("num_memory_tokens"), str(device))

        def forward():
            return flex(q, k, v, block_mask=block_mask)
    else:
        flat = [x.flatten(0, 1) for x in (q, k, v)]

        def forward():
            return segment_attention(*flat, cu, n, pattern=pattern, backend=backend, **kw)

    return (q, k, v), forward


def make_call(case: str, items: int, head_dim: int, direction: str, device: torch.device, dtype: torch.dtype):
    """``(tokens, pattern, batch, call)``: the timed call of one case."""
    backend, pattern = case.split("/")
    n = items if pattern == "causal" else stream_length(items)
    batch = batch_size(items, device)
    inputs, forward = make_forward(backend, pattern, batch, n, head_dim, direction != "fwd", device, dtype)
    if direction == "fwd":
        return n, pattern, batch, forward
    out = forward()
    grad_out = torch.randn_like(out)
    if direction == "bwd":
        return n, pattern, batch, functools.partial(torch.autograd.grad, out, inputs, grad_out, retain_graph=True)
    del out  # fwd+bwd times a fresh forward each call; the graph above is not needed

    def fwd_bwd():
        return torch.autograd.grad(forward(), inputs, grad_out)

    return n, pattern, batch, fwd_bwd


def case_params():
    """Every (L, d, direction, case), smallest sizes first (a run cut short keeps the small ones)."""
    return [
        pytest.param(items, head_dim, direction, case, id=f"L{items}-d{head_dim}-{direction}-{case}")
        for items in SIZES["full"]
        for head_dim in HEAD_DIMS["full"]
        for direction in DIRECTIONS
        for case in CASES
    ]


@pytest.mark.parametrize("items, head_dim, direction, case", case_params())
def test_segment_attention(measure, bench_mode, items, head_dim, direction, case):
    if items not in SIZES[bench_mode]:
        pytest.skip(f"L={items} runs in --bench-mode full")
    if head_dim not in HEAD_DIMS[bench_mode]:
        pytest.skip(f"head dim {head_dim} runs in --bench-mode full")
    device = bench_device()
    reason = skip_reason(case.split("/")[0], device, direction)
    if reason:
        pytest.skip(reason)
    dtype = bench_dtype(device)
    torch.manual_seed(0)
    n, pattern, batch, call = make_call(case, items, head_dim, direction, device, dtype)
    kw = pattern_kwargs(pattern)
    pairs = batch * visible_pairs(pattern, n, kw.get("segment_len"), kw.get("num_memory_tokens"))
    params = dict(
        items=items,
        tokens=n,
        batch=batch,
        heads=HEADS,
        head_dim=head_dim,
        pattern=pattern,
        direction=direction,
        dtype=str(dtype).removeprefix("torch."),
    )
    if case.startswith("sdpa"):
        params["sdpa_backend"] = sdpa_backend_name(device, dtype)
    measure(
        call,
        group=f"segment_attention {direction} L={items} B={batch} H={HEADS} d={head_dim}",
        name=case,
        baseline=case.startswith("sdpa"),
        device=device,
        flops=attention_flops(pairs, HEADS, head_dim, head_dim, direction),
        params=params,
    )


SERVING_SHAPES = {"sasrec": (4, 16, "softmax"), "hstu": (8, 8, "silu")}
SERVING_USERS = {"quick": [1], "full": [1, 64]}
SERVING_CASES = ["torch", "cpp", "sdpa"]


@pytest.mark.parametrize("users", SERVING_USERS["full"])
@pytest.mark.parametrize("shape", list(SERVING_SHAPES))
@pytest.mark.parametrize("case", SERVING_CASES)
def test_serving_block(measure, bench_mode, users, shape, case):
    """``[M ; 200 recent]`` for a batch of users, forward: what a serving request computes per layer."""
    if users not in SERVING_USERS[bench_mode]:
        pytest.skip(f"{users} users run in --bench-mode full")
    device = bench_device()
    if device.type != "cpu":
        pytest.skip("the serving-block group compares the CPU backends")
    heads, head_dim, score = SERVING_SHAPES[shape]
    if case == "cpp" and cpp_skip_reason(device):
        pytest.skip(cpp_skip_reason(device))
    if case == "sdpa" and score != "softmax":
        pytest.skip("SDPA has no SiLU score")
    torch.manual_seed(0)
    n = MEMORY_TOKENS + SEGMENT_LEN
    q, k, v = (torch.randn(users * n, heads, head_dim) for _ in range(3))
    cu = torch.arange(users + 1, dtype=torch.int32) * n
    options = dict(score=score, silu_norm=float(n) if score == "silu" else None)
    if case == "sdpa":
        batched = [x.view(users, n, heads, head_dim).transpose(1, 2) for x in (q, k, v)]

        def call():
            return sdpa(*batched, is_causal=True)
    else:

        def call():
            return segment_attention(q, k, v, cu, n, backend=case, **options)

    pairs = users * visible_pairs("causal", n, None, None)
    measure(
        call,
        group=f"serving block [M ; {SEGMENT_LEN}] {shape} B={users} H={heads} d={head_dim} {score}",
        name=case,
        baseline=case == "torch",
        device=device,
        flops=attention_flops(pairs, heads, head_dim, head_dim, "fwd"),
        params=dict(users=users, tokens=n, heads=heads, head_dim=head_dim, score=score),
    )
