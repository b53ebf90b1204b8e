import pytest
import torch

from rec2pm.data import item_clusters, leave_one_out, lifelong_histories, lifelong_planted


def owners(data):
    return torch.repeat_interleave(torch.arange(data.num_users()), data.lengths())


def in_interests(data, plan, num_clusters):
    cluster = item_clusters(data.num_items, num_clusters)[data.items]
    return (cluster[:, None] == plan.interests[owners(data)]).any(dim=1)


def cluster_counts(data, num_clusters, select=None):
    """(users, clusters) event counts, over the events where ``select`` is true."""
    cluster = item_clusters(data.num_items, num_clusters)[data.items]
    select = torch.ones_like(cluster, dtype=torch.bool) if select is None else select
    counts = torch.zeros(data.num_users(), num_clusters)
    counts.index_put_((owners(data)[select], cluster[select]), torch.ones(int(select.sum())), accumulate=True)
    return counts


def test_seeded_and_deterministic():
    a = lifelong_histories(30, 300, 200, seed=5)
    b = lifelong_histories(30, 300, 200, seed=5)
    c = lifelong_histories(30, 300, 200, seed=6)
    assert torch.equal(a.items, b.items) and torch.equal(a.cu_seqlens, b.cu_seqlens) and a.source == b.source
    assert not torch.equal(a.items, c.items)


def test_format():
    data = lifelong_histories(7, 130, 50, seed=1)
    assert data.lengths().tolist() == [130] * 7 and data.items.dtype == torch.int64
    assert 1 <= data.items.min() and data.items.max() <= 50
    assert data.item_ids == list(range(1, 51)) and data.user_ids == list(range(7)) and data.skipped == {}
    assert "lifelong_histories(num_users=7, length=130, num_items=50" in data.source


def test_lengths_between_min_length_and_length():
    data = lifelong_histories(400, 16384, 500, min_length=1000, seed=2)
    lengths = data.lengths()
    assert lengths.min() >= 1000 and lengths.max() <= 16384
    assert (lengths < 2000).sum() > 50 and (lengths > 8000).sum() > 50  # log-uniform: both ends populated


def test_item_clusters_partition_the_catalogue():
    clusters = item_clusters(103, 10)
    assert clusters[0] == -1 and clusters.shape == (104,)
    sizes = torch.bincount(clusters[1:])
    assert sizes.sum() == 103 and sizes.numel() == 10
    assert sizes.max() - sizes.min() <= 1
    assert bool((clusters[2:] >= clusters[1:-1]).all())  # consecutive ids


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.35])
def test_noise_fraction(noise):
    num_items, num_clusters = 1000, 20
    data, plan = lifelong_planted(200, 500, num_items, num_clusters=num_clusters, noise=noise, seed=3)
    outside = (~in_interests(data, plan, num_clusters)).double().mean().item()
    # A noise event is uniform over all items, so it falls outside the interests with probability 1 - 4 * 50 / 1000.
    expected = noise * (1 - 4 * (num_items // num_clusters) / num_items)
    assert abs(outside - expected) < 0.01
    if noise == 0:
        assert outside == 0


def test_events_concentrate_on_the_users_interests():
    num_clusters, noise = 25, 0.1
    data, plan = lifelong_planted(200, 500, 1000, num_clusters=num_clusters, noise=noise, seed=4)
    counts = cluster_counts(data, num_clusters)
    top = counts.topk(4, dim=1)
    share = top.values.sum(1) / counts.sum(1)
    assert share.min() > 1 - noise - 0.06  # each user's 4 busiest clusters hold ~90%
    assert (top.indices.sort(1).values == plan.interests.sort(1).values).float().mean() > 0.9  # they are the interests
    uniform = cluster_counts(
        lifelong_histories(200, 500, 1000, num_clusters=num_clusters, noise=1.0, seed=4), num_clusters
    )
    assert (uniform.topk(4, dim=1).values.sum(1) / 500).mean() < 0.25  # no interests left at noise = 1


def test_drift_changes_the_interest_weights_slowly():
    def half_shift(drift):
        data, plan = lifelong_planted(300, 1024, 400, num_clusters=20, noise=0.0, drift=drift, seed=5)
        position = torch.arange(data.items.numel()) % 1024
        first = cluster_counts(data, 20, position < 512) / 512
        second = cluster_counts(data, 20, position >= 512) / 512
        return data, plan, 0.5 * (first - second).abs().sum(1).mean().item()  # mean total variation

    _, static_plan, static = half_shift(0.0)
    assert torch.allclose(static_plan.logits, static_plan.logits[:, :1].expand_as(static_plan.logits))
    _, plan, drifting = half_shift(2.0)
    steps = (plan.logits[:, 1:] - plan.logits[:, :-1]).std().item()
    assert abs(steps - 2.0 * (64 / 1000) ** 0.5) < 0.05  # random-walk step per 64-event block
    assert static < 0.1 and drifting > static + 0.15


def test_best_metrics_match_the_oracle_on_sampled_targets():
    num_items, num_clusters, noise, k = 120, 12, 0.3, 15
    data, plan = lifelong_planted(
        20000, 6, num_items, num_clusters=num_clusters, num_interests=3, noise=noise, drift=0.5, seed=6
    )
    # The oracle's next-item distribution at each user's last event, from the planted parameters.
    w = plan.weights()
    prob = torch.full((data.num_users(), num_items + 1), noise / num_items, dtype=torch.float64)
    prob[:, 0] = -1  # padding is never a candidate
    clusters = item_clusters(num_items, num_clusters)
    for j in range(3):
        members = clusters[None, :] == plan.interests[:, j : j + 1]
        prob += members * (1 - noise) * w[:, j : j + 1] / 10
    # Items of equal probability are exchangeable, so any order among them has the bound's expectation.
    best = plan.best_metrics(k)
    order = prob.argsort(1, descending=True)[:, :k]
    targets = data.items[data.cu_seqlens[1:] - 1]
    hit_rank = (order == targets[:, None]).double()
    hr = hit_rank.sum(1).mean().item()
    ndcg = (hit_rank / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))).sum(1).mean().item()
    assert abs(hr - best["hr"]) < 4 * (best["hr"] * (1 - best["hr"]) / data.num_users()) ** 0.5
    assert abs(ndcg - best["ndcg"]) < 0.015
    # The closed forms of the module docstring (equal clusters of s = 10 items, k <= s).
    top1 = ((1 - noise) * w.max(1).values / 10 + noise / num_items).mean().item()
    assert plan.best_metrics(1)["hr"] == pytest.approx(top1)
    assert plan.best_metrics(7)["hr"] == pytest.approx(7 * top1)
    assert plan.best_metrics(10)["hr"] == pytest.approx(
        ((1 - noise) * w.max(1).values).mean().item() + noise * 10 / num_items
    )
    assert plan.best_metrics(num_items)["hr"] == pytest.approx(1.0)


def test_item_probabilities_and_expected_metrics_agree_with_the_sampled_targets():
    """``item_probabilities`` is the distribution the last event was drawn from, and the
    expected metrics of a ranking equal, on average, the metrics of the sampled targets."""
    data, plan = lifelong_planted(20000, 6, 120, num_clusters=12, num_interests=3, noise=0.3, drift=0.5, seed=6)
    probs = plan.item_probabilities()
    assert probs.shape == (20000, 121) and probs[:, 0].eq(0).all()
    assert torch.allclose(probs.sum(1), torch.ones(20000, dtype=torch.float64))
    # The oracle's ranking earns the best achievable metrics, user by user.
    oracle = plan.expected_metrics(probs.topk(10, dim=1).indices)
    best_hr, best_ndcg = plan.best_per_user(10)
    assert torch.allclose(oracle["HR@10"], best_hr) and torch.allclose(oracle["NDCG@10"], best_ndcg)
    # A fixed ranking (items 1..10 for everyone): its expectation matches its sampled hits.
    ranked = torch.arange(1, 11).expand(20000, 10)
    expected = plan.expected_metrics(ranked)["HR@10"].mean().item()
    targets = data.items[data.cu_seqlens[1:] - 1]
    sampled = (targets <= 10).double().mean().item()
    assert abs(sampled - expected) < 4 * (expected * (1 - expected) / 20000) ** 0.5
    assert expected < best_hr.mean().item()
    with pytest.raises(ValueError, match=r"ranked must have shape \(20000, k\)"):
        plan.expected_metrics(ranked[:5])


def test_works_with_leave_one_out():
    split = leave_one_out(lifelong_histories(10, 50, 100))
    assert split.test_targets.shape == (10,) and split.train.lengths().tolist() == [48] * 10


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_users=0), "num_users"),
        (dict(length=0), "length"),
        (dict(num_clusters=101), "num_clusters"),
        (dict(num_clusters=3), "num_interests"),
        (dict(noise=1.5), "noise"),
        (dict(drift=-1.0), "drift"),
        (dict(min_length=60), "min_length"),
    ],
)
def test_invalid_arguments(kwargs, message):
    args = dict(num_users=3, length=50, num_items=100) | kwargs
    with pytest.raises(ValueError, match=message):
        lifelong_histories(**args)
