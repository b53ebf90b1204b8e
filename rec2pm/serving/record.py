"""One user's stored record and its byte format (no torch: a store never needs it).

Format 1, little-endian:

====================  ======================================================================
header (64 bytes)     magic ``R2PM``, format, memory dtype, flags, reserved, version (u64),
                      archived events (u64), memory rows (u32), floats per row (u32),
                      recent events (u32), archived ids (u32), model fingerprint (16 bytes),
                      write id (8 bytes, random per write: two writers never send equal bytes)
memory                rows x width floats in the memory dtype (fp32, fp16 or bf16)
recent events         u32 item ids, oldest first (1..S of them, 0 only before any event)
archived ids          u32 distinct item ids, most recent first (bounded; see ``seen_truncated``)
checksum (8 bytes)    BLAKE2b-64 of everything before it
====================  ======================================================================

At C = 4, d = 64 in fp32 that is 64 + 1024 + 8 = 1096 bytes plus 4 bytes per recent event
and per archived id.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from .errors import CorruptRecord, FingerprintMismatch

FORMAT_VERSION = 1
MAGIC = b"R2PM"
HEADER = struct.Struct("<4sBBBBQQIIII16s8s")
CHECKSUM_BYTES = 8
MEMORY_DTYPES = {"fp32": (1, 4), "fp16": (2, 2), "bf16": (3, 2)}  # name -> (code, bytes per float)
DTYPE_BY_CODE = {code: name for name, (code, _) in MEMORY_DTYPES.items()}
FLAG_SEEN_TRUNCATED = 1
MAX_ITEM_ID = 2**32 - 1  # ids are stored as u32


def user_key(user_id) -> str:
    """The store key of a user id (an int >= 0 or a non-empty str)."""
    if isinstance(user_id, bool) or not isinstance(user_id, (int, str)):
        raise TypeError(f"user ids must be ints or strs, got {type(user_id).__name__} {user_id!r}")
    if isinstance(user_id, int) and user_id < 0:
        raise ValueError(f"user ids must be >= 0, got {user_id}")
    key = str(user_id)
    if not key or len(key.encode()) > 512:
        raise ValueError(f"user ids must be 1..512 bytes long, got {user_id!r}")
    return key


def fingerprint_bytes(fingerprint: str) -> bytes:
    try:
        raw = bytes.fromhex(fingerprint)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != 16:
        raise ValueError(f"a model fingerprint is 32 hex digits, got {fingerprint!r}")
    return raw


@dataclass(frozen=True)
class UserRecord:
    """Everything the store keeps for one user.

    Attributes:
        user: the store key (``user_key``).
        version: grows with every write (1 for the first; 0 means "no record").
        archived_events: events folded into the memory (a multiple of S).
        recent: events not archived yet, oldest first.
        memory: ``memory_rows x memory_width`` floats in ``memory_dtype`` (raw bytes).
        fingerprint: 32 hex digits naming the model (weights and config) that wrote it.
        seen: distinct archived item ids, most recent first, for ``exclude_seen``.
        seen_truncated: older archived ids were dropped to keep ``seen`` bounded.
        write_id: 8 bytes naming the write (random); a stored record equal to a new one byte
            for byte is the same write replayed, never an independent writer's equal update.
    """

    user: str
    version: int
    archived_events: int
    recent: tuple[int, ...]
    memory: bytes
    memory_rows: int
    memory_width: int
    memory_dtype: str
    fingerprint: str
    seen: tuple[int, ...] = field(default=())
    seen_truncated: bool = False
    write_id: bytes = bytes(8)

    def __post_init__(self):
        if self.memory_dtype not in MEMORY_DTYPES:
            raise ValueError(f"memory_dtype must be one of {tuple(MEMORY_DTYPES)}, got {self.memory_dtype!r}")
        for name in ("version", "archived_events", "memory_rows", "memory_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"user {self.user!r}: {name} must be an int >= 0, got {value!r}")
        if self.version < 1:
            raise ValueError(f"user {self.user!r}: a stored record has version >= 1, got {self.version}")
        expected = self.memory_rows * self.memory_width * MEMORY_DTYPES[self.memory_dtype][1]
        if len(self.memory) != expected:
            raise ValueError(
                f"user {self.user!r}: memory holds {len(self.memory)} bytes, expected {expected} "
                f"({self.memory_rows} x {self.memory_width} {self.memory_dtype})"
            )
        fingerprint_bytes(self.fingerprint)
        if not isinstance(self.write_id, bytes) or len(self.write_id) != 8:
            raise ValueError(f"user {self.user!r}: write_id must be 8 bytes, got {self.write_id!r}")

    def encode(self) -> bytes:
        for name in ("recent", "seen"):
            ids = getattr(self, name)
            if ids and (min(ids) < 0 or max(ids) > MAX_ITEM_ID):
                raise ValueError(f"user {self.user!r}: {name} holds an item id outside 0..{MAX_ITEM_ID}")
        header = HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            MEMORY_DTYPES[self.memory_dtype][0],
            FLAG_SEEN_TRUNCATED if self.seen_truncated else 0,
            0,
            self.version,
            self.archived_events,
            self.memory_rows,
            self.memory_width,
            len(self.recent),
            len(self.seen),
            fingerprint_bytes(self.fingerprint),
            self.write_id,
        )
        body = b"".join(
            (
                header,
                self.memory,
                struct.pack(f"<{len(self.recent)}I", *self.recent),
                struct.pack(f"<{len(self.seen)}I", *self.seen),
            )
        )
        return body + _checksum(body)


def _checksum(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=CHECKSUM_BYTES).digest()


def decode_record(user: str, blob: bytes, expected_fingerprint: str | None = None) -> UserRecord:
    """Parse and verify a stored record; a bad checksum or another model's record raises."""
    blob = bytes(blob)
    if len(blob) < HEADER.size + CHECKSUM_BYTES or _checksum(blob[:-CHECKSUM_BYTES]) != blob[-CHECKSUM_BYTES:]:
        raise CorruptRecord(
            f"the stored record of user {user!r} fails its checksum ({len(blob)} bytes); "
            "it is not used: rewrite it (python -m rec2pm encode) or delete it"
        )
    (magic, fmt, dtype_code, flags, _, version, archived, rows, width, n_recent, n_seen, fingerprint, write_id) = (
        HEADER.unpack_from(blob)
    )
    if magic != MAGIC or fmt != FORMAT_VERSION:
        raise CorruptRecord(
            f"the stored record of user {user!r} has format {fmt} (magic {magic!r}); this version reads "
            f"format {FORMAT_VERSION} (magic {MAGIC!r})"
        )
    if dtype_code not in DTYPE_BY_CODE:
        raise CorruptRecord(
            f"the stored record of user {user!r} has memory dtype code {dtype_code}; known codes: "
            + ", ".join(f"{code} ({name})" for code, name in sorted(DTYPE_BY_CODE.items()))
        )
    dtype = DTYPE_BY_CODE[dtype_code]
    memory_end = HEADER.size + rows * width * MEMORY_DTYPES[dtype][1]
    if memory_end + 4 * (n_recent + n_seen) + CHECKSUM_BYTES != len(blob):
        raise CorruptRecord(
            f"the stored record of user {user!r} has {len(blob)} bytes, which does not match its header"
        )
    if expected_fingerprint is not None and fingerprint.hex() != expected_fingerprint:
        raise FingerprintMismatch(
            f"the stored record of user {user!r} was written by model {fingerprint.hex()}, but this model is "
            f"{expected_fingerprint}; re-encode the memories with this model (python -m rec2pm encode)"
        )
    recent = struct.unpack_from(f"<{n_recent}I", blob, memory_end)
    seen = struct.unpack_from(f"<{n_seen}I", blob, memory_end + 4 * n_recent)
    return UserRecord(
        user=user,
        version=version,
        archived_events=archived,
        recent=recent,
        memory=blob[HEADER.size : memory_end],
        memory_rows=rows,
        memory_width=width,
        memory_dtype=dtype,
        fingerprint=fingerprint.hex(),
        seen=seen,
        seen_truncated=bool(flags & FLAG_SEEN_TRUNCATED),
        write_id=write_id,
    )


def record_version(blob: bytes) -> int:
    """The version field of an encoded record, without verifying it (for CAS checks); 0 for a
    blob too short to hold one."""
    return HEADER.unpack_from(blob)[5] if len(blob) >= HEADER.size else 0
