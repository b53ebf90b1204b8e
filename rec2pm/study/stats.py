"""Paired statistics of the accuracy study (``docs/results.md`` explains them).

Two methods are compared on the same users: each user's metric (HR@10 is 0 or 1, NDCG@10
is ``1 / log2(rank + 1)`` inside the top 10) is averaged over the method's seeds, and the
per-user differences are resampled over users (a percentile bootstrap) for a confidence
interval of the mean difference.  The minimum detectable effect is the true difference
that a two-sided test at ``alpha`` would find with probability ``power`` at this sample
size and this spread of differences: ``(z_{1 - alpha/2} + z_power) * sd(d) / sqrt(n)``.

A claim is "supported", "refuted" or "not resolved at this size", decided by the interval
alone, never by overlapping means:

* ``"greater"`` (A ahead of B): supported if the interval lies above 0, refuted if below;
* ``"not_worse"`` (A at or above B): supported if the interval lies above ``-margin``,
  refuted if it lies below 0;
* ``"equivalent"`` (A about B): supported if the interval lies inside ``[-margin, margin]``,
  refuted if it lies entirely outside it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

RESAMPLES = 10_000
CONFIDENCE = 0.95
POWER = 0.8
# The non-inferiority and equivalence margin, relative to B's mean: a method within 5% of
# the other's HR@10 is "as accurate" (the tolerance the published reproductions use).
RELATIVE_MARGIN = 0.05
CLAIM_KINDS = ("greater", "not_worse", "equivalent")
SUPPORTED, REFUTED, UNRESOLVED = "supported", "refuted", "not resolved at this size"


def per_user_metric(ranks, metric: str) -> np.ndarray:
    """``(U,)`` float64 per-user ``"HR@K"`` or ``"NDCG@K"`` from 1-based ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.ndim != 1 or (ranks.size and ranks.min() < 1):
        raise ValueError(f"ranks must be a 1-D array of 1-based ranks, got shape {ranks.shape}")
    name, _, cutoff = metric.partition("@")
    if name not in ("HR", "NDCG") or not cutoff.isdigit() or int(cutoff) < 1:
        raise ValueError(f"metric must look like 'HR@10' or 'NDCG@10', got {metric!r}")
    inside = ranks <= int(cutoff)
    if name == "HR":
        return inside.astype(np.float64)
    return np.where(inside, 1.0 / np.log2(ranks + 1.0), 0.0)


def seed_mean(per_seed: list[np.ndarray]) -> np.ndarray:
    """Each user's metric averaged over seeds (every seed must rank the same users)."""
    if not per_seed:
        raise ValueError("seed_mean needs at least one seed's per-user values")
    sizes = {len(values) for values in per_seed}
    if len(sizes) != 1:
        raise ValueError(f"every seed must rank the same users, got user counts {sorted(sizes)}")
    return np.mean(np.stack(per_seed), axis=0)


@dataclass(frozen=True)
class Comparison:
    """``A - B`` over ``users`` paired users: means, the mean difference, its interval and MDE."""

    users: int
    mean_a: float
    mean_b: float
    difference: float
    low: float
    high: float
    min_detectable: float

    def as_dict(self) -> dict:
        return asdict(self)


def _interval(resampled: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(resampled, tail)), float(np.quantile(resampled, 1.0 - tail))


def paired_comparison(
    a: np.ndarray, b: np.ndarray, *, resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0
) -> Comparison:
    """Bootstrap interval of ``mean(a - b)`` over users, resampling users with replacement."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"a and b must be paired 1-D arrays of at least 2 users, got {a.shape} and {b.shape}")
    diff = a - b
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, diff.size, size=(resamples, diff.size))
    low, high = _interval(diff[picks].mean(axis=1), confidence)
    return Comparison(
        users=int(diff.size),
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        difference=float(diff.mean()),
        low=low,
        high=high,
        min_detectable=min_detectable_effect(diff.std(ddof=1), diff.size, confidence=confidence),
    )


def min_detectable_effect(sd: float, users: int, *, confidence: float = CONFIDENCE, power: float = POWER) -> float:
    """The smallest true mean difference a two-sided test at ``1 - confidence`` detects with ``power``."""
    z = NormalDist()
    return (z.inv_cdf(1.0 - (1.0 - confidence) / 2.0) + z.inv_cdf(power)) * float(sd) / math.sqrt(users)


def verdict(comparison: Comparison, kind: str, margin: float | None = None) -> str:
    """The claim's status from the interval (see the module docstring); ``margin`` defaults
    to ``RELATIVE_MARGIN`` of B's mean."""
    if kind not in CLAIM_KINDS:
        raise ValueError(f"kind must be one of {CLAIM_KINDS}, got {kind!r}")
    if margin is None:
        margin = RELATIVE_MARGIN * abs(comparison.mean_b)
    low, high = comparison.low, comparison.high
    if kind == "greater":
        return SUPPORTED if low > 0 else REFUTED if high < 0 else UNRESOLVED
    if kind == "not_worse":
        return SUPPORTED if low > -margin else REFUTED if high < 0 else UNRESOLVED
    if -margin <= low and high <= margin:
        return SUPPORTED
    return REFUTED if low > margin or high < -margin else UNRESOLVED
