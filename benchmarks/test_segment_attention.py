"""segment_attention backends per pattern against full causal attention over the same items.

History of L events for each of B users, S = 200, C = 4 (SPEC's reference setting),
SASRec's attention shape (4 heads of 16).  The baseline is SDPA causal attention over the
L items; the interleaved patterns run over the L + K*C tokens of the Stage 1 stream.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rec2pm_kernels import segment_attention

from .harness.flops import attention_flops, visible_pairs

SEGMENT_LEN, MEMORY_TOKENS = 200, 4
BATCH, HEADS, HEAD_DIM = 2, 4, 16
SIZES = {"quick": [1024], "full": [1024, 4096, 16384]}
DIRECTIONS = ["fwd", "fwd+bwd"]
CASES = ["sdpa/causal", "torch/causal", "torch/global", "torch/kv_memory_overwrite", "torch/kv_memory_append"]


def stream_length(items: int) -> int:
    archived = (items - 1) // SEGMENT_LEN
    return items + archived * MEMORY_TOKENS


def make_call(case: str, items: int, direction: str, device: torch.device):
    backend, pattern = case.split("/")
    n = items if pattern == "causal" else stream_length(items)
    grad = direction != "fwd"
    shape = (BATCH, n, HEADS, HEAD_DIM)
    q, k, v = (torch.randn(shape, device=device, requires_grad=grad) for _ in range(3))
    if backend == "sdpa":
        def forward():
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True)
    else:
        cu = torch.arange(BATCH + 1, device=device, dtype=torch.int32) * n
        kw = {} if pattern == "causal" else dict(segment_len=SEGMENT_LEN, num_memory_tokens=MEMORY_TOKENS)
        flat = [x.flatten(0, 1) for x in (q, k, v)]

        def forward():
            return segment_attention(*flat, cu, n, pattern=pattern, backend=backend, **kw)

    if not grad:
        return n, pattern, forward
    grad_out = torch.randn_like(forward())

    def fwd_bwd():
        return torch.autograd.grad(forward(), (q, k, v), grad_out)

    return n, pattern, fwd_bwd


def size_params():
    return [pytest.param(items, id=f"L{items}") for items in SIZES["full"]]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("items", size_params())
def test_segment_attention(measure, bench_mode, items, direction, case):
    if items not in SIZES[bench_mode]:
        pytest.skip(f"L={items} runs in --bench-mode full")
    device = torch.device("cpu")
    n, pattern, call = make_call(case, items, direction, device)
    kw = {} if pattern == "causal" else dict(segment_len=SEGMENT_LEN, num_memory_tokens=MEMORY_TOKENS)
    pairs = BATCH * visible_pairs(pattern, n, kw.get("segment_len"), kw.get("num_memory_tokens"))
    measure(call, group=f"segment_attention {direction} L={items} B={BATCH} H={HEADS} d={HEAD_DIM}",
            name=case, baseline=case.startswith("sdpa"), device=device,
            flops=attention_flops(pairs, HEADS, HEAD_DIM, HEAD_DIM, direction),
            params=dict(items=items, tokens=n, pattern=pattern, direction=direction))
