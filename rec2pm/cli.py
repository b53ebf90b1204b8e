"""Command line: ``python -m rec2pm train CONFIG.toml [--set table.key=value ...]`` and
``python -m rec2pm evaluate CHECKPOINT [--data PATH] [--split test|valid]``.

Distributed: ``torchrun --nproc_per_node 2 -m rec2pm train CONFIG.toml``.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rec2pm", description="Train and evaluate Rec2PM models and baselines.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model from a TOML config")
    train.add_argument("config", nargs="?", help="TOML file (tables data, model, method, train); defaults if omitted")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE",
                       help="override one config value, e.g. --set train.lr=1e-3 (repeatable)")
    train.add_argument("--no-resume", action="store_true", help="start over even if out_dir holds a checkpoint")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    evaluate = sub.add_parser("evaluate", help="print the metrics of a checkpoint")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--data", help="the data file, if it moved since training")
    evaluate.add_argument("--split", choices=("test", "valid"), default="test")
    evaluate.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

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
        except OSError as exc:  # a data file or folder that is missing or unreadable: a message, no traceback
            parser.exit(2, f"rec2pm train: error: {exc}\n")
        return 3 if summary.get("interrupted") else 0

    from .evaluation import format_metrics
    from .training import evaluate_checkpoint

    try:
        metrics = evaluate_checkpoint(args.checkpoint, data_path=args.data, split_name=args.split,
                                      progress=not args.no_progress)
    except (ValueError, TypeError, OSError) as exc:
        parser.error(str(exc))
    print(format_metrics(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
