"""HSTU's timestamp bias on the Triton kernels (interpreter): forward and every gradient,
``ts_bias``'s included, against the dense oracle on every pattern family; the buckets read
back at every boundary; bit-identical bias gradients from run to run."""

import math

import pytest
import torch

from rec2pm_kernels import segment_attention
from rec2pm_kernels.testing import check_time_bias, random_inputs, run_time_bias, time_inputs, time_tables
from rec2pm_kernels.time_bias import time_bucket

from ..targets import TRITON_INTERPRETER as TARGET

pattern_kwargs, score_kwargs = TARGET.pattern_kwargs, TARGET.score_kwargs

pytestmark = pytest.mark.interpreter


# Every pattern and both scores, without the full product, on a shorter batch than the
# standard ragged one (empty, 1, S - 1, units, units plus a tail): the interpreter runs the
# bias kernel's sort of every 16 x 16 tile slowly.
LENGTHS = [0, 1, 4, 8, 17, 21]
PATTERN_SCORES = [
    ("causal", "softmax"),
    ("causal", "silu"),
    ("global", "softmax"),
    ("kv_memory_overwrite", "silu"),
    ("kv_memory_append", "softmax"),
]


@pytest.mark.parametrize("pattern, score", PATTERN_SCORES, ids=[f"{p}-{s}" for p, s in PATTERN_SCORES])
def test_time_bias_matches_oracle_on_every_pattern(pattern, score):
    times = time_inputs(LENGTHS)
    kw = dict(timestamps=times, **pattern_kwargs(pattern), **score_kwargs(score))
    check_time_bias(LENGTHS, time_tables(heads_of_tables=2), **kw)


# Bidirectional masks take no rel_bias, so the time-only case runs them (a time-only causal
# case runs on every pattern above).
@pytest.mark.parametrize("with_rel", [False, True], ids=["time_only-bidirectional", "with_rel-causal"])
def test_time_bias_with_hstu_masks_and_a_shared_table(monkeypatch, with_rel):
    """``deterministic`` is not a case: with a timestamp bias every table gradient comes from
    the deterministic kernel, whatever the flag (the launch log shows no atomics)."""
    from rec2pm_kernels.ops import triton_launch

    log = []
    monkeypatch.setattr(triton_launch, "launch_log", log)
    lengths = [0, 1, 5, 33, 17]
    times = time_inputs(lengths)
    kw = dict(
        score="silu",
        silu_norm=torch.linspace(2.0, 6.0, len(lengths)),
        num_targets=torch.tensor([0, 0, 2, 5, 1]),
        contextual_seq_len=1,
        max_attn_len=9,
        timestamps=times,
        query_timestamps=times.flip(0),  # given query times, not the next token's
        causal=with_rel,
    )
    check_time_bias(lengths, time_tables(heads_of_tables=1, with_rel=with_rel), deterministic=False, **kw)
    assert [name for name, _ in log] == ["segment_fwd", "segment_bwd_dkdv", "segment_bwd_dq", "segment_bwd_bias"]
    assert log[1][1] == {"bias_atomics": False}


def test_bias_gradients_are_bit_identical_from_run_to_run():
    lengths = [33, 9, 1]
    times = time_inputs(lengths)
    q, k, v, cu, _ = random_inputs(lengths, with_bias=False)
    rel, ts = time_tables(heads_of_tables=2)
    grad_out = torch.randn(q.shape[0], q.shape[1], v.shape[2])
    runs = [
        run_time_bias(q, k, v, cu, (rel, ts), grad_out, backend="triton", timestamps=times, score="softmax")
        for _ in range(2)
    ]
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


def test_time_buckets_read_back_at_every_boundary():
    """As the ``torch`` and C++ read-back test: with ``q = 0``, ``v`` the identity and a table of
    distinct weights, the last row's output names the bucket the kernel chose for every key."""
    gaps = sorted(
        {g for k in range(1, 40) for g in (math.floor(math.exp(0.301 * k)) + d for d in (-1, 0, 1)) if g >= 0}
    )
    n = len(gaps) + 1
    query = 10**13
    times = torch.tensor([query - g for g in gaps] + [query])
    table = torch.linspace(0.5, 3.0, 41)[None]
    q = torch.zeros(n, 1, 16)
    v = torch.eye(n)[:, None, :]
    out = segment_attention(
        q, q, v, torch.tensor([0, n]), n, score="silu", silu_norm=1.0, ts_bias=table, timestamps=times,
        query_timestamps=torch.full((n,), query), backend="triton",
    )  # fmt: skip
    weights = torch.nn.functional.silu(table[0])
    got = [int((weights - w).abs().argmin()) for w in out[-1, 0, :-1]]
    assert got == time_bucket(torch.tensor(query), times[:-1], 40).tolist()
    assert len(set(got)) > 30


@pytest.mark.parametrize("with_time", [False, True], ids=["rel", "rel_and_time"])
def test_frozen_tables_are_not_differentiated(monkeypatch, with_time):
    """Tables that require no gradient get none: no atomics, no bias-gradient kernel, and
    the output and q, k, v's gradients are the same bits as with the tables trained."""
    from rec2pm_kernels.ops import triton_launch

    lengths = [9, 0, 17]
    q, k, v, cu, _ = random_inputs(lengths, with_bias=False)
    rel, ts = time_tables(heads_of_tables=2)
    kw = dict(backend="triton", score="softmax")
    if with_time:
        kw["timestamps"] = time_inputs(lengths)
    else:
        ts = None
    grad_out = torch.randn(q.shape[0], q.shape[1], v.shape[2])
    log = []
    monkeypatch.setattr(triton_launch, "launch_log", log)
    trained = run_time_bias(q, k, v, cu, (rel, ts), grad_out, **kw)
    assert len(trained) == (6 if with_time else 5)
    assert ("segment_bwd_bias" in [name for name, _ in log]) == with_time
    log.clear()
    frozen = run_time_bias(q, k, v, cu, (rel.detach(), ts.detach() if with_time else None), grad_out, **kw)
    assert [name for name, _ in log] == ["segment_fwd", "segment_bwd_dkdv", "segment_bwd_dq"]
    assert log[1][1] == {"bias_atomics": False}
    for got, expected in zip(frozen, trained[:4], strict=True):
        assert torch.equal(got, expected)
