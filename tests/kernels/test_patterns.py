"""The pattern rules: golden masks of docs/patterns.md, a literal per-entry rule, and the C++ twin."""

import dataclasses
import itertools

import pytest
import torch

from rec2pm_kernels.ops.segment_attention.oracle import dense_mask
from rec2pm_kernels.patterns import PATTERN_CODES, PATTERNS, bias_positions, first_visible_column

from ..conftest import require_extension

# S = 2, C = 1, stream i0 i1 w0 i2 i3 w1 i4 (docs/patterns.md), rows top to bottom.
GOLDEN = {
    "causal": "1...... 11..... 111.... 1111... 11111.. 111111. 1111111",
    "global": "1...... 11..... 111.... 11.1... 11.11.. 11.111. 11.11.1",
    "kv_memory_overwrite": "1...... 11..... 111.... ..11... ..111.. ..1111. .....11",
    "kv_memory_append": "1...... 11..... 111.... ..11... ..111.. ..1111. ..1..11",
}


def as_text(mask: torch.Tensor) -> str:
    return " ".join("".join("1" if x else "." for x in row) for row in mask.tolist())


def literal_rule(pattern, row, col, S, C):
    """docs/patterns.md read word for word, one (row, column) pair at a time."""
    if col > row:
        return False
    if pattern == "causal":
        return True
    unit = S + C
    col_is_write = col % unit >= S
    row_unit, col_unit = row // unit, col // unit
    if pattern == "global":
        return (not col_is_write) or col_unit == row_unit
    if pattern == "kv_memory_overwrite":
        return col_unit == row_unit or (col_is_write and col_unit == row_unit - 1)
    return col_unit == row_unit or (col_is_write and col_unit < row_unit)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_golden_masks(pattern):
    assert as_text(dense_mask(pattern, 7, 2, 1)) == GOLDEN[pattern]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("S,C", [(1, 1), (2, 1), (3, 2), (5, 3), (4, 4)])
def test_dense_mask_matches_literal_rule(pattern, S, C):
    n = 3 * (S + C) + S - 1
    expected = [[literal_rule(pattern, r, c, S, C) for c in range(n)] for r in range(n)]
    assert dense_mask(pattern, n, S, C).tolist() == expected


def test_every_row_sees_itself():
    for pattern in PATTERNS:
        assert bool(dense_mask(pattern, 40, 3, 2).diagonal().all())


def test_global_bias_positions_golden():
    # Items carry their history index, write token c of unit h carries (h + 1) * S + c.
    p = torch.arange(11)
    assert bias_positions("global", p, 3, 2).tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6, 7, 6]
    for pattern in ("causal", "kv_memory_overwrite", "kv_memory_append"):
        assert bias_positions(pattern, p, 3, 2).tolist() == p.tolist()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_first_visible_column_is_a_lower_bound(pattern):
    S, C = 3, 2
    mask = dense_mask(pattern, 30, S, C)
    for r0 in range(30):
        cols = torch.nonzero(mask[r0:].any(0)).flatten()
        assert int(cols.min()) >= first_visible_column(pattern, r0, S, C)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_cpp_rule_matches_python(pattern):
    ext = require_extension()
    for S, C, n in itertools.product((1, 2, 5), (1, 3), (0, 1, 17)):
        code = PATTERN_CODES[pattern]
        assert torch.equal(ext.visibility_mask(code, n, S, C), dense_mask(pattern, n, S, C))
        assert torch.equal(ext.bias_positions(code, n, S, C), bias_positions(pattern, torch.arange(n), S, C))


def test_pattern_spec_is_the_checked_trio_and_the_public_functions_take_it():
    from rec2pm_kernels import PatternSpec, SegmentAttention, segment_attention
    from rec2pm_kernels.testing import cu_seqlens_of

    spec = PatternSpec("kv_memory_append", 3, 2)
    assert spec.kwargs() == {"pattern": "kv_memory_append", "segment_len": 3, "num_memory_tokens": 2}
    assert PatternSpec.of(**spec.kwargs()) == spec and PatternSpec.of(spec) is spec
    assert not PatternSpec().interleaved and spec.interleaved
    with pytest.raises(ValueError, match="needs segment_len"):
        PatternSpec("global")
    with pytest.raises(ValueError, match="apply only to the interleaved patterns"):
        PatternSpec("causal", 3, 2)
    with pytest.raises(ValueError, match="pass segment_len and num_memory_tokens inside the PatternSpec"):
        PatternSpec.of(spec, segment_len=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.segment_len = 4
    q = k = v = torch.randn(10, 2, 4)
    cu = cu_seqlens_of([10])
    by_keywords = segment_attention(q, k, v, cu, 10, **spec.kwargs())
    torch.testing.assert_close(segment_attention(q, k, v, cu, 10, pattern=spec), by_keywords, rtol=0, atol=0)
    module = SegmentAttention(2, pattern=spec)
    torch.testing.assert_close(module(q, k, v, cu, 10), by_keywords, rtol=0, atol=0)
    assert "segment_len=3" in repr(module)
