"""cached_step_attention(backend="triton") beyond the shared tests (test_oracle.py), under
TRITON_INTERPRET=1: split-K against one piece, and every tile config and head dim."""

import pytest
import torch

from rec2pm_kernels.ops.cached_step.triton_backend import cached_step_forward
from rec2pm_kernels.ops.triton_configs import config_key, configs
from rec2pm_kernels.testing import assert_within_budget, cached_step_case, cached_step_reference

from ..targets import TRITON_INTERPRETER as TARGET

SCORES = ["softmax", "silu"]
score_kwargs = TARGET.score_kwargs

pytestmark = pytest.mark.interpreter

FILLED = [0, 5, 40, 3, 17]
NEW = [3, 1, 0, 4, 2]


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("num_splits", [2, 4, 16])
def test_split_k_matches_one_piece(score, num_splits):
    """Cutting the keys into pieces and combining them gives the one-piece result."""
    results = []
    for splits in (1, num_splits):
        torch.manual_seed(3)
        q, k, v, cu, k_cache, v_cache, seqlens, bias = cached_step_case(FILLED, NEW, capacity=64)
        ref, base = cached_step_reference(q, k, v, cu, k_cache, v_cache, seqlens, bias, **score_kwargs(score))
        out = cached_step_forward(
            q,
            k,
            v,
            cu,
            max(NEW),
            k_cache,
            v_cache,
            seqlens,
            score,
            16**-0.5,
            bias,
            score_kwargs(score)["silu_norm"] or 1.0,
            num_splits=splits,
        )
        assert_within_budget(f"out (splits={splits})", out, ref, base)
        results.append(out)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


CONFIGS = {
    config_key(c): c
    for dtype in (torch.float32, torch.bfloat16)
    for dim in (8, 16, 64, 128)
    for arch in (80, 90)
    for c in configs("cached_step", dtype, dim, arch)
}


@pytest.mark.parametrize("key", sorted(CONFIGS))
@pytest.mark.parametrize("dim, dim_v", [(8, 8), (64, 16)])
def test_every_config_and_head_dim(key, dim, dim_v):
    q, k, v, cu, k_cache, v_cache, seqlens, bias = cached_step_case(FILLED, NEW, dim=dim, dim_v=dim_v)
    ref, base = cached_step_reference(q, k, v, cu, k_cache, v_cache, seqlens, bias)
    out = cached_step_forward(
        q,
        k,
        v,
        cu,
        max(NEW),
        k_cache,
        v_cache,
        seqlens,
        "softmax",
        dim**-0.5,
        bias,
        1.0,
        num_splits=2,
        config=CONFIGS[key],
    )
    assert_within_budget("out", out, ref, base)


def test_strided_offsets_are_read_by_value_and_a_strided_head_dim_is_refused():
    from rec2pm_kernels import cached_step_attention

    torch.manual_seed(4)
    q, k, v, cu, k_cache, v_cache, seqlens, bias = cached_step_case(FILLED, NEW, capacity=64)
    kw = dict(rel_bias=bias, backend="triton")
    want = cached_step_attention(q, k, v, cu, max(NEW), k_cache.clone(), v_cache.clone(), seqlens, **kw)
    every_other = [torch.stack([t, torch.full_like(t, 77)], 1)[:, 0] for t in (cu, seqlens)]
    got = cached_step_attention(q, k, v, every_other[0], max(NEW), k_cache, v_cache, every_other[1], **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    transposed = k_cache.transpose(2, 3).contiguous().transpose(2, 3)  # head dim with stride = heads
    with pytest.raises(ValueError, match="needs k_cache's last \\(head_dim\\) dim contiguous"):
        cached_step_attention(q, k, v, cu, max(NEW), transposed, v_cache, seqlens, **kw)
