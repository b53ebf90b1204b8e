"""The benchmark harness's percentile: nearest rank, no interpolation."""

from __future__ import annotations

import pytest

from benchmarks.harness.record import nearest_rank


def test_nearest_rank_percentiles():
    samples = [float(x) for x in range(100, 0, -1)]  # 1..100, unsorted
    assert nearest_rank(samples, 0.99) == 99.0
    assert nearest_rank(samples, 0.5) == 50.0
    assert nearest_rank(samples, 1.0) == 100.0
    assert nearest_rank([3.0, 1.0, 2.0], 0.99) == 3.0  # below 100 samples the p99 is the maximum
    assert nearest_rank([7.0], 0.0) == 7.0
    with pytest.raises(ValueError, match="at least one sample"):
        nearest_rank([], 0.99)
