"""Memory bytes per user at the reference settings, backfill shares, and serving on CUDA."""

import pytest
import torch

from rec2pm.config import named_config
from rec2pm.methods import build_model
from rec2pm.serving import Recommender
from rec2pm.serving.backfill import encode_histories
from rec2pm.serving.record import CHECKSUM_BYTES, HEADER
from rec2pm_kernels.testing import assert_within_budget

from .models import SERVED, S, history, reference_scores, small_model

OVERHEAD = HEADER.size + CHECKSUM_BYTES


@pytest.mark.parametrize(
    "method, backbone, memory_bytes",
    [
        ("rec2pm-o", "sasrec", 4 * 64 * 4),  # C x d floats
        ("rec2pm-a", "sasrec", 4 * 4 * 64 * 4),  # every written block: 4 segments at 1k events
        ("kv-mask-o", "sasrec", 2 * 4 * 4 * 64 * 4),  # 2 x layers x C x d
        ("kv-mask-o", "hstu", 2 * 16 * 4 * 64 * 4),
    ],
)
def test_bytes_per_user_at_1k_events(method, backbone, memory_bytes):
    torch.set_num_threads(1)
    model = build_model(method, named_config(backbone, num_items=1000, dropout=0.0))
    rec = Recommender(model, "memory://", device="cpu", seen_limit=0)
    rec.backfill(["u"], torch.randint(1, 1001, (1000,)), torch.tensor([0, 1000]))
    record = rec.store.get("u")
    assert len(record.memory) == memory_bytes
    assert len(record.encode()) == OVERHEAD + memory_bytes + 4 * len(record.recent)
    assert len(record.recent) == 200 and record.archived_events == 800


def test_backfill_ranks_take_disjoint_shares():
    torch.set_num_threads(1)
    rec = Recommender(small_model("rec2pm-o"), "memory://", device="cpu")
    users = [f"u{i}" for i in range(7)]
    histories = [history(3 + i, seed=i) for i in range(7)]
    items, cu = torch.cat(histories), torch.tensor([0] + [len(h) for h in histories]).cumsum(0)
    shares = [encode_histories(rec, users, items, cu, batch_size=2, rank=r, world_size=3) for r in range(3)]
    assert [s["users"] for s in shares] == [3, 2, 2]
    assert rec.store.users() == sorted(users) and all(rec.store.get(u).version == 1 for u in users)
    with pytest.raises(ValueError, match=r"rank must be in 0..world_size-1 = 2, got 3"):
        encode_histories(rec, users, items, cu, rank=3, world_size=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", SERVED)
def test_serving_on_cuda_equals_the_model(method):
    model = small_model(method, "hstu-small")
    rec = Recommender(model, "memory://", device="cuda")
    events = history(3 * S + 2)
    for item in events.tolist():
        rec.observe(["u"], [[item]])
        got = rec.scores(["u"])
    ref, baseline = reference_scores(model.cpu(), events, torch.tensor([0, len(events)]))
    assert_within_budget(method, got.cpu()[:, 1:], ref[:, 1:], baseline[:, 1:])
