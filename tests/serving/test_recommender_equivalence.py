"""observe event by event, then recommend == the model's own iterative serving path."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rec2pm.serving import Recommender
from rec2pm_kernels.testing import assert_within_budget

from .models import SERVED, S, history, reference_scores, small_model


def check_scores(name, rec, users, histories, model):
    lengths = [len(h) for h in histories]
    items = torch.cat(histories)
    cu = torch.tensor([0] + lengths).cumsum(0)
    ref, baseline = reference_scores(model, items, cu)
    assert_within_budget(name, rec.scores(users)[:, 1:], ref[:, 1:], baseline[:, 1:])


@pytest.mark.parametrize("cache_bytes", [0, 1 << 22], ids=["no-cache", "cache"])
@pytest.mark.parametrize("backbone", ["sasrec-small", "hstu-small"])
@pytest.mark.parametrize("method", SERVED)
def test_event_by_event_equals_score_history(method, backbone, cache_bytes):
    torch.set_num_threads(1)
    model = small_model(method, backbone)
    events = history(3 * S + 3)
    rec = Recommender(model, "memory://", session_cache_bytes=cache_bytes, device="cpu")
    for t in range(len(events)):
        result = rec.observe(["u"], [[int(events[t])]])
        assert result.stored == [1] and result.archived == [int(t >= S and t % S == 0)]
        if t in (0, S - 1, S, S + 1, 2 * S + 2, len(events) - 1):  # around the archive boundaries
            check_scores(f"{method} after {t + 1} events", rec, ["u"], [events[: t + 1]], model)
    if cache_bytes:
        assert rec.cache.hits > 0


@pytest.mark.parametrize("method", SERVED)
def test_ragged_batches_crossing_several_boundaries(method):
    torch.set_num_threads(1)
    model = small_model(method, "hstu-small")
    users = ["a", "b", "c", 4]
    full = [history(n, seed=i) for i, n in enumerate([3 * S + 1, 1, 2 * S, S + 2])]
    rec = Recommender(model, "memory://", device="cpu")
    fed = [0] * len(users)
    for chunk in ([2 * S + 1, 1, 3, 0], [S, 0, 2 * S - 3, S + 2]):  # several segments per user per call
        runs = [full[u][fed[u] : fed[u] + n] for u, n in enumerate(chunk)]
        lengths = [len(r) for r in runs]
        result = rec.observe(users, torch.cat(runs), torch.tensor([0] + lengths).cumsum(0))
        assert result.stored == lengths
        fed = [f + n for f, n in zip(fed, lengths, strict=True)]
    assert fed == [len(h) for h in full]
    check_scores(method, rec, users, full, model)
    items, scores = rec.recommend(users, k=5, exclude_seen=False)
    assert items.shape == (4, 5) and bool((scores[:, :-1] >= scores[:, 1:]).all())


@pytest.mark.parametrize("method", SERVED)
def test_reopening_the_sqlite_file(tmp_path, method):
    torch.set_num_threads(1)
    model = small_model(method)
    url = f"sqlite:///{tmp_path / 'm.db'}"
    events = history(2 * S + 3)
    first = Recommender(model, url, device="cpu")
    first.observe(["u"], [events[: S + 2]])
    first.recommend(["u"], 3)  # warm its session cache, then drop everything in memory
    first.close()
    second = Recommender(model, url, device="cpu")
    for t in range(S + 2, len(events)):
        second.observe(["u"], [[int(events[t])]])
    check_scores(method, second, ["u"], [events], model)


def test_restart_of_the_process(tmp_path):
    """A child process observes and exits; this one reads its store and goes on."""
    torch.set_num_threads(1)
    model = small_model("rec2pm-o")
    checkpoint = tmp_path / "model.pt"
    torch.save(model.state_dict(), checkpoint)
    url = f"sqlite:///{tmp_path / 'm.db'}"
    events = history(2 * S + 2)
    child = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from tests.serving.models import small_model
        from rec2pm.serving import Recommender
        model = small_model("rec2pm-o")
        model.load_state_dict(torch.load({str(checkpoint)!r}, weights_only=True))
        rec = Recommender(model, {url!r}, device="cpu")
        for item in {events[: S + 3].tolist()}:
            rec.observe(["u"], [[item]])
        print(rec.recommend(["u"], 3)[0].tolist())
    """)
    subprocess.run(
        [sys.executable, "-c", child],
        check=True,
        timeout=120,
        capture_output=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    rec = Recommender(model, url, device="cpu")
    assert rec.store.get("u").archived_events == S
    rec.observe(["u"], [events[S + 3 :]])
    check_scores("after a restart", rec, ["u"], [events], model)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_memories_serve_the_same_with_and_without_cache(dtype):
    torch.set_num_threads(1)
    model = small_model("rec2pm-o")
    events = history(2 * S + 2)
    cached = Recommender(model, "memory://", memory_dtype=dtype, device="cpu")
    for item in events.tolist():
        cached.observe(["u"], [[item]])
        got = cached.scores(["u"])
    uncached = Recommender(model, cached.store, memory_dtype=dtype, session_cache_bytes=0, device="cpu")
    torch.testing.assert_close(got, uncached.scores(["u"]), rtol=0, atol=1e-5)
    assert cached.store.get("u").memory_dtype == dtype
    ref, _ = reference_scores(model, events, torch.tensor([0, len(events)]))
    assert (got[:, 1:] - ref[:, 1:]).abs().max() < 0.05 * ref[:, 1:].abs().max()  # rounded memory, close


@pytest.mark.parametrize("method", ["rec2pm-o", "kv-mask-o"])
def test_a_redis_store_serves_like_the_model(redis_url, method):
    torch.set_num_threads(1)
    model = small_model(method, "hstu-small")
    events = history(2 * S + 3)
    writer = Recommender(model, redis_url, device="cpu")
    for item in events[: S + 1].tolist():
        writer.observe(["u"], [[item]])
    reader = Recommender(model, redis_url, device="cpu")  # another process would see the same
    reader.observe(["u"], [events[S + 1 :]])
    check_scores(method, reader, ["u"], [events], model)
    check_scores(method, writer, ["u"], [events], model)
