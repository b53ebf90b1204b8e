"""Bad input: every case raises ValueError or TypeError whose message names the argument."""

import re

import numpy as np
import pytest
import torch

from rec2pm_kernels import cached_step_attention, segment_attention
from rec2pm_kernels.testing import cu_seqlens_of

T, H, D = 10, 2, 8


def good_segment_args():
    q, k, v = (torch.randn(T, H, D) for _ in range(3))
    return dict(q=q, k=k, v=v, cu_seqlens=cu_seqlens_of([4, 6]), max_seqlen=6)


def with_changes(**changes):
    args = good_segment_args()
    args.update(changes)
    return args


def nan_q():
    q = torch.randn(T, H, D)
    q[3, 1, 2] = float("nan")
    return q


SEGMENT_CASES = {
    # name: (overrides, exception, text the message must contain)
    "q rank": (dict(q=torch.randn(T, H * D)), ValueError, "q must have rank 3"),
    "q not a tensor": (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    "k heads": (dict(k=torch.randn(T, H + 1, D)), ValueError, "k must have the shape of q"),
    "k head dim": (dict(k=torch.randn(T, H, D + 1)), ValueError, "k must have the shape of q"),
    "v tokens": (dict(v=torch.randn(T + 1, H, D)), ValueError, "v must have shape"),
    "v heads": (dict(v=torch.randn(T, H + 1, D)), ValueError, "v must have shape"),
    "integer q": (dict(q=torch.ones(T, H, D, dtype=torch.int64)), TypeError, "q must have dtype"),
    "mixed dtypes": (dict(v=torch.randn(T, H, D, dtype=torch.float64)), TypeError, "v must have the same dtype"),
    "device": (dict(v=torch.randn(T, H, D, device="meta")), ValueError, "v must have the same device"),
    "cu_seqlens dtype": (dict(cu_seqlens=torch.tensor([0.0, 4.0, 10.0])), TypeError, "cu_seqlens must have dtype"),
    "cu_seqlens rank": (dict(cu_seqlens=torch.tensor([[0, 4, 10]])), ValueError, "cu_seqlens must have rank 1"),
    "cu_seqlens empty": (dict(cu_seqlens=torch.tensor([], dtype=torch.int32)), ValueError, "cu_seqlens"),
    "cu_seqlens start": (dict(cu_seqlens=torch.tensor([1, 4, 10])), ValueError, "cu_seqlens must start at 0"),
    "cu_seqlens order": (dict(cu_seqlens=torch.tensor([0, 7, 4, 10])), ValueError, "cu_seqlens must be non-decreasing"),
    "cu_seqlens end": (dict(cu_seqlens=torch.tensor([0, 4, 9])), ValueError, "cu_seqlens[-1] must equal"),
    "max_seqlen small": (dict(max_seqlen=5), ValueError, "max_seqlen=5 is smaller"),
    "max_seqlen type": (dict(max_seqlen=6.0), TypeError, "max_seqlen must be an int"),
    "max_seqlen tensor": (dict(max_seqlen=torch.tensor(6)), TypeError, "max_seqlen must be an int"),
    "unknown pattern": (dict(pattern="sliding"), ValueError, "pattern must be one of"),
    "missing segment_len": (dict(pattern="global", num_memory_tokens=1), ValueError, "segment_len"),
    "missing num_memory_tokens": (dict(pattern="kv_memory_append", segment_len=2), ValueError, "num_memory_tokens"),
    "segment_len zero": (dict(pattern="global", segment_len=0, num_memory_tokens=1), ValueError, "segment_len"),
    "num_memory_tokens float": (
        dict(pattern="global", segment_len=2, num_memory_tokens=1.0),
        TypeError,
        "num_memory_tokens must be an int",
    ),
    "segment_len with causal": (dict(segment_len=2), ValueError, "segment_len and num_memory_tokens apply only"),
    # S = 2, C = 2: units of 4 tokens, so a sequence of 3 stops after the first of two write tokens.
    "ends inside write block": (
        dict(pattern="global", segment_len=2, num_memory_tokens=2, cu_seqlens=torch.tensor([0, 3, 10]), max_seqlen=7),
        ValueError,
        "cu_seqlens: sequence 0 (length 3) ends inside a write block",
    ),
    "unknown score": (dict(score="relu"), ValueError, "score must be one of"),
    "silu without silu_norm": (dict(score="silu"), ValueError, "silu_norm is required"),
    "silu_norm with softmax": (dict(silu_norm=10.0), ValueError, "silu_norm applies only"),
    "silu_norm zero": (dict(score="silu", silu_norm=0.0), ValueError, "silu_norm must be a finite number > 0"),
    "scale nan": (dict(scale=float("nan")), TypeError, "scale must be a finite number"),
    "bias rank": (dict(rel_bias=torch.randn(H)), ValueError, "rel_bias must have rank 2"),
    "bias heads": (dict(rel_bias=torch.randn(H + 1, 5)), ValueError, "rel_bias must have shape (heads=2"),
    "bias no buckets": (dict(rel_bias=torch.randn(H, 0)), ValueError, "rel_bias must have shape"),
    "bias dtype": (dict(rel_bias=torch.ones(H, 5, dtype=torch.int32)), TypeError, "rel_bias must have dtype"),
    "unknown backend": (dict(backend="metal"), ValueError, "backend must be one of"),
    "q has NaN": (dict(q=nan_q()), ValueError, "q contains NaN or Inf"),
    "validate not a flag": (dict(validate="yes"), TypeError, "validate must be True, False or None, got 'yes'"),
    "allow_tf32 not a flag": (dict(allow_tf32=1), TypeError, "allow_tf32 must be True or False, got 1"),
    "deterministic not a flag": (dict(deterministic="on"), TypeError, "deterministic must be True, False or None"),
}


@pytest.mark.parametrize("case", list(SEGMENT_CASES))
def test_segment_attention_rejects(case):
    changes, exc, text = SEGMENT_CASES[case]
    args = with_changes(**changes)
    with pytest.raises(exc) as info:
        segment_attention(
            args.pop("q"), args.pop("k"), args.pop("v"), args.pop("cu_seqlens"), args.pop("max_seqlen"), **args
        )
    assert text in str(info.value)


def test_unavailable_backend_says_why():
    with pytest.raises(ValueError, match="backend='triton' cannot run segment_attention here: "):
        segment_attention(**good_segment_args(), backend="triton")


def test_validate_false_skips_only_the_content_scan_on_host_tensors():
    # validate=False skips the NaN scan: the caller vouches for finite inputs (NaN rows follow).
    out = segment_attention(**with_changes(q=nan_q()), validate=False)
    assert out.shape == (T, H, D) and bool(out.isnan().any())
    # The O(batch) index checks on host tensors cost nothing and always run.
    for changes, text in (
        (dict(max_seqlen=5), "max_seqlen=5 is smaller"),
        (dict(cu_seqlens=torch.tensor([0, 7, 4, 10])), "cu_seqlens must be non-decreasing"),
        (dict(cu_seqlens=torch.tensor([1, 4, 10])), "cu_seqlens must start at 0"),
        (dict(cu_seqlens=torch.tensor([0, 4, 9])), "cu_seqlens[-1] must equal"),
        (
            dict(
                pattern="global", segment_len=2, num_memory_tokens=2, cu_seqlens=torch.tensor([0, 3, 10]), max_seqlen=7
            ),
            "ends inside a write block",
        ),
        (dict(q=torch.randn(T, H * D)), "q must have rank 3"),
    ):
        with pytest.raises((ValueError, TypeError), match=re.escape(text)):
            segment_attention(**with_changes(**changes), validate=False)


@pytest.mark.parametrize(
    "segment_len, num_memory_tokens, text",
    [
        (2**62, 1, "segment_len must be <= 2147483647"),
        (1, 2**63 - 1, "num_memory_tokens must be <= 2147483647"),
        (2**31 - 2, 2, "segment_len + num_memory_tokens must be <= 2147483647"),
    ],
)
def test_pattern_arguments_past_32_bit_positions_are_refused(segment_len, num_memory_tokens, text):
    with pytest.raises(ValueError, match=re.escape(text)):
        segment_attention(
            **with_changes(pattern="global", segment_len=segment_len, num_memory_tokens=num_memory_tokens)
        )


def test_max_seqlen_is_an_upper_bound_only():
    args = good_segment_args()
    want = segment_attention(**args)
    args["max_seqlen"] = 2**40
    assert torch.equal(segment_attention(**args), want)


def test_rec2pm_validate_turns_on_value_checks_for_cuda_tensors(monkeypatch):
    from rec2pm_kernels.validation import should_check_values

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("REC2PM_VALIDATE", raising=False)
    assert not should_check_values(cuda, None) and should_check_values(cpu, None)
    assert should_check_values(cuda, True) and not should_check_values(cpu, False)
    for value, expected in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv("REC2PM_VALIDATE", value)
        assert should_check_values(cuda, None) is expected
    monkeypatch.setenv("REC2PM_VALIDATE", "1")
    assert not should_check_values(cuda, False)  # an explicit argument wins over the environment


def good_cache_args():
    new = [2, 0, 1]
    q, k, v = (torch.randn(3, H, D) for _ in range(3))
    return dict(
        q_new=q,
        k_new=k,
        v_new=v,
        cu_seqlens_new=cu_seqlens_of(new),
        max_new=2,
        k_cache=torch.zeros(3, 5, H, D),
        v_cache=torch.zeros(3, 5, H, D),
        cache_seqlens=torch.tensor([3, 1, 4], dtype=torch.int32),
    )


CACHE_CASES = {
    "capacity": (
        dict(cache_seqlens=torch.tensor([4, 1, 4], dtype=torch.int32)),
        ValueError,
        "k_cache capacity 5 is too small: user 0",
    ),
    "k_cache batch": (dict(k_cache=torch.zeros(2, 5, H, D)), ValueError, "k_cache must have shape (batch=3"),
    "k_cache rank": (dict(k_cache=torch.zeros(3, 5, H * D)), ValueError, "k_cache must have rank 4"),
    "v_cache shape": (dict(v_cache=torch.zeros(3, 6, H, D)), ValueError, "v_cache must have shape"),
    "cache dtype": (
        dict(k_cache=torch.zeros(3, 5, H, D, dtype=torch.float64)),
        TypeError,
        "k_cache must have the same dtype",
    ),
    "cache_seqlens dtype": (
        dict(cache_seqlens=torch.tensor([3.0, 1.0, 4.0])),
        TypeError,
        "cache_seqlens must have dtype",
    ),
    "cache_seqlens shape": (
        dict(cache_seqlens=torch.tensor([3, 1], dtype=torch.int32)),
        ValueError,
        "cache_seqlens must have shape (3,)",
    ),
    "cache_seqlens negative": (
        dict(cache_seqlens=torch.tensor([3, -1, 4], dtype=torch.int32)),
        ValueError,
        "cache_seqlens must be >= 0",
    ),
    "max_new small": (dict(max_new=1), ValueError, "max_new=1 is smaller"),
    "grad-requiring input": (dict(q_new=torch.randn(3, H, D, requires_grad=True)), ValueError, "q_new requires grad"),
    "cu_seqlens_new end": (
        dict(cu_seqlens_new=torch.tensor([0, 2, 2, 2])),
        ValueError,
        "cu_seqlens_new[-1] must equal",
    ),
    "expanded k_cache": (
        dict(k_cache=torch.zeros(1, 5, H, D).expand(3, 5, H, D)),
        ValueError,
        "k_cache must not overlap itself in memory",
    ),
    "overlapping v_cache": (
        dict(v_cache=torch.zeros(3 * 5 * H * D).as_strided((3, 5, H, D), (D, H * D, D, 1))),
        ValueError,
        "v_cache must not overlap itself in memory",
    ),
    "k_cache is v_cache": (
        dict(k_cache=(kv := torch.zeros(3, 5, H, D)), v_cache=kv),
        ValueError,
        "k_cache and v_cache must not share memory",
    ),
    "v_cache inside k_cache": (
        dict(k_cache=(kv := torch.zeros(3, 6, H, D))[:, :5], v_cache=kv[:, 1:]),
        ValueError,
        "k_cache and v_cache must not share memory",
    ),
    "NaN in a filled k_cache slot": (
        dict(k_cache=torch.zeros(3, 5, H, D).index_fill_(1, torch.tensor([2]), 1e400)),
        ValueError,
        "k_cache contains NaN or Inf in filled slot 2 of user 0",
    ),
    "NaN in a filled v_cache slot": (
        dict(v_cache=torch.zeros(3, 5, H, D).index_fill_(1, torch.tensor([0]), float("nan"))),
        ValueError,
        "v_cache contains NaN or Inf in filled slot 0 of user 0",
    ),
    "q_new has NaN": (dict(q_new=torch.full((3, H, D), float("nan"))), ValueError, "q_new contains NaN or Inf"),
}


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_cached_step_rejects(case):
    changes, exc, text = CACHE_CASES[case]
    args = good_cache_args()
    args.update(changes)
    with pytest.raises(exc) as info:
        cached_step_attention(**args)
    assert text in str(info.value)


def test_cache_index_checks_run_on_host_tensors_even_with_validate_false():
    for changes, text in (
        (dict(cache_seqlens=torch.tensor([4, 1, 4], dtype=torch.int32)), "k_cache capacity 5 is too small: user 0"),
        (dict(cache_seqlens=torch.tensor([3, -1, 4], dtype=torch.int32)), "cache_seqlens must be >= 0"),
        (dict(max_new=1), "max_new=1 is smaller"),
        (dict(cu_seqlens_new=torch.tensor([0, 2, 1, 3])), "cu_seqlens_new must be non-decreasing"),
    ):
        args = good_cache_args()
        args.update(changes)
        with pytest.raises(ValueError, match=re.escape(text)):
            cached_step_attention(**args, validate=False)


def test_nan_in_unfilled_cache_slots_is_allowed():
    # Slots at or past cache_seqlens[b] are never read, so stale NaN there is no error.
    args = good_cache_args()
    args["k_cache"][0, 3:] = float("nan")
    args["v_cache"][1, 1:] = float("nan")
    assert bool(cached_step_attention(**args).isfinite().all())


def test_disjoint_views_of_one_kv_buffer_are_accepted():
    # A stacked (batch, capacity, 2, heads, dim) buffer: k and v interleave but share no element.
    separate, stacked = good_cache_args(), good_cache_args()
    kv = torch.randn(3, 5, 2, H, D)
    separate["k_cache"], separate["v_cache"] = kv[:, :, 0].clone(), kv[:, :, 1].clone()
    stacked["k_cache"], stacked["v_cache"] = kv[:, :, 0], kv[:, :, 1]
    for args in (separate, stacked):
        args.update(q_new=separate["q_new"], k_new=separate["k_new"], v_new=separate["v_new"])
    assert torch.equal(cached_step_attention(**stacked), cached_step_attention(**separate))
    assert torch.equal(kv[:, :, 0], separate["k_cache"]) and torch.equal(kv[:, :, 1], separate["v_cache"])


def test_max_new_is_an_upper_bound_and_never_sizes_a_buffer():
    args, huge = good_cache_args(), good_cache_args()
    huge.update(max_new=2**31, q_new=args["q_new"], k_new=args["k_new"], v_new=args["v_new"])
    assert torch.equal(cached_step_attention(**huge), cached_step_attention(**args))
    # The torch backend itself sizes its padded batch by the actual counts, not by max_new.
    from rec2pm_kernels.ops.cached_step.torch_backend import cached_step_torch

    direct = good_cache_args()
    direct.update(max_new=2**40, q_new=args["q_new"], k_new=args["k_new"], v_new=args["v_new"])
    out = cached_step_torch(*direct.values(), score="softmax", scale=D**-0.5, rel_bias=None, silu_norm=None)
    assert torch.equal(
        out,
        cached_step_attention(
            **good_cache_args() | dict(q_new=args["q_new"], k_new=args["k_new"], v_new=args["v_new"]), backend="torch"
        ),
    )


def test_good_arguments_pass():
    assert segment_attention(**good_segment_args()).shape == (T, H, D)
    assert cached_step_attention(**good_cache_args()).shape == (3, H, D)


def test_a_checked_cu_seqlens_is_checked_again_after_an_in_place_write():
    """The check of the last host cu_seqlens is reused only while it is the same tensor with
    the same values and token count."""
    q = torch.randn(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    segment_attention(q, q, q, cu, 6)
    segment_attention(q, q, q, cu, 6)  # the reused check
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must equal the number of tokens in q \(9\)"):
        segment_attention(q[:9], q[:9], q[:9], cu, 6)
    cu[1] = 12
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        segment_attention(q, q, q, cu, 10)
    fresh = torch.tensor([0, 12, 10], dtype=torch.int32)  # equal values, another tensor
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        segment_attention(q, q, q, fresh, 12)


def test_a_write_the_version_counter_misses_is_still_caught():
    """Writes through a numpy view (a data loader's reused buffer) or ``.data`` do not bump
    the version counter: the reused check compares the values themselves."""
    q = torch.randn(5, 2, 8)
    buffer = np.array([0, 2, 5], dtype=np.int64)
    cu = torch.from_numpy(buffer)
    segment_attention(q, q, q, cu, 3)
    version = cu._version
    buffer[:] = [0, 6, 5]
    assert cu._version == version
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        segment_attention(q, q, q, cu, 6, backend="cpp")
    buffer[:] = [0, 1, 5]
    with pytest.raises(ValueError, match="max_seqlen"):
        segment_attention(q, q, q, cu, 3)  # the longest sequence is 4 now


def test_int32_offsets_that_wrap_around_are_not_taken_for_lengths():
    q = torch.randn(5, 2, 8)
    cu = torch.tensor([0, 1431655765, -1431655766, 5], dtype=torch.int32)  # int32 differences all > 0
    with pytest.raises(ValueError, match=r"cu_seqlens must be non-decreasing, but cu_seqlens\[2\] < cu_seqlens\[1\]"):
        segment_attention(q, q, q, cu, 2**31 - 1)


def test_inference_mode_tensors_are_checked_on_every_call():
    """Tensors made under torch.inference_mode have no version counter (a check keyed on it
    used to raise): the reused check compares values, so an in-place write is still caught."""
    with torch.inference_mode():
        q = torch.randn(10, 2, 8)
        cu = torch.tensor([0, 4, 10], dtype=torch.int32)
        first = segment_attention(q, q, q, cu, 6)
        assert torch.equal(segment_attention(q, q, q, cu, 6), first)
        cu[1] = 12
        with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
            segment_attention(q, q, q, cu, 10)


def test_hstu_mask_keywords_name_every_field():
    import dataclasses

    from rec2pm_kernels.hstu_masks import HSTUMask

    mask = HSTUMask(contextual_seq_len=2, max_attn_len=5, min_full_attn_seq_len=1, causal=False)
    assert mask.as_kwargs() == {f.name: getattr(mask, f.name) for f in dataclasses.fields(HSTUMask)}
