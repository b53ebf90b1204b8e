"""Full-ranking evaluation: metrics by hand, ranks, no target leak, oracle, bad input, batching."""

import math
import sys
import types

import pytest
import torch

from rec2pm.evaluation import (
    METRICS,
    evaluate,
    format_metrics,
    history_mask,
    metrics_from_ranks,
    ranks_from_scores,
    target_ranks,
)


def packed(histories):
    """(items, cu_seqlens) from a list of per-user item lists."""
    items = torch.tensor([i for h in histories for i in h], dtype=torch.long)
    cu = torch.tensor([0] + [len(h) for h in histories]).cumsum(0)
    return items, cu


def hash_scores(items, cu, num_items):
    """A deterministic per-user scorer that depends only on that user's own history (integer math, exact)."""
    sums = torch.stack([items[a:b].sum() for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)])
    ids = torch.arange(num_items + 1)
    return ((ids[None] * 2654435761 + sums[:, None] * 40503) % 1000003).float()


# ---------------------------------------------------------------- metrics by hand


def test_metrics_by_hand():
    # ranks [1, 3, 12, 60]:
    #   HR@1 = 1/4; HR@10 = 2/4 (1, 3); HR@50 = 3/4 (1, 3, 12)
    #   NDCG@10 = (1/log2(2) + 1/log2(4)) / 4 = (1 + 0.5) / 4 = 0.375
    #   NDCG@50 = (1 + 0.5 + 1/log2(13)) / 4 = (1.5 + 0.270238...) / 4 = 0.442560...
    #   MRR = (1 + 1/3 + 1/12 + 1/60) / 4 = (60 + 20 + 5 + 1) / 60 / 4 = 86 / 240 = 0.358333...
    m = metrics_from_ranks(torch.tensor([1, 3, 12, 60]))
    assert tuple(m) == METRICS
    assert m["HR@1"] == 0.25 and m["HR@10"] == 0.5 and m["HR@50"] == 0.75
    assert m["NDCG@10"] == pytest.approx(0.375, abs=1e-12)
    assert m["NDCG@50"] == pytest.approx((1.5 + 1 / math.log2(13)) / 4, abs=1e-12)
    assert m["NDCG@50"] == pytest.approx(0.44256, abs=1e-5)
    assert m["MRR"] == pytest.approx(86 / 240, abs=1e-12)


def test_metrics_other_ks():
    # ranks [2, 5]: HR@5 = 1; NDCG@5 = (1/log2(3) + 1/log2(6)) / 2 = (0.630930 + 0.386853) / 2 = 0.508891
    # NDCG@1 is omitted (it equals HR@1); ks are deduplicated and sorted.
    m = metrics_from_ranks(torch.tensor([2, 5]), ks=(5, 1, 5))
    assert tuple(m) == ("HR@1", "HR@5", "NDCG@5", "MRR")
    assert m["HR@1"] == 0.0 and m["HR@5"] == 1.0
    assert m["NDCG@5"] == pytest.approx(0.508891, abs=1e-6)
    assert m["MRR"] == pytest.approx((1 / 2 + 1 / 5) / 2, abs=1e-12)


# ---------------------------------------------------------------- ranks


def test_ranks_padding_never_counts():
    # The padding column holds the highest score, yet the target (item 2, 0.5) ranks behind item 1 only.
    scores = torch.tensor([[9.0, 0.7, 0.5, 0.1]])
    assert ranks_from_scores(scores, torch.tensor([2])).tolist() == [2]


def test_ranks_exclusion_removes_items_but_never_the_target():
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.5, 0.1], [0.0, 0.9, 0.8, 0.5, 0.1]])
    targets = torch.tensor([3, 3])
    exclude = torch.tensor(
        [
            [False, True, False, False, False],  # item 1 removed: rank 3 -> 2
            [True, True, True, True, True],
        ]
    )  # everything, the target included, flagged
    assert ranks_from_scores(scores, targets).tolist() == [3, 3]
    assert ranks_from_scores(scores, targets, exclude).tolist() == [2, 1]


def test_ranks_ties_are_pessimistic():
    # Target 2 ties with items 1 and 4: rank = 1 + 2 ties + 1 strictly higher (item 3) = 4.
    scores = torch.tensor([[5.0, 1.0, 1.0, 2.0, 1.0, 0.0]])
    assert ranks_from_scores(scores, torch.tensor([2])).tolist() == [4]
    # A constant scorer ranks every target last among the N = 5 candidates.
    assert ranks_from_scores(torch.zeros(3, 6), torch.tensor([1, 3, 5])).tolist() == [5, 5, 5]
    # -inf target: last too.
    scores = torch.tensor([[0.0, -math.inf, -math.inf, 0.0]])
    assert ranks_from_scores(scores, torch.tensor([1])).tolist() == [3]


# ---------------------------------------------------------------- no leak


def random_histories(num_users, num_items, gen, max_len=200):
    lengths = torch.randint(1, max_len, (num_users,), generator=gen)
    items = torch.randint(1, num_items + 1, (int(lengths.sum()),), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    targets = torch.randint(1, num_items + 1, (num_users,), generator=gen)
    return items, cu, targets


@pytest.mark.parametrize("exclude_history", [False, True])
def test_random_model_gets_chance_level(exclude_history):
    """A model that scores at random ranks the target uniformly among its C_u candidates: HR@10 = mean(10 / C_u)."""
    N, U = 500, 4000
    gen = torch.Generator().manual_seed(1)
    items, cu, targets = random_histories(U, N, gen, max_len=800)
    score_gen = torch.Generator().manual_seed(2)
    m = evaluate(
        lambda i, c: torch.rand(c.numel() - 1, N + 1, generator=score_gen),
        items,
        cu,
        targets,
        N,
        exclude_history=exclude_history,
        batch_size=512,
        progress=False,
    )
    if exclude_history:
        # Candidates: every item not in the history, plus the target even when it repeats.
        seen = history_mask(items, cu, slice(None), N)
        seen[torch.arange(U), targets] = False
        candidates = N - seen.sum(1).double()
        assert candidates.min() < 0.2 * N  # the histories really shrink the candidate sets
    else:
        candidates = torch.full((U,), float(N), dtype=torch.float64)
    p = (10 / candidates).clamp(max=1)
    expected, se = float(p.mean()), float((p * (1 - p)).sum().sqrt() / U)
    assert abs(m["HR@10"] - expected) < 4 * se, (m["HR@10"], expected, se)
    if exclude_history:  # the test has power: ignoring the exclusion (10 / N) would fail it
        assert abs(10 / N - expected) > 8 * se
    p1 = 1 / candidates
    expected1, se1 = float(p1.mean()), float((p1 * (1 - p1)).sum().sqrt() / U)
    assert abs(m["HR@1"] - expected1) < 4 * se1, (m["HR@1"], expected1, se1)
    assert m["users"] == U


def test_target_excluded_only_when_it_truly_repeats():
    N = 10
    histories = [[1, 2, 3], [4, 5, 6, 4], [7], [2, 9]]
    targets = torch.tensor([4, 4, 7, 9])  # users 1, 2 and 3 repeat a history item; user 0 does not
    items, cu = packed(histories)
    mask = history_mask(items, cu, slice(None), N)
    assert mask[torch.arange(4), targets].tolist() == [False, True, True, True]
    # Exactly the history items are flagged, row by row; padding never.
    for u, h in enumerate(histories):
        assert set(torch.nonzero(mask[u]).flatten().tolist()) == set(h)
    # A subset of users by index tensor gives the same rows.
    assert torch.equal(history_mask(items, cu, torch.tensor([3, 1]), N), mask[[3, 1]])

    # Through evaluate: a model that puts the history items first, then the target, then the rest.
    # With the history removed, every target is rank 1, repeated or not.
    def history_first(i, c):
        scores = torch.zeros(c.numel() - 1, N + 1)
        scores[history_mask(i, c, slice(None), N)] = 2.0
        return scores + torch.nn.functional.one_hot(batch_targets.pop(0), N + 1)

    batch_targets = list(targets.split(1))
    m = evaluate(history_first, items, cu, targets, N, batch_size=1, progress=False)
    assert m["HR@1"] == 1.0 and m["MRR"] == 1.0
    # Without the exclusion, the history items outrank the non-repeated target: user 0 rank 4 (items 1, 2, 3
    # ahead); a repeated target scores 3 and ties with nothing, so it is first.
    batch_targets = list(targets.split(1))
    m = evaluate(history_first, items, cu, targets, N, batch_size=1, progress=False, exclude_history=False)
    assert m["HR@1"] == 0.75 and m["MRR"] == pytest.approx((1 / 4 + 3) / 4)


# ---------------------------------------------------------------- oracle and a real model


def test_oracle_model_gets_hr1_of_one():
    """Walks with a per-user stride: the oracle reads the stride from the last two items it is given."""
    N, U, length = 50, 60, 30
    gen = torch.Generator().manual_seed(3)
    start = torch.randint(0, N, (U, 1), generator=gen)
    stride = torch.randint(1, 4, (U, 1), generator=gen)
    walk = (start + stride * torch.arange(length + 1)) % N + 1  # stride 2 and 3 wrap: targets repeat
    items, targets = walk[:, :-1].flatten(), walk[:, -1]
    cu = torch.arange(U + 1) * length

    def oracle(i, c):
        last, prev = i[c[1:] - 1], i[c[1:] - 2]
        nxt = (last - 1 + (last - prev) % N) % N + 1
        return torch.nn.functional.one_hot(nxt, N + 1).float()

    repeats = history_mask(items, cu, slice(None), N)[torch.arange(U), targets]
    assert repeats.any() and not repeats.all()
    for exclude_history in (True, False):
        m = evaluate(oracle, items, cu, targets, N, batch_size=16, progress=False, exclude_history=exclude_history)
        assert m["HR@1"] == 1.0 and m["NDCG@10"] == 1.0 and m["MRR"] == 1.0 and m["users"] == U


def test_with_a_model_score_history():
    from rec2pm.config import named_config
    from rec2pm.methods import build_model
    from rec2pm.toy_data import toy_histories

    N = 40
    items, cu = toy_histories(num_users=6, length=12, num_items=N)
    model = build_model("full", named_config("sasrec-small", num_items=N, max_positions=64)).eval()
    targets = torch.arange(1, 7)
    m = evaluate(model.score_history, items, cu, targets, N, batch_size=4, progress=False)
    assert tuple(m) == METRICS + ("users",) and m["users"] == 6
    assert all(0.0 <= m[k] <= 1.0 for k in METRICS)
    with pytest.warns(UserWarning, match="training mode"):
        evaluate(model.train().score_history, items, cu, targets, N, progress=False)


# ---------------------------------------------------------------- batching and progress


def test_batch_size_does_not_change_results():
    N, U = 80, 50
    gen = torch.Generator().manual_seed(4)
    items, cu, targets = random_histories(U, N, gen, max_len=20)
    results = [
        evaluate(lambda i, c: hash_scores(i, c, N), items, cu, targets, N, batch_size=b, progress=False)
        for b in (1, 7, 1000)
    ]
    assert results[0] == results[1] == results[2]
    ranks = ranks_from_scores(hash_scores(items, cu, N), targets, history_mask(items, cu, slice(None), N))
    assert results[0] == {**metrics_from_ranks(ranks), "users": U}
    # The per-user ranks behind the metrics, for paired comparisons.
    per_user = target_ranks(lambda i, c: hash_scores(i, c, N), items, cu, targets, N, batch_size=7, progress=False)
    assert torch.equal(per_user, ranks)


def test_cu_batch_is_rebased_and_keeps_dtype():
    items, cu = packed([[1, 2], [3], [4, 5, 6]])
    cu = cu.int()
    seen = []

    def record(i, c):
        seen.append((i.tolist(), c.tolist(), c.dtype))
        return torch.zeros(c.numel() - 1, 7)

    evaluate(record, items, cu, torch.tensor([1, 1, 1]), 6, batch_size=2, progress=False)
    assert seen == [([1, 2, 3], [0, 2, 3], torch.int32), ([4, 5, 6], [0, 3], torch.int32)]


def test_progress_bar_with_and_without_tqdm(monkeypatch):
    items, cu = packed([[1], [2], [3]])
    args = (lambda i, c: torch.zeros(c.numel() - 1, 4), items, cu, torch.tensor([1, 2, 3]), 3)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import fails: no bar, no error
    assert evaluate(*args, batch_size=2)["users"] == 3
    calls = []

    class FakeBar:
        def __init__(self, total, desc, unit):
            calls.append(("init", total, desc))

        def update(self, n):
            calls.append(("update", n))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=FakeBar))
    evaluate(*args, batch_size=2, description="valid")
    assert calls == [("init", 3, "valid"), ("update", 2), ("update", 1), ("close",)]


def test_format_metrics():
    text = format_metrics({**metrics_from_ranks(torch.tensor([1, 3, 12, 60])), "users": 4})
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "value"]
    assert lines[2].split() == ["HR@10", "0.5000"] and lines[-1].split() == ["users", "4"]
    assert len({len(line) for line in lines}) == 1  # right-aligned values: equal widths


# ---------------------------------------------------------------- bad input


def good_args():
    items, cu = packed([[1, 2], [3]])
    return dict(
        score_fn=lambda i, c: torch.zeros(c.numel() - 1, 6),
        items=items,
        cu_seqlens=cu,
        targets=torch.tensor([4, 5]),
        num_items=5,
    )


@pytest.mark.parametrize(
    "change,text",
    [
        (dict(targets=torch.tensor([4, 5, 1])), "targets must have shape (2,)"),
        (dict(targets=torch.tensor([[4, 5]])), "targets must be a 1-D integer tensor"),
        (dict(targets=torch.tensor([4.0, 5.0])), "targets must be a 1-D integer tensor"),
        (dict(targets=torch.tensor([0, 5])), "targets holds item id 0, outside the catalogue 1..5"),
        (dict(targets=torch.tensor([4, 6])), "targets holds item id 6, outside the catalogue 1..5"),
        (dict(items=torch.tensor([1, 9, 3])), "items holds item id 9"),
        (dict(items=torch.tensor([1, 2])), "cu_seqlens must start at 0, be non-decreasing and end at 2"),
        (dict(cu_seqlens=torch.tensor([0, 3])), "targets must have shape (1,)"),
        (dict(cu_seqlens=torch.tensor([0.0, 2.0, 3.0])), "cu_seqlens must be a 1-D integer tensor"),
        (dict(score_fn=lambda i, c: torch.zeros(c.numel() - 1, 5)), "score_fn must return a tensor of shape (2, 6)"),
        (dict(score_fn=lambda i, c: torch.zeros(1, 6)), "score_fn must return a tensor of shape (2, 6)"),
        (dict(score_fn=lambda i, c: [0.0] * 6), "score_fn must return a tensor of shape (2, 6)"),
        (dict(score_fn=lambda i, c: torch.full((2, 6), math.nan)), "scores contains NaN"),
        (dict(num_items=0), "num_items must be an int >= 1"),
        (dict(batch_size=0), "batch_size must be an int >= 1"),
        (dict(ks=(0, 10)), "ks must be a non-empty sequence of ints >= 1"),
        (dict(ks=()), "ks must be a non-empty sequence of ints >= 1"),
    ],
)
def test_evaluate_bad_input(change, text):
    args = {**good_args(), **change}
    with pytest.raises((ValueError, TypeError)) as info:
        evaluate(
            args.pop("score_fn"),
            args.pop("items"),
            args.pop("cu_seqlens"),
            args.pop("targets"),
            args.pop("num_items"),
            progress=False,
            **args,
        )
    assert text in str(info.value)


@pytest.mark.parametrize(
    "call,text",
    [
        (lambda: ranks_from_scores(torch.zeros(2, 6), torch.tensor([1])), "targets must have shape (2,)"),
        (lambda: ranks_from_scores(torch.zeros(6), torch.tensor([1])), "scores must be a 2-D float tensor"),
        (
            lambda: ranks_from_scores(torch.zeros(1, 6, dtype=torch.long), torch.tensor([1])),
            "scores must be a 2-D float",
        ),
        (lambda: ranks_from_scores(torch.zeros(1, 6), torch.tensor([6])), "targets holds item id 6"),
        (lambda: ranks_from_scores(torch.zeros(1, 6), torch.tensor([1]), torch.zeros(1, 6)), "exclude must be a bool"),
        (
            lambda: ranks_from_scores(torch.zeros(1, 6), torch.tensor([1]), torch.zeros(1, 5, dtype=torch.bool)),
            "exclude must be a bool tensor of shape (1, 6)",
        ),
        (lambda: metrics_from_ranks(torch.tensor([1, 0])), "ranks must be >= 1"),
        (lambda: metrics_from_ranks(torch.tensor([], dtype=torch.long)), "ranks is empty"),
        (lambda: metrics_from_ranks(torch.tensor([1.0])), "ranks must be a 1-D integer tensor"),
        (lambda: history_mask(torch.tensor([1, 7]), torch.tensor([0, 2]), slice(None), 6), "items holds item id 7"),
        (
            lambda: history_mask(torch.tensor([1, 2]), torch.tensor([0, 3]), slice(None), 6),
            "cu_seqlens must start at 0",
        ),
    ],
)
def test_parts_bad_input(call, text):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert text in str(info.value)


def test_exclusion_can_come_from_a_longer_history_than_the_model_reads():
    # The model reads only the last item; the exclusion covers the whole history.
    num_items = 6
    full_items = torch.tensor([5, 4, 1])  # one user, history 5 4 1
    full_cu = torch.tensor([0, 3])
    window_items, window_cu = torch.tensor([1]), torch.tensor([0, 1])
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0, 6.0, 5.0, 4.0]])  # items 4, 5 score above the target 6

    def score_fn(items, cu):
        return scores

    target = torch.tensor([6])
    only_window = evaluate(score_fn, window_items, window_cu, target, num_items, progress=False)
    whole = evaluate(
        score_fn,
        window_items,
        window_cu,
        target,
        num_items,
        progress=False,
        exclude_items=full_items,
        exclude_cu_seqlens=full_cu,
    )
    assert only_window["HR@1"] == 0.0 and only_window["MRR"] == 1 / 3
    assert whole["HR@1"] == 1.0
    with pytest.raises(ValueError, match="exclude_items and exclude_cu_seqlens go together"):
        evaluate(score_fn, window_items, window_cu, target, num_items, progress=False, exclude_items=full_items)
