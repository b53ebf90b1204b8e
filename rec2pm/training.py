"""The training loop of ``python -m rec2pm train``: leave-one-out data, AdamW, a schedule,
validation with early stopping, JSON-lines metrics, and checkpoints with exact resume.

Exact resume: a checkpoint holds the model, optimiser, scheduler, every RNG state
(torch, Python, NumPy), the epoch and the next batch inside it.  The data order of an
epoch is a function of ``(seed, epoch)`` alone, so a resumed run replays the same batches
with the same dropout masks and negatives, and ends with the same metrics as a run that
was never interrupted (``tests/training/test_training.py`` checks it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .config import named_config
from .data import InteractionData, leave_one_out, lifelong_planted, load_dataset
from .evaluation import evaluate, format_metrics, metrics_from_ranks, recording_top_items, target_ranks
from .layout import packed_rows
from .methods import build_model
from .methods.base import TrainingOptions
from .run_config import DEFAULTS as RUN_DEFAULTS
from .run_config import validate as validate_run

SELECTION_METRIC = "NDCG@10"
EXPECTED_SELECTION_METRIC = "expected_NDCG@10"


# -- data --------------------------------------------------------------------------------------
def generate(data: dict):
    """The generated histories of a ``data.kind = "synthetic"`` table and their ``LifelongPlan``."""
    return lifelong_planted(
        data["synthetic_users"],
        data["synthetic_length"],
        data["synthetic_items"],
        noise=data["synthetic_noise"],
        seed=data["seed"],
        min_length=data["synthetic_min_length"] or None,
    )


def load_data(data: dict) -> InteractionData:
    if data["kind"] == "synthetic":
        loaded = generate(data)[0]
    else:
        kwargs = {}
        if data["kind"] == "table":
            kwargs = dict(
                user_col=data["user_col"], item_col=data["item_col"], time_col=data["time_col"], sep=data["sep"]
            )
        loaded = load_dataset(data["kind"], data["path"], **kwargs)
    return loaded.first_users(data["user_limit"]) if data["user_limit"] else loaded


def keep_last(items: torch.Tensor, cu: torch.Tensor, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each history's last ``max_length`` events (truncation from the left, documented)."""
    lengths = (cu[1:] - cu[:-1]).clamp(max=max_length)
    return items[packed_rows(cu[1:] - lengths, lengths)], torch.cat([cu.new_zeros(1), lengths.cumsum(0)])


def history_times(part, max_length: int, source: str) -> torch.Tensor:
    """The timestamps of ``keep_last``'s events of a split part (HSTU's timestamp bias needs them)."""
    if part.timestamps is None:
        raise ValueError(
            f"model.num_time_buckets > 0 (HSTU's timestamp bias) needs data with integer timestamps; "
            f"{source} has none (use num_time_buckets = 0)"
        )
    return keep_last(part.timestamps, part.cu_seqlens, max_length)[0]


def evaluation_times(history, target_times, max_length: int, source: str, device="cpu") -> dict:
    """``evaluate``'s ``timestamps`` (the kept events') and ``request_times`` (the held-out
    events' times) for one split part."""
    return dict(timestamps=history_times(history, max_length, source).to(device), request_times=target_times.to(device))


def gather(items: torch.Tensor, cu: torch.Tensor, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed histories of ``users`` (in that order)."""
    lengths = (cu[1:] - cu[:-1])[users]
    return items[packed_rows(cu[users], lengths)], torch.cat([cu.new_zeros(1), lengths.cumsum(0)])


def epoch_order(num_users: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_users, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def epoch_batches(order: torch.Tensor, batch_size: int, world_size: int) -> list[torch.Tensor]:
    """Global batches of ``batch_size`` users; a last batch too small to give every rank a
    user is merged into the one before it (no user is dropped)."""
    batches = list(order.split(batch_size))
    if len(batches) > 1 and batches[-1].numel() < world_size:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


# -- model -------------------------------------------------------------------------------------
def build(run: dict, num_items: int):
    model_cfg = dict(run["model"])
    name = model_cfg.pop("config")
    base = named_config(name, num_items=num_items, **model_cfg)
    longest = run["data"]["max_length"]
    needed = longest + base.num_memory_tokens * (longest // base.segment_len + 1) + 1
    if "max_positions" not in model_cfg and base.max_positions < needed:
        base = base.with_(max_positions=needed)
    method = dict(run["method"])
    return build_model(method.pop("name"), base, TrainingOptions(**method))


def lr_lambda(train: dict, total_steps: int):
    warmup, schedule = train["warmup_steps"], train["schedule"]

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


# -- checkpoints -------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every RNG state, in types ``torch.load(weights_only=True)`` accepts (tensors, tuples, numbers)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def save_atomically(obj: dict, path: Path) -> None:
    """Write to a temporary file, then rename: a kill mid-write never leaves a torn checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


CHECKPOINT_KEYS = {
    "best": ("model", "run", "num_items"),
    "last": ("model", "optimizer", "scheduler", "rng", "state", "run", "num_items"),
}


def catalogue_digest(item_ids) -> str:
    """SHA-256 of the original item ids in remapped order: what a checkpoint's item rows mean."""
    return hashlib.sha256(",".join(map(str, item_ids)).encode()).hexdigest()


def check_catalogue(path: Path, ckpt: dict, data: InteractionData, data_settings: dict) -> None:
    """The data's items are the ones the checkpoint's item rows were trained on: the same count
    and (for checkpoints that record it) the same original ids in the same order."""
    source = data_settings.get("path") or f"the {data_settings.get('kind', '?')} data"
    if data.num_items != ckpt["num_items"]:
        raise ValueError(f"{source} has {data.num_items} items, but {path} was trained on {ckpt['num_items']}")
    saved = ckpt.get("catalogue")
    if saved is not None and saved != catalogue_digest(data.item_ids):
        raise ValueError(
            f"{source} has the {data.num_items} items {path} was trained on, but not the same ones (other "
            "original ids, or another order): its scores would rank the wrong items; use the training data"
        )


# Settings a resumed run may change: where and how it runs, and how long (not what it learns).
RESUMABLE_CHANGES = {
    "train": {
        "epochs",
        "threads",
        "device",
        "out_dir",
        "progress",
        "stop_after_steps",
        "eval_batch_size",
        "checkpoint_every",
    },
}


def check_resumable(path: Path, saved: dict, run: dict) -> None:
    """Resuming continues the saved run's epoch, optimiser and schedule: refuse when the data,
    model, method or training settings changed since (other than ``RESUMABLE_CHANGES``)."""
    changed = [
        f"{table}.{key}: {saved.get(table, {}).get(key)!r} -> {run[table].get(key)!r}"
        for table in run
        for key in sorted(set(run[table]) | set(saved.get(table, {})))
        if key not in RESUMABLE_CHANGES.get(table, set()) and saved.get(table, {}).get(key) != run[table].get(key)
    ]
    if changed:
        raise ValueError(
            f"{path}: cannot resume: the run config changed since this checkpoint ({'; '.join(changed[:6])}); "
            "train into another train.out_dir, or pass --no-resume to start over"
        )


def load_checkpoint(path: str | Path, map_location="cpu", kind: str = "best") -> dict:
    """Read a checkpoint that ``train`` wrote, with ``torch.load(weights_only=True)``.

    Checkpoints hold only tensors and plain Python values, so loading one never runs code
    from the file.  Every failure is a ``ValueError`` (or ``FileNotFoundError``) naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, corrupt, not a torch file, or holding types that could run code
        if "Weights only load failed" in str(exc):
            detail = "it holds objects other than tensors and plain values, which could run code; refused"
        else:
            detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise ValueError(f"{path}: not a readable rec2pm checkpoint ({detail})") from None
    needed = CHECKPOINT_KEYS["last" if kind == "last" else "best"]
    if not isinstance(ckpt, dict) or any(key not in ckpt for key in needed):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not a rec2pm {kind} checkpoint; expected the entries {list(needed)}, found {found}")
    if not isinstance(ckpt["run"], dict) or not isinstance(ckpt["num_items"], int):
        raise ValueError(f"{path}: damaged checkpoint: 'run' must be a table and 'num_items' an int")
    run = ckpt["run"]
    for table in ("data", "train"):
        if not isinstance(run.get(table), dict):
            raise ValueError(f"{path}: damaged checkpoint: run.{table} must be a table, got {run.get(table)!r}")
        run[table] = {**RUN_DEFAULTS[table], **run[table]}  # settings added since it was written: their defaults
    try:
        validate_run(run)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{path}: the checkpoint's run config is invalid: {exc}") from None
    return ckpt


def checkpoint_run(ckpt: dict) -> dict:
    """The run config that builds a checkpoint's model.  A checkpoint written before
    ``model.input_norm`` existed neither names the option nor holds the norm's weights: its
    model is built without one, as it was trained."""
    run = ckpt["run"]
    weights = ckpt["model"]
    if "input_norm" not in run["model"] and isinstance(weights, dict) and "decoder.input_norm.weight" not in weights:
        return {**run, "model": {**run["model"], "input_norm": False}}
    return run


def load_weights(model: torch.nn.Module, weights, path: Path) -> None:
    """``model.load_state_dict(weights)`` with an error naming the file and what did not match."""
    if not isinstance(weights, dict):
        raise ValueError(f"{path}: the checkpoint's 'model' entry is not a state dict")
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ValueError(
            f"{path}: the weights do not match the model its run config builds "
            f"({type(model).__name__}, {model.config.backbone} {model.config.num_layers}x"
            f"{model.config.num_heads}, d={model.config.d_model}): {detail[:600]}"
        ) from None


class MetricsLog:
    """JSON-lines log of a run, one object per line."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# -- the loop ----------------------------------------------------------------------------------
def train(run: dict, *, resume: bool = True) -> dict:
    """Train as ``run`` (see ``rec2pm.run_config``) says; returns the final summary."""
    train_cfg, data_cfg = run["train"], run["data"]
    if train_cfg["threads"]:
        torch.set_num_threads(train_cfg["threads"])
    device = torch.device(
        "cuda"
        if train_cfg["device"] == "auto" and torch.cuda.is_available()
        else ("cpu" if train_cfg["device"] == "auto" else train_cfg["device"])
    )
    ctx = distributed.setup(device)
    out_dir = Path(train_cfg["out_dir"])
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume:  # an earlier run's log and models must not mix with this one's
            for name in ("metrics.jsonl", "last.pt", "best.pt"):
                (out_dir / name).unlink(missing_ok=True)
    ctx.barrier()
    log = MetricsLog(out_dir / "metrics.jsonl", ctx.is_main)
    say = print if ctx.is_main else (lambda *a, **k: None)

    # Selecting on the planted expectation needs the generator's plan: generate once, for both.
    planted_plan = None
    if train_cfg["selection"] == "expected":  # validation rules out user_limit here
        data, planted_plan = generate(data_cfg)
    else:
        data = load_data(data_cfg)
    split = leave_one_out(data)
    max_length = data_cfg["max_length"]
    train_items, train_cu = keep_last(split.train.items, split.train.cu_seqlens, max_length)
    valid = keep_last(split.valid_history.items, split.valid_history.cu_seqlens, max_length)
    test = keep_last(split.test_history.items, split.test_history.cu_seqlens, max_length)
    # Already-seen items are excluded from the whole history, not only the model's window.
    valid_seen = (split.valid_history.items, split.valid_history.cu_seqlens)
    test_seen = (split.test_history.items, split.test_history.cu_seqlens)
    say(f"data: {data.summary()}")

    seed_everything(train_cfg["seed"])  # the same initial model on every rank
    model = build(run, data.num_items).to(device)
    uses_times = bool(model.config.num_time_buckets)
    valid_times = test_times = {}
    if uses_times:
        train_times = history_times(split.train, max_length, data.source)
        valid_times = evaluation_times(split.valid_history, split.valid_target_times, max_length, data.source, device)
        test_times = evaluation_times(split.test_history, split.test_target_times, max_length, data.source, device)
    seed_everything(train_cfg["seed"] + 7919 * ctx.rank)  # then one RNG stream per rank (dropout, negatives)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"])
    num_train = train_cu.numel() - 1
    batches_per_epoch = math.ceil(num_train / train_cfg["batch_size"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(train_cfg, batches_per_epoch * train_cfg["epochs"])
    )
    # Everything the loop needs to continue exactly where a checkpoint left it.
    state = {
        "epoch": 0,
        "batch": 0,
        "step": 0,
        "best": -1.0,
        "best_epoch": -1,
        "bad_epochs": 0,
        "loss_sum": 0.0,
        "loss_count": 0,
        "wall_s": 0.0,  # training time up to the last checkpoint, so a resumed run reports its whole time
    }
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    catalogue = catalogue_digest(data.item_ids)  # saved with every checkpoint: computed once
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path, kind="last")
        check_resumable(last_path, ckpt["run"], run)
        load_weights(model, ckpt["model"], last_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"][ctx.rank])
        state = ckpt["state"]
        say(f"resumed from {last_path} at epoch {state['epoch']}, batch {state['batch']}, step {state['step']}")
    wall_before = state.get("wall_s", 0.0)  # absent from checkpoints written before it was kept
    trained = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if ctx.enabled else model

    def save(path: Path) -> None:
        rngs = [rng_state()]
        if ctx.enabled:  # every rank's RNG state, so that each resumes its own stream
            rngs = [None] * ctx.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        state["wall_s"] = wall_before + time.perf_counter() - started
        if ctx.is_main:
            save_atomically(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rngs,
                    "state": dict(state),
                    "run": run,
                    "num_items": data.num_items,
                    "catalogue": catalogue,
                },
                path,
            )
        ctx.barrier()

    # Generated data can select the best epoch on the planted expectation of valid NDCG@10
    # (each user's valid target is their event n - 2): free of the noise of one sampled target.
    selection_metric = EXPECTED_SELECTION_METRIC if planted_plan is not None else SELECTION_METRIC

    def validate_model() -> dict:
        model.eval()
        score_fn, tops = recording_top_items(model.score_history, 10)
        metrics = evaluate(
            score_fn,
            valid[0].to(device),
            valid[1].to(device),
            split.valid_targets.to(device),
            data.num_items,
            batch_size=train_cfg["eval_batch_size"],
            exclude_history=train_cfg["exclude_history"],
            exclude_items=valid_seen[0],
            exclude_cu_seqlens=valid_seen[1],
            progress=train_cfg["progress"] and ctx.is_main,
            description="valid",
            **valid_times,
        )
        if planted_plan is not None:
            expected = planted_plan.expected_metrics(torch.cat(tops), positions=planted_plan.lengths - 2)
            metrics.update({f"expected_{name}": float(values.mean()) for name, values in expected.items()})
        model.train()
        return metrics

    model.train()
    started = time.perf_counter()

    def early_stop() -> bool:
        return (
            bool(train_cfg["patience"])
            and state["bad_epochs"] >= train_cfg["patience"]
            and state["epoch"] >= train_cfg["min_epochs"]
        )

    stop = early_stop()  # stopped before resume
    while state["epoch"] < train_cfg["epochs"] and not stop:
        epoch = state["epoch"]
        order = epoch_order(num_train, train_cfg["seed"], epoch)
        batches = epoch_batches(order, train_cfg["batch_size"], ctx.world_size)
        progress = range(state["batch"], len(batches))
        if train_cfg["progress"] and ctx.is_main:
            from tqdm import tqdm

            progress = tqdm(progress, desc=f"epoch {epoch}", leave=False)
        for b in progress:
            users = batches[b][ctx.rank :: ctx.world_size]
            items, cu = gather(train_items, train_cu, users)
            times = (gather(train_times, train_cu, users)[0].to(device),) if uses_times else ()
            out = trained(items.to(device), cu.to(device), *times)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            scheduler.step()
            state["loss_sum"] += out.loss.item()
            state["loss_count"] += 1
            state["batch"], state["step"] = b + 1, state["step"] + 1
            if train_cfg["checkpoint_every"] and state["step"] % train_cfg["checkpoint_every"] == 0:
                save(last_path)
            if train_cfg["stop_after_steps"] and state["step"] >= train_cfg["stop_after_steps"]:
                say(f"stopping after {state['step']} steps (train.stop_after_steps), as if interrupted")
                distributed.teardown(ctx)
                return {"interrupted": True, "step": state["step"]}
        record = {"epoch": epoch, "step": state["step"], "train_loss": state["loss_sum"] / max(state["loss_count"], 1)}
        state.update(epoch=epoch + 1, batch=0, loss_sum=0.0, loss_count=0)
        if (epoch + 1) % train_cfg["eval_every"] == 0 or epoch + 1 == train_cfg["epochs"]:
            metrics = validate_model() if ctx.is_main else {}
            record["valid"] = metrics
            if ctx.is_main:
                say(
                    f"epoch {epoch}: loss {record['train_loss']:.4f}  valid "
                    + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "users")
                )
                if metrics[selection_metric] > state["best"]:
                    state["best"], state["best_epoch"], state["bad_epochs"] = metrics[selection_metric], epoch, 0
                    save_atomically(
                        {
                            "model": model.state_dict(),
                            "run": run,
                            "num_items": data.num_items,
                            "catalogue": catalogue,
                            "epoch": epoch,
                            "valid": metrics,
                        },
                        best_path,
                    )
                else:
                    state["bad_epochs"] += 1
            stop = early_stop()
            if ctx.enabled:  # every rank must agree on stopping
                flag = torch.tensor([int(stop)], device=device)
                torch.distributed.broadcast(flag, 0)
                stop = bool(flag.item())
        log.write(**record)
        save(last_path)

    summary = {"best_epoch": state["best_epoch"], "best_valid": state["best"], "steps": state["step"]}
    if ctx.is_main:
        if best_path.exists():
            load_weights(model, load_checkpoint(best_path)["model"], best_path)
        model.eval()
        test_metrics = evaluate(
            model.score_history,
            test[0].to(device),
            test[1].to(device),
            split.test_targets.to(device),
            data.num_items,
            batch_size=train_cfg["eval_batch_size"],
            progress=train_cfg["progress"],
            exclude_history=train_cfg["exclude_history"],
            exclude_items=test_seen[0],
            exclude_cu_seqlens=test_seen[1],
            description="test",
            **test_times,
        )
        summary["test"] = test_metrics
        summary["wall_s"] = round(wall_before + time.perf_counter() - started, 3)
        log.write(final=summary)
        say(
            f"best epoch {state['best_epoch']} (valid {selection_metric} {state['best']:.4f}); test:\n"
            + format_metrics(test_metrics)
        )
    ctx.barrier()
    distributed.teardown(ctx)
    return summary


@dataclass
class EvaluationSet:
    """A saved model in eval mode with one split of its run's data, ready for ``target_ranks``:
    ``items``/``cu_seqlens`` are the histories the model reads (its last ``max_length``
    events), ``seen``/``seen_cu_seqlens`` the whole histories (excluded from the candidates
    when ``exclude_history``), and ``times`` the keyword arguments of HSTU's timestamp bias."""

    model: torch.nn.Module | None
    run: dict
    data: InteractionData
    items: torch.Tensor
    cu_seqlens: torch.Tensor
    targets: torch.Tensor
    seen: torch.Tensor
    seen_cu_seqlens: torch.Tensor
    times: dict

    def ranks(self, score_fn=None, *, progress: bool = False, description: str = "test") -> torch.Tensor:
        """``(U,)`` 1-based ranks of every user's target under ``score_fn`` (default the model's
        ``score_history``), with the run's exclusion and batch size."""
        return target_ranks(
            score_fn or self.model.score_history,
            self.items,
            self.cu_seqlens,
            self.targets,
            self.data.num_items,
            batch_size=self.run["train"]["eval_batch_size"],
            exclude_history=self.run["train"]["exclude_history"],
            exclude_items=self.seen,
            exclude_cu_seqlens=self.seen_cu_seqlens,
            progress=progress,
            description=description,
            **self.times,
        )


def load_evaluation(path: str | Path, *, data_path: str | None = None, split_name: str = "test") -> EvaluationSet:
    """The model saved at ``path`` (``best.pt`` or ``last.pt``) with its run's ``split_name`` split."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    run = checkpoint_run(ckpt)
    if data_path is not None:
        run = {**run, "data": {**run["data"], "path": data_path}}
    data = load_data(run["data"])
    check_catalogue(path, ckpt, data, run["data"])
    model = build(run, data.num_items)
    load_weights(model, ckpt["model"], path)
    model.eval()
    return evaluation_set(run, data, model, split_name)


def evaluation_set(run: dict, data: InteractionData, model: torch.nn.Module | None, split_name: str = "test"):
    """``EvaluationSet`` of ``model`` (in eval mode; ``None`` for a scorer that is not a
    model, such as a count baseline) on the ``split_name`` split of ``data``."""
    if split_name not in ("test", "valid"):
        raise ValueError(f"split_name must be 'test' or 'valid', got {split_name!r}")
    split = leave_one_out(data)
    history = split.test_history if split_name == "test" else split.valid_history
    targets = split.test_targets if split_name == "test" else split.valid_targets
    items, cu = keep_last(history.items, history.cu_seqlens, run["data"]["max_length"])
    times = {}
    if model is not None and model.config.num_time_buckets:
        target_times = split.test_target_times if split_name == "test" else split.valid_target_times
        times = evaluation_times(history, target_times, run["data"]["max_length"], data.source)
    return EvaluationSet(model, run, data, items, cu, targets, history.items, history.cu_seqlens, times)


def evaluate_checkpoint(
    path: str | Path, *, data_path: str | None = None, split_name: str = "test", progress: bool = True
) -> dict:
    """Metrics of a saved model (``best.pt`` or ``last.pt``) on its run's data split."""
    evaluation = load_evaluation(path, data_path=data_path, split_name=split_name)
    ranks = evaluation.ranks(progress=progress, description=split_name)
    return {**metrics_from_ranks(ranks), "users": ranks.numel()}
