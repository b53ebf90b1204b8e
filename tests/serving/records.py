"""Record builders shared by the store tests (no torch)."""

from __future__ import annotations

import struct

from rec2pm.serving.record import UserRecord

FINGERPRINT = "0123456789abcdef0123456789abcdef"
OTHER_FINGERPRINT = "fedcba9876543210fedcba9876543210"


def make_record(
    user,
    version=1,
    *,
    rows=4,
    width=64,
    dtype="fp32",
    recent=(5, 6),
    archived=0,
    seen=(),
    fingerprint=FINGERPRINT,
    fill=0.5,
) -> UserRecord:
    if dtype == "fp32":
        memory = struct.pack(f"<{rows * width}f", *([fill] * (rows * width)))
    else:  # fp16/bf16 bit patterns; the store never interprets them
        memory = bytes(range(256)) * (rows * width * 2 // 256) + bytes(rows * width * 2 % 256)
    return UserRecord(
        user=str(user),
        version=version,
        archived_events=archived,
        recent=tuple(recent),
        memory=memory,
        memory_rows=rows,
        memory_width=width,
        memory_dtype=dtype,
        fingerprint=fingerprint,
        seen=tuple(seen),
    )
