"""rec2pm_kernels.compat.hstu: HSTU's entry points against the oracle, the cached form against
the full pass, and the weight and timestamp converters on hand-written layouts."""

import itertools

import pytest
import torch

from rec2pm_kernels.compat.hstu import (
    cached_hstu_mha,
    delta_hstu_mha,
    hstu_mha,
    hstu_timestamps,
    jagged_to_kv_cache,
    relative_bias_tables,
)
from rec2pm_kernels.ops.segment_attention.oracle import segment_attention_oracle
from rec2pm_kernels.testing import assert_within_budget, cu_seqlens_of

LENGTHS = [7, 1, 12, 5, 9]
TARGETS = torch.tensor([2, 0, 3, 1, 0])
MAX_LEN, HEADS, DIM, DIM_V = 14, 2, 4, 3


def _qkv(requires_grad=True, dtype=torch.float32, lengths=LENGTHS):
    torch.manual_seed(0)
    total = sum(lengths)
    return tuple(torch.randn(total, HEADS, d, dtype=dtype, requires_grad=requires_grad) for d in (DIM, DIM, DIM_V))


@pytest.mark.parametrize("targets", [False, True], ids=["notargets", "targets"])
@pytest.mark.parametrize("contextual", [0, 1])
@pytest.mark.parametrize("window", [(0, 0), (2, 0), (3, 2)], ids=["nowindow", "w2", "w3tail2"])
@pytest.mark.parametrize("attn_scale", ["none", "scalar", "per_token"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_hstu_mha_matches_oracle(targets, contextual, window, attn_scale, causal):
    q, k, v = _qkv()
    cu = cu_seqlens_of(LENGTHS, dtype=torch.int64)
    nt = TARGETS if targets else None
    scale = {
        "none": None,
        "scalar": torch.tensor(0.3),
        "per_token": torch.rand(sum(LENGTHS), generator=torch.Generator().manual_seed(1)) + 0.1,
    }[attn_scale]
    out = hstu_mha(MAX_LEN, 0.7, q, k, v, cu, causal, 0.0, True, nt, scale, window[0], contextual, window[1])
    mask_kw = dict(num_targets=nt, contextual_seq_len=contextual, max_attn_len=window[0], causal=causal)
    mask_kw["min_full_attn_seq_len"] = window[1]
    norm = {"none": float(MAX_LEN), "scalar": 1 / 0.3, "per_token": 1.0}[attn_scale]
    refs = []
    for upcast in (True, False):
        r = segment_attention_oracle(q, k, v, cu, score="silu", scale=0.7, silu_norm=norm, upcast=upcast, **mask_kw)
        refs.append(r if attn_scale != "per_token" else r * scale[:, None, None])
    assert_within_budget("out", out, refs[0], refs[1], torch.float32)
    g = torch.randn_like(out)
    for name, got, ref, base in zip("qkv", *(torch.autograd.grad(x, (q, k, v), g) for x in (out, *refs)), strict=True):
        assert_within_budget(f"d{name}", got, ref, base, torch.float32)


@pytest.mark.parametrize("options", ["none", "targets", "contextual_window"])
@pytest.mark.parametrize("delta", [1, 2])
def test_cached_form_equals_the_last_rows_of_the_full_pass(options, delta):
    lengths = [7, 3, 12, 5, 9]
    q, k, v = _qkv(requires_grad=False, lengths=lengths)
    cu = cu_seqlens_of(lengths, dtype=torch.int64)
    kw = {
        "none": {},
        "targets": dict(num_targets=TARGETS),
        "contextual_window": dict(contextual_seq_len=1, max_attn_len=3),
    }[options]
    full = hstu_mha(MAX_LEN, 0.5, q, k, v, cu, **kw)
    rows = torch.cat([torch.arange(end - delta, end) for end in cu[1:].tolist()])
    cached = cached_hstu_mha(MAX_LEN, 0.5, q[rows], k, v, cu, **kw)
    torch.testing.assert_close(cached, full[rows], rtol=1e-5, atol=1e-6)


def test_relative_bias_tables_put_distance_d_at_bucket_d():
    n, buckets = 5, 3
    pos_w = torch.arange(2 * n - 1, dtype=torch.float32)  # HSTU adds pos_w[n - 1 + col - row]
    ts_w = torch.tensor([10.0, 11.0, 12.0, 13.0])
    tables = relative_bias_tables({"blocks.0._pos_w": pos_w, "blocks.0._ts_w": ts_w})
    assert tables["rel_bias"].tolist() == [[4.0, 3.0, 2.0, 1.0, 0.0]]  # distance 0 .. 4
    assert tables["ts_bias"].tolist() == [ts_w.tolist()] and tables["ts_bias"].shape == (1, buckets + 1)
    tables["rel_bias"].add_(1)
    assert pos_w[0] == 0  # copies
    with pytest.raises(ValueError, match="exactly one key ending in '_ts_w'"):
        relative_bias_tables({"_pos_w": pos_w})
    with pytest.raises(ValueError, match="_pos_w must have 2 \\* max_seq_len - 1 = 9 entries"):
        relative_bias_tables({"_pos_w": pos_w[:8], "_ts_w": ts_w}, max_seq_len=5)
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        relative_bias_tables([pos_w])


def test_hstu_timestamps_score_each_row_at_the_next_padded_time():
    padded = torch.tensor([[10, 20, 30, 0], [5, 0, 0, 0], [1, 2, 3, 4]])
    times = hstu_timestamps(padded, torch.tensor([0, 3, 4, 8]))
    assert times["timestamps"].tolist() == [10, 20, 30, 5, 1, 2, 3, 4]
    # The last token of a short sequence is scored at the padding after it, as in HSTU.
    assert times["query_timestamps"].tolist() == [20, 30, 0, 0, 2, 3, 4, 4]


def test_jagged_to_kv_cache_keeps_room_for_the_last_tokens():
    k = torch.arange(9, dtype=torch.float32)[:, None, None].expand(9, 1, 2).contiguous()
    cache_k, cache_v, filled = jagged_to_kv_cache(k, k + 100, torch.tensor([0, 4, 4, 9]), keep_last=1)
    assert filled.tolist() == [3, 0, 4] and cache_k.shape == (3, 5, 1, 2)
    assert cache_k[0, :3, 0, 0].tolist() == [0, 1, 2] and cache_k[2, :4, 0, 0].tolist() == [4, 5, 6, 7]
    assert cache_v[2, :4, 0, 1].tolist() == [104, 105, 106, 107]
    with pytest.raises(ValueError, match="capacity=3 is smaller than the longest sequence"):
        jagged_to_kv_cache(k, k, torch.tensor([0, 4, 9]), capacity=3)


def test_hstu_argument_errors():
    q, k, v = _qkv(requires_grad=False)
    cu = cu_seqlens_of(LENGTHS, dtype=torch.int64)
    with pytest.raises(ValueError, match="causal=False takes ts_bias .* but no rel_bias"):
        hstu_mha(MAX_LEN, 1.0, q, k, v, cu, causal=False, rel_bias=torch.zeros(1, MAX_LEN))
    with pytest.raises(TypeError, match="causal must be a bool"):
        hstu_mha(MAX_LEN, 1.0, q, k, v, cu, causal=0)
    with pytest.raises(ValueError, match="attn_scale must be a scalar or have shape \\(L=34,\\)"):
        hstu_mha(MAX_LEN, 1.0, q, k, v, cu, attn_scale=torch.ones(3))
    with pytest.raises(ValueError, match="delta_q must have B \\* delta rows"):
        cached_hstu_mha(MAX_LEN, 1.0, q[:7], k, v, cu)
    with pytest.raises(ValueError, match="every sequence must hold its delta=2 new tokens"):
        cached_hstu_mha(MAX_LEN, 1.0, q[:10], k, v, cu)


def test_hstu_kernel_arguments_are_taken_in_hstu_order():
    """HSTU's dispatcher passes sort_by_length, kernel and enable_tma after the masks: a call
    written for it runs unchanged, its kernel choice picking the backend."""
    import enum

    class HammerKernel(enum.Enum):  # HSTU's enum, by member name
        PYTORCH = "PYTORCH"
        TRITON = "TRITON"
        CUTLASS = "CUTLASS"

    q, k, v = _qkv(requires_grad=False)
    cu = cu_seqlens_of(LENGTHS, dtype=torch.int64)
    plain = hstu_mha(MAX_LEN, 1.0, q, k, v, cu, True, 0.0, False, TARGETS, None, 3, 1, 2)
    hinted = hstu_mha(MAX_LEN, 1.0, q, k, v, cu, True, 0.0, False, TARGETS, None, 3, 1, 2, True, None, True)
    assert torch.equal(hinted, plain)  # the hints change nothing
    named = hstu_mha(MAX_LEN, 1.0, q, k, v, cu, True, 0.0, False, TARGETS, None, 3, 1, 2, False, "PYTORCH")
    torch.testing.assert_close(named, plain, rtol=1e-5, atol=1e-6)
    by_enum = hstu_mha(MAX_LEN, 1.0, q, k, v, cu, num_targets=TARGETS, kernel=HammerKernel.PYTORCH)
    torch.testing.assert_close(by_enum, hstu_mha(MAX_LEN, 1.0, q, k, v, cu, num_targets=TARGETS, backend="torch"))
    rows = torch.cat([torch.arange(end - 1, end) for end in cu[1:].tolist()])
    step = delta_hstu_mha(MAX_LEN, 1.0, q[rows], k, v, cu, None, 0, 0, HammerKernel.PYTORCH, False)
    torch.testing.assert_close(step, hstu_mha(MAX_LEN, 1.0, q, k, v, cu)[rows], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="kernel must be one of HSTU's"):
        hstu_mha(MAX_LEN, 1.0, q, k, v, cu, kernel=HammerKernel.CUTLASS)
    with pytest.raises(ValueError, match="not both"):
        hstu_mha(MAX_LEN, 1.0, q, k, v, cu, kernel="TRITON", backend="torch")
    with pytest.raises(TypeError, match="sort_by_length"):
        hstu_mha(MAX_LEN, 1.0, q, k, v, cu, sort_by_length="yes")


def test_min_full_attn_seq_len_is_ignored_without_a_window_as_in_hstu():
    q, k, v = _qkv(requires_grad=False)
    cu = cu_seqlens_of(LENGTHS, dtype=torch.int64)
    a = hstu_mha(MAX_LEN, 1.0, q, k, v, cu, min_full_attn_seq_len=3)
    b = hstu_mha(MAX_LEN, 1.0, q, k, v, cu)
    assert torch.equal(a, b)


def test_dropout_follows_training():
    q, k, v = _qkv(requires_grad=False)
    cu = cu_seqlens_of(LENGTHS, dtype=torch.int64)
    plain = hstu_mha(MAX_LEN, 1.0, q, k, v, cu)
    assert torch.equal(hstu_mha(MAX_LEN, 1.0, q, k, v, cu, dropout_pr=0.5, training=False), plain)
    a, b = (hstu_mha(MAX_LEN, 1.0, q, k, v, cu, dropout_pr=0.5, dropout_seed=s) for s in (1, 1))
    assert torch.equal(a, b) and not torch.equal(a, plain)


@pytest.mark.parametrize("lengths,delta", [([1, 1], 1), ([3], 3), ([4, 6], 0)], ids=str)
def test_cached_form_at_the_edges(lengths, delta):
    """One-token sequences, a delta of the whole sequence, and no new rows at all."""
    q, k, v = _qkv(requires_grad=False, lengths=lengths)
    cu = torch.tensor([0, *itertools.accumulate(lengths)])
    full = hstu_mha(6, 1.0, q, k, v, cu)
    rows = torch.cat([torch.arange(end - delta, end) for end in cu[1:].tolist()])
    for kw in ({}, dict(num_targets=torch.zeros(len(lengths), dtype=torch.int64))):
        cached = cached_hstu_mha(6, 1.0, q[rows], k, v, cu, **kw)
        assert cached.shape == (len(rows), HEADS, DIM_V)
        torch.testing.assert_close(cached, full[rows], rtol=1e-5, atol=1e-6)
