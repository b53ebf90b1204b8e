"""cached_step_attention against its oracle, its cache writes, and cached step vs full pass."""

import functools

import pytest
import torch

from rec2pm_kernels import cached_step_attention, segment_attention
from rec2pm_kernels.ops.cached_step.oracle import cached_step_oracle
from rec2pm_kernels.testing import assert_within_budget, cu_seqlens_of, make_cache

from ...helpers import CPU_BACKENDS, make_bias, make_qkv, score_kwargs

SCORES = ["softmax", "silu"]


@pytest.fixture(params=CPU_BACKENDS)
def cached_step(request):
    """``cached_step_attention`` on each CPU backend (the C++ one when the extension is built)."""
    from ...helpers import require_backend

    require_backend(request.param)
    return functools.partial(cached_step_attention, backend=request.param)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "filled, new",
    [
        ([0, 5, 12, 3, 20], [3, 1, 0, 4, 4]),  # ragged: several rows, empty users
        ([9, 9, 9], [1, 1, 1]),  # one row each over equal prefixes (the torch backend drops the mask)
        ([9, 10, 10], [1, 0, 0]),  # equal ends, but users without new rows
    ],
    ids=["ragged", "equal", "equal-ends"],
)
# The usual (batch, slot, heads, dim) cache, and the same shape over a head-major buffer (the
# C++ step reads a slot's heads in one pass only when they are contiguous).
@pytest.mark.parametrize("layout", ["slot-major", "head-major"])
def test_matches_oracle_and_appends(cached_step, score, with_bias, dtype, filled, new, layout):
    heads, dim, dim_v, capacity = 2, 8, 6, 24
    cu = cu_seqlens_of(new)
    q, k, v = make_qkv(sum(new), heads, dim, dim_v, dtype)
    k_cache, v_cache = make_cache(len(new), capacity, heads, dim, dim_v, filled, dtype)
    if layout == "head-major":
        k_cache, v_cache = (c.transpose(1, 2).contiguous().transpose(1, 2) for c in (k_cache, v_cache))
    seqlens = torch.tensor(filled, dtype=torch.int32)
    bias = make_bias(heads, num_buckets=10, dtype=dtype) if with_bias else None
    kw = dict(rel_bias=bias, **score_kwargs(score))
    ref = cached_step_oracle(q, k, v, cu, k_cache, v_cache, seqlens, **kw)
    base = cached_step_oracle(q, k, v, cu, k_cache, v_cache, seqlens, upcast=False, **kw)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = cached_step(q, k, v, cu, max(new), k_cache, v_cache, seqlens, **kw)
    assert_within_budget("out", out, ref, base, dtype)
    assert seqlens.tolist() == filled, "cache_seqlens must not be modified"
    for b, (c, n) in enumerate(zip(filled, new, strict=True)):
        start = int(cu[b])
        assert torch.equal(k_cache[b, c : c + n], k[start : start + n])
        assert torch.equal(v_cache[b, c : c + n], v[start : start + n])
        # Everything else is untouched (NaN compares unequal, so compare the NaN pattern too).
        for cache, before in ((k_cache, k_before), (v_cache, v_before)):
            keep = torch.ones(capacity, dtype=torch.bool)
            keep[c : c + n] = False
            assert torch.equal(cache[b, keep].isnan(), before[b, keep].isnan())
            assert torch.equal(cache[b, keep].nan_to_num(), before[b, keep].nan_to_num())


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_one_event_at_a_time_equals_causal_pass(cached_step, score, with_bias):
    """Serving step by step reproduces the rows of one causal pass over the whole block."""
    heads, dim, dim_v = 2, 8, 4
    prefix = [4, 0, 7]  # [M ; earlier items] already cached
    events = [5, 3, 1]  # then fed one at a time
    lengths = [p + e for p, e in zip(prefix, events, strict=True)]
    q, k, v = make_qkv(sum(lengths), heads, dim, dim_v, torch.float64)
    bias = make_bias(heads, num_buckets=6, dtype=torch.float64) if with_bias else None
    kw = dict(rel_bias=bias, **score_kwargs(score))
    full = segment_attention(q, k, v, cu_seqlens_of(lengths), max(lengths), **kw)

    starts = cu_seqlens_of(lengths)[:-1].tolist()
    k_cache, v_cache = make_cache(3, max(lengths), heads, dim, dim_v, [0, 0, 0], torch.float64)
    for b, n in enumerate(prefix):
        k_cache[b, :n] = k[starts[b] : starts[b] + n]
        v_cache[b, :n] = v[starts[b] : starts[b] + n]
    seqlens = torch.tensor(prefix, dtype=torch.int32)
    for step in range(max(events)):
        users = [b for b in range(3) if step < events[b]]
        rows = torch.tensor([starts[b] + prefix[b] + step for b in users], dtype=torch.long)
        counts = [1 if b in users else 0 for b in range(3)]
        out = cached_step(q[rows], k[rows], v[rows], cu_seqlens_of(counts), 1, k_cache, v_cache, seqlens, **kw)
        torch.testing.assert_close(out, full[rows], rtol=1e-12, atol=1e-12)
        seqlens += torch.tensor(counts, dtype=torch.int32)


def test_several_new_rows_equal_their_causal_rows(cached_step):
    heads, dim = 2, 8
    q, k, v = make_qkv(9, heads, dim, dim, torch.float64)
    full = segment_attention(q, k, v, cu_seqlens_of([9]), 9)
    k_cache, v_cache = make_cache(1, 12, heads, dim, dim, [4], torch.float64)
    k_cache[0, :4], v_cache[0, :4] = k[:4], v[:4]
    out = cached_step(
        q[4:], k[4:], v[4:], cu_seqlens_of([5]), 5, k_cache, v_cache, torch.tensor([4], dtype=torch.int32)
    )
    torch.testing.assert_close(out, full[4:], rtol=1e-12, atol=1e-12)


def test_no_new_rows_at_all(cached_step):
    k_cache, v_cache = make_cache(2, 4, 2, 8, 8, [1, 3])
    q, k, v = make_qkv(0)
    before = (k_cache.clone(), v_cache.clone())
    out = cached_step(q, k, v, cu_seqlens_of([0, 0]), 0, k_cache, v_cache, torch.tensor([1, 3], dtype=torch.int32))
    assert out.shape == (0, 2, 8)
    # Nothing to append: every slot, filled or not (NaN), is as it was.
    for cache, old in zip((k_cache, v_cache), before, strict=True):
        assert torch.equal(cache.nan_to_num(7.0), old.nan_to_num(7.0))


def test_runs_under_no_grad_with_parameters(cached_step):
    bias = make_bias(2, requires_grad=True)  # a model parameter
    k_cache, v_cache = make_cache(1, 4, 2, 8, 8, [2])
    q, k, v = make_qkv(1)
    seqlens = torch.tensor([2], dtype=torch.int32)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    with torch.no_grad():
        out = cached_step(q, k, v, cu_seqlens_of([1]), 1, k_cache, v_cache, seqlens, rel_bias=bias)
    assert not out.requires_grad
    ref = cached_step_oracle(q, k, v, cu_seqlens_of([1]), ref_k, ref_v, seqlens, rel_bias=bias.detach())
    base = cached_step_oracle(q, k, v, cu_seqlens_of([1]), ref_k, ref_v, seqlens, rel_bias=bias.detach(), upcast=False)
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
@pytest.mark.parametrize("layout", ["slot-major", "head-major"])
def test_long_caches_match_oracle(cached_step, score, layout):
    heads, dim, dim_v = 2, 8, 16
    cu = cu_seqlens_of(LONG_NEW)
    q, k, v = make_qkv(sum(LONG_NEW), heads, dim, dim_v)
    # Scores spread wide enough that the chunks' maxima differ and the rescaling matters.
    q = q * 3
    k_cache, v_cache = make_cache(len(LONG_NEW), LONG_CAPACITY, heads, dim, dim_v, LONG_FILLED)
    if layout == "head-major":
        k_cache, v_cache = (c.transpose(1, 2).contiguous().transpose(1, 2) for c in (k_cache, v_cache))
    seqlens = torch.tensor(LONG_FILLED, dtype=torch.int32)
    kw = dict(rel_bias=make_bias(heads, num_buckets=5000), **score_kwargs(score))
    ref = cached_step_oracle(q, k, v, cu, k_cache, v_cache, seqlens, **kw)
    base = cached_step_oracle(q, k, v, cu, k_cache, v_cache, seqlens, upcast=False, **kw)
    out = cached_step(q, k, v, cu, max(LONG_NEW), k_cache, v_cache, seqlens, **kw)
    assert_within_budget("out", out, ref, base, torch.float32)


def test_long_caches_are_bit_identical_across_thread_counts():
    """The chunks have a fixed length, so the split does not depend on the thread count
    (nor does the choice between the all-heads and per-head passes)."""
    from ...helpers import require_backend

    require_backend("cpp")
    heads, dim = 4, 16
    cu = cu_seqlens_of(LONG_NEW)
    q, k, v = make_qkv(sum(LONG_NEW), heads, dim, dim)
    k_cache, v_cache = make_cache(len(LONG_NEW), LONG_CAPACITY, heads, dim, dim, LONG_FILLED)
    seqlens = torch.tensor(LONG_FILLED, dtype=torch.int32)
    threads = torch.get_num_threads()
    outs = []
    try:
        for count in (1, 2, 3, 8):
            torch.set_num_threads(count)
            caches = (k_cache.clone(), v_cache.clone())
            outs.append(cached_step_attention(q, k, v, cu, 6, *caches, seqlens, backend="cpp"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(out, outs[0]) for out in outs[1:])
