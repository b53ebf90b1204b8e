"""``load_dataset``: one entry point over the loaders, for configs and command lines."""

from __future__ import annotations

from .interactions import InteractionData
from .movielens import load_movielens
from .s3rec import load_s3rec
from .table import load_interactions_table

LOADERS = {"movielens": load_movielens, "s3rec": load_s3rec, "table": load_interactions_table}


def load_dataset(kind: str, path, **kwargs) -> InteractionData:
    """Load ``path`` with the loader for ``kind`` (``"movielens"``, ``"s3rec"`` or ``"table"``).

    ``kwargs`` go to the loader: ``cache_dir`` for all, and ``user_col``, ``item_col``,
    ``time_col`` (required) and ``sep`` for ``"table"``.
    """
    if kind not in LOADERS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(LOADERS)}")
    return LOADERS[kind](path, **kwargs)
