"""Opening data files, plain or gzip-compressed, as text."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

GZIP_MAGIC = b"\x1f\x8b"


def open_text(path) -> io.TextIOBase:
    """Open ``path`` for reading as UTF-8 text, decompressing when it is gzip.

    Compression is recognised by the file's magic bytes, not by its name.  Universal newlines
    turn ``\\r\\n`` into ``\\n``; ``utf-8-sig`` drops a byte-order mark before a header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == GZIP_MAGIC:
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")
