"""Several threads and processes observing the same users through one store: nothing lost."""

import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from rec2pm.serving import MemoryStore, Recommender, open_store

from .concurrent_writer import USERS, observe_many
from .models import small_model

CALLS = 12


def check_totals(url: str, writers: int) -> None:
    with open_store(url) as store:
        records = store.get_many(USERS)
    for user in USERS:
        record = records[user]
        assert record.archived_events + len(record.recent) == writers * CALLS, (user, record)
        assert record.version >= writers * CALLS  # one write per event, never overwritten


@pytest.fixture(params=["sqlite", "redis"])
def shared_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}?busy_timeout_ms=60000"
    return request.getfixturevalue("redis_url")


def test_threads(shared_url):
    writers = 4
    model = small_model("rec2pm-o")
    with ThreadPoolExecutor(writers) as pool:
        # list() raises what a thread raised.
        done = list(pool.map(lambda w: observe_many(shared_url, w, CALLS, model), range(writers)))
    assert done == [CALLS] * writers
    check_totals(shared_url, writers)


def test_processes(shared_url):
    writers = 3
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        ["torch", "torch._dynamo", "rec2pm.serving.recommender", "tests.serving.concurrent_writer"]
    )
    with context.Pool(writers) as pool:
        done = pool.starmap(observe_many, [(shared_url, w, CALLS) for w in range(writers)])
    assert done == [CALLS] * writers
    check_totals(shared_url, writers)


class Interleaved(MemoryStore):
    """Delegates to ``inner``; runs ``before_put`` once, just before the first batch is written."""

    def __init__(self, inner, before_put):
        self.inner, self.url, self.before_put = inner, inner.url, before_put

    def _get_blobs(self, keys):
        return self.inner._get_blobs(keys)

    def _put(self, writes):
        if self.before_put is not None:
            hook, self.before_put = self.before_put, None
            hook()
        return self.inner._put(writes)

    def users(self):
        return self.inner.users()


def test_two_writers_appending_the_same_event_keep_both(tmp_path):
    model = small_model("rec2pm-o")
    url = f"sqlite:///{tmp_path / 'm.db'}"
    first = Recommender(model, url, device="cpu")
    first.observe(["u"], [[3]])
    second = Recommender(model, Interleaved(open_store(url), lambda: first.observe(["u"], [[7]])), device="cpu")
    second.observe(["u"], [[7]])  # read version 1, then the first writer committed the same event
    assert first.store.get("u").recent == (3, 7, 7)


def test_a_request_is_not_held_up_by_a_writer_waiting_on_the_store(tmp_path):
    rec = Recommender(small_model("rec2pm-o"), f"sqlite:///{tmp_path / 'm.db'}", device="cpu")
    rec.observe(["a", "b"], [[1, 2], [3]])
    waiting, release = threading.Event(), threading.Event()
    put_many = rec.store.put_many

    def slow_put_many(writes):  # as a writer queued on another process's write lock
        waiting.set()
        assert release.wait(30)
        return put_many(writes)

    rec.store.put_many = slow_put_many
    with ThreadPoolExecutor(1) as pool:
        writer = pool.submit(rec.observe, ["a"], [[4]])
        assert waiting.wait(30)
        items, _ = rec.recommend(["b"], 3)  # answered while the write waits
        assert items.shape == (1, 3) and not writer.done()
        release.set()
        assert writer.result(30).stored == [1]
    assert rec.store.get("a").recent == (1, 2, 4)
