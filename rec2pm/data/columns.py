"""Reading integer id columns and a numeric time column from a delimited text file.

``read_columns`` returns ``{role: (rows,) array}`` for the roles asked for (ids as int64, the
``"time"`` role as int64, or float64 when a value is not an integer) and the skip counts.  A
float64 time column refuses integers beyond 2^53 (epoch nanoseconds), which it would round into
ties and reorder.

The file is read in blocks of whole lines.  Each block first takes a fast path: the text is split
on the separator in one go, with a marker token at every line end, and the markers must sit every
``k + 1`` tokens; that proves every line has exactly ``k`` fields without a Python loop per line.
Any block that fails or holds a quote (wrong field count, blank line, a value that is not a number) is
parsed again line by line, which either counts the skip (blank lines) or raises a ``ValueError``
naming the file, the line and what was expected.  Quoted fields (``"a, b"``) are understood for
one-character separators; a quoted field may not span lines.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .textio import open_text

BLOCK_CHARS = 1 << 24  # ~16 M characters per block: bounds the token lists to a few hundred MB
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
FLOAT_EXACT = 1 << 53  # integers float64 holds exactly: a time column turned float must keep them


def read_columns(
    path, *, sep: str, roles: dict[str, str | int], header: bool, num_fields: int | None = None
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Parse the columns named in ``roles`` (role -> header name, or field index when ``header=False``).

    ``num_fields`` is the number of fields per line when there is no header (with a header it is
    the header's length).  Returns the arrays and ``{"blank lines": n}`` when there were any.
    """
    path = Path(path)
    parts: dict[str, list[np.ndarray]] = {role: [] for role in roles}
    skipped: dict[str, int] = {}
    with open_text(path) as f:
        line_no = 0
        if header:
            first = f.readline()
            if not first:
                raise ValueError(
                    f"{path}: empty file, expected a header line naming the columns "
                    f"{', '.join(map(repr, roles.values()))}"
                )
            line_no = 1
            names = _split_line(first.rstrip("\n"), sep)
            names = [name.strip() for name in names]
            index = _column_indices(path, names, roles)
            num_fields = len(names)
        else:
            if num_fields is None:
                raise ValueError("num_fields is required when the file has no header")
            index = dict(roles)
            names = None
        reader = _BlockParser(path, sep, index, num_fields, names)
        rest = ""
        while True:
            block = f.read(BLOCK_CHARS)
            if not block:
                if rest:  # a last line without a newline
                    reader.parse(rest + "\n", line_no + 1, parts, skipped)
                break
            block = rest + block
            cut = block.rfind("\n") + 1
            chunk, rest = block[:cut], block[cut:]
            if chunk:
                reader.parse(chunk, line_no + 1, parts, skipped)
                line_no += chunk.count("\n")
    rows = sum(len(a) for a in parts[next(iter(roles))])
    if rows == 0:
        where = "after the header" if header else "in the file"
        blank = f" ({skipped['blank lines']} blank lines)" if skipped else ""
        kind = "empty file" if line_no == 0 else f"no data rows {where}{blank}"
        raise ValueError(f"{path}: {kind}, expected lines of {num_fields} fields separated by {sep!r}")
    out = {}
    for role, arrays in parts.items():
        if any(a.dtype.kind == "f" for a in arrays):  # one float time anywhere makes the column float
            _check_exact_as_float(path, [a for a in arrays if a.dtype.kind != "f"])
            arrays = [a.astype(np.float64) for a in arrays]
        out[role] = np.concatenate(arrays)
    return out, skipped


def _check_exact_as_float(where, integer_arrays) -> None:
    """A time column with a fractional value becomes float64; integer times beyond 2^53 (epoch
    nanoseconds) would then round into ties and reorder events, so that is an error."""
    for values in integer_arrays:
        if len(values) and int(np.abs(values).max()) > FLOAT_EXACT:
            big = int(values[np.argmax(np.abs(values))])
            raise ValueError(
                f"{where}: the time column mixes fractional values with integers beyond 2^53 (e.g. {big}), "
                "which float64 cannot hold exactly; write every time as an integer or every time as a float"
            )


def _column_indices(path, names: list[str], roles: dict[str, str | int]) -> dict[str, int]:
    index = {}
    for role, name in roles.items():
        if names.count(name) != 1:
            problem = "missing column" if name not in names else "ambiguous column"
            raise ValueError(
                f"{path}: {problem} {name!r} for the {role}; expected it once in the header, which has columns {names}"
            )
        index[role] = names.index(name)
    return index


def _split_line(line: str, sep: str) -> list[str]:
    if len(sep) == 1 and '"' in line:
        return next(csv.reader([line], delimiter=sep))
    return line.split(sep)


class _BlockParser:
    """Parses blocks of whole lines into the role arrays (fast path, then line by line on any failure)."""

    def __init__(self, path: Path, sep: str, index: dict[str, int], num_fields: int, names: list[str] | None):
        self.path, self.sep, self.index, self.k, self.names = path, sep, index, num_fields, names

    def parse(self, chunk: str, first_line: int, parts: dict, skipped: dict) -> None:
        fast = self._fast(chunk)
        if fast is None:
            fast = self._slow(chunk, first_line, skipped)
        for role, values in fast.items():
            if len(values):
                parts[role].append(values)

    def _fast(self, chunk: str) -> dict[str, np.ndarray] | None:
        n, k, sep = chunk.count("\n"), self.k, self.sep
        if len(sep) == 1 and '"' in chunk:  # quoted fields may hold the separator: line by line
            return None
        tokens = chunk.replace("\n", sep + "\n" + sep).split(sep)
        tokens.pop()  # the empty token after the last marker
        if len(tokens) != n * (k + 1) or tokens[k :: k + 1].count("\n") != n:
            return None
        try:
            return {role: (_times if role == "time" else _ints)(tokens[i :: k + 1]) for role, i in self.index.items()}
        except (ValueError, OverflowError):
            return None

    def _slow(self, chunk: str, first_line: int, skipped: dict) -> dict[str, np.ndarray]:
        values: dict[str, list] = {role: [] for role in self.index}
        lines = chunk.split("\n")
        lines.pop()
        for offset, line in enumerate(lines):
            line_no = first_line + offset
            if not line.strip():
                skipped["blank lines"] = skipped.get("blank lines", 0) + 1
                continue
            fields = _split_line(line, self.sep)
            if len(fields) != self.k:
                raise ValueError(
                    f"{self.path}, line {line_no}: expected {self.k} fields separated by "
                    f"{self.sep!r}{self._layout()}, got {len(fields)}: {line[:120]!r}"
                )
            for role, i in self.index.items():
                values[role].append(self._value(fields[i], role, i, line_no))
        # Values are Python numbers here: a float time makes its column float64 (never truncated).
        out = {}
        for role, v in values.items():
            if any(isinstance(x, float) for x in v):
                line_of = f"{self.path}, lines {first_line}-{first_line + len(lines) - 1}"
                _check_exact_as_float(line_of, [np.array([x for x in v if isinstance(x, int)], dtype=np.int64)])
                out[role] = np.array(v, dtype=np.float64)
            else:
                out[role] = np.array(v, dtype=np.int64)
        return out

    def _value(self, text: str, role: str, i: int, line_no: int):
        column = repr(self.names[i]) if self.names else f"{i + 1}"
        try:
            value = int(text)
            if INT64_MIN <= value <= INT64_MAX:
                return value
        except ValueError:
            if role == "time":
                try:
                    value = float(text)
                    if np.isfinite(value):
                        return value
                except ValueError:
                    pass
        expected = "a finite number (the time)" if role == "time" else f"an integer id (the {role})"
        raise ValueError(f"{self.path}, line {line_no}: column {column} must be {expected}, got {text!r}")

    def _layout(self) -> str:
        return f" (header: {self.sep.join(self.names)})" if self.names else ""


def _ints(tokens) -> np.ndarray:
    return np.array(list(map(int, tokens)), dtype=np.int64)


def _times(tokens) -> np.ndarray:
    """Integer times, or float64 when a value is fractional; anything the line-by-line parser
    would refuse (an integer outside int64, a non-finite value) or that float64 would round
    (an integer beyond 2^53 beside a fraction) raises, sending the block to it."""
    try:
        return _ints(tokens)
    except (ValueError, OverflowError):
        times = np.array(list(map(float, tokens)), dtype=np.float64)
        if not np.isfinite(times).all():
            raise ValueError("non-finite time") from None
        if (np.abs(times) > FLOAT_EXACT).any():  # an integer out of int64, or beyond float64's
            raise ValueError("a time beyond 2^53 in a float column") from None
        return times
