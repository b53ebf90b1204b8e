"""Run configuration of ``python -m rec2pm train``: TOML file + ``--set`` overrides.

A run is four tables; every key has a default here, and an unknown table or key is an
error naming it (a typo never silently falls back to a default)::

    [data]    kind = "s3rec" | "movielens" | "table" | "synthetic", path, max_length, ...
    [model]   config = "sasrec" (a name of rec2pm.config), and any ModelConfig field;
              [model.kernels] backend, allow_tf32, deterministic (rec2pm.config.KernelOptions)
    [method]  name = "rec2pm-o" (a name of rec2pm.methods), and any TrainingOptions field
    [train]   epochs, batch_size, lr, weight_decay, schedule, warmup_steps, patience, min_epochs, seed, ...

Overrides are ``table.key=value`` with ``value`` read as a TOML value (``train.lr=1e-3``,
``method.name="full"``; a bare word that is not TOML is taken as a string).
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

DEFAULTS: dict[str, dict] = {
    "data": {
        "kind": "synthetic",  # movielens | s3rec | table | synthetic
        "path": "",  # the source file (not for synthetic)
        "max_length": 200,  # keep each user's last max_length events (truncation from the left)
        "user_limit": 0,  # keep only the first N users of the file (0 = all); for quick runs
        "user_col": "user_id",  # table only
        "item_col": "item_id",
        "time_col": "timestamp",
        "sep": ",",
        "synthetic_users": 500,  # synthetic only
        "synthetic_length": 120,
        "synthetic_min_length": 0,  # > 0: lengths log-uniform in [min, synthetic_length]; 0: all equal
        "synthetic_items": 1000,
        "synthetic_noise": 0.1,
        "seed": 0,
    },
    "model": {"config": "sasrec-small"},
    "method": {"name": "full"},
    "train": {
        "epochs": 10,
        "batch_size": 128,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "schedule": "constant",  # constant | cosine
        "warmup_steps": 0,
        "patience": 0,  # early stopping on valid NDCG@10; 0 = off
        # Early stopping never ends a run before this many epochs (for models that start slowly:
        # a lucky score of the untrained model must not stop them before they learn).
        "min_epochs": 0,
        # What picks the best epoch: "sampled" = valid NDCG@10 of the held-out items; "expected" =
        # generated data only: its expectation under the planted distribution (no sampling noise).
        "selection": "sampled",
        "eval_every": 1,  # epochs between validations
        "eval_batch_size": 256,
        "exclude_history": True,  # remove already-seen items from the candidates (off for data that repeats)
        "checkpoint_every": 0,  # also checkpoint every N steps inside an epoch; 0 = epoch ends only
        "seed": 0,
        "threads": 0,  # torch threads; 0 = leave as is
        "device": "auto",  # auto (cuda when available) | cpu | cuda
        "out_dir": "runs/default",
        "progress": True,
        "stop_after_steps": 0,  # stop (as if interrupted) after this many steps; 0 = never. For tests.
    },
}

SCHEDULES = ("constant", "cosine")
SELECTIONS = ("sampled", "expected")
DATA_KINDS = ("movielens", "s3rec", "table", "synthetic")


def parse_override(text: str) -> tuple[str, str, object]:
    """``"table.key=value"`` -> ``(table, key, value)``."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ValueError(f"override must look like table.key=value, got {text!r}")
    name, raw = text.split("=", 1)
    table, key = name.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return table, key, value


def build_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    """Defaults, then the TOML file, then the overrides; validated."""
    config = copy.deepcopy(DEFAULTS)
    layers: list[tuple[str, dict]] = []
    if path is not None:
        with open(path, "rb") as f:
            try:
                layers.append((str(path), tomllib.load(f)))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{path}: not a valid TOML file ({exc})") from None
    for text in overrides:
        table, key, value = parse_override(text)
        layers.append((f"--set {text}", {table: {key: value}}))
    for origin, layer in layers:
        for table, values in layer.items():
            if table not in config:
                raise ValueError(f"{origin}: unknown table [{table}]; expected one of {tuple(config)}")
            if not isinstance(values, dict):
                raise ValueError(f"{origin}: [{table}] must be a table")
            for key, value in values.items():
                if table in ("data", "train") and key not in config[table]:
                    raise ValueError(f"{origin}: unknown key {table}.{key}; expected one of {tuple(config[table])}")
                if table == "model" and key.startswith("kernels."):  # --set model.kernels.backend="torch"
                    kernels = config["model"].setdefault("kernels", {})
                    if not isinstance(kernels, dict):
                        raise ValueError(f"{origin}: model.kernels must be a table")
                    kernels[key.split(".", 1)[1]] = value
                elif table == "model" and key == "kernels" and isinstance(value, dict):
                    config["model"].setdefault("kernels", {}).update(value)
                else:
                    config[table][key] = value
    validate(config)
    return config


# Ranges of the numeric run settings (inclusive); a type comes from the default's type.
RANGES = {
    "data": {
        "max_length": (2, None),
        "synthetic_users": (1, None),
        "synthetic_length": (1, None),
        "synthetic_min_length": (0, None),
        "user_limit": (0, None),
        "synthetic_items": (1, None),
        "synthetic_noise": (0.0, 1.0),
    },
    "train": {
        "epochs": (1, None),
        "batch_size": (1, None),
        "eval_batch_size": (1, None),
        "eval_every": (1, None),
        "lr": (0.0, None),
        "weight_decay": (0.0, None),
        "warmup_steps": (0, None),
        "patience": (0, None),
        "min_epochs": (0, None),
        "checkpoint_every": (0, None),
        "threads": (0, None),
        "stop_after_steps": (0, None),
    },
}
DEVICES = ("auto", "cpu", "cuda")


def _check_setting(table: str, key: str, value) -> None:
    from .fields import check_value

    kind = {bool: "bool", int: "int", float: "float", str: "str"}[type(DEFAULTS[table][key])]
    check_value(f"{table}.{key}", kind, value)
    low, high = RANGES.get(table, {}).get(key, (None, None))
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{table}.{key} must be {bounds}, got {value!r}")


def check_planted_comparable(config: dict, what: str) -> None:
    """``what`` compares a model with the planted signal of generated data, user by user: it
    needs whole generated histories of >= 3 events, ranked over every item."""
    data, train = config["data"], config["train"]
    if (
        data["kind"] != "synthetic"
        or data["user_limit"]
        or data["max_length"] < data["synthetic_length"]
        or (data["synthetic_min_length"] or data["synthetic_length"]) < 3
        or train["exclude_history"]
    ):
        raise ValueError(
            f"{what} needs whole generated histories of >= 3 events ranked over every "
            "item (data.kind='synthetic', no data.user_limit, data.max_length >= data.synthetic_length, "
            "train.exclude_history=false)"
        )


def validate(config: dict) -> None:
    """Every value has its default's type and lies in its range; names are known; the model
    and method tables build (their errors are prefixed with the table)."""
    from .config import REFERENCE_CONFIGS, ModelConfig, named_config
    from .fields import check_field_types
    from .methods import METHODS
    from .methods.base import TrainingOptions

    data, train = config["data"], config["train"]
    for table in ("data", "train"):
        for key, value in config[table].items():
            _check_setting(table, key, value)
    if data["kind"] not in DATA_KINDS:
        raise ValueError(f"data.kind must be one of {DATA_KINDS}, got {data['kind']!r}")
    if data["synthetic_min_length"] > data["synthetic_length"]:
        raise ValueError(
            f"data.synthetic_min_length must be <= data.synthetic_length = {data['synthetic_length']}, "
            f"got {data['synthetic_min_length']}"
        )
    if train["selection"] not in SELECTIONS:
        raise ValueError(f"train.selection must be one of {SELECTIONS}, got {train['selection']!r}")
    if train["selection"] == "expected":
        check_planted_comparable(config, "train.selection='expected'")
    if data["kind"] != "synthetic" and not data["path"]:
        raise ValueError(f"data.path is required for data.kind={data['kind']!r}")
    if train["schedule"] not in SCHEDULES:
        raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {train['schedule']!r}")
    device = train["device"]
    if device not in DEVICES and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ValueError(f"train.device must be one of {DEVICES} or 'cuda:N', got {device!r}")
    model = dict(config["model"])
    name = model.pop("config", None)
    if name not in REFERENCE_CONFIGS:
        raise ValueError(f"model.config must be one of {tuple(REFERENCE_CONFIGS)}, got {name!r}")
    fields = set(ModelConfig.__dataclass_fields__) - {"num_items"}
    for key in model:
        if key not in fields:
            raise ValueError(f"unknown key model.{key}; expected one of {sorted(fields)}")
    check_field_types(ModelConfig, model, prefix="model.")
    try:
        named_config(name, **model)
    except (ValueError, TypeError) as exc:  # kernels.* type errors come from KernelOptions
        raise type(exc)(f"model: {exc}") from None
    method = dict(config["method"])
    method_name = method.pop("name", None)
    if method_name not in METHODS:
        raise ValueError(f"method.name must be one of {tuple(METHODS)}, got {method_name!r}")
    options = set(TrainingOptions.__dataclass_fields__) - {"mode"}
    for key in method:
        if key not in options:
            raise ValueError(f"unknown key method.{key}; expected one of {sorted(options)}")
    check_field_types(TrainingOptions, method, prefix="method.")
    try:
        TrainingOptions(**method)
    except ValueError as exc:
        raise ValueError(f"method: {exc}") from None
