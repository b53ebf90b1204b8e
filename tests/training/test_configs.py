"""Every shipped run config builds, and the published-table recipes differ only where they say."""

from __future__ import annotations

from pathlib import Path

import pytest

from rec2pm.run_config import build_run_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.toml"))


def differences(a: dict, b: dict) -> set[str]:
    return {
        f"{table}.{key}"
        for table in a
        for key in a[table].keys() | b[table].keys()
        if a[table].get(key) != b[table].get(key)
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_builds(path):
    build_run_config(path)


def test_s3rec_recipes_differ_only_in_backbone_and_loss():
    by_name = {path.stem: build_run_config(path) for path in CONFIGS}
    sasrec, hstu, softmax = by_name["sasrec_s3rec"], by_name["hstu_s3rec"], by_name["sasrec_softmax"]
    assert sasrec["method"]["loss"] == "bce" and sasrec["method"]["num_negatives"] == 1
    assert differences(sasrec, hstu) == {"model.config", "train.out_dir"}
    assert differences(sasrec, softmax) == {"method.loss", "method.num_negatives", "train.patience", "train.out_dir"}
