"""``sqlite:///PATH``: records in one SQLite file, WAL journal, CAS inside ``BEGIN IMMEDIATE``.

Durability: ``synchronous=FULL`` (the default) syncs the WAL at every commit, so a
committed batch survives a power loss.  ``?synchronous=NORMAL`` syncs only at checkpoints:
still atomic and never corrupt, and a killed process loses nothing, but a power loss or OS
crash can roll back the last batches committed before it.

Concurrency: one connection per thread and process; readers never block the writer (WAL),
writers queue on the file lock for up to ``busy_timeout_ms`` (default 30 s), and taking the
write lock at ``BEGIN`` (not at the first write) means a transaction never has to give up
half-way with "database is locked".
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from .errors import StoreError
from .store import MemoryStore, plan_writes

SYNCHRONOUS = ("FULL", "NORMAL")
OPTIONS = ("synchronous", "busy_timeout_ms")
CHUNK = 500  # bound parameters per statement stay under SQLite's limit


def parse_sqlite_url(url: str) -> tuple[Path, dict]:
    parts = urlsplit(url)
    if parts.netloc or not parts.path.startswith("/") or len(parts.path) < 2:
        raise StoreError(f"store URL {url!r}: expected sqlite:///relative/path.db or sqlite:////absolute/path.db")
    options = {"synchronous": "FULL", "busy_timeout_ms": 30_000}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in OPTIONS:
            raise StoreError(f"store URL {url!r}: unknown option {key!r}; expected one of {OPTIONS}")
        options[key] = value
    options["synchronous"] = str(options["synchronous"]).upper()
    if options["synchronous"] not in SYNCHRONOUS:
        raise StoreError(f"store URL {url!r}: synchronous must be one of {SYNCHRONOUS}, got {options['synchronous']!r}")
    try:
        options["busy_timeout_ms"] = int(options["busy_timeout_ms"])
    except ValueError:
        options["busy_timeout_ms"] = -1
    if options["busy_timeout_ms"] < 0:
        raise StoreError(f"store URL {url!r}: busy_timeout_ms must be an int >= 0")
    return Path(parts.path[1:]), options


class _Connection(sqlite3.Connection):
    """A connection that can be weakly referenced, and knows the process that opened it."""

    pid: int


class SQLiteStore(MemoryStore):
    def __init__(self, url: str):
        self.url = url
        self.path, self.options = parse_sqlite_url(url)
        if not self.path.parent.is_dir():
            raise StoreError(f"store URL {url!r}: the folder {str(self.path.parent)!r} does not exist")
        self._local = threading.local()
        # Every live thread's connection, so that close() closes them all (not only its
        # caller's).  Weak: a thread's connection still closes when the thread ends (a
        # threading HTTP server runs a thread per client connection).
        self._opened: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._opened_lock = threading.Lock()
        self._closed = False
        self._connection()  # fail at open, not at the first request

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"{self.path}: the store was closed")
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        # Setting up a connection can meet SQLITE_BUSY that the busy handler never sees
        # (switching a new file to WAL, creating the table, while other connections do the
        # same): retry the whole setup until the busy timeout has passed.
        deadline = time.monotonic() + self.options["busy_timeout_ms"] / 1000
        pause = 0.001
        while True:
            try:
                conn = self._open()
                break
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() >= deadline:
                    raise StoreError(f"{self.path}: cannot open it as a SQLite memory store ({exc})") from None
                time.sleep(pause)
                pause = min(2 * pause, 0.1)
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"{self.path}: cannot open it as a SQLite memory store ({exc})") from None
        conn.pid = self._local.pid = os.getpid()
        self._local.conn = conn
        with self._opened_lock:
            self._opened.add(conn)
        return conn

    def _open(self) -> sqlite3.Connection:
        # check_same_thread=False only so that close() can close it from another thread: each
        # connection is used by the one thread that opened it (thread-local).
        conn = sqlite3.connect(
            self.path,
            timeout=self.options["busy_timeout_ms"] / 1000,
            isolation_level=None,
            check_same_thread=False,
            factory=_Connection,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {self.options['busy_timeout_ms']}")
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if mode.lower() != "wal":  # WAL is a property of the file: set once, by the first opener
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: SQLite refused the WAL journal (got {mode!r})")
            conn.execute(f"PRAGMA synchronous = {self.options['synchronous']}")
            # A rowid table keeps a ~1 KB record inside its leaf page; WITHOUT ROWID would move
            # every record of more than ~1/4 page to an overflow page of its own (4 KB per user).
            conn.execute(
                "CREATE TABLE IF NOT EXISTS records (user TEXT PRIMARY KEY, version INTEGER NOT NULL, "
                "blob BLOB NOT NULL)"
            )
        except BaseException:
            conn.close()
            raise
        return conn

    def _select(self, conn, keys):
        out = {}
        for i in range(0, len(keys), CHUNK):
            chunk = keys[i : i + CHUNK]
            rows = conn.execute(f"SELECT user, blob FROM records WHERE user IN ({','.join('?' * len(chunk))})", chunk)
            out.update(rows)
        return out

    def _get_blobs(self, keys):
        conn = self._connection()
        try:
            if len(keys) <= CHUNK:  # one statement reads one snapshot
                return self._select(conn, keys)
            conn.execute("BEGIN")
            try:
                return self._select(conn, keys)
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:  # locked past the busy timeout, I/O errors: a store error naming the file
            raise StoreError(f"{self.path}: reading records failed ({exc})") from None

    def _put(self, writes):
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(
                f"{self.path}: cannot take the write lock ({exc}; busy_timeout_ms={self.options['busy_timeout_ms']})"
            ) from None
        try:
            to_write, result = plan_writes(writes, self._select(conn, [w.record.user for w in writes]))
            conn.executemany("INSERT OR REPLACE INTO records (user, version, blob) VALUES (?, ?, ?)", to_write)
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:  # a failed COMMIT may have ended the transaction already
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"{self.path}: writing records failed, nothing was written ({exc})") from None
            raise
        return result

    def users(self):
        return [row[0] for row in self._connection().execute("SELECT user FROM records ORDER BY user")]

    def corrupt_for_tests(self, user_id, offset: int = -1) -> None:
        """Flip one byte of a stored record (tests of the checksum path)."""
        conn = self._connection()
        (blob,) = conn.execute("SELECT blob FROM records WHERE user = ?", (str(user_id),)).fetchone()
        blob = bytearray(blob)
        blob[offset] ^= 0xFF
        conn.execute("UPDATE records SET blob = ? WHERE user = ?", (bytes(blob), str(user_id)))

    def close(self):
        """Close every thread's connection (call it when no request is in flight); using the
        store afterwards is a ``StoreError``.  A forked child's copies are left to the child."""
        self._closed = True
        with self._opened_lock:
            opened = list(self._opened)
            self._opened.clear()
        for conn in opened:
            if conn.pid == os.getpid():  # never close a parent's connection from a forked child
                conn.close()
        self._local.conn = None
