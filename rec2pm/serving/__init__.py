"""Serving Rec2PM: per-user memory stores (``open_store``) and the ``Recommender``.

The stores need no torch; ``Recommender`` (which does) is imported on first use.
"""

from .errors import CorruptRecord, FingerprintMismatch, StoreError, UnknownUser, VersionConflict
from .record import UserRecord
from .store import MemoryStore, PutResult, Write, open_store


def __getattr__(name):
    if name in ("Recommender", "ObserveResult"):
        from . import recommender

        return getattr(recommender, name)
    raise AttributeError(f"module 'rec2pm.serving' has no attribute {name!r}")


__all__ = [
    "CorruptRecord",
    "FingerprintMismatch",
    "MemoryStore",
    "ObserveResult",
    "PutResult",
    "Recommender",
    "StoreError",
    "UnknownUser",
    "UserRecord",
    "VersionConflict",
    "Write",
    "open_store",
]
