"""Errors of the serving layer; each names the user, URL or argument that was wrong."""

from __future__ import annotations


class StoreError(Exception):
    """Base of every memory-store error."""


class CorruptRecord(StoreError):
    """A stored record failed its checksum or does not parse; it is never used."""


class FingerprintMismatch(StoreError):
    """A record was written by another model (weights, config, memory shape or dtype)."""


class VersionConflict(StoreError):
    """A compare-and-swap write found another version than expected; nothing was written."""

    def __init__(self, users: list[str], detail: str):
        super().__init__(
            f"version conflict for user(s) {users[:8]}{' ...' if len(users) > 8 else ''}: {detail}; "
            "nothing in the batch was written (re-read the records and retry)"
        )
        self.users = users


class UnknownUser(KeyError):
    """A request named users the store holds no events for (a ``KeyError``: a lookup that
    found nothing; the HTTP endpoint answers 404 for it and for nothing else)."""

    def __str__(self) -> str:  # KeyError's would quote the message
        return str(self.args[0]) if self.args else "unknown user"
