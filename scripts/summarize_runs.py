"""Mean and standard deviation of the test metrics of finished training runs, grouped by name.

    python scripts/summarize_runs.py runs/sasrec_beauty_s0 runs/sasrec_beauty_s1 ... [--reference 0.0605 0.0318]

A run folder is a ``train.out_dir``; its ``metrics.jsonl`` ends with the ``final`` record
that ``python -m rec2pm train`` writes.  Folders named ``<group>_s<seed>`` are grouped by
``<group>``.  ``--reference HR NDCG`` adds each group's mean as a fraction of a published
HR@10 / NDCG@10.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

METRICS = ("HR@10", "NDCG@10")


def final_record(folder: Path) -> dict:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no metrics log (not a train.out_dir?)")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    finals = [line["final"] for line in lines if "final" in line]
    if not finals:
        raise SystemExit(f"{path}: the run has not finished (no final record)")
    epochs = [line for line in lines if "epoch" in line]
    return {**finals[-1], "epochs": len(epochs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--reference", nargs=2, type=float, metavar=("HR10", "NDCG10"))
    args = parser.parse_args(argv)
    groups: dict[str, list[dict]] = {}
    for folder in args.runs:
        groups.setdefault(re.sub(r"_s\d+$", "", folder.name), []).append(final_record(folder))
    print("| run | seeds | HR@10 | NDCG@10 | epochs (best) | wall time |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, finals in groups.items():
        cells = []
        for metric in METRICS:
            values = [f["test"][metric] for f in finals]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cell = f"{statistics.mean(values):.4f} ± {std:.4f}"
            if args.reference:
                cell += f" ({statistics.mean(values) / args.reference[METRICS.index(metric)]:.2f}x)"
            cells.append(cell)
        epochs = " / ".join(f"{f['epochs']} ({f['best_epoch'] + 1})" for f in finals)
        wall = " / ".join(f"{f['wall_s'] / 60:.0f} min" for f in finals)
        print(f"| {name} | {len(finals)} | {cells[0]} | {cells[1]} | {epochs} | {wall} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
