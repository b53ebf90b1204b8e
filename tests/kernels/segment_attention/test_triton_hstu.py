"""HSTU's masks on the Triton kernels (interpreter): forward and every gradient against the
oracle, and each program visiting exactly the tiles with a visible entry."""

import pytest
import torch
import triton

from rec2pm_kernels import segment_attention
from rec2pm_kernels.ops.segment_attention.oracle import dense_hstu_mask
from rec2pm_kernels.ops.triton_configs import configs
from rec2pm_kernels.testing import assert_outputs_within_budget, random_inputs, reference_and_baseline

from ..targets import TRITON_INTERPRETER as TARGET
from .test_triton_tile_counts import count_tiles, visible_tiles

RAGGED = TARGET.ragged

pytestmark = pytest.mark.interpreter

LENGTHS = [0, 3, 5, 13, 40, 9]
# (num_targets, contextual_seq_len, max_attn_len, min_full_attn_seq_len)
MASKS = {
    "targets": ([0, 0, 1, 2, 3, 0], 0, 0, 0),
    "prefix": (None, 2, 0, 0),
    "window": (None, 0, 3, 0),
    "all": ([0, 0, 1, 2, 5, 1], 2, 3, 2),
    "window_targets": ([0, 1, 2, 3, 6, 2], 1, 4, 0),
}


def _options(mask: str) -> dict:
    targets, contextual, window, tail = MASKS[mask]
    return dict(
        num_targets=None if targets is None else torch.tensor(targets),
        contextual_seq_len=contextual,
        max_attn_len=window,
        min_full_attn_seq_len=tail,
    )


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("score", ["softmax", "silu"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
def test_masks_match_oracle(mask, score, deterministic):
    q, k, v, cu, bias = random_inputs(LENGTHS, num_buckets=20)
    kw = dict(
        score=score,
        silu_norm=torch.linspace(3.0, 8.0, len(LENGTHS)) if score == "silu" else None,
        **_options(mask),
    )
    out = segment_attention(q, k, v, cu, 40, rel_bias=bias, backend="triton", deterministic=deterministic, **kw)
    grad_out = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (q, k, v, bias), grad_out))
    reference, baseline = reference_and_baseline(q, k, v, cu, bias, grad_out, **kw)
    assert_outputs_within_budget(got, reference, baseline, torch.float32)


# Bidirectional masks take no rel_bias (with the timestamp bias: test_triton_time_bias.py).
BIDIRECTIONAL_MASKS = ["targets", "window", "all"]


@pytest.mark.parametrize("mask", BIDIRECTIONAL_MASKS)
@pytest.mark.parametrize("score", ["softmax", "silu"])
def test_bidirectional_masks_match_oracle(mask, score):
    q, k, v, cu, _ = random_inputs(LENGTHS, with_bias=False)
    kw = dict(
        score=score,
        silu_norm=torch.linspace(3.0, 8.0, len(LENGTHS)) if score == "silu" else None,
        causal=False,
        **_options(mask),
    )
    out = segment_attention(q, k, v, cu, 40, backend="triton", **kw)
    grad_out = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
    reference, baseline = reference_and_baseline(q, k, v, cu, None, grad_out, **kw)
    assert_outputs_within_budget(got, reference, baseline, torch.float32)


def test_head_shared_bias_and_a_scalar_norm_with_targets():
    lengths = RAGGED  # several units of the interleaved cases: short sequences, a few hundred bias terms
    q, k, v, cu, _ = random_inputs(lengths, with_bias=False)
    shared = (0.3 * torch.randn(1, 12)).requires_grad_()
    targets = torch.tensor([min(2, n) for n in lengths])
    kw = dict(score="silu", silu_norm=7.0, num_targets=targets)
    out = segment_attention(q, k, v, cu, max(lengths), rel_bias=shared, backend="triton", **kw)
    grad_out = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (q, k, v, shared), grad_out))
    reference, baseline = reference_and_baseline(q, k, v, cu, shared, grad_out, **kw)
    assert_outputs_within_budget(got, reference, baseline, torch.float32)


# Longer sequences for the tile counts: 16 x 16 tiles cut windows, prefixes and candidates.
# (num_targets, contextual_seq_len, max_attn_len, min_full_attn_seq_len, causal)
TILE_LENGTHS = [70, 16, 33, 0, 18]
TILE_MASKS = {
    "targets": ([5, 0, 17, 0, 3], 0, 0, 0, True),
    "prefix": (None, 12, 0, 0, True),
    "window": (None, 0, 12, 0, True),
    "window_tail": (None, 0, 12, 20, True),
    "all": ([6, 0, 2, 0, 1], 3, 12, 9, True),
    "window_targets": ([20, 0, 17, 0, 2], 1, 5, 0, True),
    # The prefix fills the first 16-key tile, so only the prefix rule reaches it: rows 32..
    # (rank 17) still see it under a window of 17, and so do the candidates of rank 17.
    "prefix_tile_edge": (None, 16, 17, 0, True),
    "candidates_prefix_edge": ([38, 0, 0, 0, 0], 16, 17, 0, True),
    # Bidirectional: candidates fill tiles that no other candidate tile sees, the window
    # reaches ahead as far as back, and the prefix tile is seen from both sides.
    "bidirectional_targets": ([38, 0, 17, 0, 3], 0, 0, 0, False),
    "bidirectional_window": (None, 0, 12, 0, False),
    "bidirectional_all": ([6, 0, 2, 0, 1], 3, 12, 9, False),
    "bidirectional_prefix_edge": ([38, 0, 0, 0, 0], 16, 17, 0, False),
}


def _expected_counts(layout, lengths, block_m, block_n, per):
    """Per program, as the kernels number them: key tiles per row block or row tiles per key block."""
    targets, contextual, window, tail, causal = layout
    block = block_m if per == "row" else block_n
    blocks = triton.cdiv(max(lengths), block)
    out = torch.zeros(len(lengths) * blocks, dtype=torch.int32)
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        dense = dense_hstu_mask(n, None if targets is None else targets[b], contextual, window, tail, causal)
        tiles = visible_tiles(dense, block_m, block_n)
        counts = tiles.sum(1) if per == "row" else tiles.sum(0)
        out[b * blocks : b * blocks + counts.numel()] = counts.int()
    return out


@pytest.mark.parametrize("mask", list(TILE_MASKS))
@pytest.mark.parametrize("block", [16, None], ids=["M16N16", "tuned"])
def test_visited_tiles_equal_visible_tiles(mask, block):
    layout = TILE_MASKS[mask]
    targets, contextual, window, tail, causal = layout
    config = (
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
        if block
        else configs("segment_fwd", torch.float32, 16)[0]
    )
    q, k, v, cu, bias = (t.detach() for t in random_inputs(TILE_LENGTHS, heads=1))
    num_targets = torch.tensor(targets or [0] * len(TILE_LENGTHS), dtype=torch.int32)
    options = dict(pattern="causal", segment_len=None, num_memory_tokens=None, score="softmax", scale=0.25)
    options.update(rel_bias=bias, silu_norm=1.0, hstu=(num_targets, torch.ones(len(TILE_LENGTHS)), *layout[1:]))
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    counts = count_tiles(q, k, v, cu, TILE_LENGTHS, config, options)
    per_row = _expected_counts(layout, TILE_LENGTHS, block_m, block_n, "row")
    per_col = _expected_counts(layout, TILE_LENGTHS, block_m, block_n, "col")
    assert torch.equal(counts["segment_fwd"], per_row), (counts["segment_fwd"], per_row)
    assert torch.equal(counts["segment_bwd_dq"], per_row)
    assert torch.equal(counts["segment_bwd_dkdv"], per_col), (counts["segment_bwd_dkdv"], per_col)
    if window and not (tail or contextual) and block:  # a window skips work once tiles are shorter than it
        unwindowed = _expected_counts((None, 0, 0, 0, causal), TILE_LENGTHS, block_m, block_n, "row")
        assert per_row.sum() < unwindowed.sum()
