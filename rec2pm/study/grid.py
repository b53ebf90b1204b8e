"""The runs of the accuracy study, each a ``python -m rec2pm train`` config plus its labels.

Three groups (``docs/results.md`` states why each size is large enough):

* ``real``: MovieLens latest-small and LastFM, S = 50, C = 4; six methods on SASRec,
  Rec2PM-O and Full on HSTU; the popularity count baseline.
* ``lifelong``: generated lifelong histories at S = 200, C = 4 with noise 0, 0.2 and 0.4;
  the six methods on SASRec and two count baselines (``rec2pm.study.baselines``).  The
  planted signal bounds each user's HR@10.
* ``ablation``: Rec2PM-O at noise 0.2 without ``L_con``, with C in {1, 2, 8, 16}, and over
  the 2 x 2 stop-gradient grid crossed with Stage 1 ``L_AR``.  Overwriting against
  appending and one-shot against iterative memories reuse the ``lifelong`` runs.

Every run has three seeds (initialisation and data order; the data split is fixed); the
count baselines are deterministic and run once.  A count baseline's run config is only
read for its data and evaluation settings.  The
``mini`` scale shrinks every run type to a few dozen users, one epoch and one seed, so CI
keeps the commands working in about a minute.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from ..run_config import build_run_config
from .baselines import COUNT_BASELINES

SEEDS = (0, 1, 2)
SASREC_METHODS = ("full", "recent", "rec2pm-o", "rec2pm-a", "tok-serial-o", "kv-mask-o")
HSTU_METHODS = ("rec2pm-o", "full")
NOISES = (0.0, 0.2, 0.4)
ABLATION_NOISE = 0.2
ABLATION_MEMORY_SIZES = (1, 2, 8, 16)
# (detach_target, detach_prefix, stage1_ar) of the 2 x 2 x 2 grid; the default is in `lifelong`.
STOP_GRADIENT_GRID = tuple((t, p, ar) for t in (True, False) for p in (True, False) for ar in (False, True))
DEFAULT_STOP_GRADIENT = (True, False, False)
# A memory of another size than the default can learn nothing for its first epochs: at seed 0,
# C = 1's valid expected NDCG@10 was 0.017 after epoch 0 (the untrained model), lower for
# epochs 1-4, then rose from epoch 5 (0.054 after epoch 7), and at seed 2 early stopping ended
# the C = 2 and C = 8 runs the same way.  Patience 4 counted from that lucky first score stops
# such a run before it starts, so the memory-size cells may not stop before 8 epochs.  Every
# other run of the study ran at least 8 epochs, so this floor would not have changed any of
# them (the report checks it for every stored run).
SLOW_START_MIN_EPOCHS = 8


@dataclass(frozen=True)
class Scale:
    """Sizes of one scale of the study (the budget of ``docs/results.md``)."""

    real_max_length: int  # events of a real history the models read (the last ones)
    real_user_limit: int  # 0 = every user of the real sets
    lifelong_users: int
    lifelong_min_length: int
    lifelong_max_length: int
    lifelong_items: int
    epochs: int
    patience: int
    real_d_model: int
    lifelong_d_model: int
    real_batch_size: int  # users per step
    lifelong_batch_size: int
    real_lr: float
    lifelong_lr: float
    real_segment_len: int
    lifelong_segment_len: int
    seeds: tuple[int, ...] = SEEDS


SCALES = {
    "full": Scale(
        real_max_length=1024,
        real_user_limit=0,
        lifelong_users=128,
        lifelong_min_length=1000,
        lifelong_max_length=2000,
        lifelong_items=1000,
        epochs=20,
        patience=4,
        real_d_model=64,
        lifelong_d_model=32,
        real_batch_size=8,
        lifelong_batch_size=2,
        real_lr=1e-3,
        lifelong_lr=3e-3,
        real_segment_len=50,
        lifelong_segment_len=200,
    ),
    "mini": Scale(
        real_max_length=64,
        real_user_limit=24,
        lifelong_users=24,
        lifelong_min_length=40,
        lifelong_max_length=64,
        lifelong_items=200,
        epochs=1,
        patience=0,
        real_d_model=16,
        lifelong_d_model=16,
        real_batch_size=8,
        lifelong_batch_size=4,
        real_lr=1e-3,
        lifelong_lr=3e-3,
        real_segment_len=8,
        lifelong_segment_len=8,
        seeds=(0,),
    ),
}
REAL_SETS = {
    "movielens": ("movielens", "movielens/ml-latest-small/ratings.csv.gz"),
    "lastfm": ("s3rec", "s3rec/LastFM.txt.gz"),
}


@dataclass(frozen=True)
class StudyRun:
    """One trained model of the study: ``name`` is unique and names its result file."""

    name: str
    group: str  # real | lifelong | ablation
    labels: dict = field(hash=False)  # dataset, backbone, method, variant, noise, seed, ...
    run: dict = field(hash=False)  # the resolved run config (rec2pm.run_config)

    @property
    def file_name(self) -> str:
        return self.name.replace("/", "__") + ".json"


def _overrides(table: str, values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        text = f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else value
        out.append(f"{table}.{key}={text}")
    return out


def _run_config(data: dict, model: dict, method: dict, train: dict) -> dict:
    overrides = []
    for table, values in (("data", data), ("model", model), ("method", method), ("train", train)):
        overrides += _overrides(table, values)
    return build_run_config(None, overrides)


def _model(d_model: int, backbone: str, segment_len: int, memory_tokens: int = 4) -> dict:
    return {
        "config": backbone,
        "num_layers": 2,
        "num_heads": 2,
        "d_model": d_model,
        "dropout": 0.2,
        "segment_len": segment_len,
        "num_memory_tokens": memory_tokens,
    }


def _train(scale: Scale, seed: int, real: bool) -> dict:
    return {
        "epochs": scale.epochs,
        "patience": scale.patience,
        "batch_size": scale.real_batch_size if real else scale.lifelong_batch_size,
        "lr": scale.real_lr if real else scale.lifelong_lr,
        "seed": seed,
        # Generated histories repeat items by design, so seen items stay candidates there; their
        # best epoch is chosen on the planted expectation of valid NDCG@10, since one sampled
        # target per user of 128 is too noisy to stop on (Full stopped at epoch 8 below the
        # count baseline that way).
        "exclude_history": real,
        "selection": "sampled" if real else "expected",
        "progress": False,
    }


def lifelong_data(scale: Scale, noise: float) -> dict:
    return {
        "kind": "synthetic",
        "synthetic_users": scale.lifelong_users,
        "synthetic_length": scale.lifelong_max_length,
        "synthetic_min_length": scale.lifelong_min_length,
        "synthetic_items": scale.lifelong_items,
        "synthetic_noise": noise,
        "max_length": scale.lifelong_max_length,
        "seed": 0,
    }


def study_runs(scale: str = "full", data_root: str | Path = "../shared/data") -> list[StudyRun]:
    """Every run of the study at ``scale`` (``"full"`` or ``"mini"``), in the order they run:
    every cell's first seed before any second one, so a partial study covers every cell."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {tuple(SCALES)}, got {scale!r}")
    sizes = SCALES[scale]
    runs: list[StudyRun] = []

    def add(group: str, labels: dict, data: dict, model: dict, method: dict, seeds=sizes.seeds, **train) -> None:
        for seed in seeds:
            name = "/".join([group, labels["dataset"], labels["backbone"], labels["variant"], f"seed{seed}"])
            run = _run_config(data, model, method, {**_train(sizes, seed, real=group == "real"), **train})
            runs.append(StudyRun(name, group, {**labels, "seed": seed}, copy.deepcopy(run)))

    for dataset, (kind, relative) in REAL_SETS.items():
        data = {
            "kind": kind,
            "path": str(Path(data_root) / relative),
            "max_length": sizes.real_max_length,
            "user_limit": sizes.real_user_limit,
        }
        labels = {"dataset": dataset, "backbone": "count", "method": "popularity", "variant": "popularity"}
        model = _model(sizes.real_d_model, "sasrec", sizes.real_segment_len)
        add("real", labels, data, model, {"name": "full"}, seeds=sizes.seeds[:1])  # deterministic: one seed
        for backbone, methods in (("sasrec", SASREC_METHODS), ("hstu", HSTU_METHODS)):
            for method in methods:
                labels = {"dataset": dataset, "backbone": backbone, "method": method, "variant": method}
                model = _model(sizes.real_d_model, backbone, sizes.real_segment_len)
                add("real", labels, data, model, {"name": method})

    for noise in NOISES:
        dataset = f"noise{noise:g}"
        for baseline in COUNT_BASELINES:
            labels = {"dataset": dataset, "backbone": "count", "method": baseline, "variant": baseline, "noise": noise}
            model = _model(sizes.lifelong_d_model, "sasrec", sizes.lifelong_segment_len)
            add("lifelong", labels, lifelong_data(sizes, noise), model, {"name": "full"}, seeds=sizes.seeds[:1])
        for method in SASREC_METHODS:
            labels = {"dataset": dataset, "backbone": "sasrec", "method": method, "variant": method, "noise": noise}
            model = _model(sizes.lifelong_d_model, "sasrec", sizes.lifelong_segment_len)
            add("lifelong", labels, lifelong_data(sizes, noise), model, {"name": method})

    dataset = f"noise{ABLATION_NOISE:g}"
    base = {"dataset": dataset, "backbone": "sasrec", "method": "rec2pm-o", "noise": ABLATION_NOISE}
    data = lifelong_data(sizes, ABLATION_NOISE)
    model = _model(sizes.lifelong_d_model, "sasrec", sizes.lifelong_segment_len)
    add("ablation", {**base, "variant": "no-con"}, data, model, {"name": "rec2pm-o", "con_weight": 0.0})
    for memory_tokens in ABLATION_MEMORY_SIZES:
        labels = {**base, "variant": f"C{memory_tokens}", "memory_tokens": memory_tokens}
        model_c = _model(sizes.lifelong_d_model, "sasrec", sizes.lifelong_segment_len, memory_tokens)
        add("ablation", labels, data, model_c, {"name": "rec2pm-o"}, min_epochs=SLOW_START_MIN_EPOCHS)
    for detach_target, detach_prefix, stage1_ar in STOP_GRADIENT_GRID:
        if (detach_target, detach_prefix, stage1_ar) == DEFAULT_STOP_GRADIENT:
            continue  # the lifelong Rec2PM-O run is this cell
        variant = stop_gradient_variant(detach_target, detach_prefix, stage1_ar)
        options = {
            "name": "rec2pm-o",
            "detach_target": detach_target,
            "detach_prefix": detach_prefix,
            "stage1_ar": stage1_ar,
        }
        labels = {**base, "variant": variant, "detach_target": detach_target, "detach_prefix": detach_prefix}
        add("ablation", {**labels, "stage1_ar": stage1_ar}, data, model, options)
    return sorted(runs, key=lambda r: r.labels["seed"])  # stable: the groups keep their order


def stop_gradient_variant(detach_target: bool, detach_prefix: bool, stage1_ar: bool) -> str:
    """The ablation's label of one cell of the stop-gradient x Stage 1 L_AR grid."""
    return f"sg-target{int(detach_target)}-prefix{int(detach_prefix)}-ar{int(stage1_ar)}"
