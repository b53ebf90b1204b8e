"""Train Rec2PM and the baselines side by side for a few steps on generated data (CPU).

    python examples/train_methods.py                      # small model, seconds
    python examples/train_methods.py --config sasrec --users 8 --length 1000 --steps 5

Prints each method's loss at every step (it falls) and its mean step time.
"""

from __future__ import annotations

import argparse
import time

import torch

from rec2pm.config import named_config
from rec2pm.methods import build_model
from rec2pm.toy_data import toy_histories

DEFAULT_METHODS = ["rec2pm-o", "rec2pm-a", "full", "recent", "tok-serial-o", "kv-mask-o"]


def main(argv=None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="sasrec-small", help="a named config of rec2pm.config")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--length", type=int, default=60)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    items, cu = toy_histories(args.users, args.length, args.items, seed=args.seed)
    config = named_config(
        args.config, num_items=args.items, max_positions=max(named_config(args.config).max_positions, 2 * args.length)
    )
    history: dict[str, list[float]] = {}
    print(
        f"{args.users} users x {args.length} events, {args.items} items, config {args.config} "
        f"(S={config.segment_len}, C={config.num_memory_tokens}), {torch.get_num_threads()} threads"
    )
    for method in args.methods:
        torch.manual_seed(args.seed)
        model = build_model(method, config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        losses, times = [], []
        for _ in range(args.steps):
            start = time.perf_counter()
            out = model(items, cu)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
            losses.append(out.loss.item())
        history[method] = losses
        shown = " ".join(f"{x:.3f}" for x in losses[:: max(1, args.steps // 8)])
        print(f"{method:<13} loss {shown} -> {losses[-1]:.3f}   step {1e3 * sum(times) / len(times):8.1f} ms")
    return history


if __name__ == "__main__":
    main()
