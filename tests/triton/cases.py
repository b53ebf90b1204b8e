"""Inputs and oracle comparisons for the Triton tests, on any device.

Small segments and write blocks (``S <= 16``, ``C <= 4``) keep the interpreter fast while
giving several units per sequence.
"""

from __future__ import annotations

import torch

from rec2pm_kernels import segment_attention, testing
from rec2pm_kernels.ops.cached_step.oracle import cached_step_oracle
from rec2pm_kernels.ops.segment_attention.oracle import segment_attention_oracle
from rec2pm_kernels.testing import assert_within_budget, cu_seqlens_of, make_cache, ragged_lengths

S, C = 5, 2
UNIT = S + C
# Ragged: empty, 1, S - 1, S, a unit, a unit plus one, units plus a tail, several units.
# (S + 1 would end inside a write block of C = 2; test_lengths_around_one_write_token covers it with C = 1.)
RAGGED = ragged_lengths(S, C)
PATTERNS = ["causal", "global", "kv_memory_overwrite", "kv_memory_append"]
SCORES = ["softmax", "silu"]


def pattern_kwargs(pattern: str, segment_len: int = S, num_memory_tokens: int = C) -> dict:
    return testing.pattern_kwargs(pattern, segment_len, num_memory_tokens)


def score_kwargs(score: str) -> dict:
    return testing.score_kwargs(score, silu_norm=11.0)


def random_inputs(
    lengths, heads=2, dim=16, dim_v=None, dtype=torch.float32, device="cpu", with_bias=True, num_buckets=13
):
    """``(q, k, v, cu_seqlens, rel_bias)``, all requiring grad (bias ``None`` unless ``with_bias``)."""
    total = sum(lengths)
    dim_v = dim if dim_v is None else dim_v
    q = torch.randn(total, heads, dim, dtype=dtype, device=device)
    k = torch.randn(total, heads, dim, dtype=dtype, device=device)
    v = torch.randn(total, heads, dim_v, dtype=dtype, device=device)
    bias = (0.5 * torch.randn(heads, num_buckets, dtype=dtype, device=device)) if with_bias else None
    tensors = [t.requires_grad_() for t in (q, k, v)] + ([bias.requires_grad_()] if with_bias else [])
    return (*tensors[:3], cu_seqlens_of(lengths, device=device), tensors[3] if with_bias else None)


def reference_and_baseline(q, k, v, cu, bias, grad_out, **kw):
    """Oracle output and gradients (float64 for fp32), and the same in the input dtype (the budget's baseline)."""
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    results = []
    for upcast in (True, False):
        out = segment_attention_oracle(q, k, v, cu, rel_bias=bias, upcast=upcast, **kw)
        grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
        results.append((out, *grads))
    return results


def assert_outputs_within_budget(got, reference, baseline, dtype, names=("out", "dq", "dk", "dv", "d_rel_bias")):
    for name, g, r, b in zip(names[: len(got)], got, reference, baseline, strict=True):  # d_rel_bias only with a bias
        assert_within_budget(name, g, r, b, dtype)


def check_segment_attention(
    lengths,
    pattern,
    score,
    *,
    with_bias=True,
    dtype=torch.float32,
    device="cpu",
    heads=2,
    dim=16,
    dim_v=None,
    segment_len=S,
    num_memory_tokens=C,
    **options,
):
    """``segment_attention(backend="triton")``: output and every gradient within the oracle's budget."""
    from rec2pm_kernels import segment_attention

    q, k, v, cu, bias = random_inputs(lengths, heads, dim, dim_v, dtype, device, with_bias)
    kw = dict(**pattern_kwargs(pattern, segment_len, num_memory_tokens), **score_kwargs(score))
    out = segment_attention(q, k, v, cu, max(lengths, default=0), rel_bias=bias, backend="triton", **kw, **options)
    assert out.dtype == v.dtype and out.shape == v.shape
    grad_out = torch.randn_like(out)
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    got = (out, *torch.autograd.grad(out, inputs, grad_out))
    reference, baseline = reference_and_baseline(q, k, v, cu, bias, grad_out, **kw)
    assert_outputs_within_budget(got, reference, baseline, dtype)
    return got


def cached_step_case(
    filled, new, *, heads=2, dim=16, dim_v=8, capacity=None, dtype=torch.float32, device="cpu", with_bias=True
):
    """Inputs of one cached step: ``(q, k, v, cu, k_cache, v_cache, cache_seqlens, bias)``."""
    capacity = capacity or max(f + n for f, n in zip(filled, new, strict=True)) + 3
    total = sum(new)
    q = torch.randn(total, heads, dim, dtype=dtype, device=device)
    k = torch.randn(total, heads, dim, dtype=dtype, device=device)
    v = torch.randn(total, heads, dim_v, dtype=dtype, device=device)
    k_cache, v_cache = make_cache(len(new), capacity, heads, dim, dim_v, filled, dtype, device)
    seqlens = torch.tensor(filled, dtype=torch.int32, device=device)
    bias = 0.5 * torch.randn(heads, 10, dtype=dtype, device=device) if with_bias else None
    return q, k, v, cu_seqlens_of(new, device=device), k_cache, v_cache, seqlens, bias


def cached_step_reference(q, k, v, cu, k_cache, v_cache, seqlens, bias, **kw):
    """Oracle and same-dtype baseline of a cached step (computed before the cache is written)."""
    return tuple(
        cached_step_oracle(q, k, v, cu, k_cache, v_cache, seqlens, rel_bias=bias, upcast=upcast, **kw)
        for upcast in (True, False)
    )


# HSTU's timestamp bias: tables of TIME_BUCKETS + 1 weights and gaps that cover most of them.
TIME_BUCKETS = 60
TIME_BIAS_NAMES = ("out", "dq", "dk", "dv", "d_rel_bias", "d_ts_bias")


def time_inputs(lengths, seed=3, device="cpu"):
    """Epoch-sized int64 timestamps, increasing in each sequence, with gaps over most buckets."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.randint(0, 5000, (sum(lengths),), generator=g) ** 2
    cu = cu_seqlens_of(lengths).tolist()
    times = torch.cat([gaps[a:b].cumsum(0) for a, b in zip(cu[:-1], cu[1:], strict=True)]) + 1_700_000_000
    return times.to(device)


def time_tables(heads_of_tables, with_rel=True, heads=2, dtype=torch.float32, device="cpu"):
    """``(rel_bias or None, ts_bias)``, requiring grad; ``ts_bias`` has ``heads_of_tables`` rows."""
    rel = (0.5 * torch.randn(heads, 13, dtype=dtype, device=device)).requires_grad_() if with_rel else None
    ts = (0.3 * torch.randn(heads_of_tables, TIME_BUCKETS + 1, dtype=dtype, device=device)).requires_grad_()
    return rel, ts


def run_time_bias(q, k, v, cu, tables, grad_out, **kw):
    """``(out, *grads)`` with ``tables = (rel_bias, ts_bias)`` (either may be ``None``): of a
    backend (``backend=``) or of the oracle (``upcast=``: float64, or the input dtype).  The
    gradients are those of the inputs that require one."""
    rel_bias, ts_bias = tables
    inputs = [t for t in (q, k, v, rel_bias, ts_bias) if t is not None and t.requires_grad]
    if "backend" in kw:
        max_seqlen = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
        out = segment_attention(q, k, v, cu, max_seqlen, rel_bias=rel_bias, ts_bias=ts_bias, **kw)
    else:
        out = segment_attention_oracle(q, k, v, cu, rel_bias=rel_bias, ts_bias=ts_bias, **kw)
    return (out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype)))


def check_time_bias(lengths, tables, deterministic=False, dtype=torch.float32, device="cpu", **kw):
    """The Triton backend against the oracle with a timestamp bias, forward and every gradient."""
    q, k, v, cu, _ = random_inputs(lengths, with_bias=False, dtype=dtype, device=device)
    grad_out = torch.randn(q.shape[0], q.shape[1], v.shape[2], device=device)
    got = run_time_bias(q, k, v, cu, tables, grad_out, backend="triton", deterministic=deterministic, **kw)
    reference = run_time_bias(q, k, v, cu, tables, grad_out, upcast=True, **kw)
    baseline = run_time_bias(q, k, v, cu, tables, grad_out, upcast=False, **kw)
    names = [name for name in TIME_BIAS_NAMES if name != "d_rel_bias" or tables[0] is not None]
    for name, g, r, b in zip(names, got, reference, baseline, strict=True):
        assert_within_budget(name, g, r, b, dtype)
    return got
