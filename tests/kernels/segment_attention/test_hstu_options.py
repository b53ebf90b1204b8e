"""HSTU's masks (candidates, contextual prefix, local window), head-shared and timestamp
biases, per-sequence SiLU divisors and attention dropout, against the dense oracle.

* Golden masks, written out by hand from the rules of ``rec2pm_kernels.hstu_masks``, for
  tiny sequences: checked against the vectorised rule, the oracle's pair-by-pair loop and
  what the ``torch`` backend actually attends to (SiLU of a constant bias with ``v`` the
  identity makes each output row the row's mask).
* The rule and the loop agree on every small layout; the backend matches the oracle,
  forward and every gradient, on ragged batches with 0, 1 and several targets,
  contextual tokens and window sizes, in one chunk and in many (checkpointed).
"""

import itertools
import math

import pytest
import torch

from rec2pm_kernels import backends as backends_status
from rec2pm_kernels import segment_attention
from rec2pm_kernels.hstu_masks import HSTUMask, hstu_visible
from rec2pm_kernels.ops.segment_attention.oracle import dense_hstu_mask, segment_attention_oracle
from rec2pm_kernels.ops.segment_attention.torch_backend import row_chunks, segment_attention_torch
from rec2pm_kernels.patterns import PatternSpec
from rec2pm_kernels.testing import assert_within_budget, cu_seqlens_of, random_qkv
from rec2pm_kernels.time_bias import next_timestamps, time_bucket

from ..targets import require_backend

# (length, num_targets, contextual_seq_len, max_attn_len, min_full_attn_seq_len, causal): rows
# of "1" where visible.
GOLDEN_MASKS = {
    (6, 2, 0, 0, 0, True): ["100000", "110000", "111000", "111100", "111110", "111101"],
    (6, None, 2, 0, 0, True): ["111111", "111111", "111000", "111100", "111110", "111111"],
    (7, None, 0, 2, 0, True): ["1000000", "1100000", "1110000", "0111000", "0011100", "0001110", "0000111"],
    (7, None, 0, 2, 2, True): ["1000000", "1100000", "1110000", "0111000", "0011100", "1111110", "1111111"],
    # Prefix of 2, window 2 with a tail of 1, 2 candidates: the window hides the prefix from row 4.
    (8, 2, 2, 2, 1, True): [
        "11111100",
        "11111100",
        "11100000",
        "11110000",
        "00111000",
        "11111100",
        "11111110",
        "11111101",
    ],
    # Bidirectional: candidates still miss each other, everything else sees both ways.
    (6, 2, 0, 0, 0, False): ["111111", "111111", "111111", "111111", "111110", "111101"],
    (6, None, 2, 0, 0, False): ["111111"] * 6,
    (7, None, 0, 2, 0, False): ["1110000", "1111000", "1111100", "0111110", "0011111", "0001111", "0000111"],
    (7, None, 0, 2, 2, False): ["1110000", "1111000", "1111100", "0111110", "0011111", "1111111", "1111111"],
    # The window now reaches two ranks ahead too: row 4 (rank 3) sees the candidates (rank 5).
    (8, 2, 2, 2, 1, False): [
        "11111100",
        "11111100",
        "11111000",
        "11111100",
        "00111111",
        "11111111",
        "11111110",
        "11111101",
    ],
}


def _rule_mask(n, targets, contextual, window, tail, causal=True):
    p = torch.arange(n)
    nt = None if targets is None else torch.tensor(targets)
    return hstu_visible(p[:, None], p[None, :], torch.tensor(n), nt, HSTUMask(contextual, window, tail, causal))


def _as_rows(mask: torch.Tensor) -> list[str]:
    return ["".join("1" if x else "0" for x in row) for row in mask.tolist()]


@pytest.mark.parametrize("layout", list(GOLDEN_MASKS), ids=str)
@pytest.mark.parametrize("implementation", ["rule", "oracle", "torch", "cpp"])
def test_golden_masks(layout, implementation):
    n, targets, contextual, window, tail, causal = layout
    require_backend(implementation)
    if implementation == "rule":
        mask = _rule_mask(*layout)
    elif implementation == "oracle":
        mask = dense_hstu_mask(*layout)
    else:
        q = torch.zeros(n, 1, 2, dtype=torch.float64)
        v = torch.eye(n, dtype=torch.float64)[:, None, :]
        out = segment_attention(
            q,
            q,
            v,
            cu_seqlens_of([n]),
            n,
            score="silu",
            silu_norm=1.0,
            ts_bias=torch.ones(1, 1, dtype=torch.float64),  # one bucket: the same bias everywhere
            timestamps=torch.zeros(n, dtype=torch.int64),
            num_targets=None if targets is None else torch.tensor([targets]),
            contextual_seq_len=contextual,
            max_attn_len=window,
            min_full_attn_seq_len=tail,
            causal=causal,
            backend=implementation,
        )
        mask = out[:, 0] != 0
    assert _as_rows(mask) == GOLDEN_MASKS[layout]


def test_rule_matches_the_pair_loop_on_every_small_layout():
    checked = 0
    layouts = itertools.product(range(9), [None, 0, 1, 3], range(4), range(4), [True, False])
    for n, targets, contextual, window, causal in layouts:
        if n and n < contextual + (targets or 0) or (targets and not n):
            continue
        for tail in range(3) if window else [0]:
            layout = (n, targets, contextual, window, tail, causal)
            assert torch.equal(_rule_mask(*layout), dense_hstu_mask(*layout)), layout
            checked += 1
    assert checked > 1000


def test_bidirectional_masks_are_the_causal_ones_mirrored_without_options():
    for n in range(7):
        assert torch.equal(_rule_mask(n, None, 0, 0, 0, causal=False), torch.ones(n, n, dtype=torch.bool))
        for window in (1, 3):
            causal = _rule_mask(n, None, 0, window, 0)
            assert torch.equal(_rule_mask(n, None, 0, window, 0, causal=False), causal | causal.T)


def test_without_options_the_masks_are_causal():
    for n in range(7):
        assert torch.equal(_rule_mask(n, None, 0, 0, 0), torch.ones(n, n, dtype=torch.bool).tril())


LENGTHS = [0, 1, 2, 5, 9, 13, 4]
TARGETS = {"none": None, "zero": [0] * 7, "mixed": [0, 0, 1, 2, 3, 5, 1]}


def _inputs(lengths, heads=2, dtype=torch.float32, requires_grad=True, seed=0):
    torch.manual_seed(seed)
    q, k, v = random_qkv(sum(lengths), heads=heads, dim=4, dim_v=3, dtype=dtype, requires_grad=requires_grad)
    return q, k, v, cu_seqlens_of(lengths)


def _compare(lengths, kw, tensors, dtype=torch.float32, **backend_kwargs):
    q, k, v, cu = _inputs(lengths, dtype=dtype)
    out = segment_attention(q, k, v, cu, max(lengths, default=0), backend="torch", **kw, **backend_kwargs)
    ref = segment_attention_oracle(q, k, v, cu, **kw)
    base = segment_attention_oracle(q, k, v, cu, upcast=False, **kw)
    assert_within_budget("out", out, ref, base, dtype)
    wrt = (q, k, v, *tensors)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, wrt, grad_out)
    ref_grads = torch.autograd.grad(ref, wrt, grad_out)
    base_grads = torch.autograd.grad(base, wrt, grad_out)
    for name, g, r, b in zip(
        ["q", "k", "v", *(f"table{i}" for i in range(len(tensors)))], grads, ref_grads, base_grads, strict=True
    ):
        assert_within_budget(f"d{name}", g, r, b, dtype)


@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("contextual", [0, 1, 2])
@pytest.mark.parametrize("window", [(0, 0), (1, 0), (3, 0), (3, 2)], ids=["nowindow", "w1", "w3", "w3tail2"])
@pytest.mark.parametrize("score", ["softmax", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masks_match_oracle(targets, contextual, window, score, dtype):
    lengths = [n if n == 0 else max(n, contextual + (TARGETS[targets] or [0] * 7)[i]) for i, n in enumerate(LENGTHS)]
    nt = TARGETS[targets]
    bias = (0.3 * torch.randn(2, 6, dtype=dtype)).requires_grad_()
    kw = dict(
        score=score,
        silu_norm=5.0 if score == "silu" else None,
        rel_bias=bias,
        num_targets=None if nt is None else torch.tensor(nt),
        contextual_seq_len=contextual,
        max_attn_len=window[0],
        min_full_attn_seq_len=window[1],
    )
    _compare(lengths, kw, (bias,), dtype=dtype)


def _time_inputs(lengths, buckets, heads, seed=1):
    g = torch.Generator().manual_seed(seed)
    gaps = torch.randint(0, 5000, (sum(lengths),), generator=g) ** 2  # gaps over many buckets
    times = torch.cat([gaps[a:b].cumsum(0) for a, b in itertools.pairwise(cu_seqlens_of(lengths).tolist())])
    table = (0.3 * torch.randn(heads, buckets + 1, generator=g)).requires_grad_()
    return times + 1_700_000_000, table


def _bidirectional_options(targets, contextual, window, score, lengths, ts_bias, times):
    nt = TARGETS[targets]
    return dict(
        score=score,
        silu_norm=torch.linspace(2.0, 8.0, len(lengths)) if score == "silu" else None,
        ts_bias=ts_bias,
        timestamps=times,
        num_targets=None if nt is None else torch.tensor(nt),
        contextual_seq_len=contextual,
        max_attn_len=window[0],
        min_full_attn_seq_len=window[1],
        causal=False,
    )


def _lengths_for(targets, contextual):
    nt = TARGETS[targets] or [0] * len(LENGTHS)
    return [n if n == 0 else max(n, contextual + nt[i]) for i, n in enumerate(LENGTHS)]


@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("contextual", [0, 2])
@pytest.mark.parametrize("window", [(0, 0), (1, 0), (3, 2)], ids=["nowindow", "w1", "w3tail2"])
@pytest.mark.parametrize("score", ["softmax", "silu"])
def test_bidirectional_masks_match_oracle(targets, contextual, window, score):
    lengths = _lengths_for(targets, contextual)
    times, ts_bias = _time_inputs(lengths, buckets=64, heads=1)  # buckets up to gaps of ~e^19
    _compare(lengths, _bidirectional_options(targets, contextual, window, score, lengths, ts_bias, times), (ts_bias,))


@pytest.mark.parametrize("heads_of_tables", [1, 2], ids=["shared", "per_head"])
@pytest.mark.parametrize("score", ["softmax", "silu"])
@pytest.mark.parametrize("query_times", ["next", "given"])
def test_time_bias_and_shared_tables_match_oracle(heads_of_tables, score, query_times):
    lengths = [3, 0, 1, 11, 6]
    times, ts_bias = _time_inputs(lengths, buckets=12, heads=heads_of_tables)
    rel_bias = (0.3 * torch.randn(heads_of_tables, 11)).requires_grad_()  # one weight per distance
    given = times.flip(0) if query_times == "given" else None
    kw = dict(
        score=score,
        silu_norm=4.0 if score == "silu" else None,
        rel_bias=rel_bias,
        ts_bias=ts_bias,
        timestamps=times,
        query_timestamps=given,
        num_targets=torch.tensor([1, 0, 0, 2, 0]),
    )
    _compare(lengths, kw, (rel_bias, ts_bias))


@pytest.mark.parametrize("heads_of_tables", [1, 2], ids=["shared", "per_head"])
@pytest.mark.parametrize("query_times", ["next", "given"])
def test_cpp_time_bias_matches_oracle(heads_of_tables, query_times):
    require_backend("cpp")
    lengths = [3, 0, 1, 11, 6]
    times, ts_bias = _time_inputs(lengths, buckets=12, heads=heads_of_tables)
    q, k, v, cu = _inputs(lengths, requires_grad=False)
    kw = dict(
        score="silu",
        silu_norm=4.0,
        rel_bias=0.3 * torch.randn(heads_of_tables, 11),
        ts_bias=ts_bias.detach(),
        timestamps=times,
        query_timestamps=times.flip(0) if query_times == "given" else None,
        num_targets=torch.tensor([1, 0, 0, 2, 0]),
        max_attn_len=4,
    )
    out = segment_attention(q, k, v, cu, 11, backend="cpp", **kw)
    ref = segment_attention_oracle(q, k, v, cu, **kw)
    base = segment_attention_oracle(q, k, v, cu, upcast=False, **kw)
    assert_within_budget("out", out, ref, base, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_time_buckets_read_back_at_every_boundary(backend):
    """Gaps on both sides of every bucket boundary ``e ** (0.301 k)``: with ``q = 0``, ``v`` the
    identity and a table of distinct weights, the last row's output names the bucket of
    every key, which must be ``time_bucket``'s."""
    require_backend(backend)

    gaps = sorted(
        {g for k in range(1, 40) for g in (math.floor(math.exp(0.301 * k)) + d for d in (-1, 0, 1)) if g >= 0}
    )
    n = len(gaps) + 1
    query = 10**13
    times = torch.tensor([query - g for g in gaps] + [query])  # the last row is scored at `query`
    table = torch.linspace(0.5, 3.0, 41, dtype=torch.float64)[None]  # distinct, SiLU-increasing
    q = torch.zeros(n, 1, 2, dtype=torch.float64)
    v = torch.eye(n, dtype=torch.float64)[:, None, :]
    out = segment_attention(
        q, q, v, torch.tensor([0, n]), n, score="silu", silu_norm=1.0, ts_bias=table, timestamps=times,
        query_timestamps=torch.full((n,), query), backend=backend,
    )  # fmt: skip
    weights = torch.nn.functional.silu(table[0])
    got = [int((weights - w).abs().argmin()) for w in out[-1, 0, :-1]]
    assert got == time_bucket(torch.tensor(query), times[:-1], 40).tolist()
    assert len(set(got)) > 30  # the boundaries were crossed


def test_time_buckets_follow_hstu_log_rule():
    query = torch.tensor([0])
    gaps = torch.tensor([0, 1, 2, 3, 10, 100, 10**6, 10**12, -3])
    # floor(ln(max(|gap|, 1)) / 0.301), at most the bucket count
    assert time_bucket(query, -gaps, 60).tolist() == [0, 0, 2, 3, 7, 15, 45, 60, 3]
    cu = cu_seqlens_of([3, 0, 1, 2])
    assert next_timestamps(torch.tensor([5, 6, 9, 4, 7, 8]), cu).tolist() == [6, 9, 9, 4, 8, 8]


def test_per_sequence_silu_norm_matches_oracle_and_the_scalar_form():
    lengths = [4, 0, 7, 2]
    norm = torch.tensor([3.0, 1.0, 9.0, 0.5])
    _compare(lengths, dict(score="silu", silu_norm=norm, num_targets=torch.tensor([1, 0, 2, 0])), ())
    q, k, v, cu = _inputs(lengths, requires_grad=False)
    backends = ["torch"] + (["cpp"] if backends_status()["cpp"].available else [])
    for backend in backends:
        per_seq = segment_attention(q, k, v, cu, 7, score="silu", silu_norm=torch.full((4,), 6.0), backend=backend)
        scalar = segment_attention(q, k, v, cu, 7, score="silu", silu_norm=6.0, backend=backend)
        torch.testing.assert_close(per_seq, scalar, rtol=0, atol=0)


@pytest.mark.parametrize("score", ["softmax", "silu"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_chunked_rows_match_one_chunk(score, causal):
    """Many small (checkpointed) chunks give the one-chunk result: the prefix's keys run ahead,
    the window's start moves, and dropout redraws the same mask in backward."""
    lengths = [40, 7, 0, 23]
    q, k, v, cu = _inputs(lengths, dtype=torch.float64)
    times, ts_bias = _time_inputs(lengths, buckets=8, heads=2)
    ts_bias = ts_bias.detach().double().requires_grad_()
    kw = dict(
        pattern=PatternSpec(),
        score=score,
        scale=0.5,
        silu_norm=9.0 if score == "silu" else None,
        rel_bias=None,
        hstu_mask=HSTUMask(contextual_seq_len=2, max_attn_len=5, min_full_attn_seq_len=3, causal=causal),
        num_targets=torch.tensor([3, 1, 0, 2]),
        ts_bias=ts_bias,
        timestamps=times,
        query_timestamps=next_timestamps(times, cu),
        dropout_p=0.25,
        dropout_seed=11,
    )
    results = []
    for max_chunk in (1 << 30, 2 * 2 * 40 * 3, 1):
        out = segment_attention_torch(q, k, v, cu, max_chunk_elements=max_chunk, **kw)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v, ts_bias))))
    windowed = dict(kw, hstu_mask=HSTUMask(max_attn_len=5, causal=causal), num_targets=None, dropout_p=0.0)
    for max_chunk in (1 << 30, 1):  # a plain window skips the keys before it
        out = segment_attention_torch(q, k, v, cu, max_chunk_elements=max_chunk, **windowed)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v, ts_bias))))
    for first, other in ((results[0], results[1]), (results[0], results[2]), (results[3], results[4])):
        for a, b in zip(first, other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_chunks_of_a_plain_window_hold_only_its_keys():
    for causal in (True, False):
        chunks = row_chunks(PatternSpec(), HSTUMask(max_attn_len=5, causal=causal), False, 40, 40, 8 * 40)
        assert [(r0, r1) for r0, r1, _, _ in chunks] == [(r, r + 8) for r in range(0, 40, 8)]
        for r0, r1, k0, k1 in chunks:
            assert (k0, k1) == (max(r0 - 5, 0), r1 if causal else min(r1 + 5, 40))
    # Candidates, a prefix or a tail reach past the window: bidirectional chunks keep every key.
    mask = HSTUMask(contextual_seq_len=1, max_attn_len=5, causal=False)
    assert {(k0, k1) for _, _, k0, k1 in row_chunks(PatternSpec(), mask, False, 40, 40, 8 * 40)} == {(0, 40)}


@pytest.mark.parametrize("score", ["softmax", "silu"])
def test_dropout_is_seeded_and_unbiased(score):
    lengths = [6, 9]
    q, k, v, cu = _inputs(lengths)
    kw = dict(score=score, silu_norm=3.0 if score == "silu" else None, num_targets=torch.tensor([2, 1]))
    plain = segment_attention(q, k, v, cu, 9, **kw)

    def dropped(seed):
        return segment_attention(q, k, v, cu, 9, dropout_p=0.5, dropout_seed=seed, **kw)

    a, b, c = dropped(1), dropped(1), dropped(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(*(torch.autograd.grad(x.sum(), q)[0] for x in (dropped(3), dropped(3))))
    torch.manual_seed(0)
    unseeded = segment_attention(q, k, v, cu, 9, dropout_p=0.5, **kw)
    torch.manual_seed(0)
    assert torch.equal(unseeded, segment_attention(q, k, v, cu, 9, dropout_p=0.5, **kw))
    # Each weight is kept with probability 1/2 and doubled: the mean over seeds is the plain output.
    with torch.no_grad():
        mean = torch.stack([dropped(seed) for seed in range(400)]).mean(0)
    assert (mean - plain).abs().max() < 0.25 * plain.abs().max()
    assert (a - plain).abs().max() > 0.05 * plain.abs().max()


@pytest.mark.parametrize("backend", ["cpp"])
def test_shared_bias_on_compiled_backends_equals_expanded(backend):
    require_backend(backend)
    lengths = [5, 0, 8]
    q, k, v, cu = _inputs(lengths, dtype=torch.float32, requires_grad=False)
    shared = torch.randn(1, 6)
    kw = dict(score="silu", silu_norm=4.0)
    out = segment_attention(q, k, v, cu, 8, rel_bias=shared, backend=backend, **kw)
    ref = segment_attention(q, k, v, cu, 8, rel_bias=shared.expand(2, -1).contiguous(), backend="torch", **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_auto_runs_every_option_and_cpp_refuses_dropout():
    q, k, v, cu = _inputs([5, 3], dtype=torch.float32, requires_grad=False)
    targets = torch.tensor([1, 1])
    with torch.no_grad():
        out = segment_attention(q, k, v, cu, 5, num_targets=targets)  # auto: cpp when built, else torch
        ref = segment_attention_oracle(q, k, v, cu, num_targets=targets)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="backend='cpp' is forward only and has no dropout_p"):
        segment_attention(q, k, v, cu, 5, max_attn_len=2, dropout_p=0.1, backend="cpp")
    times = torch.arange(8)
    with torch.no_grad():  # auto: cpp runs the timestamp bias too
        auto = segment_attention(q, k, v, cu, 5, ts_bias=torch.ones(1, 3), timestamps=times)
        plain = segment_attention(q, k, v, cu, 5, ts_bias=torch.ones(1, 3), timestamps=times, backend="torch")
    torch.testing.assert_close(auto, plain, rtol=1e-5, atol=1e-6)


def test_cpp_spans_follow_the_rule_on_every_small_layout():
    require_backend("cpp")
    from rec2pm_kernels import _extension

    checked = 0
    layouts = itertools.product(range(1, 9), [0, 1, 3], range(4), range(4), [True, False])
    for n, targets, contextual, window, causal in layouts:
        if n < contextual + targets:
            continue
        for tail in range(3) if window else [0]:
            rule = _rule_mask(n, targets, contextual, window, tail, causal)
            for row in range(n):
                spans = _extension.C.hstu_key_spans(row, n, targets, contextual, window, tail, causal)
                got = torch.zeros(n, dtype=torch.bool)
                previous_end = -1
                for begin, end in spans:  # increasing, disjoint and not touching (merged)
                    assert previous_end < begin < end, (spans, row)
                    got[begin:end] = True
                    previous_end = end
                assert torch.equal(got, rule[row]), (n, targets, contextual, window, tail, causal, row, spans)
                checked += 1
    assert checked > 4000


@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("contextual", [0, 2])
@pytest.mark.parametrize("window", [(0, 0), (1, 0), (3, 2)], ids=["nowindow", "w1", "w3tail2"])
@pytest.mark.parametrize("score", ["softmax", "silu"])
def test_cpp_masks_match_oracle(targets, contextual, window, score):
    require_backend("cpp")
    nt = TARGETS[targets]
    lengths = [n if n == 0 else max(n, contextual + (nt or [0] * 7)[i]) for i, n in enumerate(LENGTHS)]
    q, k, v, cu = _inputs(lengths, requires_grad=False)
    kw = dict(
        score=score,
        silu_norm=torch.linspace(2.0, 8.0, len(lengths)) if score == "silu" else None,
        rel_bias=0.3 * torch.randn(1, 6),
        num_targets=None if nt is None else torch.tensor(nt),
        contextual_seq_len=contextual,
        max_attn_len=window[0],
        min_full_attn_seq_len=window[1],
    )
    out = segment_attention(q, k, v, cu, max(lengths), backend="cpp", **kw)
    ref = segment_attention_oracle(q, k, v, cu, **kw)
    base = segment_attention_oracle(q, k, v, cu, upcast=False, **kw)
    assert_within_budget("out", out, ref, base, torch.float32)


@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("contextual", [0, 2])
@pytest.mark.parametrize("window", [(0, 0), (1, 0), (3, 2)], ids=["nowindow", "w1", "w3tail2"])
@pytest.mark.parametrize("score", ["softmax", "silu"])
def test_cpp_bidirectional_masks_match_oracle(targets, contextual, window, score):
    require_backend("cpp")
    lengths = _lengths_for(targets, contextual)
    times, ts_bias = _time_inputs(lengths, buckets=64, heads=2)
    q, k, v, cu = _inputs(lengths, requires_grad=False)
    kw = _bidirectional_options(targets, contextual, window, score, lengths, ts_bias.detach(), times)
    out = segment_attention(q, k, v, cu, max(lengths), backend="cpp", **kw)
    ref = segment_attention_oracle(q, k, v, cu, **kw)
    base = segment_attention_oracle(q, k, v, cu, upcast=False, **kw)
    assert_within_budget("out", out, ref, base, torch.float32)


BAD_OPTIONS = [
    (dict(num_targets=torch.tensor([1])), "num_targets must have shape \\(batch=2,\\)"),
    (dict(num_targets=torch.tensor([1.0, 1.0])), "num_targets must have dtype"),
    (dict(num_targets=torch.tensor([6, 0])), "num_targets\\[0\\]=6 must be in \\[0, 5\\]"),
    (dict(num_targets=torch.tensor([0, -1])), "num_targets\\[1\\]=-1"),
    (dict(num_targets=torch.tensor([2, 1]), contextual_seq_len=3), "num_targets\\[1\\]=1 must be in \\[0, 0\\]"),
    (dict(contextual_seq_len=4), "sequence 1 has 3 tokens, fewer than contextual_seq_len=4"),
    (dict(contextual_seq_len=-1), "contextual_seq_len must be in"),
    (dict(max_attn_len=2.5), "max_attn_len must be an int"),
    (dict(min_full_attn_seq_len=2), "it needs max_attn_len > 0"),
    (
        dict(causal=False, rel_bias=torch.zeros(2, 4)),
        "causal=False takes ts_bias \\(symmetric in time\\) but no rel_bias",
    ),
    (dict(causal=False, pattern="global", segment_len=2, num_memory_tokens=1), "and causal=False refine"),
    (dict(causal=None), "causal must be a bool, got NoneType"),
    (dict(num_targets=torch.tensor([1, 1]), pattern="global", segment_len=2, num_memory_tokens=1), "refine"),
    (dict(ts_bias=torch.zeros(2, 5)), "ts_bias needs timestamps"),
    (dict(timestamps=torch.zeros(8, dtype=torch.int64)), "pass ts_bias too"),
    (dict(ts_bias=torch.zeros(3, 5), timestamps=torch.zeros(8, dtype=torch.int64)), "ts_bias must have shape"),
    (dict(ts_bias=torch.zeros(1, 5), timestamps=torch.zeros(7, dtype=torch.int64)), "timestamps must have shape"),
    (dict(ts_bias=torch.zeros(1, 5), timestamps=torch.zeros(8)), "timestamps must have dtype"),
    (dict(rel_bias=torch.zeros(3, 4)), "or \\(1, buckets\\) shared"),
    (dict(score="silu", silu_norm=torch.ones(3)), "silu_norm must have shape \\(batch=2,\\)"),
    (dict(score="silu", silu_norm=torch.tensor([1.0, 0.0])), "silu_norm must be finite and > 0"),
    (dict(score="silu", silu_norm=torch.tensor([1, 2])), "silu_norm must have dtype"),
    (
        dict(score="silu", silu_norm=torch.ones(2), pattern="global", segment_len=2, num_memory_tokens=1),
        "a per-sequence silu_norm \\(a tensor\\) refines pattern='causal'",
    ),
    (dict(dropout_p=1.0), "dropout_p must be a number in \\[0, 1\\)"),
    (dict(dropout_p=0.1, dropout_seed=1.5), "dropout_seed must be an int"),
    (dict(dropout_p=0.1, dropout_seed=2**63), "dropout_seed must fit in int64"),
]


def test_the_shape_of_a_per_sequence_silu_norm_is_checked_even_without_value_checks(monkeypatch):
    """As on CUDA with ``validate=False``, or under ``torch.compile``: no check reads a value."""
    from rec2pm_kernels import validation

    monkeypatch.setattr(validation, "reads_host_indices", lambda tensor: False)
    q, k, v, cu = _inputs([5, 3], dtype=torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="silu_norm must have shape \\(batch=2,\\), got \\(3,\\)"):
        segment_attention(q, k, v, cu, 5, score="silu", silu_norm=torch.ones(3), validate=False, backend="torch")


@pytest.mark.parametrize("options,message", BAD_OPTIONS, ids=[m for _, m in BAD_OPTIONS])
def test_bad_options_name_the_argument(options, message):
    q, k, v, cu = _inputs([5, 3], dtype=torch.float32, requires_grad=False)
    with pytest.raises((ValueError, TypeError), match=message):
        segment_attention(q, k, v, cu, 5, **options)


def test_dropout_draws_are_independent_across_rows_keys_and_heads():
    from rec2pm_kernels.ops.torch_math import dropout_keep

    keep = dropout_keep(123, torch.arange(64)[None, :] + 1000, torch.arange(64), 4, 0.3)  # (1, 4, 64, 64)
    assert abs(keep.float().mean().item() - 0.7) < 0.01
    for dim in (1, 2, 3):  # neighbours along heads, rows and keys agree as often as chance says
        a, b = keep.narrow(dim, 0, keep.shape[dim] - 1), keep.narrow(dim, 1, keep.shape[dim] - 1)
        assert abs((a == b).float().mean().item() - (0.7**2 + 0.3**2)) < 0.02, dim
    assert not torch.equal(keep, dropout_keep(124, torch.arange(64)[None, :] + 1000, torch.arange(64), 4, 0.3))


def test_module_takes_the_per_batch_options_in_forward():
    from rec2pm_kernels import SegmentAttention

    attn = SegmentAttention(
        2, score="silu", scale=1.0, num_buckets=6, shared_bias=True, num_time_buckets=8, max_attn_len=3, dropout=0.5
    )
    assert attn.rel_bias.shape == (1, 6) and attn.ts_bias.shape == (1, 9)
    with torch.no_grad():
        attn.rel_bias.normal_()
        attn.ts_bias.normal_()
    lengths = [6, 4]
    q, k, v, cu = _inputs(lengths, dtype=torch.float32)
    times, _ = _time_inputs(lengths, buckets=8, heads=1)
    kw = dict(num_targets=torch.tensor([1, 2]), timestamps=times)
    with pytest.raises(ValueError, match="built without silu_norm: pass silu_norm= to forward"):
        attn(q, k, v, cu, 6, **kw)
    norm = torch.tensor([6.0, 4.0])
    attn.eval()
    out = attn(q, k, v, cu, 6, silu_norm=norm, **kw)
    want = segment_attention_oracle(
        q,
        k,
        v,
        cu,
        score="silu",
        scale=1.0,
        silu_norm=norm,
        rel_bias=attn.rel_bias,
        ts_bias=attn.ts_bias,
        max_attn_len=3,
        **kw,
    )
    torch.testing.assert_close(out, want.float(), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert torch.count_nonzero(attn.rel_bias.grad) and torch.count_nonzero(attn.ts_bias.grad)
    attn.train()
    assert not torch.equal(attn(q, k, v, cu, 6, silu_norm=norm, dropout_seed=0, **kw), out)
    with pytest.raises(ValueError, match="no timestamp table"):
        SegmentAttention(2)(q, k, v, cu, 6, timestamps=times)
    with pytest.raises(ValueError, match="has a timestamp table .*: pass timestamps= to forward"):
        attn(q, k, v, cu, 6, silu_norm=norm, num_targets=kw["num_targets"])  # the table is never dropped


def test_module_builds_bidirectional_masks():
    from rec2pm_kernels import SegmentAttention

    with pytest.raises(ValueError, match="no rel_bias"):
        SegmentAttention(2, causal=False, num_buckets=4)
    attn = SegmentAttention(2, score="silu", silu_norm=6.0, num_time_buckets=8, contextual_seq_len=1, causal=False)
    with torch.no_grad():
        attn.ts_bias.normal_()
    lengths = [6, 4]
    q, k, v, cu = _inputs(lengths, dtype=torch.float32)
    times, _ = _time_inputs(lengths, buckets=8, heads=1)
    out = attn(q, k, v, cu, 6, timestamps=times)
    kw = dict(score="silu", silu_norm=6.0, ts_bias=attn.ts_bias, timestamps=times, contextual_seq_len=1)
    want = segment_attention_oracle(q, k, v, cu, causal=False, **kw)
    torch.testing.assert_close(out, want.float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, segment_attention_oracle(q, k, v, cu, **kw).float(), atol=1e-3)
