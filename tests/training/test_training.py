"""Training CLI: config handling, exact resume, two-process data parallelism, evaluate."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rec2pm.cli import main
from rec2pm.run_config import build_run_config, parse_override
from rec2pm.training import epoch_batches, load_checkpoint, save_atomically, train

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    'data.kind="synthetic"',
    "data.synthetic_users=40",
    "data.synthetic_length=22",
    "data.synthetic_items=60",
    "data.max_length=20",
    'model.config="sasrec-small"',
    "model.segment_len=6",
    "model.num_memory_tokens=2",
    'method.name="rec2pm-o"',
    "train.epochs=3",
    "train.batch_size=8",
    "train.progress=false",
    "train.eval_batch_size=16",
    "train.threads=1",
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


# Everything a resume must restore: dropout masks and sampled negatives (RNG streams), and a
# schedule whose learning rate changes every step (warm-up, then cosine).
STOCHASTIC = (
    "model.dropout=0.3",
    'method.loss="sampled"',
    "method.num_negatives=16",
    'train.schedule="cosine"',
    "train.warmup_steps=4",
)


def test_a_run_resumes_only_with_the_settings_it_was_saved_with(tmp_path):
    stopped = ("train.checkpoint_every=2", "train.stop_after_steps=3")
    assert train(run_config(tmp_path, *stopped))["interrupted"]
    for changed, text in [("train.lr=0.5", "train.lr: 0.001 -> 0.5"), ("model.dropout=0.3", "model.dropout")]:
        with pytest.raises(ValueError, match=rf"last.pt: cannot resume: .*{re.escape(text)}"):
            train(run_config(tmp_path, *stopped, changed))
    # Where it runs and for how long may change.
    assert "interrupted" not in train(run_config(tmp_path, "train.checkpoint_every=2", "train.progress=false"))


def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    whole = train(run_config(tmp_path / "whole", *STOCHASTIC))
    first = train(run_config(tmp_path / "resumed", *STOCHASTIC, "train.checkpoint_every=3", "train.stop_after_steps=8"))
    assert first == {"interrupted": True, "step": 8}
    last = load_checkpoint(tmp_path / "resumed" / "last.pt", kind="last")
    assert last["state"]["step"] == 6  # the last checkpoint
    # The reported wall time is the whole run's: an hour recorded before the interruption is kept.
    last["state"]["wall_s"] = 3600.0
    save_atomically(last, tmp_path / "resumed" / "last.pt")
    resumed = train(run_config(tmp_path / "resumed", *STOCHASTIC, "train.checkpoint_every=3"))
    assert 3600.0 < resumed.pop("wall_s") < 3600.0 + 600.0
    whole.pop("wall_s")
    assert resumed == whole
    assert log_lines(tmp_path / "resumed") == log_lines(tmp_path / "whole")


def test_cli_train_and_evaluate(tmp_path, capsys):
    out = tmp_path / "cli"
    args = (
        ["train"]
        + [a for s in SMALL for a in ("--set", s)]
        + ["--set", f'train.out_dir="{out}"', "--set", "train.epochs=1"]
    )
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
    sets = [a for s in SMALL + ["train.epochs=1", "model.dropout=0.0", 'method.loss="full"'] for a in ("--set", s)]
    single = tmp_path / "single"
    assert main(["train", *sets, "--set", f'train.out_dir="{single}"']) == 0
    double = tmp_path / "double"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "rec2pm",
            "train",
            *sets,
            "--set",
            f'train.out_dir="{double}"',
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one = load_checkpoint(single / "last.pt", kind="last")["model"]
    two = load_checkpoint(double / "last.pt", kind="last")["model"]
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


def test_min_epochs_holds_early_stopping_back(tmp_path):
    # The same never-improving run as above: patience 1 alone stops after 2 epochs; the floor
    # keeps it going to 4, and the stop then holds across a resume.
    args = ("train.lr=0.0", "train.patience=1", "train.epochs=6", "train.min_epochs=4")
    assert train(run_config(tmp_path / "floor", *args))["steps"] == 20
    assert train(run_config(tmp_path / "floor", *args))["steps"] == 20


@pytest.mark.parametrize(
    "override, text",
    [
        ("train.min_epochs=-2", "train.min_epochs must be >= 0, got -2"),
        ("train.batch_size=true", "train.batch_size must be an int, got True (bool)"),
        ("train.patience=-1", "train.patience must be >= 0, got -1"),
        ('train.lr="fast"', "train.lr must be a finite number, got 'fast' (str)"),
        ("train.lr=-0.1", "train.lr must be >= 0.0"),
        ("train.epochs=2.5", "train.epochs must be an int, got 2.5 (float)"),
        ('train.progress="yes"', "train.progress must be true or false"),
        ('train.device="gpu"', "train.device must be one of"),
        ('data.max_length="50"', "data.max_length must be an int"),
        ("data.synthetic_noise=1.5", "data.synthetic_noise must be in [0.0, 1.0]"),
        ("data.synthetic_min_length=500", "data.synthetic_min_length must be <= data.synthetic_length = 120"),
        ("data.user_limit=-1", "data.user_limit must be >= 0, got -1"),
        ('train.selection="best"', "train.selection must be one of ('sampled', 'expected')"),
        ('train.selection="expected"', "train.selection='expected' needs whole generated histories"),
        ('model.dropout="0.5"', "model.dropout must be a finite number, got '0.5' (str)"),
        ("model.num_layers=2.0", "model.num_layers must be an int, got 2.0 (float)"),
        ("model.dropout=1.0", "model: dropout must be in [0, 1)"),
        ('method.con_weight="1"', "method.con_weight must be a finite number, got '1' (str)"),
        ("method.num_negatives=-1", "method: num_negatives must be >= 1, got -1"),
        ("method.stage1_ar=1", "method.stage1_ar must be true or false, got 1 (int)"),
    ],
)
def test_wrong_typed_or_out_of_range_settings_are_errors_naming_the_key(override, text, capsys):
    with pytest.raises((ValueError, TypeError)) as info:
        build_run_config(None, [override])
    assert text in str(info.value)
    with pytest.raises(SystemExit) as code:  # the CLI reports it as a usage error, no traceback
        main(["train", "--set", override, "--print-config"])
    assert code.value.code == 2 and text in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    train(run_config(out, "train.epochs=1"))
    return out


def crafted_pickle(path, marker):
    """A file that runs code when unpickled without weights_only (it would create ``marker``)."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.write_bytes(pickle.dumps({"model": Payload(), "run": {}, "num_items": 1}, protocol=2))
    return path


def test_checkpoints_load_without_running_code_from_the_file(tmp_path, trained_run):
    marker = tmp_path / "code-ran"
    bad = crafted_pickle(tmp_path / "crafted.pt", marker)
    with pytest.raises(ValueError, match=f"{bad}: not a readable rec2pm checkpoint"):
        load_checkpoint(bad)
    assert not marker.exists()
    # A resume from a crafted last.pt is refused the same way.
    out = tmp_path / "resume"
    out.mkdir()
    crafted_pickle(out / "last.pt", marker)
    with pytest.raises(ValueError, match="last.pt: not a readable rec2pm checkpoint"):
        train(run_config(out))
    assert not marker.exists()


def damaged_checkpoints(tmp_path, trained_run):
    good = trained_run / "best.pt"
    ckpt = torch.load(good, weights_only=True)
    cases = {}
    (tmp_path / "text.pt").write_text("epoch,loss\n1,0.5\n")
    cases["text.pt"] = "not a readable rec2pm checkpoint"
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["truncated.pt"] = "not a readable rec2pm checkpoint"
    torch.save({"weights": ckpt["model"]}, tmp_path / "other.pt")
    cases["other.pt"] = "not a rec2pm best checkpoint; expected the entries ['model', 'run', 'num_items']"
    layers = {**ckpt, "run": {**ckpt["run"], "model": {**ckpt["run"]["model"], "num_layers": 3}}}
    torch.save(layers, tmp_path / "layers.pt")
    cases["layers.pt"] = "the weights do not match the model its run config builds"
    method = {**ckpt, "run": {**ckpt["run"], "method": {**ckpt["run"]["method"], "name": "full"}}}
    torch.save(method, tmp_path / "method.pt")
    cases["method.pt"] = "the weights do not match the model its run config builds (FullAttention"
    junk = {**ckpt, "run": {**ckpt["run"], "train": {**ckpt["run"]["train"], "batch_size": "many"}}}
    torch.save(junk, tmp_path / "junk.pt")
    cases["junk.pt"] = "the checkpoint's run config is invalid: train.batch_size must be an int"
    torch.save({**ckpt, "run": {**ckpt["run"], "data": [1]}}, tmp_path / "list.pt")
    cases["list.pt"] = "damaged checkpoint: run.data must be a table, got [1]"
    return cases


def test_evaluating_on_another_catalogue_of_the_same_size_is_refused(tmp_path, trained_run):
    from rec2pm.training import load_evaluation

    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    assert load_evaluation(trained_run / "best.pt").data.num_items == ckpt["num_items"]
    torch.save({**ckpt, "catalogue": "0" * 64}, tmp_path / "other.pt")  # trained on other item ids
    with pytest.raises(ValueError, match=r"has the 60 items .*other.pt was trained on, but not the same ones"):
        load_evaluation(tmp_path / "other.pt")
    torch.save({**ckpt, "num_items": 61}, tmp_path / "more.pt")
    with pytest.raises(ValueError, match=r"the synthetic data has 60 items, but .*more.pt was trained on 61"):
        load_evaluation(tmp_path / "more.pt")
    older = {key: value for key, value in ckpt.items() if key != "catalogue"}  # written before it was kept
    torch.save(older, tmp_path / "older.pt")
    assert load_evaluation(tmp_path / "older.pt").data.num_items == 60


def test_a_checkpoint_without_a_setting_added_since_takes_its_default(tmp_path, trained_run):
    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    data = {key: value for key, value in ckpt["run"]["data"].items() if key != "user_limit"}
    torch.save({**ckpt, "run": {**ckpt["run"], "data": data}}, tmp_path / "older.pt")
    assert load_checkpoint(tmp_path / "older.pt")["run"]["data"]["user_limit"] == 0


def test_evaluate_names_the_file_and_what_is_wrong_with_it(tmp_path, trained_run, capsys):
    assert main(["evaluate", str(trained_run / "best.pt"), "--no-progress"]) == 0
    capsys.readouterr()
    for name, text in damaged_checkpoints(tmp_path, trained_run).items():
        path = tmp_path / name
        with pytest.raises(SystemExit) as code:
            main(["evaluate", str(path), "--no-progress"])
        err = capsys.readouterr().err
        assert code.value.code == 2 and str(path) in err and text in err, (name, err)
    with pytest.raises(SystemExit):
        main(["evaluate", str(tmp_path / "missing.pt")])
    assert "missing.pt: no such checkpoint file" in capsys.readouterr().err


def test_a_checkpoint_from_before_the_input_norm_builds_without_it(tmp_path, trained_run, capsys):
    """Checkpoints written before ``model.input_norm`` existed name no such option and hold no
    norm weights: evaluating or serving them builds the model they were trained as.  Naming
    the option while lacking the weights stays an error."""
    from rec2pm.serving.recommender import load_model

    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    assert "input_norm" not in ckpt["run"]["model"]
    old = {**ckpt, "model": {k: v for k, v in ckpt["model"].items() if not k.startswith("decoder.input_norm.")}}
    torch.save(old, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt").decoder.input_norm is None
    assert main(["evaluate", str(tmp_path / "old.pt"), "--no-progress"]) == 0
    assert load_model(trained_run / "best.pt").decoder.input_norm is not None
    named = {**old, "run": {**old["run"], "model": {**old["run"]["model"], "input_norm": True}}}
    torch.save(named, tmp_path / "named.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["evaluate", str(tmp_path / "named.pt"), "--no-progress"])
    assert "the weights do not match" in capsys.readouterr().err


def test_training_excludes_the_whole_history_not_the_window(tmp_path, monkeypatch):
    """Seen items are removed from the candidates over the untruncated history by default."""
    import rec2pm.training as training
    from rec2pm.data import leave_one_out
    from rec2pm.run_config import DEFAULTS

    assert DEFAULTS["train"]["exclude_history"] is True
    calls = []
    real = training.evaluate

    def spy(score, items, cu, targets, num_items, **kwargs):
        calls.append(dict(items=items, cu=cu, **kwargs))
        return real(score, items, cu, targets, num_items, **kwargs)

    monkeypatch.setattr(training, "evaluate", spy)
    run = run_config(tmp_path, "train.epochs=1", "data.max_length=5")  # histories of 20 events, window 5
    del run["train"]["exclude_history"]  # the default must be in force
    run["train"]["exclude_history"] = DEFAULTS["train"]["exclude_history"]
    train(run)
    split = leave_one_out(training.load_data(run["data"]))
    for call, history in zip(calls, (split.valid_history, split.test_history), strict=True):
        assert call["exclude_history"] is True
        assert int(call["cu"].diff().max()) == 5  # the model reads the window...
        assert torch.equal(call["exclude_items"], history.items)  # ...exclusion sees everything
        assert torch.equal(call["exclude_cu_seqlens"], history.cu_seqlens)
        assert int(history.cu_seqlens.diff().min()) > 5


def test_a_malformed_toml_file_is_named(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nepochs = = 3\n")
    with pytest.raises(SystemExit):
        main(["train", str(path), "--print-config"])
    assert f"{path}: not a valid TOML file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, text, message",
    [("absent.txt", None, "absent.txt: no such file"), ("bad.txt", "1 2 x\n", "bad.txt, line 1: field 3 (item 2)")],
)
def test_a_missing_or_malformed_data_file_is_a_message_not_a_traceback(tmp_path, capsys, name, text, message):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as code:
        main(
            [
                "train",
                "--set",
                'data.kind="s3rec"',
                "--set",
                f'data.path="{tmp_path / name}"',
                "--set",
                f'train.out_dir="{tmp_path / "out"}"',
                "--set",
                "train.progress=false",
            ]
        )
    assert code.value.code == 2 and message in capsys.readouterr().err


def _table_with_times(path, users=30, length=14, items=40):
    """A user,item,time table: each user's events a few minutes to days apart."""
    gen = torch.Generator().manual_seed(5)
    rows = ["user,item,time"]
    for u in range(users):
        t = 1_600_000_000 + u
        for _ in range(length):
            t += int(10 ** (1 + 4 * torch.rand((), generator=gen)))
            rows.append(f"{u},{int(torch.randint(1, items + 1, (), generator=gen))},{t}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("method", ["full", "rec2pm-o"])
def test_hstu_trains_and_evaluates_with_the_timestamp_bias(tmp_path, method):
    table = _table_with_times(tmp_path / "events.csv")
    out = tmp_path / method
    overrides = [
        'data.kind="table"',
        f'data.path="{table}"',
        'data.user_col="user"',
        'data.item_col="item"',
        'data.time_col="time"',
        "data.max_length=12",
        'model.config="hstu-small"',
        "model.segment_len=4",
        "model.num_time_buckets=40",
        f'method.name="{method}"',
        "train.epochs=2",
        "train.batch_size=8",
        "train.progress=false",
        "train.threads=1",
        f'train.out_dir="{out}"',
    ]
    summary = train(build_run_config(None, overrides))
    assert summary["test"]["users"] == 30
    weights = load_checkpoint(out / "best.pt")["model"]
    tables = [w for name, w in weights.items() if name.endswith("ts_bias")]
    assert len(tables) == 2 and all(t.abs().sum() > 0 for t in tables)  # trained, from zeros
    assert main(["evaluate", str(out / "best.pt"), "--no-progress"]) == 0


def test_the_timestamp_bias_needs_data_with_times(tmp_path):
    config = run_config(tmp_path / "x", 'model.config="hstu-small"', "model.num_time_buckets=8", 'method.name="full"')
    with pytest.raises(ValueError, match="needs data with integer timestamps"):
        train(config)


def test_user_limit_and_min_length_shape_the_data():
    from rec2pm.training import load_data

    run = build_run_config(None, ["data.synthetic_users=30", "data.synthetic_min_length=40", "data.user_limit=12"])
    data = load_data(run["data"])
    lengths = data.lengths()
    assert data.num_users() == 12 and data.num_items == 1000
    assert int(lengths.min()) >= 40 and int(lengths.max()) <= 120 and len(set(lengths.tolist())) > 1
    whole = load_data({**run["data"], "user_limit": 0})
    assert torch.equal(whole.items[: data.items.numel()], data.items)  # the first 12 users, unchanged


def test_expected_selection_picks_the_epoch_of_the_best_planted_expectation(tmp_path):
    extra = ['train.selection="expected"', "train.exclude_history=false", "train.epochs=3", "data.max_length=22"]
    summary = train(run_config(tmp_path, *extra))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [r["valid"]["expected_NDCG@10"] for r in records if "valid" in r]
    assert len(expected) == 3 and all(0.0 < value < 1.0 for value in expected)
    assert summary["best_valid"] == max(expected) and summary["best_epoch"] == expected.index(max(expected))
    assert all("expected_HR@10" in r["valid"] for r in records if "valid" in r)
