"""S3-Rec format: one user per line, ``user item_1 item_2 ... item_n`` (whitespace-separated integers).

The items of a line are already in time order, oldest first (the format of the S3-Rec, CL4SRec,
ICLRec, DuoRec and FMLP-Rec code bases; the ``s3rec/`` sets in the shared data folder).  Their
order is kept as is, repeats included (Yelp has repeated items).  Users are listed in ascending
original id and items remapped to ``1..N`` in ascending original id, so files whose ids already
run ``1..N`` (all the published ones) keep their ids.

Skips, counted in ``skipped``: ``"blank lines"``, ``"users without items"`` (a line with only a
user id), ``"duplicate rows"`` (a line repeating an earlier line of the same user exactly).  A user
on two lines with different histories is an error, as is any token that is not an integer.
"""

from __future__ import annotations

import numpy as np
import torch

from .cache import cached_load
from .interactions import InteractionData
from .textio import open_text


def load_s3rec(path, *, cache_dir=None) -> InteractionData:
    """Load an S3-Rec format file (cached; see ``cache``)."""
    return cached_load("s3rec", path, {}, lambda: parse_s3rec(path), cache_dir)


def parse_s3rec(path) -> InteractionData:
    """Parse without the cache; ``source`` is the format description only."""
    skipped: dict[str, int] = {}
    lines_of: dict[int, int] = {}  # user -> line it was read from
    histories: dict[int, list[int]] = {}
    line_no = 0
    with open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                skipped["blank lines"] = skipped.get("blank lines", 0) + 1
                continue
            ids = _integers(tokens, path, line_no)
            user, items = ids[0], ids[1:]
            if min(items, default=1) < 1:  # ids run from 1; 0 is the format's padding
                field = next(i for i, item in enumerate(items, 2) if item < 1)
                raise ValueError(
                    f"{path}, line {line_no}: field {field} (item {field - 1}) is {items[field - 2]}; "
                    "item ids start at 1 in this format (0 is padding)"
                )
            if not items:
                skipped["users without items"] = skipped.get("users without items", 0) + 1
                continue
            if user in histories:
                if histories[user] != items:
                    raise ValueError(
                        f"{path}, line {line_no}: user {user} already has a different history "
                        f"on line {lines_of[user]}; expected one line per user"
                    )
                skipped["duplicate rows"] = skipped.get("duplicate rows", 0) + 1
                continue
            histories[user], lines_of[user] = items, line_no
    if line_no == 0:
        raise ValueError(f"{path}: empty file, expected lines 'user item_1 item_2 ...'")
    if not histories:
        raise ValueError(f"{path}: no user with items ({skipped}), expected lines 'user item_1 item_2 ...'")
    user_ids = sorted(histories)
    lengths = np.array([len(histories[u]) for u in user_ids], dtype=np.int64)
    flat = np.fromiter((i for u in user_ids for i in histories[u]), dtype=np.int64, count=int(lengths.sum()))
    item_ids, remapped = np.unique(flat, return_inverse=True)
    return InteractionData(
        items=torch.from_numpy(remapped.reshape(-1).astype(np.int64) + 1),
        cu_seqlens=torch.from_numpy(np.concatenate(([0], np.cumsum(lengths)))),
        num_items=len(item_ids),
        item_ids=item_ids.tolist(),
        user_ids=user_ids,
        skipped=skipped,
        source="S3-Rec format, file order per user",
    )


def _integers(tokens: list[str], path, line_no: int) -> list[int]:
    try:
        ids = list(map(int, tokens))
    except ValueError:
        ids = None
    if ids is not None and all(-(1 << 63) <= i < (1 << 63) for i in ids):
        return ids
    for position, token in enumerate(tokens, 1):
        try:
            if -(1 << 63) <= int(token) < (1 << 63):
                continue
        except ValueError:
            pass
        what = "the user id" if position == 1 else f"item {position - 1}"
        raise ValueError(
            f"{path}, line {line_no}: field {position} ({what}) must be an integer id, got {token!r}; "
            "expected 'user item_1 item_2 ...'"
        )
    raise AssertionError("unreachable")
