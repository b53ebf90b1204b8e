"""On-disk cache of processed data sets, keyed by the source file's content and the loader arguments.

A processed data set is two files with a common stem ``<cache_dir>/<kind>-<key>``:

* ``.pt``: ``torch.save({"items": (total,) int64, "cu_seqlens": (users + 1,) int64})``, plus
  ``"timestamps": (total,) int64`` when the source has integer times;
* ``.json``: ``num_items``, ``item_ids`` (original id of remapped item ``i`` at ``i - 1``),
  ``user_ids``, ``skipped``, the format description and the cache key.

``key`` is a sha256 over the source file's sha256, the loader kind and arguments, and
``FORMAT_VERSION`` (bumped whenever parsing or remapping changes, so stale entries are never
read).  The file's path is not part of the key: a renamed or copied file still hits.  Both files
are written to a temporary name and renamed, the ``.json`` last, so a crash never leaves an
entry that looks complete.  ``cache_dir``: ``None`` means ``$REC2PM_CACHE`` or ``~/.cache/rec2pm``;
``False`` turns caching off.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .interactions import InteractionData
from .textio import require_file

FORMAT_VERSION = 3  # 3: quoted text never takes the fast path; exact float times; item ids >= 1 (S3-Rec)
CACHE_NOTE = "from cache"


def default_cache_dir() -> Path:
    return Path(os.environ.get("REC2PM_CACHE") or Path.home() / ".cache" / "rec2pm")


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_load(kind: str, path, args: dict, parse: Callable[[], InteractionData], cache_dir=None) -> InteractionData:
    """Return the processed data set for ``path``: from the cache, or from ``parse()`` (then stored).

    ``parse`` returns ``InteractionData`` whose ``source`` is the format description only; the
    result's ``source`` becomes ``"<path> (<format>)"``, with ``"; from cache <file>"`` on a hit.
    """
    path = Path(path)
    require_file(path)
    if cache_dir is False:
        data = parse()
        data.source = f"{path} ({data.source})"
        return data
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    spec = {"kind": kind, "file_sha256": file_sha256(path), "args": args, "version": FORMAT_VERSION}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]
    stem = directory / f"{kind}-{key}"
    data = _try_load(stem, key)
    if data is not None:
        data.source = f"{path} ({data.source}; {CACHE_NOTE} {stem}.pt)"
        return data
    data = parse()
    save_processed(data, stem, key=key)
    data.source = f"{path} ({data.source})"
    return data


def save_processed(data: InteractionData, stem, *, key: str = "") -> None:
    """Write ``data`` as ``<stem>.pt`` (tensors) and ``<stem>.json`` (mappings, skips, source)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "version": FORMAT_VERSION,
        "key": key,
        "num_items": data.num_items,
        "item_ids": data.item_ids,
        "user_ids": data.user_ids,
        "skipped": data.skipped,
        "source": data.source,
    }
    tmp = f".tmp{os.getpid()}"
    tensors = {"items": data.items, "cu_seqlens": data.cu_seqlens}
    if data.timestamps is not None:
        tensors["timestamps"] = data.timestamps
    torch.save(tensors, f"{stem}.pt{tmp}")
    os.replace(f"{stem}.pt{tmp}", f"{stem}.pt")
    with open(f"{stem}.json{tmp}", "w", encoding="utf-8") as f:
        json.dump(meta, f)
    os.replace(f"{stem}.json{tmp}", f"{stem}.json")


def load_processed(stem) -> InteractionData:
    """Read what ``save_processed`` wrote at ``stem``."""
    with open(f"{stem}.json", encoding="utf-8") as f:
        meta = json.load(f)
    tensors = torch.load(f"{stem}.pt", weights_only=True)
    return InteractionData(
        items=tensors["items"],
        cu_seqlens=tensors["cu_seqlens"],
        num_items=meta["num_items"],
        item_ids=meta["item_ids"],
        user_ids=meta["user_ids"],
        skipped=meta["skipped"],
        source=meta["source"],
        timestamps=tensors.get("timestamps"),
    )


def _try_load(stem: Path, key: str) -> InteractionData | None:
    if not Path(f"{stem}.json").is_file():
        return None
    try:
        with open(f"{stem}.json", encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("key") != key or meta.get("version") != FORMAT_VERSION:
            return None
        return load_processed(stem)
    except Exception as exc:  # a damaged entry is rebuilt, not fatal; say so
        warnings.warn(f"ignoring damaged cache entry {stem}: {exc}", RuntimeWarning, stacklevel=3)
        return None
