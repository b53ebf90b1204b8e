"""segment_attention on every backend (``tests/kernels/targets.py``) against the oracle: every
pattern, score, bias and dtype over the standard ragged batch, head dims, empty and one-token
sequences, and two properties of the patterns (docs/patterns.md) as equalities between calls.

Forward-only targets are checked on their outputs; the others on every gradient as well."""

import pytest
import torch

from rec2pm_kernels import PATTERNS, segment_attention
from rec2pm_kernels.testing import (
    cu_seqlens_of,
    pattern_kwargs,
    random_bias,
    random_inputs,
    random_qkv,
    score_kwargs,
)

from ..targets import SEGMENT_ATTENTION

OP = SEGMENT_ATTENTION
SCORES = ["softmax", "silu"]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_matches_oracle(target, dtype, pattern, score, with_bias):
    target.check(target.ragged, pattern, score, with_bias=with_bias, dtype=dtype)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_lengths_around_one_write_token(target, pattern):
    """With ``C = 1`` a sequence may end right after its first write token: lengths S - 1, S, S + 1."""
    segment_len = 4
    lengths = [segment_len - 1, segment_len, segment_len + 1, 3 * (segment_len + 1) + 2]
    target.check(lengths, pattern, "softmax", segment_len=segment_len, num_memory_tokens=1)


@pytest.mark.parametrize("pattern", ["causal", "global", "kv_memory_append"])
def test_head_dims(target, head_dims, pattern):
    """``head_dim_v`` may differ from ``head_dim``; three heads."""
    dim, dim_v = head_dims
    target.check(target.ragged, pattern, "softmax", with_bias=True, dim=dim, dim_v=dim_v, heads=3)


@pytest.mark.parametrize("lengths", [[], [0], [0, 0, 0], [1], [1, 0, 1]], ids=str)
@pytest.mark.parametrize("score", SCORES)
def test_empty_and_single_token_sequences(target, lengths, score):
    q, k, v, cu, bias = random_inputs(lengths, dim=target.dim, device=target.device)
    if not target.differentiable:
        q, k, v, bias = (t.detach() for t in (q, k, v, bias))
    out = segment_attention(
        q, k, v, cu, max(lengths, default=0), rel_bias=bias, backend=target.backend, **score_kwargs(score, 7.0)
    )
    assert out.shape == v.shape
    if score == "softmax" and sum(lengths):
        assert torch.equal(out, v.detach())  # a length-1 sequence sees only itself
    if not target.differentiable:
        return
    out.sum().backward()
    for x in (q, k, v, bias):
        assert x.grad is not None and x.grad.shape == x.shape
        if sum(lengths) == 0:
            assert torch.count_nonzero(x.grad) == 0


def _items_only(lengths, segment_len, num_memory_tokens):
    """Stream rows that are items, and the item-only lengths, for interleaved lengths."""
    rows, item_lengths, start = [], [], 0
    for n in lengths:
        p = torch.arange(n)
        items = p[p % (segment_len + num_memory_tokens) < segment_len]
        rows.append(start + items)
        item_lengths.append(items.numel())
        start += n
    return torch.cat(rows), item_lengths


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_global_item_rows_equal_causal_over_items(target, score, with_bias):
    """Stage 1 ``global`` item rows are causal attention over the items alone, bias included."""
    S, C = target.segment_len, target.num_memory_tokens
    lengths = [3 * (S + C) + 2, S, 2 * (S + C), 1]
    q, k, v = random_qkv(sum(lengths), dim=target.dim, dtype=target.exact_dtype, device=target.device)
    bias = random_bias(2, 20, target.exact_dtype, target.device) if with_bias else None
    kw = dict(rel_bias=bias, backend=target.backend, **score_kwargs(score, 7.0))
    cu = cu_seqlens_of(lengths, device=target.device)
    glob = segment_attention(q, k, v, cu, max(lengths), **pattern_kwargs("global", S, C), **kw)
    rows, item_lengths = _items_only(lengths, S, C)
    rows = rows.to(target.device)
    causal = segment_attention(
        q[rows], k[rows], v[rows], cu_seqlens_of(item_lengths, device=target.device), max(item_lengths), **kw
    )
    torch.testing.assert_close(glob[rows], causal, **target.exact_tolerance)


@pytest.mark.parametrize("pattern", ["global", "kv_memory_overwrite", "kv_memory_append"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_write_block_ignores_later_tokens_and_other_write_blocks(target, pattern, with_bias):
    """Write block h's output depends on nothing after it, nor (global) on other write blocks."""
    S, C = target.segment_len, target.num_memory_tokens
    n = 4 * (S + C) + 2
    cu = cu_seqlens_of([n], device=target.device)
    q, k, v = random_qkv(n, dim=target.dim, dtype=target.exact_dtype, device=target.device)
    bias = random_bias(2, 9, target.exact_dtype, target.device) if with_bias else None
    kw = dict(**pattern_kwargs(pattern, S, C), rel_bias=bias, backend=target.backend)
    before = segment_attention(q, k, v, cu, n, **kw)
    h = 1
    block = torch.arange(h * (S + C) + S, (h + 1) * (S + C), device=target.device)
    later = torch.arange((h + 1) * (S + C), n, device=target.device)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[later] = torch.randn_like(x[later])
    if pattern == "global":  # the write block of unit 0 is invisible to unit 1 as well
        earlier_block = torch.arange(S, S + C, device=target.device)
        for x in (k2, v2):
            x[earlier_block] = torch.randn_like(x[earlier_block])
    after = segment_attention(q2, k2, v2, cu, n, **kw)
    torch.testing.assert_close(after[block], before[block], rtol=0, atol=0)
    assert not torch.allclose(after[later], before[later])
