"""``python -m rec2pm encode CHECKPOINT --store URL``: write every user's memory from its history.

Needed whenever a new model makes the stored memories stale (their fingerprint no longer
matches).  Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set) rank r takes users r, r + W,
...  and encodes them.  Who writes depends on the store: a SQLite file has one writer,
rank 0, which receives every rank's encoded batch (gloo, one batch per rank at a time)
and commits them, so the ranks never queue on the file lock; Redis (and an in-process
store) take every rank's writes directly, in parallel.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch


def encode_histories(
    recommender,
    user_ids: list,
    items: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    batch_size: int = 64,
    iterative: bool = True,
    rank: int = 0,
    world_size: int = 1,
    single_writer: bool = False,
    progress: bool = False,
) -> dict:
    """Backfill ``user_ids`` (their histories packed in ``items`` / ``cu_seqlens``) in batches.

    ``single_writer`` (with ``world_size > 1``, inside an initialised ``torch.distributed``
    group): rank 0 writes every rank's batches; the other ranks only encode.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1 = {world_size - 1}, got {rank}")
    mine = list(range(rank, len(user_ids), world_size))
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    single_writer = single_writer and world_size > 1
    if single_writer:
        import torch.distributed as dist

        # Every rank takes part in as many rounds as rank 0, which has the most users.
        rounds = math.ceil(len(range(0, len(user_ids), world_size)) / batch_size)
        batches += [None] * (rounds - len(batches))
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"encode (rank {rank})" if world_size > 1 else "encode", unit="batch")
    started, users, events, segments = time.perf_counter(), 0, 0, 0
    cu = cu_seqlens.tolist()

    def encode(batch):
        runs = [items[cu[u] : cu[u + 1]] for u in batch]
        lengths = torch.tensor([0] + [len(r) for r in runs]).cumsum(0)
        return recommender.encode_backfill([user_ids[u] for u in batch], torch.cat(runs), lengths, iterative=iterative)

    for batch in batches:
        encoded = encode(batch) if batch else None
        if single_writer:
            gathered = [None] * world_size if rank == 0 else None
            dist.gather_object(encoded, gathered, dst=0)
            for part in gathered or ():
                if part is not None:
                    recommender.commit_backfill(part)
        else:
            recommender.commit_backfill(encoded)
        if encoded is not None:
            users += len(batch)
            events += sum(encoded.events)
            segments += sum(encoded.archived)
    return {
        "users": users,
        "events": events,
        "segments": segments,
        "rank": rank,
        "world_size": world_size,
        "writer": "rank 0" if single_writer else "every rank",
        "seconds": round(time.perf_counter() - started, 3),
    }


def main_encode(args, parser) -> int:
    import json

    from ..training import check_catalogue, load_checkpoint, load_data
    from .errors import StoreError
    from .recommender import Recommender
    from .sqlite_store import SQLiteStore

    try:
        ckpt = load_checkpoint(args.checkpoint)
        run = ckpt["run"]
        if args.data is not None:
            run = {**run, "data": {**run["data"], "path": args.data}}
        data = load_data(run["data"])
        check_catalogue(Path(args.checkpoint), ckpt, data, run["data"])
        recommender = Recommender(
            args.checkpoint,
            args.store,
            device=args.device,
            memory_dtype=args.memory_dtype,
            seen_limit=args.seen_limit,
            session_cache_bytes=0,
        )
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        single_writer = world_size > 1 and isinstance(recommender.store, SQLiteStore)
        if single_writer:  # a gloo group to hand the encoded batches to rank 0
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend="gloo")
        summary = encode_histories(
            recommender,
            list(data.user_ids),
            data.items,
            data.cu_seqlens,
            batch_size=args.batch_size,
            iterative=not args.one_shot,
            rank=int(os.environ.get("RANK", "0")),
            world_size=world_size,
            single_writer=single_writer,
            progress=not args.no_progress,
        )
        if single_writer:
            dist.destroy_process_group()
    except (ValueError, TypeError, OSError, StoreError) as exc:
        parser.exit(2, f"rec2pm encode: error: {exc}\n")
    # One write of the whole line (newline included): ranks under torchrun share stdout, and a
    # pipe keeps a single write of under PIPE_BUF bytes whole, where print's two writes can interleave.
    sys.stdout.write(json.dumps({"store": args.store, **summary}) + "\n")
    sys.stdout.flush()
    return 0
