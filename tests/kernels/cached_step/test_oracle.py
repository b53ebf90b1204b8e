"""cached_step_attention on every backend (``tests/kernels/targets.py``) against its oracle and
its cache writes, and the cached step against the full causal pass of the same backend."""

import pytest
import torch

from rec2pm_kernels import cached_step_attention, segment_attention
from rec2pm_kernels.testing import (
    assert_within_budget,
    cached_step_case,
    cached_step_reference,
    cu_seqlens_of,
    make_cache,
    random_bias,
    random_qkv,
    score_kwargs,
)

from ..targets import CACHED_STEP

OP = CACHED_STEP
SCORES = ["softmax", "silu"]
# The usual (batch, slot, heads, dim) cache, and the same shape over a head-major buffer (the
# C++ step reads a slot's heads in one pass only when they are contiguous).
LAYOUTS = ["slot-major", "head-major"]


def _in_layout(layout, *caches):
    if layout == "head-major":
        return tuple(c.transpose(1, 2).contiguous().transpose(1, 2) for c in caches)
    return caches


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_oracle_and_appends(target, dtype, cache_case, score, with_bias, layout):
    _, filled, new = cache_case
    q, k, v, cu, k_cache, v_cache, seqlens, bias = cached_step_case(
        filled, new, dim=target.dim, dim_v=target.dim_v, dtype=dtype, device=target.device, with_bias=with_bias
    )
    k_cache, v_cache = _in_layout(layout, k_cache, v_cache)
    kw = score_kwargs(score, 7.0)
    ref, base = cached_step_reference(q, k, v, cu, k_cache, v_cache, seqlens, bias, **kw)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = cached_step_attention(
        q, k, v, cu, max(new), k_cache, v_cache, seqlens, rel_bias=bias, backend=target.backend, **kw
    )
    assert_within_budget("out", out, ref, base, dtype)
    assert seqlens.tolist() == list(filled), "cache_seqlens must not be modified"
    capacity = k_cache.shape[1]
    for b, (c, n) in enumerate(zip(filled, new, strict=True)):
        start = int(cu[b])
        assert torch.equal(k_cache[b, c : c + n], k[start : start + n])
        assert torch.equal(v_cache[b, c : c + n], v[start : start + n])
        # Everything else is untouched (NaN compares unequal, so compare the NaN pattern too).
        for cache, before in ((k_cache, k_before), (v_cache, v_before)):
            keep = torch.ones(capacity, dtype=torch.bool, device=target.device)
            keep[c : c + n] = False
            assert torch.equal(cache[b, keep].isnan(), before[b, keep].isnan())
            assert torch.equal(cache[b, keep].nan_to_num(), before[b, keep].nan_to_num())


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_one_event_at_a_time_equals_causal_pass(target, score, with_bias):
    """Serving step by step reproduces the rows of the same backend's causal pass over the block."""
    heads, dim_v, device, dtype = 2, 4, target.device, target.exact_dtype
    prefix = [4, 0, 7, 0]  # [M ; earlier items] already cached
    events = [5, 3, 1, 14]  # then fed one at a time
    lengths = [p + e for p, e in zip(prefix, events, strict=True)]
    q, k, v = random_qkv(sum(lengths), heads, target.dim, dim_v, dtype, device)
    bias = random_bias(heads, 6, dtype, device) if with_bias else None
    kw = dict(rel_bias=bias, backend=target.backend, **score_kwargs(score, 7.0))
    full = segment_attention(q, k, v, cu_seqlens_of(lengths, device=device), max(lengths), **kw)

    starts = cu_seqlens_of(lengths)[:-1].tolist()
    k_cache, v_cache = make_cache(
        len(lengths), max(lengths), heads, target.dim, dim_v, [0] * len(lengths), dtype, device
    )
    for b, n in enumerate(prefix):
        k_cache[b, :n] = k[starts[b] : starts[b] + n]
        v_cache[b, :n] = v[starts[b] : starts[b] + n]
    seqlens = torch.tensor(prefix, dtype=torch.int32, device=device)
    for step in range(max(events)):
        counts = [int(step < e) for e in events]
        rows = torch.tensor([s + p + step for s, p, n in zip(starts, prefix, counts, strict=True) if n], device=device)
        cu = cu_seqlens_of(counts, device=device)
        out = cached_step_attention(q[rows], k[rows], v[rows], cu, 1, k_cache, v_cache, seqlens, **kw)
        torch.testing.assert_close(out, full[rows], **target.exact_tolerance)
        seqlens += torch.tensor(counts, dtype=torch.int32, device=device)


def test_several_new_rows_equal_their_causal_rows(target):
    device, dtype = target.device, target.exact_dtype
    q, k, v = random_qkv(9, 2, target.dim, target.dim, dtype, device)
    full = segment_attention(q, k, v, cu_seqlens_of([9], device=device), 9, backend=target.backend)
    k_cache, v_cache = make_cache(1, 12, 2, target.dim, target.dim, [4], dtype, device)
    k_cache[0, :4], v_cache[0, :4] = k[:4], v[:4]
    seqlens = torch.tensor([4], dtype=torch.int32, device=device)
    out = cached_step_attention(
        q[4:], k[4:], v[4:], cu_seqlens_of([5], device=device), 5, k_cache, v_cache, seqlens, backend=target.backend
    )
    torch.testing.assert_close(out, full[4:], **target.exact_tolerance)


def test_no_new_rows_at_all(target):
    device = target.device
    k_cache, v_cache = make_cache(2, 4, 2, 8, 8, [1, 3], device=device)
    q, k, v = random_qkv(0, device=device)
    before = (k_cache.clone(), v_cache.clone())
    seqlens = torch.tensor([1, 3], dtype=torch.int32, device=device)
    out = cached_step_attention(
        q, k, v, cu_seqlens_of([0, 0], device=device), 0, k_cache, v_cache, seqlens, backend=target.backend
    )
    assert out.shape == (0, 2, 8)
    # Nothing to append: every slot, filled or not (NaN), is as it was.
    for cache, old in zip((k_cache, v_cache), before, strict=True):
        assert torch.equal(cache.nan_to_num(7.0), old.nan_to_num(7.0))


def test_runs_under_no_grad_with_parameters(target):
    device = target.device
    bias = random_bias(2, 9, device=device, requires_grad=True)  # a model parameter
    k_cache, v_cache = make_cache(1, 4, 2, 8, 8, [2], device=device)
    q, k, v = random_qkv(1, device=device)
    seqlens = torch.tensor([2], dtype=torch.int32, device=device)
    cu = cu_seqlens_of([1], device=device)
    ref, base = cached_step_reference(q, k, v, cu, k_cache.clone(), v_cache.clone(), seqlens, bias.detach())
    with torch.no_grad():
        out = cached_step_attention(q, k, v, cu, 1, k_cache, v_cache, seqlens, rel_bias=bias, backend=target.backend)
    assert not out.requires_grad
    assert_within_budget("out", out, ref, base)


def test_fresh_kernel_outputs_are_nan_under_the_test_fixture():
    # Every test runs under nan_filled_outputs (tests/conftest.py): an output row that no
    # kernel writes stays NaN and fails its comparison, where zeros would pass as valid.
    from rec2pm_kernels.ops.outputs import new_output
    from rec2pm_kernels.testing import nan_filled_outputs

    assert new_output((2, 3), dtype=torch.float32, device=torch.device("cpu")).isnan().all()
    with nan_filled_outputs(False):
        assert new_output((0,), dtype=torch.float32, device=torch.device("cpu")).numel() == 0


# Caches longer than the C++ step's chunk of 4,096 slots: its rows are split and their
# partials merged (csrc/include/rec2pm/split_keys.h).  The users straddle the boundary: a
# row with 4,096 slots (one chunk), rows that cross it, and one row of three chunks.
LONG_FILLED, LONG_NEW = [4095, 4092, 9000, 5], [1, 6, 3, 2]
LONG_CAPACITY = 9100


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_long_caches_match_oracle(target, score, layout):
    q, k, v, cu, k_cache, v_cache, seqlens, _ = cached_step_case(
        LONG_FILLED, LONG_NEW, dim=8, dim_v=16, capacity=LONG_CAPACITY, device=target.device, with_bias=False
    )
    q = q * 3  # scores spread wide enough that the chunks' maxima differ and the rescaling matters
    k_cache, v_cache = _in_layout(layout, k_cache, v_cache)
    bias, kw = random_bias(2, 5000, device=target.device), score_kwargs(score, 7.0)
    ref, base = cached_step_reference(q, k, v, cu, k_cache, v_cache, seqlens, bias, **kw)
    out = cached_step_attention(
        q, k, v, cu, max(LONG_NEW), k_cache, v_cache, seqlens, rel_bias=bias, backend=target.backend, **kw
    )
    assert_within_budget("out", out, ref, base, torch.float32)
