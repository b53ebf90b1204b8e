"""Interaction data for training and evaluation: loaders, a synthetic generator and splits.

* ``InteractionData`` (``interactions``): every user's history packed into ``items`` with
  ``cu_seqlens`` offsets, item ids remapped to ``1..num_items`` (0 is padding), plus the id maps
  and the counts of everything skipped.
* Loaders of the original formats, plain or gzip: ``load_movielens`` (``ratings.csv`` /
  ``ratings.dat``), ``load_s3rec`` (one user per line), ``load_interactions_table`` (CSV or
  Parquet), and ``load_dataset(kind, path)`` over them.  Each caches its processed result
  (``cache``: keyed by the file's sha256 and the arguments).
* ``lifelong_histories`` (``synthetic``): generated lifelong histories with planted interests,
  drift and noise, and ``lifelong_planted`` / ``LifelongPlan`` for the best achievable metrics.
* ``leave_one_out`` (``split``): the standard split by time.
"""

from .cache import load_processed, save_processed
from .interactions import InteractionData, from_events
from .load import load_dataset
from .movielens import load_movielens
from .s3rec import load_s3rec
from .split import LeaveOneOut, leave_one_out
from .synthetic import LifelongPlan, item_clusters, lifelong_histories, lifelong_planted
from .table import load_interactions_table

__all__ = [
    "InteractionData",
    "from_events",
    "load_movielens",
    "load_s3rec",
    "load_interactions_table",
    "load_dataset",
    "save_processed",
    "load_processed",
    "lifelong_histories",
    "lifelong_planted",
    "LifelongPlan",
    "item_clusters",
    "LeaveOneOut",
    "leave_one_out",
]
