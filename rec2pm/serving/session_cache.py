"""A bounded in-process cache of each active user's per-layer K/V of ``[M ; recent]``.

An entry says which memory it was built on (archived events and a digest of the memory
bytes) and which recent events its slots hold; a request whose store record still has
that memory and extends those events steps only the events after them.  Least recently
used entries go first when the cached bytes would pass the bound.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..backbones.decoder import LayerCache, UserCaches


@dataclass
class SessionEntry:
    """Per layer ``(k, v)``, each ``(capacity, heads, head_dim)``; slots ``[0, memory_rows)``
    hold the memory, the next ``len(cached_items)`` the recent events ``cached_items``.
    ``last_logits``: the scores ``(N + 1,)`` after the last of them, the answer to a request
    with no new events (kept with the slots, and counted in ``nbytes``)."""

    memory_digest: bytes
    archived_events: int
    memory_rows: int
    cached_items: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    last_logits: torch.Tensor
    # Computed once: the sizes never change, and a hot request made 32 views per step.
    nbytes: int = field(init=False)
    capacity: int = field(init=False)
    _step_caches: list[LayerCache] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.nbytes = sum(k.nbytes + v.nbytes for k, v in self.layers) + self.last_logits.nbytes
        self.capacity = self.layers[0][0].shape[0] if self.layers else 0

    @property
    def filled_rows(self) -> int:
        return self.memory_rows + len(self.cached_items)

    def grown(self, capacity: int) -> SessionEntry:
        """The entry with ``capacity`` slots per layer: its filled slots copied, the rest zero."""
        if capacity < self.capacity:
            raise ValueError(f"an entry grows: capacity {capacity} is below its {self.capacity} slots")
        filled = self.filled_rows
        k0 = self.layers[0][0]
        (layers,) = UserCaches.allocate([capacity], len(self.layers), tuple(k0.shape[1:]), like=k0).layers
        for (k, v), (grown_k, grown_v) in zip(self.layers, layers, strict=True):
            grown_k[:filled], grown_v[:filled] = k[:filled], v[:filled]
        return SessionEntry(
            self.memory_digest, self.archived_events, self.memory_rows, self.cached_items, layers, self.last_logits
        )

    @property
    def step_caches(self) -> list[LayerCache]:
        """The layers as a batch of one user's caches (views: a step appends into the entry)."""
        if self._step_caches is None:
            self._step_caches = [LayerCache(k[None], v[None]) for k, v in self.layers]
        return self._step_caches


class SessionCache:
    def __init__(self, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"session_cache_bytes must be an int >= 0 (0 turns the cache off), got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0
        self._entries: OrderedDict[str, SessionEntry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, user: str) -> SessionEntry | None:
        with self._lock:
            entry = self._entries.get(user)
            if entry is not None:
                self._entries.move_to_end(user)
            return entry

    def put(self, user: str, entry: SessionEntry) -> None:
        with self._lock:
            self._drop(user)
            if entry.nbytes > self.max_bytes:
                return  # larger than the whole cache: served, not kept
            self._entries[user] = entry
            self.nbytes += entry.nbytes
            while self.nbytes > self.max_bytes:
                oldest = next(iter(self._entries))
                self._drop(oldest)
                self.evictions += 1

    def touch(self, user: str) -> None:
        """Mark ``user``'s entry most recently used (its size is unchanged)."""
        with self._lock:
            if user in self._entries:
                self._entries.move_to_end(user)

    def invalidate(self, user: str) -> None:
        with self._lock:
            self._drop(user)

    def _drop(self, user: str) -> None:
        entry = self._entries.pop(user, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
