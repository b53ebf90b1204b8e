"""A writer of the concurrency tests: one event per shared user per call."""

from __future__ import annotations

USERS = ["x", "y", "z"]


def observe_many(url: str, worker: int, calls: int, model=None) -> int:
    """``model``: shared by threads (building one per thread would race on the global seed)."""
    import torch

    torch.set_num_threads(1)
    from rec2pm.serving import Recommender

    from .models import small_model

    rec = Recommender(model or small_model("rec2pm-o"), url, device="cpu", session_cache_bytes=0)
    for call in range(calls):
        rec.observe(USERS, [[1 + (worker * 13 + call) % 40]] * len(USERS))
        rec.recommend(USERS, 3)
    rec.close()
    return calls
