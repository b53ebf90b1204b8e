"""One training step (forward + backward) of each method, against Full, on one CPU batch.

Full mode: 8 users x 1000 events, S = 200, C = 4, SASRec reference config (4 layers,
4 heads, d = 64); quick mode: 2 users x 400 events.
"""

from __future__ import annotations

import pytest
import torch

from rec2pm.config import named_config
from rec2pm.methods import build_model
from rec2pm.toy_data import toy_histories

from .harness.kernel_options import kernel_options

SIZES = {"quick": (2, 400), "full": (8, 1000)}
METHODS = ["full", "rec2pm-o", "rec2pm-a", "recent", "tok-serial-o", "tok-serial-a", "kv-mask-o", "kv-mask-a"]
NUM_ITEMS = 10_000


@pytest.mark.parametrize("method", METHODS)
def test_training_step(measure, bench_mode, method):
    users, length = SIZES[bench_mode]
    items, cu = toy_histories(users, length, NUM_ITEMS)
    torch.manual_seed(0)
    model = build_model(method, named_config("sasrec", num_items=NUM_ITEMS, kernels=kernel_options()))

    def step():
        model.zero_grad(set_to_none=True)
        model(items, cu).loss.backward()

    measure(
        step,
        group=f"training step {users}x{length} sasrec S=200 C=4",
        name=method,
        baseline=method == "full",
        device=torch.device("cpu"),
        params=dict(users=users, length=length, method=method),
    )
