"""The C++ entry points check their raw inputs themselves: a direct call of ``rec2pm_kernels._C``
with shapes, offsets or codes that do not fit is an error naming the argument, never a read
or write past a buffer (each case below overran one, or divided by zero, before the checks;
``csrc/cpu/input_checks.h``)."""

from __future__ import annotations

import pytest
import torch

from rec2pm.backbones import fused_step
from rec2pm.config import named_config
from rec2pm.methods import build_model

from ..conftest import require_extension

HEADS, DIM, TOKENS = 4, 8, 40


@pytest.fixture(scope="module")
def C():
    return require_extension()


def score_args():
    """What both attention entry points take for the scores: SiLU with a relative bias."""
    return dict(score=1, scale=0.3, rel_bias=torch.randn(HEADS, 16), silu_norm=1.0)


def segment_args(**changes):
    torch.manual_seed(0)
    args = dict(
        q=torch.randn(TOKENS, HEADS, DIM),
        k=torch.randn(TOKENS, HEADS, DIM),
        v=torch.randn(TOKENS, HEADS, DIM),
        cu_seqlens=torch.tensor([0, 25, TOKENS]),
        pattern=0,
        segment_len=1,
        num_memory_tokens=0,
        **score_args(),
    )
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes, text",
    [
        (dict(k=torch.randn(TOKENS, HEADS, 4)), "k must have q's shape"),
        (dict(k=torch.randn(TOKENS - 5, HEADS, DIM)), "k must have q's shape"),
        (dict(v=torch.randn(TOKENS, 1, DIM)), "v must have q's tokens and heads"),
        (dict(cu_seqlens=torch.tensor([0, 100])), "cu_seqlens must start at 0 and end at the 40 rows, got 0 and 100"),
        (dict(cu_seqlens=torch.tensor([0, 30, 20, TOKENS])), "cu_seqlens must not decrease, got 30 then 20"),
        (dict(cu_seqlens=torch.zeros(0, dtype=torch.long)), "cu_seqlens must be a contiguous int64 (batch + 1,)"),
        (dict(rel_bias=torch.randn(1, 5)), "rel_bias must be (heads = 4, buckets >= 1), got [1, 5]"),
        (dict(pattern=1, segment_len=0, num_memory_tokens=0), "an interleaved pattern needs segment_len >= 1"),
        (dict(pattern=7), "pattern must be a code 0..3"),
        (dict(score=5), "score must be 0 (softmax) or 1 (silu), got 5"),
        (dict(num_targets=torch.tensor([2, -3])), "num_targets[1]=-3 must be in [0, 15]"),
        (dict(num_targets=torch.tensor([26, 0])), "num_targets[0]=26 must be in [0, 25]"),
        (dict(contextual_seq_len=20), "sequence 1 has 15 tokens, fewer than contextual_seq_len=20"),
    ],
)
def test_segment_attention_forward_checks_its_inputs(C, changes, text):
    with pytest.raises(RuntimeError) as info:
        C.segment_attention_forward(**segment_args(**changes))
    assert text in str(info.value)


def test_segment_attention_forward_still_takes_what_fits(C):
    out = C.segment_attention_forward(**segment_args())
    assert out.shape == (TOKENS, HEADS, DIM) and torch.isfinite(out).all()


def test_pattern_utilities_refuse_a_unit_of_zero_tokens(C):
    for call in (C.visibility_mask, C.bias_positions):
        with pytest.raises(RuntimeError, match="an interleaved pattern needs segment_len >= 1"):
            call(pattern=1, n=4, segment_len=0, num_memory_tokens=0)
    with pytest.raises(RuntimeError, match="an interleaved pattern needs segment_len >= 1"):
        C.key_spans(pattern=2, row=3, segment_len=0, num_memory_tokens=0)


def cached_args(**changes):
    torch.manual_seed(0)
    rows, capacity = 3, 16
    args = dict(
        q_new=torch.randn(rows, HEADS, DIM),
        k_new=torch.randn(rows, HEADS, DIM),
        v_new=torch.randn(rows, HEADS, DIM),
        cu_seqlens_new=torch.tensor([0, rows]),
        k_cache=torch.zeros(1, capacity, HEADS, DIM),
        v_cache=torch.zeros(1, capacity, HEADS, DIM),
        cache_seqlens=torch.tensor([5]),
        append=True,
        **score_args(),
    )
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes, text",
    [
        (
            dict(v_new=torch.randn(3, 1, DIM), v_cache=torch.zeros(1, 16, 1, DIM)),
            "v_new must have q_new's tokens and heads",
        ),
        (dict(k_new=torch.randn(1, HEADS, DIM)), "k_new must have q_new's shape"),
        (dict(rel_bias=torch.randn(1, 5)), "rel_bias must be (heads = 4, buckets >= 1)"),
        (dict(score=2), "score must be 0 (softmax) or 1 (silu), got 2"),
        (
            dict(
                cu_seqlens_new=torch.tensor([0]),
                cache_seqlens=torch.zeros(0, dtype=torch.long),
                k_cache=torch.zeros(0, 16, HEADS, DIM),
                v_cache=torch.zeros(0, 16, HEADS, DIM),
            ),
            "cu_seqlens_new must start at 0 and end at the 3 rows, got 0 and 0",
        ),
    ],
)
def test_cached_step_forward_checks_its_inputs(C, changes, text):
    args = cached_args(**changes)
    before = args["v_cache"].clone()
    with pytest.raises(RuntimeError) as info:
        C.cached_step_forward(**args)
    assert text in str(info.value)
    assert torch.equal(args["v_cache"], before)  # nothing was written


@pytest.fixture(scope="module")
def hstu():
    torch.manual_seed(0)
    config = named_config("hstu-small", num_items=50, dropout=0.0)
    return build_model("full", config).decoder.eval()


def decoder_args(decoder, rows):
    x = torch.randn(rows, decoder.config.d_model)
    return fused_step._decoder_arguments(decoder, x, torch.arange(rows))


def batch_caches(decoder, capacity, heads=None):
    shape = (1, capacity, heads or decoder.config.num_heads, decoder.config.head_dim)
    return [torch.zeros(shape) for _ in decoder.blocks], [torch.zeros(shape) for _ in decoder.blocks]


def test_decoder_step_refuses_rows_that_do_not_fit_its_caches(C, hstu):
    # Each cache is the first 4 slots of a 6-slot buffer: a step past them would write slots 4 and 5.
    shape = (1, 6, hstu.config.num_heads, hstu.config.head_dim)
    buffers = [torch.zeros(shape) for _ in range(2 * len(hstu.blocks))]
    k, v = [b[:, :4] for b in buffers[::2]], [b[:, :4] for b in buffers[1::2]]
    text = r"user 0: its 4 filled slots and 2 new rows must fit the caches \(capacity 4\)"
    with pytest.raises(RuntimeError, match=text):
        C.decoder_step(
            **decoder_args(hstu, 2),
            cu_seqlens_new=torch.tensor([0, 2]),
            k_caches=k,
            v_caches=v,
            cache_seqlens=torch.tensor([4]),
        )
    assert not any(b.any() for b in buffers)


def test_decoder_step_refuses_caches_of_another_shape(C, hstu):
    k, v = batch_caches(hstu, capacity=8, heads=1)
    with pytest.raises(RuntimeError, match="layer 0: the K cache must be a \\(batch = 1, capacity"):
        C.decoder_step(
            **decoder_args(hstu, 2),
            cu_seqlens_new=torch.tensor([0, 2]),
            k_caches=k,
            v_caches=v,
            cache_seqlens=torch.tensor([0]),
        )


@pytest.mark.parametrize("heads", [0, 3, -2])
def test_decoder_forward_refuses_a_head_count_that_does_not_divide_d_model(C, hstu, heads):
    args = dict(decoder_args(hstu, 4), num_heads=heads)
    with pytest.raises(RuntimeError, match=f"num_heads must be >= 1 and divide d_model = 16, got {heads}"):
        C.decoder_forward(**args, cu_seqlens=torch.tensor([0, 4]))


def test_decoder_forward_refuses_offsets_past_its_rows(C, hstu):
    with pytest.raises(RuntimeError, match="cu_seqlens must start at 0 and end at the 4 rows, got 0 and 64"):
        C.decoder_forward(**decoder_args(hstu, 4), cu_seqlens=torch.tensor([0, 64]))


def test_decoder_forward_refuses_last_rows_of_an_empty_sequence(C, hstu):
    """Its output has one row per user: a user without rows has none to give."""
    with pytest.raises(RuntimeError, match="last_rows_only: user 1 has no new rows"):
        C.decoder_forward(**decoder_args(hstu, 4), cu_seqlens=torch.tensor([0, 4, 4]), last_rows_only=True)


def test_decoder_step_users_refuses_a_weight_of_another_shape_and_leaves_the_caches(C, hstu):
    args = decoder_args(hstu, 2)
    layers = [list(w) for w in args["layers"]]
    layers[1][2] = layers[1][2][: hstu.config.d_model]  # f1's weight (4d, d) cut to (d, d)
    shape = (8, hstu.config.num_heads, hstu.config.head_dim)
    k, v = [torch.ones(shape) for _ in hstu.blocks], [torch.ones(shape) for _ in hstu.blocks]
    with pytest.raises(RuntimeError, match="HSTU's f1 weight must have shape \\[64, 16\\], got \\[16, 16\\]"):
        C.decoder_step_users(
            **dict(args, layers=layers),
            cu_seqlens_new=torch.tensor([0, 2]),
            user_k_caches=[k],
            user_v_caches=[v],
            cache_seqlens=torch.tensor([0], dtype=torch.int32),
        )
    # A prefill zeroes the slots after its rows, but only once every check has passed.
    assert all(bool((cache == 1).all()) for cache in k + v)
