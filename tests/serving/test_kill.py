"""A writer SIGKILLed at random moments: acknowledged batches are all there, others all-or-nothing."""

import multiprocessing
import os
import random
import signal
import sqlite3
import time

from rec2pm.serving import open_store

from .kill_writer import expected_events, write
from .models import S

KILLS = 50


def committed_batches(url: str, last_ack: int) -> int:
    """How many batches the store holds: the acknowledged ones, or one more (committed, not yet
    acknowledged); every user's events must be exactly that prefix (no half batch)."""
    with open_store(url) as store:
        users = store.users()
        records = store.get_many(users)  # a torn or corrupt record raises here
    totals = {u: r.archived_events + len(r.recent) for u, r in records.items()}
    for n in (last_ack + 1, last_ack + 2):
        expected = expected_events(n)
        if totals == {u: len(e) for u, e in expected.items()} and all(
            list(records[u].recent) == expected[u][records[u].archived_events :] for u in expected
        ):
            return n
    raise AssertionError(
        f"after acknowledging batch {last_ack}, the store holds {totals}, which is neither "
        f"{last_ack + 1} nor {last_ack + 2} whole batches"
    )


def test_sigkill_during_observe_and_archive(tmp_path):
    path = tmp_path / "kill.db"
    url = f"sqlite:///{path}"
    # A fresh process that never ran torch, forked per writer; it imports what a first kernel call
    # would import (torch._dynamo: over a second) once, so every writer starts working at once.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        ["torch", "torch._dynamo", "rec2pm.serving.recommender", "tests.serving.kill_writer"]
    )
    rng = random.Random(0)
    start, unacknowledged_commits = 0, 0
    for _ in range(KILLS):
        parent, child = context.Pipe()
        writer = context.Process(target=write, args=(url, start, child), daemon=True)
        writer.start()
        child.close()
        assert parent.poll(60) and parent.recv() == ("ready", start)
        deadline, last_ack = time.monotonic() + rng.uniform(0.01, 0.3), start - 1
        while time.monotonic() < deadline:
            if parent.poll(0.005):
                last_ack = parent.recv()[1]
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(10)
        last_ack = drain(parent, last_ack)  # acknowledgements sent before the kill
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        start = committed_batches(url, last_ack)
        unacknowledged_commits += start - (last_ack + 1)
    with open_store(url) as store:
        archived = [r.archived_events for r in store.get_many(store.users()).values()]
    print(f"{KILLS} kills, {start} batches committed, {unacknowledged_commits} committed but not acknowledged")
    assert start > 2 * KILLS  # the writers got work done between kills
    assert min(archived) >= 2 * S  # and archived segments on the way


def drain(connection, last_ack: int) -> int:
    while True:
        try:
            if not connection.poll():
                break
            last_ack = connection.recv()[1]
        except EOFError:  # the writer is gone
            break
    connection.close()
    return last_ack
