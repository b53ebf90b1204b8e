"""Serving: per-request latency of Rec2PM-O against Full recomputation, Recent-only and
KV-Mask-O (the same weights), cold (read from a SQLite store, no session cache: one
forward pass), miss (session cache on, the user not in it: store read and a prefill that
keeps the K/V), hot (session cache: the cached step over the last event, what a request
after one new event costs) and repeat (session cache, no new event: the entry's last
answer);
the archive cost of one segment (divide by S for the cost per event); and the store's
get_many / put_many.

Quick mode: SASRec and HSTU reference configs, L = 1,000 events, B = 1, recent = S (the
worst case) and, for HSTU, S/2 (the average: a user's recent events run from 1 to S
between archives).  Full mode adds L = 4,000 and 16,000, recent = S/2 for SASRec, and
B = 64 (SASRec at 16k only).
Redis rows run when ``REC2PM_TEST_REDIS_URL`` names a server (``scripts/services.sh start``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from functools import lru_cache

import pytest
import torch

from rec2pm.config import named_config
from rec2pm.methods import build_model
from rec2pm.serving import Recommender, Write, open_store
from rec2pm.serving.record import UserRecord, user_key
from rec2pm.toy_data import toy_histories

from .harness.kernel_options import kernel_options

NUM_ITEMS = 10_000
S = 200
# Timed calls of a latency case (served requests and store operations; the Full baseline
# keeps the mode's rounds): enough for a p99 by nearest rank to be more than the maximum.
LATENCY_ROUNDS = {"quick": 100, "full": 300}
# Timed calls of the Full and Recent-only baselines up to 4,000 events: every ratio of a
# group divides by the Full median, and a median of the mode's 3 rounds moves with whatever
# else the machine does; at 16k the mode's rounds (one Full call takes seconds).
BASELINE_ROUNDS = 20
CPU = torch.device("cpu")


def cases(mode: str):
    out = [(b, 1000, S, 1) for b in ("sasrec", "hstu")] + [("hstu", 1000, S // 2, 1)]
    if mode == "full":
        out += [(b, 4000, S, 1) for b in ("sasrec", "hstu")] + [("sasrec", 1000, S // 2, 1)]
        out += [("sasrec", 16000, S, 1), ("sasrec", 1000, S, 64), ("hstu", 1000, S, 64)]
    return out


@lru_cache(maxsize=4)
def weights(backbone: str):
    torch.manual_seed(0)
    return (
        build_model("rec2pm-o", named_config(backbone, num_items=NUM_ITEMS, dropout=0.0, kernels=kernel_options()))
        .eval()
        .state_dict()
    )


def model_of(method: str, backbone: str):
    model = build_model(
        method, named_config(backbone, num_items=NUM_ITEMS, dropout=0.0, kernels=kernel_options())
    ).eval()
    missing, unexpected = model.load_state_dict(weights(backbone), strict=False)
    assert set(missing) | set(unexpected) <= {"write_tokens"}, (missing, unexpected)
    return model


def histories(length: int, recent: int, users: int):
    return toy_histories(users, length - S + recent, NUM_ITEMS)


@lru_cache(maxsize=2)
def served(method: str, backbone: str, length: int, recent: int, users: int, cached: bool):
    folder = tempfile.mkdtemp(prefix="rec2pm-bench-")  # removed at exit
    atexit.register(shutil.rmtree, folder, True)
    rec = Recommender(
        model_of(method, backbone),
        f"sqlite:///{folder}/memories.db",
        device="cpu",
        session_cache_bytes=(1 << 30) if cached else 0,
    )
    items, cu = histories(length, recent, users)
    rec.backfill(list(range(users)), items, cu)
    return rec


def pytest_generate_tests(metafunc):
    if "serving_case" in metafunc.fixturenames:
        mode = metafunc.config.getoption("--bench-mode")
        metafunc.parametrize("serving_case", cases(mode), ids=[f"{b}-L{L}-r{r}-B{n}" for b, L, r, n in cases(mode)])


REQUESTS = [
    "full",
    "recent",
    "rec2pm-o cold",
    "rec2pm-o miss",
    "rec2pm-o hot",
    "rec2pm-o repeat",
    "kv-mask-o cold",
    "kv-mask-o hot",
]


@pytest.mark.parametrize("request_kind", REQUESTS)
def test_request(measure, bench_mode, one_thread, serving_case, request_kind):
    backbone, length, recent, users = serving_case
    group = f"serving request {backbone} L={length} recent={recent} B={users} (cold: store + forward)"
    params = {"backbone": backbone, "length": length, "recent": recent, "users": users, "kind": request_kind}
    if request_kind in ("full", "recent"):
        model = model_of(request_kind, backbone)
        items, cu = histories(length, recent, users)

        def call():
            with torch.no_grad():
                return model.score_history(items, cu)
    else:
        method, temperature = request_kind.split()
        rec = served(method, backbone, length, recent, users, temperature != "cold")
        ids = list(range(users))
        rec.scores(ids)  # a hot user's K/V is in the session cache before timing starts

        def call():
            for user in ids:
                if temperature == "miss":  # dropped from the session cache: the request prefills it again
                    rec.cache.invalidate(user_key(user))
                elif temperature == "hot":  # the entry forgets its last event: one event is stepped
                    entry = rec.cache.get(user_key(user))
                    entry.cached_items = entry.cached_items[:-1]
            return rec.scores(ids)

    measure(
        call,
        group=group,
        name=request_kind,
        baseline=request_kind == "full",
        device=CPU,
        params=params,
        rounds=(None if length > 4000 else BASELINE_ROUNDS)
        if request_kind in ("full", "recent")
        else LATENCY_ROUNDS[bench_mode],
    )


@pytest.mark.parametrize("method", ["rec2pm-o", "kv-mask-o"])
@pytest.mark.parametrize("backbone", ["sasrec", "hstu"])
def test_archive_cost(measure, one_thread, method, backbone):
    """One segment archived for B = 1 (divide by S for the cost per event)."""
    rec = served(method, backbone, 1000, S, 1, False)
    memory = rec._memory_tensor(rec.store.get(0))
    segment = [list(range(1, S + 1))]

    def call():
        with torch.no_grad():
            return rec.engine.archive([memory], segment, [4])

    measure(
        call,
        group=f"archive one segment (S={S}) {backbone}",
        name=method,
        baseline=method == "rec2pm-o",
        device=CPU,
        params={"method": method, "backbone": backbone, "per_event": "divide by 200"},
    )


def store_urls(tmp_path):
    urls = {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path / 'bench.db'}"}
    if os.environ.get("REC2PM_TEST_REDIS_URL"):
        urls["redis"] = os.environ["REC2PM_TEST_REDIS_URL"]
    return urls


def bench_record(user, version):
    return UserRecord(
        user=str(user),
        version=version,
        archived_events=1000,
        recent=tuple(range(1, 101)),
        memory=bytes(4 * 64 * 4),
        memory_rows=4,
        memory_width=64,
        memory_dtype="fp32",
        fingerprint="0" * 32,
    )


@pytest.mark.parametrize("users", [1, 64])
@pytest.mark.parametrize("operation", ["get_many", "put_many"])
@pytest.mark.parametrize("engine", ["memory", "sqlite", "redis"])
def test_store(measure, bench_mode, tmp_path, engine, operation, users):
    urls = store_urls(tmp_path)
    if engine not in urls:
        pytest.skip("REC2PM_TEST_REDIS_URL is not set (bash scripts/services.sh start)")
    store = open_store(urls[engine])
    keys = [f"bench-{engine}-{u}" for u in range(users)]
    current = {k: (store.versions([k]).get(k, 0)) for k in keys}
    store.put_many([Write(bench_record(k, current[k] + 1), current[k]) for k in keys])
    current = {k: v + 1 for k, v in current.items()}

    if operation == "get_many":

        def call():
            return store.get_many(keys)
    else:

        def call():
            store.put_many([Write(bench_record(k, current[k] + 1), current[k]) for k in keys])
            for k in keys:
                current[k] += 1

    measure(
        call,
        group=f"store {operation} {users} users (C=4, d=64 fp32, 100 recent)",
        name=engine,
        baseline=engine == "memory",
        device=CPU,
        params={"engine": engine, "users": users},
        rounds=LATENCY_ROUNDS[bench_mode],
    )
    store.close()
