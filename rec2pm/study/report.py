"""``python -m rec2pm study report``: every table, claim and plot of ``docs/results.md``,
redrawn from the result files alone (``rec2pm.study.runner`` writes them).

Per-user values, averaged over a method's seeds, are what two methods are compared on:
HR@10 / NDCG@10 of the held-out item from its rank (real data), and on generated data the
expected HR@10 / NDCG@10 under the planted next-event distribution (``LifelongPlan.
expected_metrics``), which carries no target-sampling noise.  ``rec2pm.study.stats`` turns
the paired differences into intervals and verdicts.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import stats
from .baselines import COUNT_BASELINES
from .grid import ABLATION_MEMORY_SIZES, NOISES, SASREC_METHODS, SCALES, SLOW_START_MIN_EPOCHS, study_runs
from .runner import RECENT_WINDOW, read_result

METRIC = "HR@10"
BACKBONES = ("count", "sasrec", "hstu")
VARIANTS = (*COUNT_BASELINES, *SASREC_METHODS)
# History-length buckets of the per-length comparison, in segments of S events.
SEGMENT_BUCKETS = ((0, 1), (1, 4), (4, 10), (10, None))
FIGURES = ("accuracy_vs_noise.png", "accuracy_vs_memory_size.png", "rec2pm_vs_full_by_length.png")


@dataclass
class Cell:
    """The seeds of one (group, dataset, backbone, variant)."""

    records: list[dict]

    @property
    def seeds(self) -> int:
        return len(self.records)

    def per_user(self, key: str, metric: str = METRIC) -> np.ndarray:
        """Seed-mean per-user values: ``key`` is ``"ranks"``/``"ranks_one_shot"`` (metric from
        ranks) or ``"expected"``/``"expected_one_shot"`` (planted expectation)."""
        if key.startswith("expected"):
            suffix = key[len("expected") :]
            return stats.seed_mean([np.asarray(r["users"][f"expected_{metric}{suffix}"]) for r in self.records])
        return stats.seed_mean([stats.per_user_metric(r["users"][key], metric) for r in self.records])

    def seed_values(self, key: str, metric: str = METRIC) -> np.ndarray:
        """One mean per seed (for the spread across seeds)."""
        return np.array([Cell([r]).per_user(key, metric).mean() for r in self.records])

    def best(self, metric: str = METRIC) -> np.ndarray:
        return np.asarray(self.records[0]["users"][f"best_{metric}"])

    def history_length(self) -> np.ndarray:
        return np.asarray(self.records[0]["users"]["history_length"])

    def efficiency(self, key: str) -> float:
        return float(np.mean([r["efficiency"][key] for r in self.records]))

    def train_minutes(self) -> float:
        return float(np.mean([r["train"]["wall_s"] for r in self.records])) / 60.0

    def cost_columns(self) -> str:
        """``state / user | request | train`` cells (dashes for a count baseline)."""
        if self.records[0]["labels"]["backbone"] == "count":
            return "– | – | – |"
        return (
            f"{_bytes(self.efficiency('state_bytes_per_user'))} | {self.efficiency('request_ms'):.1f} ms | "
            f"{self.train_minutes():.1f} min |"
        )


def load_cells(results_dir: str | Path) -> dict[tuple[str, str, str, str], Cell]:
    """Result files grouped by ``(group, dataset, backbone, variant)``, seeds in order."""
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for path in sorted(Path(results_dir).glob("*.json")):
        record = read_result(path)
        labels = record["labels"]
        grouped[(record["group"], labels["dataset"], labels["backbone"], labels["variant"])].append(record)
    return {key: Cell(sorted(records, key=lambda r: r["labels"]["seed"])) for key, records in grouped.items()}


def main_key(group: str) -> str:
    return "ranks" if group == "real" else "expected"


def _fmt_ci(c: stats.Comparison, scale: float = 100.0) -> str:
    return f"{c.difference * scale:+.2f} [{c.low * scale:+.2f}, {c.high * scale:+.2f}]"


def _mean_sd(values: np.ndarray, scale: float = 100.0) -> str:
    if values.size < 2:
        return f"{values.mean() * scale:.2f}"
    return f"{values.mean() * scale:.2f} ± {values.std(ddof=1) * scale:.2f}"


def _standing(c: stats.Comparison) -> str:
    """A variant against the defaults: what would justify changing a default."""
    if c.low > 0:
        return "**better** than the defaults"
    if c.high < 0:
        return "worse"
    return "not distinguishable at this size"


def _name(backbone: str, variant: str) -> str:
    return f"{variant} (count baseline)" if backbone == "count" else variant


def _bytes(value: float) -> str:
    return f"{value / 1024:.1f} KB" if value >= 1024 else f"{value:.0f} B"


class Report:
    """Builds the markdown sections and figures from the cells."""

    def __init__(self, cells: dict, scale: str = "full"):
        self.cells = cells
        self.scale = scale
        self.claims: list[tuple[str, str, stats.Comparison, str]] = []

    def cell(self, group, dataset, backbone, variant) -> Cell | None:
        return self.cells.get((group, dataset, backbone, variant))

    def compare(self, a: Cell, b: Cell, key: str, key_b: str | None = None, users=None) -> stats.Comparison:
        va, vb = a.per_user(key), b.per_user(key_b or key)
        if users is not None:
            va, vb = va[users], vb[users]
        return stats.paired_comparison(va, vb)

    def claim(self, text: str, where: str, comparison: stats.Comparison, kind: str) -> str:
        verdict = stats.verdict(comparison, kind)
        self.claims.append((text, where, comparison, verdict))
        return verdict

    # -- tables ----------------------------------------------------------------------------
    def real_table(self, dataset: str) -> list[str]:
        segment_len = SCALES[self.scale].real_segment_len
        rows = [
            "| backbone | method | seeds | HR@10 (%) | NDCG@10 (%) | ΔHR@10 vs Full [95% CI] | MDE | "
            "users ≥ 4 segments: HR@10 | Δ vs Full [95% CI] | state / user | request | train |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for backbone in BACKBONES:
            # Count baselines against SASRec's Full; a backbone whose Full is missing gets no Δ
            # (another backbone's Full would compare across groups).
            full = self.cell("real", dataset, "sasrec" if backbone == "count" else backbone, "full")
            for variant in VARIANTS:
                cell = self.cell("real", dataset, backbone, variant)
                if cell is None:
                    continue
                long_users = cell.history_length() >= 4 * segment_len
                hr = cell.seed_values("ranks")
                ndcg = cell.seed_values("ranks", "NDCG@10")
                long_hr = cell.per_user("ranks")[long_users].mean()
                delta = mde = long_delta = "–"
                if full is not None and variant != "full":
                    c = self.compare(cell, full, "ranks")
                    delta, mde = _fmt_ci(c), f"{c.min_detectable * 100:.2f}"
                    long_delta = _fmt_ci(self.compare(cell, full, "ranks", users=long_users))
                rows.append(
                    f"| {backbone} | {variant} | {cell.seeds} | {_mean_sd(hr)} | {_mean_sd(ndcg)} | {delta} | {mde} | "
                    f"{long_hr * 100:.2f} (n = {int(long_users.sum())}) | {long_delta} | {cell.cost_columns()}"
                )
        return rows

    def lifelong_table(self) -> list[str]:
        rows = [
            "| noise | method (SASRec) | seeds | expected HR@10 / best | HR@10 of the sampled target (%) | "
            "Δ expected HR@10 vs Full [95% CI] | MDE | state / user | request | train |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for noise in NOISES:
            dataset = f"noise{noise:g}"
            full = self.cell("lifelong", dataset, "sasrec", "full")
            for backbone, variant in [(b, v) for b in BACKBONES for v in VARIANTS]:
                cell = self.cell("lifelong", dataset, backbone, variant)
                if cell is None:
                    continue
                fraction = cell.seed_values("expected") / cell.best().mean()
                delta = mde = "–"
                if full is not None and variant != "full":
                    c = self.compare(cell, full, "expected")
                    delta, mde = _fmt_ci(c), f"{c.min_detectable * 100:.2f}"
                rows.append(
                    f"| {noise:g} | {_name(backbone, variant)} | {cell.seeds} | {_mean_sd(fraction, 1.0)} | "
                    f"{_mean_sd(cell.seed_values('ranks'))} | {delta} | {mde} | {cell.cost_columns()}"
                )
        return rows

    def ablation_table(self) -> list[str]:
        dataset = "noise0.2"
        base = self.cell("lifelong", dataset, "sasrec", "rec2pm-o")
        rows = [
            "| variant | seeds | expected HR@10 / best | Δ vs Rec2PM-O (defaults) [95% CI] | MDE | the variant is |",
            "|---|---:|---:|---:|---:|---|",
        ]
        if base is None:
            return rows
        best = base.best().mean()
        fraction = _mean_sd(base.seed_values("expected") / best, 1)
        rows.append(f"| rec2pm-o (defaults, C = 4) | {base.seeds} | {fraction} | – | – | – |")
        variants = sorted({key[3] for key in self.cells if key[0] == "ablation"})
        for variant in variants:
            cell = self.cell("ablation", dataset, "sasrec", variant)
            c = self.compare(cell, base, "expected")
            rows.append(
                f"| {variant} | {cell.seeds} | {_mean_sd(cell.seed_values('expected') / best, 1)} | "
                f"{_fmt_ci(c)} | {c.min_detectable * 100:.2f} | {_standing(c)} |"
            )
        return rows

    # -- claims ----------------------------------------------------------------------------
    def collect_claims(self) -> None:
        datasets = sorted({(k[0], k[1], k[2]) for k in self.cells if k[0] in ("real", "lifelong") and k[2] != "count"})
        datasets.sort(key=lambda k: k[0] != "real")  # real sets first
        for group, dataset, backbone in datasets:
            key = main_key(group)
            where = f"{dataset}, {backbone}"
            ours = self.cell(group, dataset, backbone, "rec2pm-o")
            if ours is None:
                continue
            for other, text, kind in (
                ("full", "Rec2PM-O at or above Full", "not_worse"),
                ("tok-serial-o", "Rec2PM-O ahead of Tok-Serial-O", "greater"),
                ("kv-mask-o", "Rec2PM-O ahead of KV-Mask-O", "greater"),
                ("rec2pm-a", "overwriting beats appending", "greater"),
            ):
                cell = self.cell(group, dataset, backbone, other)
                if cell is not None:
                    self.claim(text, where, self.compare(ours, cell, key), kind)
            one_shot_key = "ranks_one_shot" if key == "ranks" else "expected_one_shot"
            self.claim("one-shot about iterative", where, self.compare(ours, ours, one_shot_key, key), "equivalent")
        base = self.cell("lifelong", "noise0.2", "sasrec", "rec2pm-o")
        if base is not None:
            no_con = self.cell("ablation", "noise0.2", "sasrec", "no-con")
            if no_con is not None:
                self.claim("L_con helps", "noise 0.2", self.compare(base, no_con, "expected"), "greater")
            for size in ABLATION_MEMORY_SIZES:
                cell = self.cell("ablation", "noise0.2", "sasrec", f"C{size}")
                if cell is not None:
                    self.claim(
                        "C = 4 best", f"noise 0.2, against C = {size}", self.compare(base, cell, "expected"), "greater"
                    )
        leads = {}
        for noise in (NOISES[0], NOISES[-1]):
            ours = self.cell("lifelong", f"noise{noise:g}", "sasrec", "rec2pm-o")
            full = self.cell("lifelong", f"noise{noise:g}", "sasrec", "full")
            if ours is not None and full is not None:
                leads[noise] = (ours.per_user("expected") - full.per_user("expected")) / ours.best().mean()
        if len(leads) == 2:
            # Generated with one seed, the users (interests, lengths) match across noise levels: paired.
            c = stats.paired_comparison(leads[NOISES[-1]], leads[NOISES[0]])
            self.claim(
                "robust to noise (lead over Full grows with noise)",
                f"lead as a fraction of best, noise {NOISES[-1]:g} minus {NOISES[0]:g}",
                c,
                "greater",
            )

    def full_context_table(self) -> list[str]:
        """Full on its whole input against the same models on their last S events only."""
        rows = [
            "| data | backbone | seeds | Full, whole input | Full, last S events | whole − last S (points) [95% CI] | "
            "MDE | Full gains from the older events |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for group, dataset, backbone, variant in sorted(self.cells):
            if variant != "full" or backbone == "count":
                continue
            key = main_key(group)
            window = Cell([r for r in self.cells[(group, dataset, backbone, variant)].records if _has_window(r)])
            if not window.records:
                continue
            c = self.compare(window, window, key, key + RECENT_WINDOW)
            whole, recent = window.per_user(key).mean(), window.per_user(key + RECENT_WINDOW).mean()
            scale = 1.0 / window.best().mean() if key == "expected" else 100.0
            unit = " of best" if key == "expected" else " %"
            rows.append(
                f"| {dataset} | {backbone} | {window.seeds} | {whole * scale:.2f}{unit} | {recent * scale:.2f}{unit} | "
                f"{_fmt_ci(c)} | {c.min_detectable * 100:.2f} | {stats.verdict(c, 'greater')} |"
            )
        return rows

    def sanity_table(self) -> list[str]:
        """Every trained model against the strongest count baseline of its data."""
        rows = [
            "| data | model | strongest count baseline | model − baseline (points) [95% CI] | verdict |",
            "|---|---|---|---:|---|",
        ]
        for group, dataset in sorted({(k[0], k[1]) for k in self.cells if k[2] == "count"}):
            key = main_key(group)
            baselines = [(v, self.cell(group, dataset, "count", v)) for v in COUNT_BASELINES]
            baselines = [(v, c) for v, c in baselines if c is not None]
            name, baseline = max(baselines, key=lambda vc: vc[1].per_user(key).mean())
            trained = sorted(k for k in self.cells if k[:2] == (group, dataset) and k[2] != "count")
            for _, _, backbone, variant in trained:
                c = self.compare(self.cell(group, dataset, backbone, variant), baseline, key)
                verdict = stats.verdict(c, "greater")
                flag = {stats.SUPPORTED: "above", stats.REFUTED: "**below**"}.get(verdict, "not resolved")
                rows.append(f"| {dataset} | {backbone} {variant} | {name} | {_fmt_ci(c)} | {flag} |")
        return rows

    def claims_table(self) -> list[str]:
        rows = [
            "| claim (paper) | where | A − B (points) [95% CI] | MDE | verdict |",
            "|---|---|---:|---:|---|",
        ]
        for text, where, c, verdict in self.claims:
            rows.append(f"| {text} | {where} | {_fmt_ci(c)} | {c.min_detectable * 100:.2f} | **{verdict}** |")
        return rows

    # -- figures ---------------------------------------------------------------------------
    def figures(self, out_dir: Path) -> list[str]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir.mkdir(parents=True, exist_ok=True)
        written = []

        fig, ax = plt.subplots(figsize=(6, 4))
        for backbone, variant in [("sasrec", v) for v in SASREC_METHODS] + [("count", "history-count")]:
            xs, ys, errs = [], [], []
            for noise in NOISES:
                cell = self.cell("lifelong", f"noise{noise:g}", backbone, variant)
                if cell is not None:
                    values = cell.seed_values("expected") / cell.best().mean()
                    (
                        xs.append(noise),
                        ys.append(values.mean()),
                        errs.append(values.std(ddof=1) if values.size > 1 else 0),
                    )
            if xs:
                style = "--" if backbone == "count" else "-"
                ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, linestyle=style, label=_name(backbone, variant))
        ax.set(xlabel="noise fraction", ylabel="expected HR@10 / best achievable", title="Lifelong histories, S = 200")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        written.append(self._save(fig, out_dir / FIGURES[0]))

        fig, ax = plt.subplots(figsize=(6, 4))
        xs, ys, errs = [], [], []
        for size in sorted((*ABLATION_MEMORY_SIZES, 4)):
            cell = (
                self.cell("lifelong", "noise0.2", "sasrec", "rec2pm-o")
                if size == 4
                else self.cell("ablation", "noise0.2", "sasrec", f"C{size}")
            )
            if cell is not None:
                values = cell.seed_values("expected") / cell.best().mean()
                xs.append(size), ys.append(values.mean()), errs.append(values.std(ddof=1) if values.size > 1 else 0)
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="memory tokens C", ylabel="expected HR@10 / best achievable", title="Rec2PM-O, noise 0.2")
        written.append(self._save(fig, out_dir / FIGURES[1]))

        fig, ax = plt.subplots(figsize=(6, 4))
        segment_len = SCALES[self.scale].real_segment_len
        for offset, dataset in enumerate(sorted({k[1] for k in self.cells if k[0] == "real"})):
            ours = self.cell("real", dataset, "sasrec", "rec2pm-o")
            full = self.cell("real", dataset, "sasrec", "full")
            if ours is None or full is None:
                continue
            segments = ours.history_length() / segment_len
            xs, ys, lows, highs = [], [], [], []
            for i, (lo, hi) in enumerate(SEGMENT_BUCKETS):
                users = (segments >= lo) & (segments < (hi if hi is not None else np.inf))
                if users.sum() >= 2:
                    c = self.compare(ours, full, "ranks", users=users)
                    xs.append(i + 0.1 * offset), ys.append(c.difference * 100)
                    lows.append((c.difference - c.low) * 100), highs.append((c.high - c.difference) * 100)
            ax.errorbar(xs, ys, yerr=[lows, highs], marker="o", capsize=3, linestyle="none", label=dataset)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        labels = [f"{lo}–{hi}" if hi is not None else f"≥ {lo}" for lo, hi in SEGMENT_BUCKETS]
        ax.set_xticks(range(len(SEGMENT_BUCKETS)), labels)
        ax.set(xlabel="history length (segments)", ylabel="HR@10 Rec2PM-O − Full (points, 95% CI)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        written.append(self._save(fig, out_dir / FIGURES[2]))
        return written

    @staticmethod
    def _save(fig, path: Path) -> str:
        # A fixed creation date keeps a redrawn PNG byte-identical for identical results.
        fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
        import matplotlib.pyplot as plt

        plt.close(fig)
        return path.name


def epochs_trained(record: dict) -> int:
    """Epochs a stored run trained (every user trains once per epoch, evaluated users included)."""
    users = len(record["users"]["history_length"])
    return record["train"]["steps"] // math.ceil(users / record["run"]["train"]["batch_size"])


def _has_window(record: dict) -> bool:
    return any(name.endswith(RECENT_WINDOW) for name in record["users"])


def progress_lines(cells: dict, scale: str) -> list[str]:
    records = [r for cell in cells.values() for r in cell.records]
    done = {r["name"] for r in records}
    planned = study_runs(scale)
    lines = []
    for group in ("real", "lifelong", "ablation"):
        names = [r.name for r in planned if r.group == group]
        lines.append(f"| {group} | {sum(n in done for n in names)} / {len(names)} |")
    # Early stopping that fired before SLOW_START_MIN_EPOCHS may have cut a slow starter short
    # (it did for C = 1, which now runs with that floor); the grid's floor assumes no other run does.
    floor = min(SLOW_START_MIN_EPOCHS, SCALES[scale].epochs)
    short = sorted(r["name"] for r in records if r["labels"]["backbone"] != "count" and epochs_trained(r) < floor)
    stopped = ", ".join(f"`{name}`" for name in short) or "none"
    return [
        "| group | runs done |",
        "|---|---:|",
        *lines,
        f"Runs that early stopping ended before {floor} epochs: {stopped}.",
    ]


def write_report(results_dir: str | Path, out: str | Path, *, scale: str = "full", figures_dir=None) -> Path:
    """Redraw ``out`` (markdown) and its figures from the result files in ``results_dir``."""
    cells = load_cells(results_dir)
    out = Path(out)
    figures_dir = Path(figures_dir) if figures_dir is not None else Path(results_dir)
    report = Report(cells, scale)
    report.collect_claims()
    figures = report.figures(figures_dir)
    relative = Path(os.path.relpath(figures_dir.resolve(), out.parent.resolve()))
    sections = [
        "<!-- Generated by `python -m rec2pm study report` from the result files; do not edit by hand. -->",
        "## Progress",
        *progress_lines(cells, scale),
        "## The paper's claims",
        *report.claims_table(),
        "## Does Full use the events beyond the recent window?",
        "The same trained Full models scored twice: on their whole input, and on only their last S events "
        "(the window the memory methods read beside their memory); the seeds column counts the runs that "
        "stored both.  Where the "
        "whole input scores no higher, Full does not profit from the older events, and a memory method's "
        "lead over Full is no evidence that its memory does.",
        *report.full_context_table(),
        "## Every model against the count baselines",
        "A model below the strongest count baseline of data with a planted signal has a bug (or too little training).",
        *report.sanity_table(),
        "## Run 1: long real histories (S = 50, C = 4)",
    ]
    for dataset in sorted({k[1] for k in cells if k[0] == "real"}):
        sections += [f"### {dataset}", *report.real_table(dataset)]
    sections += ["## Run 2: lifelong generated histories (S = 200, C = 4)", *report.lifelong_table()]
    sections += ["## Run 3: ablations at noise 0.2 (Rec2PM-O)", *report.ablation_table()]
    sections += ["## Figures", *(f"![{name}]({(relative / name).as_posix()})" for name in figures)]
    generated = "\n\n".join(_join_tables(sections)) + "\n"
    text = out.read_text() if out.exists() else ""
    marker = "<!-- Generated by"
    head = text[: text.index(marker)] if marker in text else text
    out.write_text(head + generated)
    return out


def _join_tables(sections: list[str]) -> list[str]:
    """Consecutive table rows become one block (tables must not have blank lines inside)."""
    blocks: list[str] = []
    for line in sections:
        if line.startswith("|") and blocks and blocks[-1].startswith("|"):
            blocks[-1] += "\n" + line
        else:
            blocks.append(line)
    return blocks
