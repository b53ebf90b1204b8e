"""Per-user memory stores behind one interface, opened by URL (no torch here).

=========================  ================================================================
``memory://``              in this process only (tests, one-off jobs)
``sqlite:///PATH``         an embedded SQLite file (the default engine), WAL journal;
                           ``sqlite:///runs/mem.db`` is relative, ``sqlite:////srv/mem.db``
                           absolute; options ``?synchronous=NORMAL&busy_timeout_ms=30000``
``redis://HOST:PORT/DB``   a Redis server through redis-py (many machines)
=========================  ================================================================

Every write is a compare-and-swap: a ``Write`` names the version it expects to replace
(0: no record yet) and the new record, whose version must be larger.  A batch is one
transaction: either every write of it lands or none does (``VersionConflict``).  A write
whose record is byte-for-byte the one already stored (the same random ``write_id``) is a
no-op, so resending a batch whose outcome was unknown (a lost reply, a crash before the
acknowledgement) never archives a segment twice; two independent writers' records always
differ in their ``write_id``, so one of them gets the conflict and re-applies its events.
A resent batch some of whose users were written over since it landed is still a replay
(``plan_writes``): those users are ``superseded``, not conflicts.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .errors import StoreError, VersionConflict
from .record import UserRecord, decode_record, record_version, user_key


@dataclass(frozen=True)
class Write:
    """Replace the record at ``expected_version`` (0: none stored) by ``record``."""

    record: UserRecord
    expected_version: int

    def __post_init__(self):
        if not isinstance(self.record, UserRecord):
            raise TypeError(f"Write.record must be a UserRecord, got {type(self.record).__name__}")
        if (
            isinstance(self.expected_version, bool)
            or not isinstance(self.expected_version, int)
            or self.expected_version < 0
        ):
            raise ValueError(f"expected_version must be an int >= 0, got {self.expected_version!r}")
        if self.record.version <= self.expected_version:
            raise ValueError(
                f"user {self.record.user!r}: versions only grow; the new version "
                f"{self.record.version} must exceed the expected {self.expected_version}"
            )


@dataclass
class PutResult:
    """Users whose record was written; users whose identical record was already stored; and,
    in a replay of a batch that landed, users written over since (by a later version)."""

    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)


def plan_writes(writes: Sequence[Write], current: dict[str, bytes]) -> tuple[list[tuple[str, int, bytes]], PutResult]:
    """The CAS decision for a batch, given the stored blobs of its users.

    A write lands when its user's stored version is the expected one; one whose record is
    stored byte for byte is a replay (unchanged).  A batch that holds a replay landed
    before, whole (batches are atomic), so its users stored at a later version than the
    write's were written over since: superseded, not a conflict (re-applying their events
    would store them twice).  Anything else is a conflict.

    Returns ``(user, version, blob)`` to write and the result; raises ``VersionConflict``
    (before anything is written) when a stored version is not the expected one.
    """
    to_write, result, later = [], PutResult(), []
    conflicts, detail = [], ""
    for write in writes:
        user, blob = write.record.user, write.record.encode()
        stored = current.get(user)
        stored_version = 0 if stored is None else record_version(stored)
        if stored_version == write.expected_version:
            to_write.append((user, write.record.version, blob))
            result.written.append(user)
        elif stored == blob:
            result.unchanged.append(user)
        elif stored_version >= write.record.version:
            later.append((user, write.expected_version, stored_version))
        else:
            conflicts.append(user)
            detail = detail or f"user {user!r} expected version {write.expected_version}, stored {stored_version}"
    if later and not result.unchanged:  # no proof that the batch landed: written over before it could
        conflicts = [user for user, _, _ in later] + conflicts
        user, expected, stored_version = later[0]
        detail = detail or f"user {user!r} expected version {expected}, stored {stored_version}"
    if conflicts:
        raise VersionConflict(conflicts, detail)
    result.superseded = [user for user, _, _ in later]
    return to_write, result


def check_batch(writes: Sequence[Write]) -> list[Write]:
    writes = list(writes)
    seen: set[str] = set()
    for write in writes:
        if not isinstance(write, Write):
            raise TypeError(f"put_many takes Write(record, expected_version) entries, got {type(write).__name__}")
        if write.record.user in seen:
            raise ValueError(f"put_many got user {write.record.user!r} twice in one batch")
        seen.add(write.record.user)
    return writes


class MemoryStore(ABC):
    """Records by user: ``get_many`` reads a batch in one snapshot, ``put_many`` writes one
    atomically with compare-and-swap on the versions."""

    url: str

    def get_many(self, user_ids: Iterable, *, fingerprint: str | None = None) -> dict[str, UserRecord]:
        """The stored records of ``user_ids`` (keys as ``user_key``); users without one are absent.

        ``fingerprint``: refuse (``FingerprintMismatch``) records another model wrote.
        A record failing its checksum raises ``CorruptRecord`` naming the user.
        """
        keys = list(dict.fromkeys(user_key(u) for u in user_ids))
        blobs = self._get_blobs(keys) if keys else {}
        return {key: decode_record(key, blob, fingerprint) for key, blob in blobs.items()}

    def get(self, user_id, *, fingerprint: str | None = None) -> UserRecord | None:
        return self.get_many([user_id], fingerprint=fingerprint).get(user_key(user_id))

    def versions(self, user_ids: Iterable) -> dict[str, int]:
        """Stored versions, read without decoding the records (backfill replaces even a
        corrupt record or another model's)."""
        keys = list(dict.fromkeys(user_key(u) for u in user_ids))
        blobs = self._get_blobs(keys) if keys else {}
        return {key: record_version(blob) for key, blob in blobs.items()}

    def put_many(self, writes: Sequence[Write]) -> PutResult:
        writes = check_batch(writes)
        return self._put(writes) if writes else PutResult()

    @abstractmethod
    def _get_blobs(self, keys: list[str]) -> dict[str, bytes]: ...

    @abstractmethod
    def _put(self, writes: list[Write]) -> PutResult: ...

    @abstractmethod
    def users(self) -> list[str]:
        """Every user with a record (for maintenance, not the request path)."""

    def close(self) -> None:  # noqa: B027 -- optional: stores without a connection have nothing to close
        """Release the connection, if the store holds one."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class InProcessStore(MemoryStore):
    """``memory://``: encoded records in a dict, so checksums and CAS behave as on disk."""

    def __init__(self, url: str = "memory://"):
        self.url = url
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def _get_blobs(self, keys):
        with self._lock:
            return {k: self._blobs[k] for k in keys if k in self._blobs}

    def _put(self, writes):
        with self._lock:
            to_write, result = plan_writes(
                writes, {w.record.user: self._blobs.get(w.record.user) for w in writes if w.record.user in self._blobs}
            )
            for user, _, blob in to_write:
                self._blobs[user] = blob
        return result

    def users(self):
        with self._lock:
            return sorted(self._blobs)

    def corrupt_for_tests(self, user_id, offset: int = -1) -> None:
        """Flip one byte of a stored record (tests of the checksum path)."""
        key = user_key(user_id)
        with self._lock:
            blob = bytearray(self._blobs[key])
            blob[offset] ^= 0xFF
            self._blobs[key] = bytes(blob)


SCHEMES = ("memory", "sqlite", "redis")


def open_store(url: str) -> MemoryStore:
    """The store at ``url``: ``memory://``, ``sqlite:///PATH`` or ``redis://HOST:PORT/DB``."""
    if isinstance(url, MemoryStore):
        return url
    if not isinstance(url, str):
        raise TypeError(f"a store URL must be a str such as 'sqlite:///memories.db', got {type(url).__name__}")
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return InProcessStore(url)
    if scheme == "sqlite":
        from .sqlite_store import SQLiteStore

        return SQLiteStore(url)
    if scheme in ("redis", "rediss"):
        from .redis_store import RedisStore

        return RedisStore(url)
    raise StoreError(
        f"store URL {url!r}: unknown scheme {scheme!r}; expected one of memory://, sqlite:///PATH, redis://HOST:PORT/DB"
    )
