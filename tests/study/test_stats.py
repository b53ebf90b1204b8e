"""The study's paired statistics: per-user metrics, bootstrap intervals, MDE and verdicts."""

import numpy as np
import pytest
import torch

from rec2pm.evaluation import metrics_from_ranks
from rec2pm.study import stats


def test_per_user_metrics_average_to_the_evaluation_metrics():
    ranks = np.array([1, 2, 9, 10, 11, 400, 3])
    expected = metrics_from_ranks(torch.tensor(ranks))
    for metric in ("HR@10", "NDCG@10", "HR@1", "NDCG@50"):
        assert stats.per_user_metric(ranks, metric).mean() == pytest.approx(expected[metric])
    with pytest.raises(ValueError, match="metric must look like 'HR@10'"):
        stats.per_user_metric(ranks, "MRR")
    with pytest.raises(ValueError, match="1-based ranks"):
        stats.per_user_metric(np.array([0, 1]), "HR@10")


def test_seed_mean_needs_the_same_users():
    assert np.allclose(stats.seed_mean([np.array([0.0, 1.0]), np.array([1.0, 1.0])]), [0.5, 1.0])
    with pytest.raises(ValueError, match="same users"):
        stats.seed_mean([np.zeros(3), np.zeros(4)])


def test_the_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered, trials = 0, 200
    for trial in range(trials):
        a = rng.normal(0.3, 1.0, 60)
        b = a - 0.1 + rng.normal(0.0, 0.5, 60)  # A is 0.1 ahead, paired noise
        c = stats.paired_comparison(a, b, resamples=2000, seed=trial)
        covered += c.low <= 0.1 <= c.high
    assert 0.89 <= covered / trials <= 0.99


def test_min_detectable_effect_is_the_normal_power_formula():
    # z_0.975 + z_0.8 = 1.95996 + 0.84162 = 2.80158
    assert stats.min_detectable_effect(0.5, 100) == pytest.approx(2.80158 * 0.05, rel=1e-4)
    diff = np.random.default_rng(1).normal(0.0, 2.0, 400)
    c = stats.paired_comparison(diff, np.zeros(400))
    assert c.min_detectable == pytest.approx(2.80158 * diff.std(ddof=1) / 20.0, rel=1e-4)
    # The interval's half-width is about z_0.975 * sd / sqrt(n).
    assert (c.high - c.low) / 2 == pytest.approx(1.96 * diff.std(ddof=1) / 20.0, rel=0.1)


@pytest.mark.parametrize(
    "low, high, kind, verdict",
    [
        (0.01, 0.03, "greater", stats.SUPPORTED),
        (-0.03, -0.01, "greater", stats.REFUTED),
        (-0.01, 0.03, "greater", stats.UNRESOLVED),
        (-0.004, 0.02, "not_worse", stats.SUPPORTED),  # margin 5% of 0.1 = 0.005
        (-0.03, -0.001, "not_worse", stats.REFUTED),
        (-0.02, 0.01, "not_worse", stats.UNRESOLVED),
        (-0.004, 0.004, "equivalent", stats.SUPPORTED),
        (0.006, 0.02, "equivalent", stats.REFUTED),
        (-0.004, 0.02, "equivalent", stats.UNRESOLVED),
    ],
)
def test_verdicts_follow_the_interval(low, high, kind, verdict):
    c = stats.Comparison(
        users=100, mean_a=0.1, mean_b=0.1, difference=(low + high) / 2, low=low, high=high, min_detectable=0.01
    )
    assert stats.verdict(c, kind) == verdict


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="paired 1-D arrays"):
        stats.paired_comparison(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="kind must be one of"):
        stats.verdict(stats.paired_comparison(np.ones(3), np.zeros(3)), "better")
