"""One new event per user through a whole decoder: the fused C++ step against the same
``Decoder.step`` block by block, on the CPU.

One group per (backbone, users): the reference configs (HSTU 16 x 8 and SASRec 4 x 4 at
d = 64), eval mode, fp32, caches holding a serving block of ``[M ; 200]`` = 204 events per
user.  Rows: ``block by block`` (the baseline: one ATen call per op, layer by layer),
``fused`` (``rec2pm/backbones/fused_step.py``: one C++ call, loops for up to 8 rows and
ATen matrix products beyond), ``fp32 matmul`` (a 512 x 512 x 512 product: this machine's
matmul throughput in the same run, against which the steps' TFLOP/s column reads) and
``memory read`` (the sum of 64 MiB of floats: the read bandwidth one thread gets, against
which the GB/s column reads).  The steps' FLOPs count the projections and the attention over the
cache, so their TFLOP/s is the fraction of the arithmetic they use; their bytes count the
K/V caches every layer reads (the step cannot read less), so their GB/s is the fraction of
the bandwidth.  At B = 64 the caches (16 layers x 64 users x 205 slots x 2 x 64 floats for
HSTU: 107 MB) are far larger than the CPU's caches, so the step is bound by bandwidth, not
arithmetic: it does about 1 FLOP per byte read.  Targets (1 thread): HSTU ≤ 0.5 ms and
SASRec ≤ 0.2 ms at B = 1; B = 64 at 25% of the matmul throughput or more.
"""

from __future__ import annotations

import pytest
import torch

from rec2pm.backbones.decoder import caches_from_kv
from rec2pm.config import named_config
from rec2pm.methods import build_model
from rec2pm_kernels import _extension
from rec2pm_kernels.testing import cu_seqlens_of

from .harness.flops import attention_flops
from .harness.kernel_options import kernel_options

SLOTS = 204  # [M ; 200 recent] at C = 4
USERS = [1, 64]
BACKBONES = ["hstu", "sasrec"]
ROWS = ["block by block", "fused", "fp32 matmul", "memory read"]
MATMUL = 512
READ_BYTES = 64 << 20


def step_flops(config, users: int) -> float:
    """Projections and attention of one new event per user, every layer."""
    d, heads = config.d_model, config.num_heads
    linear = 2 * d * (4 * d + d) if config.backbone == "hstu" else 2 * d * d * 6  # f1, f2 / q, k, v, out, ffn
    attention = attention_flops(SLOTS + 1, heads, d // heads, d // heads, "fwd")
    return users * config.num_layers * (linear + attention)


def decoder_and_caches(backbone: str, users: int):
    torch.manual_seed(0)
    config = named_config(backbone, num_items=1000, kernels=kernel_options())
    decoder = build_model("full", config).decoder.eval()
    d = config.d_model
    cu = cu_seqlens_of([SLOTS] * users)
    with torch.no_grad():
        _, kv = decoder(torch.randn(users * SLOTS, d), torch.arange(SLOTS).repeat(users), cu, SLOTS, collect_kv=True)
    caches, seqlens = caches_from_kv(kv, cu, capacity=SLOTS + 1)
    return decoder, caches, seqlens


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("users", USERS)
@pytest.mark.parametrize("row", ROWS)
def test_decoder_step(measure, one_thread, backbone, users, row):
    if row == "fused" and _extension.C is None:
        pytest.skip("the C++ extension is not built")
    if row == "fused" and kernel_options().backend not in ("auto", "cpp"):
        pytest.skip(f"--kernel-backend {kernel_options().backend}: the fused step runs with auto or cpp only")
    group = f"decoder step {backbone} B={users} one event, {SLOTS} cached, 1 thread"
    if row == "fp32 matmul":
        a, b = torch.randn(MATMUL, MATMUL), torch.randn(MATMUL, MATMUL)
        measure(
            lambda: a @ b,
            group=group,
            name=row,
            device=torch.device("cpu"),
            flops=2.0 * MATMUL**3,
            params=dict(backbone=backbone, users=users),
        )
        return
    if row == "memory read":
        floats = torch.randn(READ_BYTES // 4)
        measure(
            lambda: floats.sum(),
            group=group,
            name=row,
            device=torch.device("cpu"),
            bytes_moved=float(READ_BYTES),
            params=dict(backbone=backbone, users=users),
        )
        return
    decoder, caches, seqlens = decoder_and_caches(backbone, users)
    decoder.use_fused_step = row == "fused"
    x = torch.randn(users, decoder.config.d_model)
    positions = torch.full((users,), SLOTS)
    cu = cu_seqlens_of([1] * users)
    filled = seqlens.clone()

    def step():
        seqlens.copy_(filled)  # the same slot each time: one event on a fixed history
        with torch.no_grad():
            return decoder.step(x, positions, cu, 1, caches, seqlens)

    measure(
        step,
        group=group,
        name=row,
        baseline=row == "block by block",
        device=torch.device("cpu"),
        flops=step_flops(decoder.config, users),
        bytes_moved=sum(c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size() for c in caches),
        params=dict(backbone=backbone, users=users, slots=SLOTS),
        rounds=30,
    )
