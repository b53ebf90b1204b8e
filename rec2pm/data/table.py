"""A generic interactions table: one event per row with a user, an item and a time column.

* Delimited text (``sep``, default ``,``), plain or gzip, with a header naming the columns.
  Other columns are ignored; quoted fields are understood for one-character separators.
* Parquet, when the path ends with ``.parquet``: read through pandas (with pyarrow), imported
  only then; install them with ``pip install 'rec2pm[data]'``.

Ids must be integers; the time any number (int64 kept exact, else float64; for Parquet also a
datetime column, taken as int64 nanoseconds).  Each user's events are ordered by ``(time, item)``
with the original item id breaking ties, and users and items remapped in ascending original id,
as ``rec2pm.data.interactions.from_events`` describes; rows repeating the ``(user, item, time)``
of an earlier row are skipped and counted in ``skipped["duplicate rows"]``.
"""

from __future__ import annotations

import numpy as np

from .cache import cached_load
from .columns import read_columns
from .interactions import InteractionData, from_events

PARQUET_EXTRA = "pip install 'rec2pm[data]'"


def load_interactions_table(
    path, *, user_col: str, item_col: str, time_col: str, sep: str = ",", cache_dir=None
) -> InteractionData:
    """Load a CSV (or ``.parquet``) interactions table, ordered per user by ``(time, item)`` (cached)."""
    args = {"user_col": user_col, "item_col": item_col, "time_col": time_col, "sep": sep}
    roles = {"user": user_col, "item": item_col, "time": time_col}
    if str(path).endswith(".parquet"):
        _require_pandas()  # fail before hashing the file when the readers are missing
        return cached_load("parquet", path, args, lambda: parse_parquet(path, roles), cache_dir)
    return cached_load("table", path, args, lambda: parse_table(path, roles, sep), cache_dir)


def parse_table(path, roles: dict[str, str], sep: str = ",") -> InteractionData:
    """Parse delimited text without the cache; ``roles`` maps user/item/time to header names."""
    if not sep or "\n" in sep:
        raise ValueError(f"sep must be a non-empty separator without newlines, got {sep!r}")
    columns, skipped = read_columns(path, sep=sep, roles=roles, header=True)
    return from_events(
        columns["user"],
        columns["item"],
        columns["time"],
        skipped=skipped,
        source=f"table sep={sep!r} user={roles['user']!r} item={roles['item']!r} "
        f"time={roles['time']!r}, ordered by (time, item)",
    )


def parse_parquet(path, roles: dict[str, str]) -> InteractionData:
    """Parse a Parquet table without the cache (needs pandas and pyarrow)."""
    pd = _require_pandas()
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow's errors name a buffer, not the file
        raise ValueError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    values = {}
    for role, name in roles.items():
        if name not in frame.columns:
            raise ValueError(
                f"{path}: missing column {name!r} for the {role}; the table has columns {list(map(str, frame.columns))}"
            )
        values[role] = _parquet_column(pd, frame[name], path, name, role)
    if len(frame) == 0:
        raise ValueError(f"{path}: no rows")
    return from_events(
        values["user"],
        values["item"],
        values["time"],
        source=f"Parquet user={roles['user']!r} item={roles['item']!r} time={roles['time']!r}, ordered by (time, item)",
    )


def _parquet_column(pd, column, path, name: str, role: str) -> np.ndarray:
    types = pd.api.types
    bad = np.array(column.isna(), dtype=bool)  # a copy: pandas may hand out read-only views
    values = None
    if bad.any():
        pass
    elif types.is_unsigned_integer_dtype(column) and len(column) and int(column.max()) > np.iinfo(np.int64).max:
        bad = np.array(column > np.iinfo(np.int64).max, dtype=bool)  # to_numpy(int64) would wrap them
    elif role == "time" and types.is_datetime64_any_dtype(column):
        if getattr(column.dt, "tz", None) is not None:  # an instant with a zone: the same instant in UTC
            column = column.dt.tz_convert("UTC").dt.tz_localize(None)
        values = column.astype("datetime64[ns]").astype("int64").to_numpy(dtype=np.int64)
    elif role == "time" and types.is_numeric_dtype(column) and not types.is_bool_dtype(column):
        integer = types.is_integer_dtype(column)
        values = column.to_numpy(dtype=np.int64 if integer else np.float64)
        bad = ~np.isfinite(values.astype(np.float64))
    elif role != "time" and types.is_integer_dtype(column):
        values = column.to_numpy(dtype=np.int64)
    else:
        bad[:] = True  # a column of the wrong type: point at its first row
    if not bad.any():
        return values
    row = int(np.flatnonzero(bad)[0])
    expected = "a finite number or a datetime (the time)" if role == "time" else f"an integer id (the {role})"
    expected += " within int64" if types.is_unsigned_integer_dtype(column) else ""
    raise ValueError(
        f"{path}, row {row}: column {name!r} must be {expected}, got {column.iloc[row]!r} (dtype {column.dtype})"
    )


def _require_pandas():
    try:
        import pandas as pd
        import pyarrow  # noqa: F401  (pandas reads Parquet through it)
    except ImportError as exc:
        raise ImportError(
            f"reading Parquet needs pandas and pyarrow ({exc}); install them with {PARQUET_EXTRA}"
        ) from exc
    return pd
