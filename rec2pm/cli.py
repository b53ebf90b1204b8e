"""Command line: ``python -m rec2pm train CONFIG.toml [--set table.key=value ...]`` and
``python -m rec2pm evaluate CHECKPOINT [--data PATH] [--split test|valid]`` and
``python -m rec2pm encode CHECKPOINT --store URL`` (memory backfill) and
``python -m rec2pm serve CHECKPOINT --store URL --port P`` (HTTP), both in ``rec2pm.serving``, and
``python -m rec2pm study run|report|list`` (the accuracy study, ``rec2pm.study``).

Distributed: ``torchrun --nproc_per_node 2 -m rec2pm train CONFIG.toml``.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_record_options(command: argparse.ArgumentParser) -> None:
    """How stored records are written: ``encode`` and ``serve`` take the same two (a server
    given other values than the encode rewrites what the encode stored)."""
    command.add_argument(
        "--memory-dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="how new memories are stored"
    )
    command.add_argument("--seen-limit", type=int, default=1024, help="archived item ids kept per user")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rec2pm", description="Train and evaluate Rec2PM models and baselines.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model from a TOML config")
    train.add_argument("config", nargs="?", help="TOML file (tables data, model, method, train); defaults if omitted")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="override one config value, e.g. --set train.lr=1e-3 (repeatable)",
    )
    train.add_argument("--no-resume", action="store_true", help="start over even if out_dir holds a checkpoint")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    evaluate = sub.add_parser("evaluate", help="print the metrics of a checkpoint")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--data", help="the data file, if it moved since training")
    evaluate.add_argument("--split", choices=("test", "valid"), default="test")
    evaluate.add_argument("--no-progress", action="store_true")
    encode = sub.add_parser("encode", help="write every user's memory into a store (backfill)")
    encode.add_argument("checkpoint")
    encode.add_argument("--store", required=True, help="memory store URL: sqlite:///PATH, redis://HOST:PORT/DB")
    encode.add_argument("--data", help="the data file, if it moved since training")
    encode.add_argument(
        "--one-shot",
        action="store_true",
        help="one Stage 1 pass per user instead of one memory update per segment (what serving computes)",
    )
    encode.add_argument("--batch-size", type=int, default=64)
    add_record_options(encode)
    encode.add_argument("--device", default="auto")
    encode.add_argument("--no-progress", action="store_true")
    serve = sub.add_parser("serve", help="answer POST /observe, POST /recommend and GET /health over HTTP")
    serve.add_argument("checkpoint")
    serve.add_argument("--store", required=True, help="memory store URL: sqlite:///PATH, redis://HOST:PORT/DB")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080, help="0 picks a free port (printed at start)")
    serve.add_argument("--device", default="auto")
    serve.add_argument("--session-cache-mb", type=int, default=256, help="session K/V cache bound; 0 turns it off")
    add_record_options(serve)
    study = sub.add_parser("study", help="the accuracy study: run its grid, redraw docs/results.md, list its runs")
    study.add_argument("action", choices=("run", "report", "list"))
    study.add_argument("--scale", choices=("full", "mini"), default="full", help="mini: a few dozen users, for CI")
    study.add_argument("--only", action="append", default=[], metavar="TEXT", help="runs whose name contains TEXT")
    study.add_argument("--results", default="docs/results", help="the result files (one JSON per run)")
    study.add_argument("--work", default="runs/study", help="checkpoints of the runs in progress")
    study.add_argument("--report", default="docs/results.md", help="the markdown file `report` rewrites")
    study.add_argument("--data-root", default="../shared/data", help="the folder of the real data sets")
    study.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    args = parser.parse_args(argv)

    if args.command == "encode":
        from .serving.backfill import main_encode

        return main_encode(args, parser)
    if args.command == "serve":
        from .serving.http import main_serve

        return main_serve(args, parser)

    if args.command == "study":
        from .study.cli import main_study

        return main_study(args, parser)
    if args.command == "train":
        from .run_config import build_run_config

        try:
            run = build_run_config(args.config, args.overrides)
        except (ValueError, TypeError, OSError) as exc:
            parser.error(str(exc))
        if args.print_config:
            print(json.dumps(run, indent=2))
            return 0
        from .training import train as run_training

        try:
            summary = run_training(run, resume=not args.no_resume)
        except (OSError, ValueError) as exc:  # a data file missing, unreadable or malformed: a message
            parser.exit(2, f"rec2pm train: error: {exc}\n")
        return 3 if summary.get("interrupted") else 0

    from .evaluation import format_metrics
    from .training import evaluate_checkpoint

    try:
        metrics = evaluate_checkpoint(
            args.checkpoint, data_path=args.data, split_name=args.split, progress=not args.no_progress
        )
    except (ValueError, TypeError, OSError) as exc:
        parser.error(str(exc))
    print(format_metrics(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
