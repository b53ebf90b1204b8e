"""The lifelong generator at full size (10k users x 2k events), against a plain random draw
of the same number of item ids (the floor any generator pays)."""

from __future__ import annotations

import pytest
import torch

from rec2pm.data import lifelong_histories

SIZES = {"quick": (200, 2_000), "full": (10_000, 2_000)}


@pytest.mark.parametrize("case", ["randint", "lifelong_histories"])
def test_lifelong_generator(measure, bench_mode, case):
    users, length = SIZES[bench_mode]
    if case == "randint":

        def run():
            return torch.randint(1, 10_001, (users * length,), generator=torch.Generator().manual_seed(0))
    else:

        def run():
            return lifelong_histories(users, length, 10_000, seed=0)

    measure(
        run,
        group=f"data generation {users}x{length}",
        name=case,
        baseline=case == "randint",
        device=torch.device("cpu"),
        params=dict(users=users, length=length),
    )
