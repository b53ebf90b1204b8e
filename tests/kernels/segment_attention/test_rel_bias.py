"""The relative-position bias, checked against sources that share no code with the backends.

* Golden bucket tables, written out by hand from the rule, for the stream
  ``i0 i1 w0 i2 i3 w1 i4`` (S = 2, C = 1): a bias table with one distinct value per bucket,
  SiLU scores with ``q = 0`` and ``v`` the identity make each output entry ``silu(bias)``
  of its (row, column), so the bucket every visible entry used can be read back.
* A plain-Python loop over (row, column) pairs with its own λ positions and visibility,
  against the ``torch`` backend and the oracle on random inputs with few buckets (so the
  clamp at the last bucket matters), for every pattern and the cached step.
"""

import math

import pytest
import torch

from rec2pm_kernels import cached_step_attention, segment_attention
from rec2pm_kernels.ops.segment_attention.oracle import segment_attention_oracle
from rec2pm_kernels.testing import cu_seqlens_of

S, C, BUCKETS = 2, 1, 3
# Row r, column c: the bucket digit, or "." where the pattern hides the column.
GOLDEN_BUCKETS = {
    "causal": ["0......", "10.....", "210....", "2210...", "22210..", "222210.", "2222210"],
    # λ = 0 1 2 2 3 4 4: items carry their history index, write tokens (h + 1) S + c.
    "global": ["0......", "10.....", "210....", "21.0...", "22.10..", "22.210.", "22.21.0"],
    "kv_memory_overwrite": ["0......", "10.....", "210....", "..10...", "..210..", "..2210.", ".....10"],
    "kv_memory_append": ["0......", "10.....", "210....", "..10...", "..210..", "..2210.", "..2..10"],
}


def silu(x: float) -> float:
    return x / (1 + math.exp(-x))


@pytest.mark.parametrize("pattern", list(GOLDEN_BUCKETS))
@pytest.mark.parametrize("implementation", ["torch", "oracle"])
def test_golden_bucket_tables(pattern, implementation):
    n, heads = 7, 2
    table = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.5, 2.5]], dtype=torch.float64)  # distinct, silu-monotone
    q = torch.zeros(n, heads, 4, dtype=torch.float64)
    k = torch.randn(n, heads, 4, dtype=torch.float64)
    v = torch.eye(n, dtype=torch.float64)[:, None, :].expand(n, heads, n).contiguous()
    kw = dict(pattern=pattern, score="silu", silu_norm=1.0, rel_bias=table)
    if pattern != "causal":
        kw.update(segment_len=S, num_memory_tokens=C)
    run = segment_attention if implementation == "torch" else segment_attention_oracle
    args = (q, k, v, cu_seqlens_of([n])) + ((n,) if implementation == "torch" else ())
    out = run(*args, **kw)
    for h in range(heads):
        values = {round(silu(float(x)), 9): str(b) for b, x in enumerate(table[h])}
        got = ["".join(values.get(round(float(x), 9), "?") if x != 0 else "." for x in row) for row in out[:, h]]
        assert got == GOLDEN_BUCKETS[pattern], (h, got)


# -- an independent loop ------------------------------------------------------------------------
def loop_lambda(pattern: str, p: int, seg: int, mem: int) -> int:
    if pattern != "global":
        return p
    unit, offset = divmod(p, seg + mem)
    return unit * seg + offset  # an item: its history index; write token c of unit h: (h + 1) S + c


def loop_visible(pattern: str, row: int, col: int, seg: int, mem: int) -> bool:
    if col > row:
        return False
    if pattern == "causal":
        return True
    unit = seg + mem
    row_unit, col_unit, col_write = row // unit, col // unit, col % unit >= seg
    if pattern == "global":
        return not col_write or col_unit == row_unit
    if pattern == "kv_memory_overwrite":
        return col_unit == row_unit or (col_write and col_unit == row_unit - 1)
    return col_unit == row_unit or (col_write and col_unit < row_unit)


def loop_attention(q, k, v, lengths, pattern, seg, mem, table, score, silu_norm):
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    scale = q.shape[-1] ** -0.5
    start = 0
    for n in lengths:
        for h in range(q.shape[1]):
            for row in range(n):
                cols = [c for c in range(n) if loop_visible(pattern, row, c, seg, mem)]
                scores = []
                for c in cols:
                    distance = loop_lambda(pattern, row, seg, mem) - loop_lambda(pattern, c, seg, mem)
                    bucket = min(max(distance, 0), table.shape[1] - 1)
                    scores.append(scale * float(q[start + row, h] @ k[start + c, h]) + float(table[h, bucket]))
                if score == "softmax":
                    top = max(scores)
                    weights = [math.exp(s - top) for s in scores]
                    weights = [w / sum(weights) for w in weights]
                else:
                    weights = [silu(s) / silu_norm for s in scores]
                for w, c in zip(weights, cols, strict=True):
                    out[start + row, h] += w * v[start + c, h]
        start += n
    return out


@pytest.mark.parametrize("pattern", list(GOLDEN_BUCKETS))
@pytest.mark.parametrize("score", ["softmax", "silu"])
def test_bias_matches_an_independent_loop(pattern, score):
    lengths, seg, mem, heads = [11, 0, 8], 3, 2, 2
    q, k, v = (torch.randn(sum(lengths), heads, 4, dtype=torch.float64) for _ in range(3))
    table = torch.randn(heads, 4, dtype=torch.float64)  # distances up to 10: the last bucket clamps
    kw = dict(pattern=pattern, score=score, rel_bias=table, silu_norm=5.0 if score == "silu" else None)
    if pattern != "causal":
        kw.update(segment_len=seg, num_memory_tokens=mem)
    want = loop_attention(q, k, v, lengths, pattern, seg, mem, table, score, 5.0)
    cu = cu_seqlens_of(lengths)
    torch.testing.assert_close(segment_attention(q, k, v, cu, 11, **kw), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(segment_attention_oracle(q, k, v, cu, **kw), want, rtol=0, atol=1e-12)


def test_cached_step_bias_matches_an_independent_loop():
    # New row t of user b sits at position cache_seqlens[b] + t and sees slots 0..itself.
    filled, new, heads, buckets = [6, 0, 2], [2, 3, 1], 2, 3
    q, k, v = (torch.randn(sum(new), heads, 4, dtype=torch.float64) for _ in range(3))
    k_cache = torch.randn(3, 8, heads, 4, dtype=torch.float64)
    v_cache = torch.randn(3, 8, heads, 4, dtype=torch.float64)
    keys, values = k_cache.clone(), v_cache.clone()
    table = torch.randn(heads, buckets, dtype=torch.float64)
    out = cached_step_attention(q, k, v, cu_seqlens_of(new), 3, k_cache, v_cache, torch.tensor(filled), rel_bias=table)
    row = 0
    for b, (m, n) in enumerate(zip(filled, new, strict=True)):
        keys[b, m : m + n], values[b, m : m + n] = k[row : row + n], v[row : row + n]
        for t in range(n):
            for h in range(heads):
                position = m + t
                scores = torch.stack(
                    [
                        q[row + t, h] @ keys[b, j, h] * 0.5 + table[h, min(position - j, buckets - 1)]
                        for j in range(position + 1)
                    ]
                )
                want = torch.softmax(scores, 0) @ values[b, : position + 1, h]
                torch.testing.assert_close(out[row + t, h], want, rtol=0, atol=1e-12)
        row += n
