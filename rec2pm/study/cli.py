"""``python -m rec2pm study run|report|list`` (arguments in ``rec2pm.cli``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .grid import study_runs


def main_study(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    runs = study_runs(args.scale, args.data_root)
    if args.only:
        runs = [r for r in runs if any(text in r.name for text in args.only)]
        if not runs:
            parser.error(f"--only {args.only} matches no run of the {args.scale} study (see `study list`)")
    results = Path(args.results)
    if args.action == "list":
        for spec in runs:
            status = "done" if (results / spec.file_name).exists() else "to run"
            print(f"{spec.name:<60} {status}")
        return 0
    if args.action == "report":
        from .report import write_report

        try:
            out = write_report(results, args.report, scale=args.scale)
        except ValueError as exc:
            parser.exit(2, f"rec2pm study report: error: {exc}\n")
        print(f"wrote {out}")
        return 0
    from .runner import run_study

    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    try:
        counts = run_study(runs, results_dir=results, work_dir=args.work, threads=args.threads)
    except (ValueError, OSError) as exc:
        parser.exit(2, f"rec2pm study run: error: {exc}\n")
    print(
        f"study: {counts['done']} runs done, {counts['skipped']} already had results, "
        f"{counts['claimed']} in progress in other processes"
    )
    return 0
