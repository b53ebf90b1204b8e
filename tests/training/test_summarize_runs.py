"""scripts/summarize_runs.py: mean ± std over seeds of finished runs, grouped by name."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "summarize_runs.py"


def load_script():
    spec = importlib.util.spec_from_file_location("summarize_runs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(folder: Path, hr: float, ndcg: float, finished: bool = True) -> Path:
    folder.mkdir()
    lines = [{"epoch": e, "train_loss": 1.0} for e in range(3)]
    if finished:
        lines.append({"final": {"best_epoch": 1, "wall_s": 120.0, "test": {"HR@10": hr, "NDCG@10": ndcg}}})
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return folder


def test_groups_by_name_and_reports_mean_std_and_reference(tmp_path, capsys):
    runs = [fake_run(tmp_path / "m_s0", 0.06, 0.03), fake_run(tmp_path / "m_s1", 0.04, 0.01)]
    runs.append(fake_run(tmp_path / "other_s0", 0.1, 0.05))
    assert load_script().main([str(r) for r in runs] + ["--reference", "0.05", "0.02"]) == 0
    out = capsys.readouterr().out
    assert "| m | 2 | 0.0500 ± 0.0141 (1.00x) | 0.0200 ± 0.0141 (1.00x) | 3 (2) / 3 (2) | 2 min / 2 min |" in out
    assert "| other | 1 | 0.1000 ± 0.0000 (2.00x) |" in out


def test_an_unfinished_run_is_an_error_naming_it(tmp_path):
    run = fake_run(tmp_path / "m_s0", 0.0, 0.0, finished=False)
    with pytest.raises(SystemExit, match="m_s0/metrics.jsonl: the run has not finished"):
        load_script().main([str(run)])
