"""backend="cpp" (rec2pm_kernels._C, forward only) beyond the shared oracle tests: float64
inputs, its span rule, bit-identical results across thread counts, its dispatch and opcheck."""

import pytest
import torch

from rec2pm_kernels import PATTERNS, backends, cached_step_attention, segment_attention
from rec2pm_kernels.backends import cpp_row_lanes
from rec2pm_kernels.ops.segment_attention.oracle import segment_attention_oracle
from rec2pm_kernels.patterns import PATTERN_CODES, visible
from rec2pm_kernels.testing import (
    assert_within_budget,
    cached_step_case,
    cached_step_reference,
    cu_seqlens_of,
    error_budget,
    make_cache,
    max_abs_error,
    random_bias,
    random_inputs,
    random_qkv,
    reference_and_baseline,
)

from ..conftest import require_extension
from .targets import BY_ID

TARGET = BY_ID["cpp"]
S, C = TARGET.segment_len, TARGET.num_memory_tokens
SCORES = ["softmax", "silu"]
pattern_kwargs, score_kwargs = TARGET.pattern_kwargs, TARGET.score_kwargs


@pytest.fixture(autouse=True)
def _needs_extension():
    require_extension()


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("score", SCORES)
def test_float64_inputs_compute_in_float64(pattern, score):
    """float64 stays float64 (fp32 math would be ~1e-7 off).  Not the shared error budget:
    its same-dtype baseline is the reference itself in float64, leaving only a 2-ulp floor
    that a different summation order can exceed."""
    q, k, v, cu, bias = random_inputs(TARGET.ragged, dim=8, dtype=torch.float64)
    kw = dict(rel_bias=bias.detach(), **TARGET.pattern_kwargs(pattern), **TARGET.score_kwargs(score))
    q, k, v = (t.detach() for t in (q, k, v))
    out = segment_attention(q, k, v, cu, max(TARGET.ragged), backend="cpp", **kw)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, segment_attention_oracle(q, k, v, cu, **kw), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_key_spans_are_exactly_the_visible_keys(pattern):
    """The C++ rule (attention_math.h) covers each row's visible keys exactly, in order, once."""
    ext = require_extension()
    segment_len, memory_tokens = 3, 2
    cols = torch.arange(40)
    for row in range(40):
        spans = ext.key_spans(PATTERN_CODES[pattern], row, segment_len, memory_tokens)
        keys = [j for begin, end in spans for j in range(begin, end)]
        want = torch.nonzero(visible(pattern, torch.tensor(row), cols, segment_len, memory_tokens)).flatten()
        assert keys == want.tolist(), (row, spans)


def test_long_sequences_with_many_spans():
    # Longer than one key tile of every span, and kv_memory_append rows with many earlier units.
    lengths = [7 * (S + C) + 2, 40 * (S + C), 130]
    for pattern in PATTERNS:
        TARGET.check(lengths, pattern, "softmax", with_bias=True, dim=16)


@pytest.fixture(params=["avx512", "portable"])
def lanes_build(request):
    """Causal attention in fp32 at head dims 8 and 16 runs 16 rows per vector
    (csrc/cpu/causal_lanes.cpp) in one of two builds: AVX-512 where the CPU has it, and a
    portable one; each test runs with each build this machine can take."""
    ext = require_extension()
    previous = ext.force_portable_causal_lanes(request.param == "portable")
    try:
        if request.param == "avx512" and not ext.causal_lanes_use_avx512():
            pytest.skip("this CPU has no AVX-512")
        yield request.param
    finally:
        ext.force_portable_causal_lanes(previous)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("heads,dim", [(2, 8), (3, 16)])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_causal_row_lanes_match_the_oracle(lanes_build, score, heads, dim, with_bias):
    """Blocks of 16 rows: sequences that end inside a block, on its edge and one row past it
    (lanes past the end compute and must not be written), rows far past the bias table's
    last bucket, softmax chunks of keys that end mid-block, and per-sequence SiLU norms."""
    lengths = [0, 1, 15, 16, 17, 40, 300]
    for num_buckets in (13, 400):  # the table ends before / after the longest distance
        TARGET.check(lengths, "causal", score, with_bias=with_bias, heads=heads, dim=dim, num_buckets=num_buckets)
    if score == "softmax":
        return
    q, k, v, cu, bias = random_inputs(lengths, heads, dim, dim, torch.float32, "cpu", with_bias, 13)
    q, k, v = (t.detach() for t in (q, k, v))
    kw = dict(rel_bias=None if bias is None else bias.detach(), backend="cpp", **pattern_kwargs("causal"))
    norms = torch.tensor([1.0, 2.0, 15.0, 16.0, 17.0, 40.0, 300.0])
    silu = score_kwargs("silu")
    out = segment_attention(q, k, v, cu, max(lengths), **kw, **silu | {"silu_norm": norms})
    for b, norm in enumerate(norms.tolist()):
        rows = slice(cu[b], cu[b + 1])
        one = cu_seqlens_of([lengths[b]])
        alone = segment_attention(q[rows], k[rows], v[rows], one, lengths[b], **kw, **silu | {"silu_norm": norm})
        torch.testing.assert_close(out[rows], alone, rtol=0, atol=0)


@pytest.mark.parametrize("score", SCORES)
def test_row_lanes_stay_within_budget_over_long_rows(lanes_build, score):
    """120 random cases of the lengths above, 3 heads x 16 (seeds 0..59, both bias tables):
    SiLU's weighted values summed in one chain of adds per row (300 adds for the long
    sequence) put 3 of them up to 1.24x past the budget; partial sums of 64 keys keep all."""
    lengths = [0, 1, 15, 16, 17, 40, 300]
    kw = dict(**pattern_kwargs("causal"), **score_kwargs(score))
    over = []
    with torch.random.fork_rng():
        for seed in range(60):
            for num_buckets in (13, 400):
                torch.manual_seed(seed)
                q, k, v, cu, bias = random_inputs(lengths, 3, 16, 16, torch.float32, "cpu", True, num_buckets)
                q, k, v, bias = (t.detach() for t in (q, k, v, bias))
                out = segment_attention(q, k, v, cu, max(lengths), rel_bias=bias, backend="cpp", **kw)
                reference, baseline = reference_and_baseline(q, k, v, cu, bias, None, **kw)
                error, budget = max_abs_error(out, reference[0]), error_budget(reference[0], baseline[0], torch.float32)
                if not error <= budget:
                    over.append((seed, num_buckets, round(error / budget, 3)))
    assert not over, f"(seed, buckets, error / budget) past the budget: {over}"


def test_softmax_row_lanes_keep_large_scores(lanes_build):
    """Softmax's running maximum: scores of a few hundred (exp would overflow without the
    shift) and a later key far above the earlier ones (the sums rescale to almost nothing)."""
    q, k, v = random_qkv(40, heads=2, dim=8)
    q, k = q * 30, k * 30
    k[33] *= 5
    cu = cu_seqlens_of([40])
    kw = dict(backend="cpp", **pattern_kwargs("causal"), **score_kwargs("softmax"))
    out = segment_attention(q, k, v, cu, 40, **kw)
    reference = segment_attention_oracle(q.double(), k.double(), v.double(), cu, **pattern_kwargs("causal"))
    torch.testing.assert_close(out, reference.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("dim", [8, 16])
def test_row_lanes_keep_a_later_keys_infinity_out_of_earlier_rows(lanes_build, score, dim):
    """A row never reads a key it cannot see: an infinite value at token 10 leaves rows 0..9
    bit for bit as they were, in both builds (the lanes that do not see a key keep their sums;
    adding zero times the key's value made them NaN, in the AVX-512 build rows 0..9 and in the
    portable one rows 8..9)."""
    q, k, v = random_qkv(16, heads=2, dim=dim)
    cu = cu_seqlens_of([16])
    kw = dict(backend="cpp", validate=False, **pattern_kwargs("causal"), **score_kwargs(score))
    assert cpp_row_lanes("causal", dim, dim, torch.float32)
    clean = segment_attention(q, k, v, cu, 16, **kw)
    v[10] = float("inf")
    out = segment_attention(q, k, v, cu, 16, **kw)
    assert torch.equal(out[:10], clean[:10])


@pytest.mark.parametrize("score", SCORES)
def test_row_lanes_builds_agree(score):
    """The AVX-512 and portable builds compute the same math in the same order; only the
    exp's last steps differ (vscalefps against integer exponent bits), so they agree to a
    few ulp, and both match the float64 oracle within the budget (above)."""
    ext = require_extension()
    if not ext.causal_lanes_use_avx512():
        pytest.skip("this CPU has no AVX-512")
    q, k, v = random_qkv(500, heads=8, dim=8)
    bias = random_bias(8, num_buckets=128)
    kw = dict(rel_bias=bias, backend="cpp", **pattern_kwargs("causal"), **score_kwargs(score))
    cu = cu_seqlens_of([500])
    fast = segment_attention(q, k, v, cu, 500, **kw)
    previous = ext.force_portable_causal_lanes(True)
    try:
        portable = segment_attention(q, k, v, cu, 500, **kw)
    finally:
        ext.force_portable_causal_lanes(previous)
    torch.testing.assert_close(fast, portable, rtol=1e-5, atol=1e-6)


# Users whose new rows start on and off the 16-row grid (0, 4, 37 filled slots), end inside
# and on a block, a user without new rows and one with a single row: 70 rows over 4 users
# with rows, so the step takes the lane kernel over the caches.
MANY_ROWS_FILLED, MANY_ROWS_NEW = (0, 4, 37, 16, 9), (20, 16, 33, 0, 1)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("dim", [8, 16])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("layout", ["slot-major", "head-major"])
def test_cached_step_of_many_rows_matches_the_oracle(lanes_build, score, dim, with_bias, layout):
    """A cached step with 8 or more new rows per user runs the lane kernel over the caches
    (``takes_cached_lanes`` in csrc/cpu/attention_cpu.cpp): KV-Mask's serving prefill and archive."""
    q, k, v, cu, k_cache, v_cache, seqlens, bias = cached_step_case(
        MANY_ROWS_FILLED, MANY_ROWS_NEW, heads=3, dim=dim, dim_v=dim, with_bias=with_bias
    )
    if layout == "head-major":
        k_cache, v_cache = (c.transpose(1, 2).contiguous().transpose(1, 2) for c in (k_cache, v_cache))
    kw = score_kwargs(score)
    ref, base = cached_step_reference(q, k, v, cu, k_cache, v_cache, seqlens, bias, **kw)
    with torch.no_grad():
        out = cached_step_attention(
            q, k, v, cu, max(MANY_ROWS_NEW), k_cache, v_cache, seqlens, rel_bias=bias, backend="cpp", **kw
        )
    assert_within_budget("out", out, ref, base, torch.float32)
    for b, (c, n) in enumerate(zip(MANY_ROWS_FILLED, MANY_ROWS_NEW, strict=True)):
        start = int(cu[b])
        assert torch.equal(k_cache[b, c : c + n], k[start : start + n])
        assert torch.equal(v_cache[b, c : c + n], v[start : start + n])
    threads = torch.get_num_threads()
    try:  # each block's sums run in one order: the same bits for any thread count
        for count in (1, 3):
            torch.set_num_threads(count)
            again = cached_step_attention(
                q, k, v, cu, max(MANY_ROWS_NEW), k_cache, v_cache, seqlens, rel_bias=bias, backend="cpp", **kw
            )
            assert torch.equal(again, out)
    finally:
        torch.set_num_threads(threads)


def test_bit_identical_across_runs_and_thread_counts():
    lengths = [200, 3, 57, 0, 90]
    q, k, v = random_qkv(sum(lengths), heads=4, dim=16)
    bias = random_bias(4, num_buckets=40)
    cu = cu_seqlens_of(lengths)
    threads = torch.get_num_threads()
    outs = []
    try:
        for count in (1, 2, 1, 3):
            torch.set_num_threads(count)
            outs.append(
                segment_attention(
                    q,
                    k,
                    v,
                    cu,
                    200,
                    rel_bias=bias,
                    backend="cpp",
                    **pattern_kwargs("global", 20, 4),
                    **score_kwargs("silu"),
                )
            )
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(out, outs[0]) for out in outs[1:])


def test_cpp_is_forward_only_and_auto_picks_it_without_gradients(monkeypatch):
    q, k, v = random_qkv(9, requires_grad=True)
    cu = cu_seqlens_of([9])
    with pytest.raises(ValueError, match="backend='cpp' is forward only"):
        segment_attention(q, k, v, cu, 9, backend="cpp")
    from rec2pm_kernels import interface

    chosen = []
    for name in ("cpp", "torch"):
        real = interface.SEGMENT_ATTENTION_IMPLS[name]
        monkeypatch.setitem(
            interface.SEGMENT_ATTENTION_IMPLS,
            name,
            lambda *a, _name=name, _real=real, **kw: chosen.append(_name) or _real(*a, **kw),
        )
    with torch.no_grad():
        segment_attention(q, k, v, cu, 9)
    segment_attention(q, k, v, cu, 9).sum().backward()
    assert chosen == ["cpp", "torch"]
    assert backends()["cpp"].available


@pytest.mark.parametrize(
    "pattern, dim, dtype, length, expected",
    [
        ("global", 16, torch.float32, 512, "cpp"),
        ("global", 16, torch.float32, 513, "torch"),
        ("global", 64, torch.float32, 384, "cpp"),
        ("global", 64, torch.float32, 385, "torch"),
        ("global", 8, torch.float32, 2000, "torch"),
        ("causal", 64, torch.float32, 385, "torch"),
        ("causal", 16, torch.float64, 513, "torch"),
        ("causal", 8, torch.float32, 4000, "cpp"),  # the lane kernel's AVX-512 build
        ("causal", 16, torch.bfloat16, 4000, "cpp"),
        ("causal", 8, "portable", 513, "torch"),  # its portable build: the row kernel's limit
        ("causal", 8, "portable", 512, "cpp"),
    ],
)
def test_auto_picks_cpp_for_softmax_up_to_the_measured_length(monkeypatch, pattern, dim, dtype, length, expected):
    """``auto`` without gradients: C++ for softmax up to 512 tokens at head dims up to 16, 384
    at wider ones, and at any length where plain causal attention takes the lane kernel's
    AVX-512 build (fp32 math at head dims 8 and 16) (``backends.cpp_preferred``); SiLU at any
    length."""
    from rec2pm_kernels import interface

    ext = require_extension()
    portable = dtype == "portable"
    dtype = torch.float32 if portable else dtype
    if expected == "cpp" and length > 512 and not portable and not ext.causal_lanes_use_avx512():
        pytest.skip("this CPU has no AVX-512")
    chosen = []
    for name in ("cpp", "torch"):
        monkeypatch.setitem(interface.SEGMENT_ATTENTION_IMPLS, name, lambda *a, _name=name, **kw: chosen.append(_name))
    q, k, v = random_qkv(length, heads=1, dim=dim, dtype=dtype)
    cu = cu_seqlens_of([length])
    previous = ext.force_portable_causal_lanes(portable)
    try:
        with torch.no_grad():
            segment_attention(q, k, v, cu, length, **pattern_kwargs(pattern, 20, 4))
            segment_attention(q, k, v, cu, length, score="silu", silu_norm=float(length))
    finally:
        ext.force_portable_causal_lanes(previous)
    assert chosen == [expected, "cpp"]


def test_python_lane_rule_states_the_compiled_one():
    """``backends.cpp_row_lanes`` (which ``auto`` reads) and ``causal_lanes_support`` (which the
    C++ kernel reads) must name the same head dims: a dim compiled in but not listed would be
    sent to torch by ``auto`` past 512 tokens, one listed but not compiled would be timed as
    the lane kernel while the row kernel runs."""
    ext = require_extension()
    for dim in range(1, 257):
        for dim_v in (dim, dim * 2, max(dim // 2, 1)):
            python = cpp_row_lanes("causal", dim, dim_v, torch.float32)
            assert python == ext.causal_lanes_support(dim, dim_v), (dim, dim_v)


def test_bad_input_reaches_the_shared_validation():
    q, k, v = random_qkv(10)
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        segment_attention(q, k, v, torch.tensor([0, 7, 4, 10]), 7, backend="cpp")
    with pytest.raises(ValueError, match="q contains NaN or Inf"):
        segment_attention(
            q.index_fill(0, torch.tensor([2]), float("nan")), k, v, cu_seqlens_of([10]), 10, backend="cpp"
        )


def test_custom_ops_pass_opcheck():
    """The ops torch.compile traces: schema, fake implementation and in-place cache writes."""
    from rec2pm_kernels.ops.cached_step.cpp_backend import cpp_cached_step_op
    from rec2pm_kernels.ops.segment_attention.cpp_backend import cpp_segment_attention_op

    q, k, v = random_qkv(12, heads=2, dim=8)
    bias = random_bias(2)
    torch.library.opcheck(
        cpp_segment_attention_op, (q, k, v, cu_seqlens_of([5, 7]), "global", S, C, "silu", 0.3, bias, 4.0)
    )
    k_cache, v_cache = torch.zeros(2, 6, 2, 8), torch.zeros(2, 6, 2, 8)
    torch.library.opcheck(
        cpp_cached_step_op,
        (
            q[:3],
            k[:3],
            v[:3],
            cu_seqlens_of([2, 1]),
            k_cache,
            v_cache,
            torch.tensor([1, 3], dtype=torch.int32),
            "softmax",
            0.35,
            bias,
            1.0,
        ),
    )


# Caches longer than the C++ step's chunk of 4,096 slots (cached_step/test_oracle.py checks
# them against the oracle).
LONG_FILLED, LONG_NEW, LONG_CAPACITY = [4095, 4092, 9000, 5], [1, 6, 3, 2], 9100


# (heads, dim): SASRec's and HSTU's heads (scores of four heads at a time), four lane
# chunks per head, a head left over after the groups of four, and a dim that is not a
# multiple of the 8 score lanes.
HEAD_SHAPES = [(4, 16), (8, 8), (4, 32), (5, 8), (2, 12)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("score", ["softmax", "silu"])
@pytest.mark.parametrize("heads,dim", HEAD_SHAPES)
def test_long_caches_are_bit_identical_across_thread_counts(heads, dim, score, dtype):
    """The chunks have a fixed length, so the split does not depend on the thread count
    (nor does the choice between the all-heads and per-head passes: 1-3 threads take the
    first for these 4 users, 8 threads the second)."""
    cu = cu_seqlens_of(LONG_NEW)
    q, k, v = random_qkv(sum(LONG_NEW), heads, dim, dim, dtype=dtype)
    k_cache, v_cache = make_cache(len(LONG_NEW), LONG_CAPACITY, heads, dim, dim, LONG_FILLED, dtype)
    seqlens = torch.tensor(LONG_FILLED, dtype=torch.int32)
    bias = random_bias(heads, num_buckets=40, dtype=dtype) if score == "silu" else None
    threads = torch.get_num_threads()
    outs = []
    try:
        for count in (1, 2, 3, 8):
            torch.set_num_threads(count)
            caches = (k_cache.clone(), v_cache.clone())
            outs.append(
                cached_step_attention(
                    q, k, v, cu, 6, *caches, seqlens, rel_bias=bias, backend="cpp", **score_kwargs(score)
                )
            )
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(out, outs[0]) for out in outs[1:])
