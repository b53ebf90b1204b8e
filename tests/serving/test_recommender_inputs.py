"""Bad input to the Recommender is an error naming what was wrong; exclude_seen and its bound."""

import pytest
import torch

from rec2pm.config import named_config
from rec2pm.methods import build_model
from rec2pm.serving import Recommender, UnknownUser

from .models import N_ITEMS, S, history, small_model


@pytest.fixture
def rec():
    torch.set_num_threads(1)
    return Recommender(small_model("rec2pm-o"), "memory://", device="cpu", seen_limit=3)


def test_unknown_users_are_named(rec):
    rec.observe(["known"], [[1, 2]])
    with pytest.raises(UnknownUser, match=r"no events stored for user\(s\) \['stranger'\]"):
        rec.recommend(["known", "stranger"], 3)


@pytest.mark.parametrize("item", [0, -3, N_ITEMS + 1, 2.0, True])
def test_items_outside_the_catalogue(rec, item):
    with pytest.raises(ValueError, match=f"user 'u': item id {item!r} is outside the catalogue 1..{N_ITEMS}"):
        rec.observe(["u"], [[1, item]])
    assert rec.store.get("u") is None  # nothing of the batch was stored


def test_malformed_batches(rec):
    with pytest.raises(ValueError, match="user 'a' more than once"):
        rec.observe(["a", "a"], [[1], [2]])
    with pytest.raises(ValueError, match="cu_seqlens must be 3 non-decreasing offsets"):
        rec.observe(["a", "b"], torch.tensor([1, 2, 3]), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="one sequence of item ids per user"):
        rec.observe(["a", "b"], [[1]])
    with pytest.raises(TypeError, match="a sequence of user ids"):
        rec.observe("a", [[1]])
    rec.observe(["a"], [[1]])
    with pytest.raises(ValueError, match="k must be an int in 1..40"):
        rec.recommend(["a"], 0)
    with pytest.raises(ValueError, match="memory_dtype must be one of"):
        Recommender(rec.model, "memory://", memory_dtype="fp64")
    with pytest.raises(ValueError, match="session_cache_bytes must be an int >= 0"):
        Recommender(rec.model, "memory://", session_cache_bytes=-1)


def test_a_model_without_memory_is_refused():
    model = build_model("full", named_config("sasrec-small", num_items=N_ITEMS))
    with pytest.raises(TypeError, match=r"keeps none"):
        Recommender(model, "memory://")
    with pytest.raises(TypeError, match="checkpoint path or a model"):
        Recommender(42, "memory://")


def test_observe_reports_events_and_segments(rec):
    result = rec.observe(
        ["a", "b", "c"], torch.arange(1, 2 * S + 3), torch.tensor([0, 2 * S + 1, 2 * S + 1, 2 * S + 2])
    )
    assert result.users == ["a", "b", "c"] and result.stored == [2 * S + 1, 0, 1] and result.archived == [2, 0, 0]
    assert rec.store.get("b") is None  # no events, no record


def test_exclude_seen_drops_recent_and_bounded_archived_ids(rec):
    events = history(2 * S + 2).tolist()
    rec.observe(["u"], [events])
    record = rec.store.get("u")
    assert len(record.seen) == 3 and record.seen_truncated  # seen_limit=3 of the archived ids, newest first
    assert record.seen[0] == events[2 * S - 1]
    items, scores = rec.recommend(["u"], N_ITEMS)
    excluded = set(record.recent) | set(record.seen)
    assert not excluded & set(items[0][torch.isfinite(scores[0])].tolist())
    assert (items[0][~torch.isfinite(scores[0])] == 0).all()  # fewer candidates than k: item 0, score -inf
    assert int(torch.isfinite(scores[0]).sum()) == N_ITEMS - len(excluded)
    everything, _ = rec.recommend(["u"], N_ITEMS, exclude_seen=False)
    assert sorted(everything[0].tolist()) == list(range(1, N_ITEMS + 1))


@pytest.mark.parametrize("retries", [0, -1, 2.0, True])
def test_max_retries_must_be_a_positive_int(retries):
    with pytest.raises(ValueError, match="max_retries must be an int >= 1"):
        Recommender(small_model("rec2pm-o"), "memory://", device="cpu", max_retries=retries)


def test_an_append_keeps_the_stored_memory_as_it_is_and_an_archive_writes_its_own_dtype():
    torch.set_num_threads(1)
    model = small_model("rec2pm-o")
    half = Recommender(model, "memory://", device="cpu", memory_dtype="fp16")
    half.observe(["u"], [history(S + 1).tolist()])
    stored = half.store.get("u")
    assert stored.memory_dtype == "fp16" and stored.archived_events == S
    full = Recommender(model, half.store, device="cpu", memory_dtype="fp32")
    full.observe(["u"], [[3]])  # no archive: the memory is not rewritten in fp32
    appended = full.store.get("u")
    assert (appended.memory_dtype, appended.memory) == (stored.memory_dtype, stored.memory)
    assert appended.recent == (*stored.recent, 3)
    full.observe(["u"], [[4] * S])  # an archive: the new memory in this Recommender's dtype
    assert full.store.get("u").memory_dtype == "fp32" and full.store.get("u").archived_events == 2 * S


def test_seen_limit_zero_drops_the_ids_another_writer_kept_at_the_next_archive(rec):
    rec.observe(["u"], [history(S + 1).tolist()])
    assert len(rec.store.get("u").seen) == 3
    none_kept = Recommender(rec.model, rec.store, device="cpu", seen_limit=0)
    none_kept.observe(["u"], [[5]])  # an append leaves the record's ids as they are
    assert len(none_kept.store.get("u").seen) == 3
    none_kept.observe(["u"], [[5] * S])
    assert none_kept.store.get("u").seen == () and none_kept.store.get("u").seen_truncated
