"""The memory stores: round trips, batched CAS, replay, refusals; every backend."""

import ast
import gc
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

import rec2pm.serving
from rec2pm.serving.errors import CorruptRecord, FingerprintMismatch, StoreError, VersionConflict
from rec2pm.serving.record import CHECKSUM_BYTES, HEADER, _checksum, decode_record
from rec2pm.serving.store import Write, open_store

from .records import FINGERPRINT, OTHER_FINGERPRINT, make_record

SERVING = Path(rec2pm.serving.__file__).parent
STORE_MODULES = ("store.py", "record.py", "errors.py", "sqlite_store.py", "redis_store.py")


@pytest.mark.parametrize("module", STORE_MODULES)
def test_store_modules_do_not_import_torch(module):
    tree = ast.parse((SERVING / module).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name.split(".")[0] in ("torch", "numpy")}, imported
    # Relative imports stay inside the torch-free modules.
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert f"{node.module}.py" in STORE_MODULES, node.module


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_round_trip(store_url, dtype):
    with open_store(store_url) as store:
        records = [make_record(u, dtype=dtype, recent=tuple(range(1, u + 2)), seen=(9, 8, 7)) for u in range(3)]
        result = store.put_many([Write(r, 0) for r in records])
        assert sorted(result.written) == ["0", "1", "2"] and not result.unchanged
        got = store.get_many([2, 0, 1, 99], fingerprint=FINGERPRINT)
        assert set(got) == {"0", "1", "2"}  # user 99 has no record
        for r in records:
            assert got[r.user] == r
        assert store.users() == ["0", "1", "2"]


def test_bytes_per_record_at_c4_d64_fp32():
    blob = make_record(1, recent=()).encode()
    assert len(blob) == HEADER.size + 4 * 64 * 4 + 8 == 1096  # <= 1.2 KB, plus 4 bytes per recent event


def test_large_batches_cross_statement_chunks(store_url):
    with open_store(store_url) as store:
        records = [make_record(f"u{i}", rows=1, width=4) for i in range(1200)]
        store.put_many([Write(r, 0) for r in records])
        got = store.get_many([r.user for r in records])
        assert len(got) == 1200 and got["u1199"] == records[-1]


def test_cas_conflict_writes_nothing(store_url):
    with open_store(store_url) as store:
        store.put_many([Write(make_record("a"), 0), Write(make_record("b"), 0)])
        stale = [Write(make_record("a", 2, fill=1.0), 1), Write(make_record("b", 3, fill=1.0), 2)]  # b is at 1
        with pytest.raises(VersionConflict, match="'b'") as info:
            store.put_many(stale)
        assert info.value.users == ["b"]
        assert store.get("a").version == 1 and store.get("b").version == 1  # a was not written either
        store.put_many([Write(make_record("a", 2, fill=1.0), 1)])
        assert store.get("a").version == 2
        with pytest.raises(VersionConflict):  # a second writer still holding version 1 loses
            store.put_many([Write(make_record("a", 2, fill=2.0), 1)])


def test_replaying_a_committed_batch_is_a_no_op(store_url):
    with open_store(store_url) as store:
        store.put_many([Write(make_record("a"), 0)])
        archive = [Write(make_record("a", 2, archived=200, recent=(1,)), 1), Write(make_record("b"), 0)]
        assert sorted(store.put_many(archive).written) == ["a", "b"]
        replay = store.put_many(archive)  # the writer did not see the acknowledgement and retries
        assert replay.written == [] and sorted(replay.unchanged) == ["a", "b"]
        assert store.get("a").archived_events == 200 and store.get("a").version == 2


def test_a_replayed_batch_whose_users_were_written_over_since_is_still_a_replay(store_url):
    with open_store(store_url) as store:
        batch = [Write(make_record("a"), 0), Write(make_record("b"), 0)]
        store.put_many(batch)
        later = make_record("b", 2, fill=2.0)  # another writer, after the batch landed
        store.put_many([Write(later, 1)])
        replay = store.put_many(batch)  # the first writer never saw its acknowledgement
        assert replay.written == [] and replay.unchanged == ["a"] and replay.superseded == ["b"]
        assert store.get("b") == later  # not written back over
        # Without a replayed record in it, a batch that finds a later version is a conflict.
        stale = [Write(make_record("b", 2, fill=3.0), 1)]
        with pytest.raises(VersionConflict, match="'b' expected version 1, stored 2") as info:
            store.put_many(stale)
        assert info.value.users == ["b"] and store.get("b") == later
        # A replayed record proves nothing for a user stored below the write's version.
        store.put_many([Write(make_record("c"), 0)])
        mixed = [Write(make_record("a"), 0), Write(make_record("c", 3, fill=3.0), 2)]
        with pytest.raises(VersionConflict, match="'c'"):
            store.put_many(mixed)


def test_versions_only_grow():
    with pytest.raises(ValueError, match="versions only grow"):
        Write(make_record("a", 3), 3)
    with pytest.raises(ValueError, match="twice"):
        open_store("memory://").put_many([Write(make_record("a"), 0), Write(make_record("a", 2), 0)])


def test_another_models_record_is_refused_naming_both(store_url):
    with open_store(store_url) as store:
        store.put_many([Write(make_record("a", fingerprint=OTHER_FINGERPRINT), 0)])
        with pytest.raises(FingerprintMismatch) as info:
            store.get_many(["a"], fingerprint=FINGERPRINT)
        assert OTHER_FINGERPRINT in str(info.value) and FINGERPRINT in str(info.value) and "'a'" in str(info.value)


@pytest.mark.parametrize("offset", [-1, 0, HEADER.size + 3])
def test_corrupted_record_names_the_user(store_url, offset):
    with open_store(store_url) as store:
        store.put_many([Write(make_record("alice"), 0), Write(make_record("bob"), 0)])
        store.corrupt_for_tests("alice", offset)
        with pytest.raises(CorruptRecord, match="'alice'"):
            store.get_many(["bob", "alice"])
        assert store.get("bob") == make_record("bob")


def test_truncated_blob_is_corrupt():
    blob = make_record("a").encode()
    with pytest.raises(CorruptRecord, match="'a'"):
        decode_record("a", blob[:40])


@pytest.mark.parametrize(
    "offset, value, message",
    [
        (0, ord("X"), "has format 1 \\(magic b'X2PM'\\)"),
        (4, 9, "has format 9"),
        (5, 7, "has memory dtype code 7; known codes: 1 \\(fp32\\)"),
    ],
)
def test_a_header_this_version_cannot_read_says_which_field(offset, value, message):
    body = bytearray(make_record("a").encode()[:-CHECKSUM_BYTES])
    body[offset] = value  # a well-formed record (its checksum matches) of another format or dtype
    with pytest.raises(CorruptRecord, match=f"user 'a' {message}"):
        decode_record("a", bytes(body) + _checksum(bytes(body)))


def test_closing_a_sqlite_store_closes_every_threads_connection(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'm.db'}")
    store.put_many([Write(make_record("a"), 0)])
    connections = [store._connection()]

    def read():
        assert store.get("a") == make_record("a")
        connections.append(store._connection())

    worker = threading.Thread(target=read)
    worker.start()
    worker.join()
    assert len(set(map(id, connections))) == 2
    store.close()
    for conn in connections:
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            conn.execute("SELECT 1")
    with pytest.raises(StoreError, match="m.db: the store was closed"):
        store.get("a")


def test_a_sqlite_connection_closes_when_its_thread_ends(tmp_path):
    """close() can reach every live thread's connection without keeping dead threads' open
    (a threading HTTP server runs one thread per client connection)."""
    store = open_store(f"sqlite:///{tmp_path / 'm.db'}")
    workers = [threading.Thread(target=store.get_many, args=(["a"],)) for _ in range(20)]
    for worker in workers:
        worker.start()
        worker.join()
    gc.collect()
    assert len(store._opened) == 1  # the opening thread's
    store.close()


def test_sqlite_reopens_with_records(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}?synchronous=NORMAL"
    with open_store(url) as store:
        store.put_many([Write(make_record("a"), 0)])
    with open_store(url) as store:
        assert store.get("a") == make_record("a")
        assert store._connection().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._connection().execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    with open_store(f"sqlite:///{tmp_path / 'm.db'}") as store:
        assert store._connection().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL by default


@pytest.mark.parametrize(
    "url, message",
    [
        ("postgres://localhost/x", "unknown scheme 'postgres'"),
        ("sqlite://host/x.db", "expected sqlite:///"),
        ("sqlite:///no/such/folder/x.db", "does not exist"),
        ("sqlite:///x.db?synchronous=OFF", "synchronous must be one of"),
        ("sqlite:///x.db?journal=delete", "unknown option 'journal'"),
        ("redis://127.0.0.1:1/0", "cannot reach the Redis server"),
    ],
)
def test_bad_urls_are_named(url, message):
    with pytest.raises(StoreError, match=message) as info:
        open_store(url)
    assert url in str(info.value)


def test_a_file_that_is_not_a_database(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="junk.db"):
        open_store(f"sqlite:///{path}")


def test_bad_user_ids():
    store = open_store("memory://")
    with pytest.raises(TypeError, match="user ids must be ints or strs"):
        store.get_many([1.5])
    with pytest.raises(ValueError, match=">= 0"):
        store.get_many([-1])
    with pytest.raises(ValueError, match="outside"):
        make_record("a", recent=(2**32,)).encode()
    with pytest.raises(ValueError, match="memory holds"):
        replace(make_record("a"), memory_rows=3)


def test_equal_updates_of_two_writers_are_not_taken_for_a_replay(store_url):
    """Two writers appending the same event to the same record: the second must conflict."""
    with open_store(store_url) as store:
        store.put_many([Write(make_record("a"), 0)])
        first = replace(make_record("a", 2, recent=(5, 6, 7)), write_id=b"writer-1")
        store.put_many([Write(first, 1)])
        with pytest.raises(VersionConflict):
            store.put_many([Write(replace(first, write_id=b"writer-2"), 1)])
        assert store.get("a").write_id == b"writer-1"


def test_sqlite_file_growth_per_user(tmp_path):
    """10k users at C = 4, d = 64 fp32 with one recent event: the record is 1100 bytes and the
    file grows by about 1.4 KB per user (key index, page fill)."""
    path = tmp_path / "growth.db"
    with open_store(f"sqlite:///{path}") as store:

        def size():
            store._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return path.stat().st_size

        empty = size()
        for start in range(0, 10_000, 1000):
            store.put_many([Write(make_record(f"user-{u}", recent=(7,)), 0) for u in range(start, start + 1000)])
        per_user = (size() - empty) / 10_000
    assert 1100 <= per_user <= 1500, per_user


def test_a_locked_sqlite_file_is_a_store_error_naming_it(tmp_path):
    import sqlite3

    path = tmp_path / "locked.db"
    store = open_store(f"sqlite:///{path}?busy_timeout_ms=100")
    store.put_many([Write(make_record("u", version=1), expected_version=0)])
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the write lock past the busy timeout
    try:
        with pytest.raises(StoreError, match=f"{path}: cannot take the write lock"):
            store.put_many([Write(make_record("u", version=2), expected_version=1)])
    finally:
        holder.execute("ROLLBACK")
    store.put_many([Write(make_record("u", version=2), expected_version=1)])  # and works once it is free


def test_a_damaged_version_header_does_not_block_its_replacement(store_url):
    """Backfill replaces corrupt records: the version it reads must be the one the CAS checks."""
    store = open_store(store_url)
    store.put_many([Write(make_record("u", version=3), expected_version=0)])
    store.corrupt_for_tests("u", offset=8)  # a byte of the header's version field
    expected = store.versions(["u"])["u"]
    store.put_many([Write(make_record("u", version=expected + 1), expected_version=expected)])
    assert store.get_many(["u"], fingerprint=FINGERPRINT)["u"].version == expected + 1


def test_sqlite_open_retries_a_busy_setup_until_the_timeout(tmp_path, monkeypatch):
    """Switching a file to WAL can meet SQLITE_BUSY that the busy handler never sees (another
    connection closing the last handle and removing the WAL): the open retries, and gives up
    with a StoreError naming the file once the busy timeout has passed."""
    import sqlite3

    from rec2pm.serving.sqlite_store import SQLiteStore

    real_open, failures = SQLiteStore._open, []

    def flaky_open(self):
        if len(failures) < 3:
            failures.append(1)
            raise sqlite3.OperationalError("database is locked")
        return real_open(self)

    monkeypatch.setattr(SQLiteStore, "_open", flaky_open)
    store = open_store(f"sqlite:///{tmp_path / 'busy.db'}?busy_timeout_ms=5000")
    assert len(failures) == 3 and store.users() == []
    store.close()

    def always_busy(self):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(SQLiteStore, "_open", always_busy)
    with pytest.raises(StoreError, match=r"busy2\.db: cannot open it as a SQLite memory store \(database is locked\)"):
        open_store(f"sqlite:///{tmp_path / 'busy2.db'}?busy_timeout_ms=50")

    def broken(self):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(SQLiteStore, "_open", broken)  # not a lock: no retry, no waiting
    started = time.monotonic()
    with pytest.raises(StoreError, match="disk I/O error"):
        open_store(f"sqlite:///{tmp_path / 'busy3.db'}?busy_timeout_ms=60000")
    assert time.monotonic() - started < 5
