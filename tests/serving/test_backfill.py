"""Backfill: Recommender.backfill and ``python -m rec2pm encode`` write what observe would."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rec2pm.cli import main
from rec2pm.serving import CorruptRecord, FingerprintMismatch, Recommender, open_store
from rec2pm.training import load_checkpoint

from .models import SERVED, S, history, small_model


def packed(histories):
    return torch.cat(histories), torch.tensor([0] + [len(h) for h in histories]).cumsum(0)


@pytest.mark.parametrize("method", SERVED)
def test_iterative_backfill_equals_observing_event_by_event(method):
    torch.set_num_threads(1)
    model = small_model(method, "hstu-small")
    histories = [history(n, seed=n) for n in (1, S, S + 1, 3 * S + 2)]
    users = ["a", "b", "c", "d"]
    filled = Recommender(model, "memory://", device="cpu")
    result = filled.backfill(users, *packed(histories))
    assert result.stored == [1, S, S + 1, 3 * S + 2] and result.archived == [0, 0, 1, 3]
    observed = Recommender(model, "memory://", device="cpu")
    for t in range(max(len(h) for h in histories)):
        observed.observe(users, [h[t : t + 1] for h in histories])
    for user in users:
        a, b = filled.store.get(user), observed.store.get(user)
        assert (a.archived_events, a.recent, a.seen, a.memory_rows) == (
            b.archived_events,
            b.recent,
            b.seen,
            b.memory_rows,
        )
    torch.testing.assert_close(filled.scores(users), observed.scores(users), rtol=0, atol=1e-5)


def test_one_shot_backfill_serves_the_one_shot_scores():
    torch.set_num_threads(1)
    model = small_model("rec2pm-o")
    histories = [history(3 * S + 1, seed=1), history(S - 1, seed=2)]
    rec = Recommender(model, "memory://", device="cpu")
    rec.backfill(["a", "b"], *packed(histories), iterative=False)
    items, cu = packed(histories)
    with torch.no_grad():
        ref = model.score_history(items, cu)
        iterative = model.score_history(items, cu, iterative=True)
    torch.testing.assert_close(rec.scores(["a", "b"]), ref, rtol=0, atol=1e-5)
    assert not torch.allclose(ref, iterative)  # the two encodings differ, so the check above means something


def test_backfill_replaces_another_models_and_corrupt_records():
    torch.set_num_threads(1)
    store = open_store("memory://")
    old = Recommender(small_model("rec2pm-o", seed=1), store, device="cpu")
    old.observe(["a", "b"], [[1, 2, 3], [4]])
    store.corrupt_for_tests("b")
    new = Recommender(small_model("rec2pm-o", seed=2), store, device="cpu")
    with pytest.raises(FingerprintMismatch, match=old.fingerprint) as info:
        new.recommend(["a"], 3)
    assert new.fingerprint in str(info.value)
    with pytest.raises(CorruptRecord, match="'b'"):
        new.recommend(["b"], 3)
    new.backfill(["a", "b"], *packed([history(2 * S), history(3)]))
    assert new.recommend(["a", "b"], 3)[0].shape == (2, 3)
    assert store.get("a").version == 2 and store.get("a").fingerprint == new.fingerprint


def test_cli_encode_writes_every_user(tmp_path, checkpoint, capsys):
    torch.set_num_threads(1)
    url = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["encode", str(checkpoint), "--store", url, "--batch-size", "5", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["users"] == 12 and summary["events"] == 12 * 14 and summary["segments"] == 12 * 3
    rec = Recommender(checkpoint, url, device="cpu")
    assert len(rec.store.users()) == 12
    ckpt = load_checkpoint(checkpoint)
    assert rec.store.get(rec.store.users()[0]).archived_events == 12
    items, scores = rec.recommend(rec.store.users()[:2], 5)
    assert items.shape == (2, 5) and bool(torch.isfinite(scores).all())
    assert ckpt["num_items"] == 30


@pytest.mark.parametrize(
    "args, message",
    [
        (["--store", "ftp://x"], "unknown scheme 'ftp'"),
        (["--store", "sqlite:///no/such/dir/m.db"], "does not exist"),
    ],
)
def test_cli_encode_errors_name_what_was_wrong(checkpoint, capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(["encode", str(checkpoint), "--no-progress", *args])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_cli_encode_names_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["encode", str(tmp_path / "none.pt"), "--store", "memory://"])
    assert "none.pt" in capsys.readouterr().err


def _json_objects(text: str) -> list[dict]:
    """Every JSON object in ``text``, wherever lines break: two ranks share one stdout."""
    decoder, objects, start = json.JSONDecoder(), [], text.find("{")
    while start != -1:
        obj, end = decoder.raw_decode(text, start)
        objects.append(obj)
        start = text.find("{", end)
    return objects


@pytest.mark.slow
def test_cli_encode_under_torchrun_writes_sqlite_through_rank_0(tmp_path, checkpoint, capsys):
    """Two ranks encode disjoint halves; rank 0 alone commits both to the SQLite file, and the
    records equal a one-process backfill's."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    single = f"sqlite:///{tmp_path / 'single.db'}"
    assert main(["encode", str(checkpoint), "--store", single, "--batch-size", "5", "--no-progress"]) == 0
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    result = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "rec2pm",
            "encode",
            str(checkpoint),
            "--store",
            shared,
            "--batch-size",
            "2",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summaries = _json_objects(result.stdout)
    assert sorted(s["rank"] for s in summaries) == [0, 1]
    assert {s["writer"] for s in summaries} == {"rank 0"} and sum(s["users"] for s in summaries) == 12
    one, two = open_store(single), open_store(shared)
    assert one.users() == two.users() and len(two.users()) == 12
    for user in one.users():
        a, b = one.get(user), two.get(user)
        assert (a.version, a.memory, a.recent, a.archived_events) == (b.version, b.memory, b.recent, b.archived_events)
