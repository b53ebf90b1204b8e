"""Training CLI: config handling, exact resume, two-process data parallelism, evaluate."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rec2pm.cli import main
from rec2pm.run_config import build_run_config, parse_override
from rec2pm.training import epoch_batches, load_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    'data.kind="synthetic"', "data.synthetic_users=40", "data.synthetic_length=22", "data.synthetic_items=60",
    "data.max_length=20", 'model.config="sasrec-small"', "model.segment_len=6", "model.num_memory_tokens=2",
    'method.name="rec2pm-o"', "train.epochs=3", "train.batch_size=8", "train.progress=false",
    "train.eval_batch_size=16", "train.threads=1",
]


def run_config(out_dir, *extra):
    return build_run_config(None, [*SMALL, f'train.out_dir="{out_dir}"', *extra])


def log_lines(out_dir):
    lines = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.get("final", {}).pop("wall_s", None)
    return lines


def test_overrides_and_unknown_keys():
    assert parse_override("train.lr=1e-3") == ("train", "lr", 1e-3)
    assert parse_override("method.name=full") == ("method", "name", "full")
    with pytest.raises(ValueError, match="unknown key train.lrate"):
        build_run_config(None, ["train.lrate=1"])
    with pytest.raises(ValueError, match="unknown table"):
        build_run_config(None, ["optim.lr=1"])
    with pytest.raises(ValueError, match="method.name must be one of"):
        build_run_config(None, ['method.name="gru4rec"'])
    with pytest.raises(ValueError, match="unknown key model.layers"):
        build_run_config(None, ["model.layers=2"])


def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    whole = train(run_config(tmp_path / "whole"))
    first = train(run_config(tmp_path / "resumed", "train.checkpoint_every=3", "train.stop_after_steps=8"))
    assert first == {"interrupted": True, "step": 8}
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["state"]["step"] == 6  # the last checkpoint
    resumed = train(run_config(tmp_path / "resumed", "train.checkpoint_every=3"))
    for summary in (whole, resumed):
        summary.pop("wall_s")
    assert resumed == whole
    assert log_lines(tmp_path / "resumed") == log_lines(tmp_path / "whole")


def test_cli_train_and_evaluate(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train"] + [a for s in SMALL for a in ("--set", s)] + ["--set", f'train.out_dir="{out}"',
                                                                    "--set", "train.epochs=1"]
    assert main(args) == 0
    assert main(["evaluate", str(out / "best.pt"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "NDCG@10" in printed and "HR@10" in printed
    final = log_lines(out)[-1]["final"]["test"]
    assert f"{final['NDCG@10']:.4f}" in printed


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    sets = [a for s in SMALL + ["train.epochs=1", "model.dropout=0.0", 'method.loss="full"']
            for a in ("--set", s)]
    single = tmp_path / "single"
    assert main(["train", *sets, "--set", f'train.out_dir="{single}"']) == 0
    double = tmp_path / "double"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "rec2pm", "train", *sets,
                             "--set", f'train.out_dir="{double}"'], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one = load_checkpoint(single / "last.pt")["model"]
    two = load_checkpoint(double / "last.pt")["model"]
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)


def test_epoch_batches_give_every_rank_a_user_and_drop_none():
    order = torch.randperm(41, generator=torch.Generator().manual_seed(0))
    batches = epoch_batches(order, 8, world_size=2)
    assert torch.equal(torch.cat(batches), order)
    assert [b.numel() for b in batches] == [8, 8, 8, 8, 9]
    assert all(b[rank::2].numel() >= 1 for b in batches for rank in range(2))
    assert [b.numel() for b in epoch_batches(order, 8, world_size=1)] == [8, 8, 8, 8, 8, 1]


def test_early_stop_survives_resume_and_no_resume_starts_clean(tmp_path):
    # lr 0: validation never improves after the first epoch, so patience 1 stops after epoch 1.
    args = ("train.lr=0.0", "train.patience=1", "train.epochs=6")
    stopped = train(run_config(tmp_path / "es", *args))
    assert stopped["steps"] == 10  # two epochs of 5 batches
    again = train(run_config(tmp_path / "es", *args))  # resuming a stopped run trains nothing more
    assert again["steps"] == 10
    assert len([x for x in log_lines(tmp_path / "es") if "epoch" in x]) == 2
    fresh = train(run_config(tmp_path / "es", "train.epochs=1"), resume=False)
    assert fresh["steps"] == 5
    assert len([x for x in log_lines(tmp_path / "es") if "epoch" in x]) == 1
