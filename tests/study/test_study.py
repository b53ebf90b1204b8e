"""The accuracy study's commands on its miniature: every run type trains, stores its result,
is skipped when done, and the report redraws the same tables and figures from the files."""

import json
import multiprocessing
import subprocess
import sys
import time

import pytest
import torch

from rec2pm.cli import main
from rec2pm.study import grid
from rec2pm.study.report import FIGURES, write_report
from rec2pm.study.runner import comparable_run, planted, read_result
from rec2pm.training import keep_last, load_evaluation
from tests.data.files import SHARED_DATA, shared_file


def test_the_full_grid_has_every_run_the_study_needs():
    runs = grid.study_runs("full")
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    groups = {g: [r for r in runs if r.group == g] for g in ("real", "lifelong", "ablation")}
    # 2 sets x (6 SASRec + 2 HSTU methods), 3 noises x 6 methods, 1 + 4 + 7 ablation cells; 3 seeds
    # each; the count baselines once (popularity on the real sets, and history counts on the generated).
    assert [len(groups[g]) for g in groups] == [2 * 8 * 3 + 2, 3 * 6 * 3 + 3 * 2, 12 * 3]
    assert {r.labels["seed"] for r in runs} == set(grid.SEEDS)
    lifelong = groups["lifelong"][0].run
    assert lifelong["model"]["segment_len"] == 200 and lifelong["model"]["num_memory_tokens"] == 4
    assert lifelong["data"]["synthetic_min_length"] == 1000 and lifelong["data"]["synthetic_length"] == 2000
    assert not lifelong["train"]["exclude_history"]
    real = groups["real"][0].run
    assert real["model"]["segment_len"] == 50 and real["train"]["exclude_history"]
    cells = {(r.labels["variant"], r.labels["seed"]) for r in groups["ablation"]}
    assert ("no-con", 0) in cells and ("C16", 2) in cells and ("sg-target0-prefix1-ar1", 1) in cells
    sizes = {r.run["model"]["num_memory_tokens"] for r in groups["ablation"]}
    assert sizes == {1, 2, 4, 8, 16}
    no_con = next(r for r in groups["ablation"] if r.labels["variant"] == "no-con")
    assert no_con.run["method"]["con_weight"] == 0.0
    # Only the memory-size cells start slowly enough to need the early-stopping floor.
    floors = {
        r.run["model"]["num_memory_tokens"] in grid.ABLATION_MEMORY_SIZES: r.run["train"]["min_epochs"] for r in runs
    }
    assert floors == {True: grid.SLOW_START_MIN_EPOCHS, False: 0}


@pytest.fixture(scope="module")
def mini_study(tmp_path_factory):
    """The whole miniature grid, run once through the command line (about 20 s)."""
    shared_file("movielens/ml-latest-small/ratings.csv.gz")
    shared_file("s3rec/LastFM.txt.gz")
    root = tmp_path_factory.mktemp("study")
    args = ["--scale", "mini", "--results", str(root / "results"), "--work", str(root / "work")]
    args += ["--data-root", str(SHARED_DATA), "--threads", "1"]
    assert main(["study", "run", *args]) == 0
    return root, args


def test_every_run_leaves_a_small_result_with_per_user_values(mini_study):
    root, _ = mini_study
    files = sorted((root / "results").glob("*.json"))
    assert len(files) == len(grid.study_runs("mini"))
    assert max(f.stat().st_size for f in files) < 20_000
    lifelong = read_result(root / "results" / "lifelong__noise0.2__sasrec__rec2pm-o__seed0.json")
    users = lifelong["users"]
    count = len(users["ranks"])
    for key in ("ranks_one_shot", "expected_HR@10", "expected_HR@10_one_shot", "best_HR@10", "history_length"):
        assert len(users[key]) == count
    # No ranking beats the planted signal's oracle, user by user.
    assert all(e <= b + 1e-9 for e, b in zip(users["expected_HR@10"], users["best_HR@10"], strict=True))
    assert lifelong["efficiency"]["state_bytes_per_user"] == 4 * 16 * 4  # C = 4 vectors of d = 16, fp32
    # The stored expectations are the planted signal's, of the saved model's own top 10.
    evaluation = load_evaluation(root / "work" / lifelong["name"] / "best.pt")
    with torch.no_grad():
        scores = evaluation.model.score_history(evaluation.items, evaluation.cu_seqlens, iterative=True)
    expected = planted(evaluation.run).expected_metrics(scores.topk(10, dim=1).indices)["HR@10"]
    assert torch.allclose(torch.tensor(users["expected_HR@10"], dtype=torch.float64), expected, atol=1e-5)
    full = read_result(root / "results" / "real__movielens__sasrec__full__seed0.json")
    assert "ranks_one_shot" not in full["users"] and full["efficiency"]["request_ms"] > 0
    # Full is also scored on its last S events alone: the saved model's own scores of that window.
    window = full["users"]["ranks_recent_window"]
    evaluation = load_evaluation(root / "work" / full["name"] / "best.pt")
    segment_len = evaluation.model.config.segment_len
    recent = evaluation.ranks(lambda items, cu: evaluation.model.score_history(*keep_last(items, cu, segment_len)))
    assert window == recent.tolist() and window != full["users"]["ranks"]
    lifelong_full = read_result(root / "results" / "lifelong__noise0.2__sasrec__full__seed0.json")
    assert len(lifelong_full["users"]["expected_HR@10_recent_window"]) == count


def test_a_second_run_skips_what_is_done_and_a_changed_config_is_an_error(mini_study, capsys):
    root, args = mini_study
    assert main(["study", "run", *args, "--only", "ablation/noise0.2/sasrec/C1/"]) == 0
    assert "0 runs done, 1 already had results" in capsys.readouterr().out
    path = root / "results" / "ablation__noise0.2__sasrec__C1__seed0.json"
    record = json.loads(path.read_text())
    spec = next(r for r in grid.study_runs("mini") if r.file_name == path.name)
    assert record["run"] == comparable_run(spec.run)
    record["run"]["train"]["lr"] = 0.5
    original = path.read_text()
    path.write_text(json.dumps(record))
    try:
        with pytest.raises(SystemExit):
            main(["study", "run", *args, "--only", "ablation/noise0.2/sasrec/C1/"])
        assert "written for another configuration" in capsys.readouterr().err
    finally:
        path.write_text(original)


def test_the_report_redraws_identical_tables_and_figures(mini_study, tmp_path):
    root, _ = mini_study
    out = tmp_path / "results.md"
    out.write_text("# Hand-written introduction\n\nkept as is\n\n")
    write_report(root / "results", out, scale="mini", figures_dir=tmp_path / "figures")
    first = out.read_text()
    pngs = {name: (tmp_path / "figures" / name).read_bytes() for name in FIGURES}
    assert all(data.startswith(b"\x89PNG") for data in pngs.values())
    write_report(root / "results", out, scale="mini", figures_dir=tmp_path / "figures")
    assert out.read_text() == first
    assert {name: (tmp_path / "figures" / name).read_bytes() for name in FIGURES} == pngs
    assert first.startswith("# Hand-written introduction\n\nkept as is\n\n<!-- Generated by")
    for text in (
        "| real | 18 / 18 |",
        "Rec2PM-O at or above Full",
        "C = 4 best",
        "L_con helps",
        "one-shot about iterative",
        "overwriting beats appending",
        "robust to noise",
        "| sasrec | rec2pm-o | 1 |",
        "(figures/accuracy_vs_noise.png)",
        "| noise0.2 | sasrec rec2pm-o |",
        "history-count (count baseline)",
    ):
        assert text in first, text


def test_a_damaged_result_file_is_named(mini_study, tmp_path):
    root, _ = mini_study
    results = tmp_path / "results"
    results.mkdir()
    (results / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json: not a readable study result"):
        write_report(results, tmp_path / "out.md", scale="mini")


def test_a_run_claimed_by_a_live_process_is_passed_by_and_a_dead_claim_is_taken_over(tmp_path):
    from rec2pm.study.runner import claim, run_study

    spec = next(r for r in grid.study_runs("mini") if r.name == "lifelong/noise0.2/sasrec/recent/seed0")
    work = tmp_path / "work" / spec.name
    work.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (work / "claim").write_text(str(live.pid))
        counts = run_study([spec], results_dir=tmp_path / "results", work_dir=tmp_path / "work", say=lambda _: None)
        assert counts == {"done": 0, "skipped": 0, "claimed": 1}
    finally:
        live.kill()
        live.wait()
    # Its owner is gone: the next process takes the run over and finishes it.
    counts = run_study([spec], results_dir=tmp_path / "results", work_dir=tmp_path / "work", say=lambda _: None)
    assert counts == {"done": 1, "skipped": 0, "claimed": 0}
    assert (tmp_path / "results" / spec.file_name).exists() and not (work / "claim").exists()
    assert claim(work) and not (work / "claim").read_text() == ""


def fabricated(group, dataset, variant, seed, per_user, best=None, length=1500, epochs=20):
    """A result record with the fields the report reads, per-user values given."""
    users = {"history_length": [length] * len(per_user), "ranks": [1] * len(per_user)}
    if best is not None:
        users.update({"expected_HR@10": list(per_user), "expected_HR@10_one_shot": list(per_user)})
        users["best_HR@10"] = [best] * len(per_user)
    else:
        users["ranks"] = [1 if v else 50 for v in per_user]
        users["ranks_one_shot"] = users["ranks"]
    labels = {"dataset": dataset, "backbone": "sasrec", "method": variant, "variant": variant, "seed": seed}
    return {
        "format": 1,
        "name": f"{group}/{dataset}/sasrec/{variant}/seed{seed}",
        "group": group,
        "labels": labels,
        "metrics": {},
        "users": users,
        "run": {"train": {"batch_size": 2}},
        "efficiency": {"state_bytes_per_user": 1024.0, "request_ms": 1.0},
        "train": {"wall_s": 60.0, "steps": epochs * -(-len(per_user) // 2)},
    }


def test_report_compares_full_on_its_whole_input_with_its_last_window(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    whole = [0.3, 0.4, 0.35, 0.5] * 10
    for seed in (0, 1):  # seed 0 predates the window: the table uses seed 1 alone
        record = fabricated("lifelong", "noise0", "full", seed, whole, best=0.5)
        if seed:
            record["users"]["expected_HR@10_recent_window"] = [v - 0.1 for v in whole]
        (results / (record["name"].replace("/", "__") + ".json")).write_text(json.dumps(record))
    text = write_report(results, tmp_path / "results.md", scale="full", figures_dir=tmp_path / "figures").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| noise0 | sasrec | 1 |"))
    assert "0.78 of best | 0.57 of best | +10.00 [+10.00, +10.00]" in row and row.endswith("| supported |")


def test_report_names_runs_that_stopped_before_the_slow_start_floor(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    floor = grid.SLOW_START_MIN_EPOCHS
    for variant, epochs in (("full", floor), ("rec2pm-o", floor - 1)):
        record = fabricated("lifelong", "noise0", variant, 0, [0.3] * 9, best=0.5, epochs=epochs)
        (results / (record["name"].replace("/", "__") + ".json")).write_text(json.dumps(record))
    text = write_report(results, tmp_path / "results.md", scale="full", figures_dir=tmp_path / "figures").read_text()
    assert f"ended before {floor} epochs: `lifelong/noise0/sasrec/rec2pm-o/seed0`." in text


@pytest.mark.parametrize("lead", [0.05, -0.05])
def test_claims_follow_planted_differences(tmp_path, lead):
    """Result files with known per-user differences give the verdicts those differences imply."""
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.4, 200)
    results = tmp_path / "results"
    results.mkdir()
    records = []
    for noise, gap in ((0, 0.0), (0.4, lead)):
        dataset = f"noise{noise:g}"
        for seed in (0, 1):
            jitter = rng.normal(0, 0.002, 200)
            records += [
                fabricated("lifelong", dataset, "full", seed, base + jitter, best=0.5),
                fabricated("lifelong", dataset, "rec2pm-o", seed, base + gap + jitter, best=0.5),
                fabricated("lifelong", dataset, "tok-serial-o", seed, base + gap - 0.1 + jitter, best=0.5),
            ]
    for record in records:
        (results / (record["name"].replace("/", "__") + ".json")).write_text(json.dumps(record))
    out = write_report(results, tmp_path / "results.md", scale="mini", figures_dir=tmp_path / "figures")
    claims = {
        (line.split("|")[1].strip(), line.split("|")[2].strip()): line.split("**")[1]
        for line in out.read_text().splitlines()
        if line.count("**") == 2
    }
    ahead = "supported" if lead > 0 else "refuted"
    assert claims[("Rec2PM-O at or above Full", "noise0.4, sasrec")] == ahead
    assert claims[("Rec2PM-O at or above Full", "noise0, sasrec")] == "supported"
    assert claims[("Rec2PM-O ahead of Tok-Serial-O", "noise0.4, sasrec")] == "supported"
    assert claims[("one-shot about iterative", "noise0.4, sasrec")] == "supported"
    grows = next(v for k, v in claims.items() if k[0].startswith("robust to noise"))
    assert grows == ahead


def test_a_backbone_without_its_own_full_is_not_compared_with_another_backbones_full(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    for backbone, variant in (("sasrec", "full"), ("hstu", "rec2pm-o"), ("count", "popularity")):
        record = fabricated("real", "ml-1m", variant, 0, [1, 0, 1, 1] * 10)
        record["labels"]["backbone"] = backbone
        record["name"] = f"real/ml-1m/{backbone}/{variant}/seed0"
        (results / (record["name"].replace("/", "__") + ".json")).write_text(json.dumps(record))
    text = write_report(results, tmp_path / "results.md", scale="full", figures_dir=tmp_path / "figures").read_text()
    hstu = next(line for line in text.splitlines() if line.startswith("| hstu | rec2pm-o |"))
    assert hstu.split(" | ")[5:7] == ["–", "–"]  # ΔHR@10 and MDE: no HSTU Full to compare with
    count = next(line for line in text.splitlines() if line.startswith("| count | popularity |"))
    assert count.split(" | ")[5] == "+0.00 [+0.00, +0.00]"  # count baselines: against SASRec's Full


def _claim_in_a_process(work, start_at, out):
    from rec2pm.study.runner import claim

    while time.time() < start_at:  # every process asks at the same moment
        pass
    out.put(claim(work))


def test_processes_that_find_a_dead_claim_at_once_take_it_over_once(tmp_path):
    """Every claimant decides under one lock: of eight processes that find a dead owner's
    claim at the same moment, exactly one takes the run."""
    context = multiprocessing.get_context("fork")
    for attempt in range(5):
        work = tmp_path / f"work{attempt}"
        work.mkdir()
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (work / "claim").write_text(str(dead.pid))  # its owner has exited
        out = context.Queue()
        start_at = time.time() + 1.0
        processes = [context.Process(target=_claim_in_a_process, args=(work, start_at, out)) for _ in range(8)]
        for p in processes:
            p.start()
        won = [out.get(timeout=60) for _ in processes]
        for p in processes:
            p.join()
        assert sum(won) == 1, won
        assert int((work / "claim").read_text()) in {p.pid for p in processes}


def test_a_result_file_that_is_not_a_json_object_is_named(tmp_path):
    path = tmp_path / "five.json"
    path.write_text("5")
    with pytest.raises(ValueError, match=r"five\.json: not a study result \(a JSON int, not an object\)"):
        read_result(path)
