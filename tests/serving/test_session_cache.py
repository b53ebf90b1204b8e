"""The session K/V cache: only new events are stepped, bounded by bytes, invalidated by the store."""

from dataclasses import replace

import pytest
import torch

from rec2pm.serving import Recommender, Write

from .models import S, history, reference_scores, small_model


def counting(rec):
    """Count the events each engine call runs."""
    calls = {"step": [], "prefill": [], "score": []}
    step, prefill, score = rec.engine.step, rec.engine.prefill, rec.engine.score

    def counted_step(caches, seqlens, new_items, *args):
        calls["step"].append(sum(len(x) for x in new_items))
        return step(caches, seqlens, new_items, *args)

    def counted_prefill(memories, recents, *args):
        calls["prefill"].append(sum(len(x) for x in recents))
        return prefill(memories, recents, *args)

    def counted_score(memories, recents, *args):
        calls["score"].append(sum(len(x) for x in recents))
        return score(memories, recents, *args)

    rec.engine.step, rec.engine.prefill, rec.engine.score = counted_step, counted_prefill, counted_score
    return calls


@pytest.mark.parametrize("method", ["rec2pm-o", "kv-mask-o"])
def test_a_request_after_one_new_event_steps_only_that_event(method):
    torch.set_num_threads(1)
    rec = Recommender(small_model(method), "memory://", device="cpu")
    events = history(S + 4).tolist()
    rec.observe(["u"], [events[: S + 2]])
    calls = counting(rec)
    rec.scores(["u"])  # a miss: one prefill over the recent events
    assert calls == {"step": [], "prefill": [2], "score": []}
    for item in events[S + 2 :]:
        rec.observe(["u"], [[item]])
        rec.scores(["u"])
    assert calls == {"step": [1, 1], "prefill": [2], "score": []}
    answer = rec.scores(["u"])
    rec.recommend(["u"], k=3)  # sets the seen items' scores to -inf in its own copy
    # Nothing new: the entry's last answer, with no step; the same scores a step gives.
    assert torch.equal(rec.scores(["u"]), answer) and calls == {"step": [1, 1], "prefill": [2], "score": []}
    uncached = Recommender(rec.model, rec.store, session_cache_bytes=0, device="cpu")
    torch.testing.assert_close(rec.scores(["u"]), uncached.scores(["u"]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["rec2pm-o", "rec2pm-a", "kv-mask-o"])
def test_without_a_session_cache_a_request_keeps_no_caches(method):
    """With the cache off nothing would keep a prefill's K/V: each request is one pass
    without cache slots, and scores as a cached recommender's miss (a prefill) does."""
    torch.set_num_threads(1)
    model = small_model(method, "hstu-small")
    cached = Recommender(model, "memory://", device="cpu")
    uncached = Recommender(model, cached.store, session_cache_bytes=0, device="cpu")
    users = ["a", "b", "c"]
    cached.observe(users, [history(n, seed=i).tolist() for i, n in enumerate([2 * S + 3, S + 1, 4 * S])])
    calls = counting(uncached)
    for _ in range(2):
        torch.testing.assert_close(uncached.scores(users), cached.scores(users), rtol=0, atol=1e-5)
    assert calls == {"step": [], "prefill": [], "score": [3 + 1 + S] * 2}
    assert len(uncached.cache) == 0 and cached.cache.misses == 3


@pytest.mark.parametrize("method", ["rec2pm-o", "kv-mask-o"])
def test_an_entry_holds_room_for_the_next_events_and_grows_when_full(method):
    """A miss keeps slots for the next power of two of recent events (at least 16, at most
    S), not S: a hit that would not fit copies the entry into twice the slots instead of
    prefilling again, and scores as before."""
    torch.set_num_threads(1)
    segment_len = 40
    model = small_model(method, "hstu-small", segment_len=segment_len)
    cached = Recommender(model, "memory://", device="cpu")
    uncached = Recommender(model, cached.store, session_cache_bytes=0, device="cpu")
    streams = {"a": history(2 * segment_len, seed=1).tolist(), "b": history(2 * segment_len, seed=2).tolist()}
    fed = {"a": segment_len + 3, "b": segment_len + 20}  # one archive each; 3 and 20 recent
    cached.observe(["a", "b"], [streams[u][: fed[u]] for u in ("a", "b")])
    calls = counting(cached)
    torch.testing.assert_close(cached.scores(["a", "b"]), uncached.scores(["a", "b"]), rtol=0, atol=1e-5)
    recent_slots = {u: [cached.cache.get(u).capacity - cached.cache.get(u).memory_rows] for u in ("a", "b")}
    while fed["b"] < 2 * segment_len:  # b reaches S recent events, a 23
        cached.observe(["a", "b"], [[streams[u][fed[u]]] for u in ("a", "b")])
        fed = {u: n + 1 for u, n in fed.items()}
        torch.testing.assert_close(cached.scores(["a", "b"]), uncached.scores(["a", "b"]), rtol=0, atol=1e-5)
        for u in ("a", "b"):
            if cached.cache.get(u).capacity - cached.cache.get(u).memory_rows != recent_slots[u][-1]:
                recent_slots[u].append(cached.cache.get(u).capacity - cached.cache.get(u).memory_rows)
    assert recent_slots == {"a": [16, 32], "b": [32, segment_len]}
    assert calls["prefill"] == [3 + 20] and len(calls["step"]) == segment_len - 20


def test_hits_alone_and_in_a_batch_share_one_entry():
    """A user's hit alone steps over views of its entry and in a batch over a stacked copy
    that is written back: each must leave the entry holding every stepped event, so that
    alternating the two keeps the scores of an uncached recommender."""
    torch.set_num_threads(1)
    model = small_model("rec2pm-o", "hstu-small")
    cached = Recommender(model, "memory://", device="cpu")
    uncached = Recommender(model, cached.store, session_cache_bytes=0, device="cpu")
    streams = [history(S + 12, seed=i).tolist() for i in range(2)]
    cached.observe(["a", "b"], [s[: S + 2] for s in streams])
    for t in range(S + 2, S + 12):
        cached.observe(["a", "b"], [[s[t]] for s in streams])
        users = ["a", "b"] if t % 2 else ["a"]
        torch.testing.assert_close(cached.scores(users), uncached.scores(users), rtol=0, atol=1e-5)
    assert cached.cache.hits >= 7  # archives every S events rebuild the entries


@pytest.mark.parametrize("method", ["rec2pm-a", "kv-mask-o"])
def test_batched_hits_equal_uncached_scores(method):
    torch.set_num_threads(1)
    model = small_model(method, "hstu-small")
    cached = Recommender(model, "memory://", device="cpu")
    uncached = Recommender(model, cached.store, session_cache_bytes=0, device="cpu")
    users = ["a", "b", "c"]
    streams = [history(3 * S, seed=i).tolist() for i in range(3)]
    for t in range(3 * S):
        runs = [[s[t]] if (t + b) % 3 else [] for b, s in enumerate(streams)]  # ragged: not every user each time
        cached.observe(users, runs)
        if t >= 1:
            torch.testing.assert_close(cached.scores(users), uncached.scores(users), rtol=0, atol=1e-5)
    assert cached.cache.hits > 2 * len(users)


def test_the_cache_is_bounded_by_bytes():
    torch.set_num_threads(1)
    rec = Recommender(small_model("rec2pm-o"), "memory://", device="cpu")
    rec.observe(["a", "b"], [[1, 2], [3]])
    rec.scores(["a"])
    one_entry = rec.cache.nbytes
    assert one_entry > 0
    bounded = Recommender(rec.model, rec.store, session_cache_bytes=one_entry * 3 // 2, device="cpu")
    for user in ["a", "b", "a", "b"]:
        bounded.scores([user])
        assert bounded.cache.nbytes <= one_entry * 3 // 2 and len(bounded.cache) == 1
    assert bounded.cache.evictions == 3 and bounded.cache.hits == 0
    tiny = Recommender(rec.model, rec.store, session_cache_bytes=one_entry - 1, device="cpu")
    tiny.scores(["a", "b"])
    assert len(tiny.cache) == 0 and tiny.cache.nbytes == 0


def test_an_archive_drops_the_entry():
    torch.set_num_threads(1)
    rec = Recommender(small_model("rec2pm-o"), "memory://", device="cpu")
    rec.observe(["u"], [history(S).tolist()])
    rec.scores(["u"])
    assert rec.cache.get("u") is not None
    assert rec.observe(["u"], [[1]]).archived == [1]
    assert rec.cache.get("u") is None


@pytest.mark.parametrize("method", ["rec2pm-o", "kv-mask-o"])
def test_another_writer_archiving_is_seen(tmp_path, method):
    torch.set_num_threads(1)
    model = small_model(method)
    url = f"sqlite:///{tmp_path / 'm.db'}"
    server, writer = Recommender(model, url, device="cpu"), Recommender(model, url, device="cpu")
    events = history(2 * S + 1)
    server.observe(["u"], [events[: S - 1]])
    server.scores(["u"])  # cached on the first S - 1 events
    writer.observe(["u"], [events[S - 1 :]])  # archives behind the server's back
    ref, baseline = reference_scores(model, events, torch.tensor([0, len(events)]))
    from rec2pm_kernels.testing import assert_within_budget

    assert_within_budget("after another writer's archive", server.scores(["u"])[:, 1:], ref[:, 1:], baseline[:, 1:])


def test_a_rewritten_memory_with_the_same_counts_is_not_served_from_the_cache():
    torch.set_num_threads(1)
    rec = Recommender(small_model("rec2pm-o"), "memory://", device="cpu")
    rec.observe(["u"], [history(S + 2).tolist()])
    before = rec.scores(["u"])
    record = rec.store.get("u")
    memory = bytearray(record.memory)
    memory[:4] = b"\x00\x00\x80\x3f"  # the first float becomes 1.0: as a backfill by another encoder would
    rec.store.put_many([Write(replace(record, version=record.version + 1, memory=bytes(memory)), record.version)])
    after = rec.scores(["u"])
    fresh = Recommender(rec.model, rec.store, session_cache_bytes=0, device="cpu").scores(["u"])
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh, rtol=0, atol=1e-6)
