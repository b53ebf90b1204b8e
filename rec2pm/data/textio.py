"""Opening data files, plain or gzip-compressed, as text, with errors that name the file."""

from __future__ import annotations

import contextlib
import gzip
import io
import zlib
from collections.abc import Iterator
from pathlib import Path

GZIP_MAGIC = b"\x1f\x8b"


def require_file(path: Path) -> None:
    """``FileNotFoundError`` / ``IsADirectoryError`` naming ``path`` unless it is a regular file."""
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, expected a data file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")


@contextlib.contextmanager
def open_text(path) -> Iterator[io.TextIOBase]:
    """Open ``path`` for reading as UTF-8 text, decompressing when it is gzip.

    Compression is recognised by the file's magic bytes, not by its name.  Universal newlines
    turn ``\\r\\n`` into ``\\n``; ``utf-8-sig`` drops a byte-order mark before a header.

    Used as ``with open_text(path) as f:``; a file that is not UTF-8 text (binary, Latin-1)
    or a gzip stream that is truncated or corrupt raises ``ValueError`` naming the file and,
    for text, the line, wherever in the ``with`` body it is read.
    """
    path = Path(path)
    require_file(path)
    with open(path, "rb") as f:
        magic = f.read(2)
    compressed = magic == GZIP_MAGIC
    raw = gzip.open(path, "rb") if compressed else open(path, "rb")
    text = io.TextIOWrapper(raw, encoding="utf-8-sig")
    try:
        yield text
    except UnicodeDecodeError:
        line, snippet = _first_undecodable_line(path, compressed)
        raise ValueError(
            f"{path}, line {line}: not UTF-8 text ({snippet!r}); expected a UTF-8 text file"
            f"{', gzip-compressed or plain' if compressed else ''}: is it binary, or text in another "
            "encoding such as Latin-1 (re-encode it as UTF-8)?"
        ) from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ValueError(
            f"{path}: damaged gzip file ({exc}); expected a complete gzip stream (was the download or copy cut short?)"
        ) from None
    finally:
        text.close()


def _first_undecodable_line(path: Path, compressed: bool) -> tuple[int | str, bytes]:
    """Where decoding fails, for the error message (the decoder reads ahead in blocks, so the
    line it was on says nothing): the first line that is not UTF-8, and its bytes."""
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return number, line[max(exc.start - 10, 0) : exc.start + 10]
    except (OSError, EOFError, zlib.error):
        pass
    return "?", b""
