"""segment_attention's torch backend beyond the shared oracle tests (test_oracle.py): its row
chunking and checkpointing, length grouping, float64 gradcheck, hypothesis-drawn layouts,
16k-token rows and its memory bound."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rec2pm_kernels import PATTERNS, PatternSpec, segment_attention
from rec2pm_kernels.ops.segment_attention.oracle import segment_attention_oracle
from rec2pm_kernels.ops.segment_attention.torch_backend import group_by_length, segment_attention_torch
from rec2pm_kernels.patterns import bias_bucket, bias_positions, visible
from rec2pm_kernels.testing import assert_within_budget, cu_seqlens_of, interleaved_lengths, random_bias, random_qkv

from ..targets import BY_ID

TARGET = BY_ID["torch"]
S, C = TARGET.segment_len, TARGET.num_memory_tokens
SCORES = ["softmax", "silu"]
pattern_kwargs, score_kwargs = TARGET.pattern_kwargs, TARGET.score_kwargs


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("score", SCORES)
def test_head_dim_v_differs(pattern, score):
    TARGET.check(TARGET.ragged, pattern, score, with_bias=True, dim=8, dim_v=5, heads=3)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("score", SCORES)
def test_row_chunking_matches_one_chunk(pattern, score):
    """Chunked (and checkpointed) rows give the unchunked result, forward and backward."""
    lengths = [4 * (S + C) + 2, 7, 0, 2 * (S + C)]
    cu = cu_seqlens_of(lengths)
    q, k, v = random_qkv(sum(lengths), dtype=torch.float64, requires_grad=True)
    bias = random_bias(2, dtype=torch.float64, requires_grad=True)
    kw = dict(
        pattern=PatternSpec.of(**pattern_kwargs(pattern)),
        scale=0.3,
        rel_bias=bias,
        silu_norm=7.0 if score == "silu" else None,
        score=score,
    )
    results = []
    for max_chunk in (1 << 30, 2 * 2 * 26, 1):  # one chunk; 2 rows per chunk; one row per chunk
        out = segment_attention_torch(q, k, v, cu, max_chunk_elements=max_chunk, **kw)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v, bias))))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_cu_seqlens_int32_and_int64_agree():
    lengths = [5, 0, 12]
    q, k, v = random_qkv(17)
    out32 = segment_attention(q, k, v, cu_seqlens_of(lengths, torch.int32), 12)
    out64 = segment_attention(q, k, v, cu_seqlens_of(lengths, torch.int64), 12)
    assert torch.equal(out32, out64)


def test_group_by_length_bounds_padding():
    lengths = [1, 100, 49, 50, 0, 3, 2, 26, 25]
    groups = group_by_length(lengths)
    assert sorted(i for g in groups for i in g) == [i for i, n in enumerate(lengths) if n > 0]
    for g in groups:
        assert 2 * min(lengths[i] for i in g) >= max(lengths[i] for i in g)


def test_deterministic_across_runs():
    lengths = [23, 11, 40]
    cu = cu_seqlens_of(lengths)
    q, k, v = random_qkv(74, requires_grad=True)
    bias = random_bias(2, requires_grad=True)
    runs = []
    for _ in range(2):
        out = segment_attention(q, k, v, cu, 40, pattern="global", segment_len=S, num_memory_tokens=C, rel_bias=bias)
        runs.append((out, *torch.autograd.grad(out.sum(), (q, k, v, bias))))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Gradient check in float64 and hypothesis-driven shapes and layouts.


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_gradcheck(pattern, score, with_bias):
    lengths = [2 * (S + C) + 1, 0, S]
    cu = cu_seqlens_of(lengths)
    q, k, v = random_qkv(sum(lengths), heads=2, dim=3, dim_v=2, dtype=torch.float64, requires_grad=True)
    inputs = [q, k, v]
    if with_bias:
        inputs.append(random_bias(2, num_buckets=5, dtype=torch.float64, requires_grad=True))

    def fn(*args):
        bias = args[3] if with_bias else None
        return segment_attention(
            *args[:3],
            cu,
            max(lengths),
            rel_bias=bias,
            **pattern_kwargs(pattern),
            **score_kwargs(score),
        )

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(
    pattern=st.sampled_from(PATTERNS),
    score=st.sampled_from(SCORES),
    seg=st.integers(1, 5),
    mem=st.integers(1, 4),
    heads=st.integers(1, 3),
    dim=st.integers(1, 9),
    dim_v=st.integers(1, 9),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(0, 5),
)
def test_hypothesis_layouts_match_oracle(pattern, score, seg, mem, heads, dim, dim_v, with_bias, seed, batch):
    gen = torch.Generator().manual_seed(seed)
    lengths = interleaved_lengths(gen, batch, max_units=4, segment_len=seg, num_memory_tokens=mem)
    cu = cu_seqlens_of(lengths, dtype=torch.int64)
    with torch.random.fork_rng():  # the tensors too follow the drawn seed: a failing example replays
        torch.manual_seed(seed)
        q, k, v = random_qkv(sum(lengths), heads, dim, dim_v)
        bias = random_bias(heads, num_buckets=1 + seed % 12) if with_bias else None
    kw = dict(rel_bias=bias, **pattern_kwargs(pattern, seg, mem), **score_kwargs(score))
    out = segment_attention(q, k, v, cu, max(lengths, default=0), **kw)
    ref = segment_attention_oracle(q, k, v, cu, **kw)
    base = segment_attention_oracle(q, k, v, cu, upcast=False, **kw)
    assert_within_budget("out", out, ref, base)


@pytest.mark.slow
@pytest.mark.parametrize("pattern", PATTERNS)
def test_long_sequence_rows_match_dense_rows(pattern):
    """16k tokens through the chunked path, forward and backward, spot-checked row by row."""
    n = 16 * 1024  # 16384 % 204 = 64: ends on an item with S = 200, C = 4
    cu = cu_seqlens_of([n])
    q, k, v = random_qkv(n, heads=2, dim=16, requires_grad=True)
    bias = random_bias(2, num_buckets=64, requires_grad=True)
    kw = pattern_kwargs(pattern, 200, 4)
    out = segment_attention(q, k, v, cu, n, rel_bias=bias, **kw)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(bias.grad).all()
    cols = torch.arange(n)
    lam_c = bias_positions(pattern, cols, kw.get("segment_len"), kw.get("num_memory_tokens"))
    for row in (0, 203, 4000, n - 1):
        seen = visible(pattern, torch.tensor(row), cols, kw.get("segment_len"), kw.get("num_memory_tokens"))
        lam_r = bias_positions(pattern, torch.tensor(row), kw.get("segment_len"), kw.get("num_memory_tokens"))
        # The row's gradients by autograd on the dense row.  Only the last row sees the last
        # column, so that column's dk and dv come from it alone and are checked there too.
        q_row, k_all, v_all = (x.detach().double().requires_grad_(True) for x in (q[row], k, v))
        s = torch.einsum("hd,nhd->hn", q_row, k_all) * 16**-0.5
        s = s + bias.detach().double()[:, bias_bucket(lam_r, lam_c, 64)]
        p = torch.softmax(s.masked_fill(~seen, float("-inf")), dim=-1)
        want = torch.einsum("hn,nhd->hd", p, v_all)
        torch.testing.assert_close(out[row].double(), want, rtol=0, atol=1e-5)
        want.sum().backward()  # out.sum() was differentiated: every output has gradient 1
        torch.testing.assert_close(q.grad[row].double(), q_row.grad, rtol=0, atol=1e-5)
        if row == n - 1:
            torch.testing.assert_close(k.grad[row].double(), k_all.grad[row], rtol=0, atol=1e-5)
            torch.testing.assert_close(v.grad[row].double(), v_all.grad[row], rtol=0, atol=1e-5)


@pytest.mark.parametrize("score", SCORES)
def test_torch_backend_memory_stays_within_its_chunk_budget(score):
    """Forward and backward with a bias gradient (the case that keeps scores for backward)
    peak far below one dense score tensor: chunking bounds the forward, checkpointing the
    backward.  Measured with the benchmark harness's allocation replay."""
    from benchmarks.harness.measure import peak_memory_bytes
    from rec2pm_kernels.ops.segment_attention.torch_backend import segment_attention_torch

    n, heads, chunk = 1024, 2, 2**16
    q, k, v = random_qkv(n, heads=heads, dim=16, requires_grad=True)
    bias = random_bias(heads, num_buckets=32, requires_grad=True)

    def forward_backward():
        out = segment_attention_torch(
            q,
            k,
            v,
            cu_seqlens_of([n]),
            pattern=PatternSpec("global", 200, 4),
            rel_bias=bias,
            scale=0.25,
            max_chunk_elements=chunk,
            **score_kwargs(score),
        )
        out.sum().backward()

    peak = peak_memory_bytes(forward_backward, torch.device("cpu"))
    if peak is None:
        pytest.skip("the profiler cannot report allocations in this torch build")
    dense_scores = heads * n * n * 4  # one fp32 score tensor over the whole sequence: 8 MiB
    inputs = 6 * q.numel() * 4  # q, k, v and their gradients
    assert peak <= inputs + 24 * chunk * 4, (peak, dense_scores)  # about 1/5 of dense_scores
