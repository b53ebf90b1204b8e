"""MovieLens ratings: ``ratings.csv`` (latest, 20M, 25M) or ``ratings.dat`` (1M, 10M), plain or gzip.

* ``ratings.csv``: header ``userId,movieId,rating,timestamp`` (only ``userId``, ``movieId`` and
  ``timestamp`` are read; other columns may be present in any order).
* ``ratings.dat``: no header, ``UserID::MovieID::Rating::Timestamp``.

The format is recognised from the first line (``::`` means ``.dat``).  Every rating counts as an
interaction, whatever its value (as in the HSTU and S3-Rec protocols).  Each user's events are
ordered by ``(timestamp, movieId)``: MovieLens has many equal timestamps (ml-latest-small has
15,790 adjacent ties, and for 94 users the last two events tie), and the movie id makes the
order, and with it the leave-one-out targets, independent of the row order of the file.  Users
and items are remapped as ``rec2pm.data.interactions.from_events`` describes (ascending ids).
"""

from __future__ import annotations

from .cache import cached_load
from .columns import read_columns
from .interactions import InteractionData, from_events
from .textio import open_text

CSV_COLUMNS = {"user": "userId", "item": "movieId", "time": "timestamp"}
DAT_FIELDS = {"user": 0, "item": 1, "time": 3}  # UserID::MovieID::Rating::Timestamp


def load_movielens(path, *, cache_dir=None) -> InteractionData:
    """Load MovieLens ratings as histories ordered by ``(timestamp, movieId)`` (cached; see ``cache``)."""
    return cached_load("movielens", path, {}, lambda: parse_movielens(path), cache_dir)


def parse_movielens(path) -> InteractionData:
    """Parse without the cache; ``source`` is the format description only."""
    with open_text(path) as f:
        first = f.readline()
    if first and not first.strip():
        raise ValueError(
            f"{path}, line 1: blank, expected MovieLens ratings to start with a 'userId,movieId,rating,timestamp' "
            "header or a 'UserID::MovieID::Rating::Timestamp' line"
        )
    if not first:
        raise ValueError(
            f"{path}: empty file, expected MovieLens ratings "
            "(a 'userId,movieId,rating,timestamp' header, or 'UserID::MovieID::Rating::Timestamp' lines)"
        )
    if "::" in first:
        columns, skipped = read_columns(path, sep="::", roles=DAT_FIELDS, header=False, num_fields=4)
        fmt = "MovieLens ratings.dat"
    else:
        columns, skipped = read_columns(path, sep=",", roles=CSV_COLUMNS, header=True)
        fmt = "MovieLens ratings.csv"
    return from_events(
        columns["user"],
        columns["item"],
        columns["time"],
        skipped=skipped,
        source=f"{fmt}, ordered by (timestamp, movieId)",
    )
