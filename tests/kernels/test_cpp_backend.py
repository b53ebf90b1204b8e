"""backend="cpp" (rec2pm_kernels._C, forward only) against the oracle, its span rule, and its dispatch."""

import pytest
import torch

from rec2pm_kernels import PATTERNS, backends, segment_attention
from rec2pm_kernels.patterns import PATTERN_CODES, visible
from rec2pm_kernels.testing import cu_seqlens_of

from ..conftest import require_extension
from ..helpers import C, S, check_against_oracle, make_bias, make_qkv, pattern_kwargs, score_kwargs

RAGGED = [0, 1, S - 1, S, S + C, S + C + 1, 2 * (S + C) + S, 4 * (S + C) + 1, 3 * (S + C)]
SCORES = ["softmax", "silu"]


@pytest.fixture(autouse=True)
def _needs_extension():
    require_extension()


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_matches_oracle(pattern, score, with_bias, dtype):
    check_against_oracle(RAGGED, pattern, score, with_bias=with_bias, dtype=dtype, grads=False, backend="cpp")


@pytest.mark.parametrize("dim, dim_v", [(8, 8), (16, 16), (32, 32), (64, 64), (8, 5), (16, 24), (3, 7)])
@pytest.mark.parametrize("pattern", ["causal", "global", "kv_memory_append"])
def test_head_dims(dim, dim_v, pattern):
    # 8/16/32/64 take the fixed-width value loops, the others the generic one.
    check_against_oracle(
        RAGGED, pattern, "softmax", with_bias=True, dim=dim, dim_v=dim_v, heads=3, grads=False, backend="cpp"
    )


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
        check_against_oracle(lengths, pattern, "softmax", with_bias=True, grads=False, backend="cpp", dim=16)


def test_bit_identical_across_runs_and_thread_counts():
    lengths = [200, 3, 57, 0, 90]
    q, k, v = make_qkv(sum(lengths), heads=4, dim=16)
    bias = make_bias(4, num_buckets=40)
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
    q, k, v = make_qkv(9, requires_grad=True)
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


def test_bad_input_reaches_the_shared_validation():
    q, k, v = make_qkv(10)
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

    q, k, v = make_qkv(12, heads=2, dim=8)
    bias = make_bias(2)
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
