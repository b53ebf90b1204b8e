"""The writer of the kill test: observes deterministic batches and acknowledges each commit."""

from __future__ import annotations

NUM_USERS, USERS_PER_BATCH, EVENTS_PER_USER = 7, 3, 2


def batch(i: int) -> tuple[list[str], list[list[int]]]:
    users = [f"u{(i * USERS_PER_BATCH + j) % NUM_USERS}" for j in range(USERS_PER_BATCH)]
    return users, [[1 + (i * 7 + j * 3 + e) % 40 for e in range(EVENTS_PER_USER)] for j in range(USERS_PER_BATCH)]


def expected_events(batches: int) -> dict[str, list[int]]:
    """Every user's events after batches ``0..batches-1``."""
    out: dict[str, list[int]] = {}
    for i in range(batches):
        for user, events in zip(*batch(i), strict=True):
            out.setdefault(user, []).extend(events)
    return out


def write(url: str, start: int, connection) -> None:
    import torch

    torch.set_num_threads(1)
    from rec2pm.serving import Recommender

    from .models import small_model

    rec = Recommender(small_model("rec2pm-o"), url, device="cpu", session_cache_bytes=0)
    connection.send(("ready", start))
    i = start
    while True:
        rec.observe(*batch(i))
        connection.send(("ack", i))  # only after the commit returned
        i += 1
