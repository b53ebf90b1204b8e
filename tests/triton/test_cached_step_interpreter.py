"""cached_step_attention(backend="triton") against its oracle, split-K against one piece, and
cached steps against the full pass, under TRITON_INTERPRET=1."""

import pytest
import torch

from rec2pm_kernels import cached_step_attention, segment_attention
from rec2pm_kernels.ops.cached_step.triton_backend import cached_step_forward
from rec2pm_kernels.ops.triton_configs import config_key, configs
from rec2pm_kernels.testing import assert_within_budget, cu_seqlens_of

from .cases import SCORES, cached_step_case, cached_step_reference, score_kwargs

pytestmark = pytest.mark.interpreter

FILLED = [0, 5, 40, 3, 17]
NEW = [3, 1, 0, 4, 2]


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_matches_oracle_and_appends(score, with_bias):
    q, k, v, cu, k_cache, v_cache, seqlens, bias = cached_step_case(FILLED, NEW, with_bias=with_bias)
    ref, base = cached_step_reference(q, k, v, cu, k_cache, v_cache, seqlens, bias, **score_kwargs(score))
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    for b, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        k_expected[b, FILLED[b] : FILLED[b] + end - start] = k[start:end]
        v_expected[b, FILLED[b] : FILLED[b] + end - start] = v[start:end]
    with torch.no_grad():
        out = cached_step_attention(
            q, k, v, cu, max(NEW), k_cache, v_cache, seqlens, rel_bias=bias, backend="triton", **score_kwargs(score)
        )
    assert_within_budget("out", out, ref, base)
    assert torch.equal(k_cache.nan_to_num(123.0), k_expected.nan_to_num(123.0))
    assert torch.equal(v_cache.nan_to_num(123.0), v_expected.nan_to_num(123.0))
    assert torch.equal(seqlens, torch.tensor(FILLED, dtype=torch.int32))  # read, never advanced


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


@pytest.mark.parametrize("score", SCORES)
def test_cached_steps_equal_full_causal_pass(score):
    """Serving one event at a time through the cache gives the full pass's rows."""
    lengths = [9, 1, 14]
    heads, dim = 2, 16
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, dim) for _ in range(3))
    bias = 0.5 * torch.randn(heads, 6)
    cu = cu_seqlens_of(lengths)
    full = segment_attention(q, k, v, cu, max(lengths), rel_bias=bias, backend="triton", **score_kwargs(score))
    k_cache = torch.zeros(len(lengths), max(lengths), heads, dim)
    v_cache = torch.zeros_like(k_cache)
    seqlens = torch.zeros(len(lengths), dtype=torch.int32)
    starts = cu[:-1].long()
    stepped = torch.empty_like(full)
    with torch.no_grad():
        for t in range(max(lengths)):
            active = torch.tensor([t < n for n in lengths])
            rows = (starts + t)[active]
            counts = active.int()
            out = cached_step_attention(
                q[rows],
                k[rows],
                v[rows],
                cu_seqlens_of(counts.tolist()),
                1,
                k_cache,
                v_cache,
                seqlens,
                rel_bias=bias,
                backend="triton",
                **score_kwargs(score),
            )
            stepped[rows] = out
            seqlens += counts
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-6)


def test_no_new_rows():
    q, k, v, cu, k_cache, v_cache, seqlens, bias = cached_step_case([4, 0], [0, 0])
    with torch.no_grad():
        out = cached_step_attention(q, k, v, cu, 0, k_cache, v_cache, seqlens, rel_bias=bias, backend="triton")
    assert out.shape == (0, 2, 8)
