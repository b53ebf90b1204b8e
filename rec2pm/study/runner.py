"""Run the study's runs one after another, each resumable, each leaving one small JSON file.

A run trains in ``work_dir/<name>/`` with the training loop's exact resume (an interrupted
run continues from its last epoch), then ranks every user's test item with the best
model and writes ``results_dir/<name>.json`` atomically.  A run whose result file exists
is skipped, so ``python -m rec2pm study run`` can be stopped and restarted at any time;
a result file written under a different configuration is an error, never silently kept.

Several ``study run`` processes may share one results folder (one per core, say): a
process claims a run with an exclusive ``claim`` file in the run's work folder, and the
others pass it by while its owner is alive.  A claim whose process has died is taken
over, and the run resumes from its last checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..data import leave_one_out
from ..evaluation import metrics_from_ranks, recording_top_items
from ..methods import TokenMemoryModel
from ..run_config import DEFAULTS, check_planted_comparable
from ..training import evaluation_set, generate, keep_last, load_data, load_evaluation, train
from .baselines import COUNT_BASELINES, count_scorer
from .efficiency import request_ms, request_users, state_bytes
from .grid import StudyRun

RESULT_FORMAT = 1
# Suffix of the per-user results of Full scored on only its last S events (format 1 gained it
# during the study; the report uses the runs that have it).
RECENT_WINDOW = "_recent_window"
BEST_K = 10  # the cut-off of the planted signal's best achievable metrics


def comparable_run(run: dict) -> dict:
    """The run config without the settings that do not change the result (where, how loudly),
    with every data and train key a later version added at its default (a default keeps the
    earlier behaviour, so results written before the key existed stay valid)."""
    run = copy.deepcopy(run)
    for table in ("data", "train"):
        run[table] = {**DEFAULTS[table], **run.get(table, {})}
    for key in ("out_dir", "progress", "threads", "device"):
        run["train"].pop(key, None)
    return run


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def _rounded(values: torch.Tensor, digits: int = 5) -> list[float]:
    return [round(float(v), digits) for v in values.tolist()]


def planted(run: dict):
    """The ``LifelongPlan`` behind the generated data of a run config."""
    check_planted_comparable(run, "comparing with the planted signal")
    return generate(run["data"])[1]


def run_one(spec: StudyRun, work_dir: Path, *, threads: int = 0) -> dict:
    """Train (or resume) ``spec`` in ``work_dir``, or count for a count baseline, and return
    its result record."""
    if spec.labels["method"] in COUNT_BASELINES:
        return _count_baseline(spec)
    run = copy.deepcopy(spec.run)
    run["train"].update(out_dir=str(work_dir), threads=threads, progress=False)
    summary = train(run, resume=True)
    if summary.get("interrupted"):
        raise RuntimeError(f"{spec.name}: training stopped early (train.stop_after_steps)")
    evaluation = load_evaluation(work_dir / "best.pt")
    model = evaluation.model
    modes = {"": model.score_history}
    if isinstance(model, TokenMemoryModel):
        # Serving archives segment by segment, so iterative memories are the main result.
        modes = {
            "": lambda items, cu: model.score_history(items, cu, iterative=True),
            "_one_shot": lambda items, cu: model.score_history(items, cu, iterative=False),
        }
    elif spec.labels["method"] == "full" and not evaluation.times:
        # Does Full use what lies beyond the recent window?  The same model reads only its
        # last S events: if that scores as well, a memory method's lead over Full says
        # nothing about what its memory keeps.
        window = model.config.segment_len
        modes[RECENT_WINDOW] = lambda items, cu: model.score_history(*keep_last(items, cu, window))
    record = _evaluate(spec, evaluation, modes)
    sample = request_users(evaluation.cu_seqlens.diff())
    record.update(
        efficiency={
            "state_bytes_per_user": float(state_bytes(model, evaluation.items, evaluation.cu_seqlens).double().mean()),
            "request_ms": round(request_ms(model, evaluation.items, evaluation.cu_seqlens, sample), 3),
            "request_users": len(sample),
        },
        train={k: summary[k] for k in ("best_epoch", "best_valid", "steps", "wall_s")},
    )
    return record


def _count_baseline(spec: StudyRun) -> dict:
    data = load_data(spec.run["data"])
    evaluation = evaluation_set(spec.run, data, None)
    score = count_scorer(spec.labels["method"], leave_one_out(data).train.items, data.num_items)
    record = _evaluate(spec, evaluation, {"": score})
    record.update(
        efficiency={"state_bytes_per_user": 0.0, "request_ms": 0.0, "request_users": 0},
        train={"best_epoch": -1, "best_valid": None, "steps": 0, "wall_s": 0.0},
    )
    return record


def _evaluate(spec: StudyRun, evaluation, modes: dict) -> dict:
    """Per-user ranks (and expected metrics on generated data) under each scorer of ``modes``."""
    started = time.perf_counter()
    run = evaluation.run
    users: dict[str, list] = {"history_length": evaluation.seen_cu_seqlens.diff().tolist()}
    record = {"format": RESULT_FORMAT, "name": spec.name, "group": spec.group, "labels": spec.labels}
    plan = planted(run) if run["data"]["kind"] == "synthetic" else None
    for suffix, score_fn in modes.items():
        score, tops = recording_top_items(score_fn, BEST_K)
        ranks = evaluation.ranks(score)
        users[f"ranks{suffix}"] = ranks.tolist()
        record[f"metrics{suffix}"] = metrics_from_ranks(ranks)
        if plan is not None:
            # The expected metrics under the planted distribution: no target-sampling noise.
            for metric, values in plan.expected_metrics(torch.cat(tops)).items():
                users[f"expected_{metric}{suffix}"] = _rounded(values)
    if plan is not None:
        best_hr, best_ndcg = plan.best_per_user(BEST_K)
        users[f"best_HR@{BEST_K}"], users[f"best_NDCG@{BEST_K}"] = _rounded(best_hr), _rounded(best_ndcg)
    record.update(
        users=users,
        eval_s=round(time.perf_counter() - started, 3),
        run=comparable_run(spec.run),
        environment=environment(),
    )
    return record


def write_json_atomically(record: dict | int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def read_result(path: Path) -> dict:
    """One result file, checked for the fields the report reads (errors name the file)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable study result ({exc})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: not a study result (a JSON {type(record).__name__}, not an object)")
    missing = [key for key in ("format", "name", "group", "labels", "metrics", "users", "run") if key not in record]
    if missing:
        raise ValueError(f"{path}: not a study result (missing {missing})")
    if record["format"] != RESULT_FORMAT:
        raise ValueError(f"{path}: result format {record['format']!r}, this version reads {RESULT_FORMAT}")
    return record


def claim(work_dir: Path) -> bool:
    """Claim the run in ``work_dir`` for this process; False while another live process holds it.

    Every claimant decides under one lock (``claim.lock``, released with its file), and a
    claim file is written whole (a temporary file renamed into place): an empty claim file,
    seen between its creation and its pid, read as a dead owner's, and two processes that
    both found a dead owner's claim both took it over."""
    import fcntl  # POSIX only, as the study's process pool is

    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / "claim"
    with open(work_dir / "claim.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            owner = int(path.read_text())
        except (OSError, ValueError):  # no claim, or one that names no process
            owner = 0
        if owner and owner != os.getpid() and _alive(owner):
            return False
        write_json_atomically(os.getpid(), path)  # a dead owner's claim is replaced, never left half written
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


def run_study(
    runs: Iterable[StudyRun],
    *,
    results_dir: str | Path,
    work_dir: str | Path,
    threads: int = 0,
    say: Callable[[str], None] = print,
) -> dict[str, int]:
    """Run every run without a result file; returns ``{"done": n, "skipped": n, "claimed": n}``
    (``claimed``: runs another live process is working on)."""
    results_dir, work_dir = Path(results_dir), Path(work_dir)
    counts = {"done": 0, "skipped": 0, "claimed": 0}
    for spec in runs:
        path = results_dir / spec.file_name
        if path.exists():
            stored = read_result(path)
            if comparable_run(stored["run"]) != comparable_run(spec.run):
                raise ValueError(
                    f"{path}: written for another configuration of {spec.name}; delete it to rerun the run"
                )
            counts["skipped"] += 1
            continue
        run_dir = work_dir / spec.name
        if not claim(run_dir):
            counts["claimed"] += 1
            continue
        try:
            if path.exists():  # finished by another process between the two checks
                counts["skipped"] += 1
                continue
            started = time.perf_counter()
            say(f"[study] {spec.name}: training")
            sys.stdout.flush()
            record = run_one(spec, run_dir, threads=threads)
            write_json_atomically(record, path)
        finally:
            (run_dir / "claim").unlink(missing_ok=True)
        metrics = record["metrics"]
        say(
            f"[study] {spec.name}: HR@10 {metrics['HR@10']:.4f} NDCG@10 {metrics['NDCG@10']:.4f} "
            f"({time.perf_counter() - started:.0f} s)"
        )
        counts["done"] += 1
    return counts
