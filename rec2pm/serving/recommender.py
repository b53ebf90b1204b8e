"""``Recommender``: observe events into the store, recommend from ``[M ; recent]``.

``observe`` appends each user's events to its record; when a user holds more than S
recent events it archives the oldest S through the memory update (segment by segment, in
order, batched over every user crossing a boundary) and writes the records back with
compare-and-swap, re-reading and re-applying on a conflict, so concurrent writers never
lose an event.  ``recommend`` reads the records, serves cached users through the cached
step over their session K/V and the others through one prefill, and returns the top k.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backbones.decoder import UserCaches
from .engines import engine_for
from .errors import FingerprintMismatch, StoreError, UnknownUser, VersionConflict
from .fingerprint import model_fingerprint
from .record import UserRecord, user_key
from .session_cache import SessionCache, SessionEntry
from .store import MemoryStore, Write, open_store

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ObserveResult:
    """Per user of the call, in its order: events stored, and segments archived by this call."""

    users: list[str]
    stored: list[int]
    archived: list[int]


@dataclass
class _UserState:
    version: int
    archived_events: int
    recent: list[int]
    memory: torch.Tensor
    seen: list[int]
    seen_truncated: bool
    segments: int = 0
    # The stored memory's bytes and dtype while no segment was archived: an append rewrites
    # them as they are, not rounded to this Recommender's memory_dtype.
    stored_memory: tuple[bytes, str] | None = None


@dataclass
class BackfillBatch:
    """Users' states computed by ``Recommender.encode_backfill``, not yet written."""

    keys: list[str]
    events: list[int]
    archived: list[int]
    states: list[_UserState]


def _back_off(attempt: int) -> None:
    """A random, growing pause after a conflict: writers that collided do not collide again in step."""
    time.sleep(random.uniform(0, min(0.05, 0.0005 * 2**attempt)))


def load_model(checkpoint_or_model) -> torch.nn.Module:
    if isinstance(checkpoint_or_model, torch.nn.Module):
        return checkpoint_or_model
    if not isinstance(checkpoint_or_model, (str, Path)):
        raise TypeError(
            f"checkpoint_or_model must be a checkpoint path or a model from build_model, got "
            f"{type(checkpoint_or_model).__name__}"
        )
    from ..training import build, checkpoint_run, load_checkpoint, load_weights

    path = Path(checkpoint_or_model)
    ckpt = load_checkpoint(path)
    model = build(checkpoint_run(ckpt), ckpt["num_items"])
    load_weights(model, ckpt["model"], path)
    return model


def _digest(memory: bytes) -> bytes:
    return hashlib.blake2b(memory, digest_size=16).digest()


class Recommender:
    """Serves a model with a memory (Rec2PM, Tok-Serial, KV-Mask) from a ``MemoryStore``.

    Args:
        checkpoint_or_model: a checkpoint ``train`` wrote, or a model (put in eval mode here).
        store: a ``MemoryStore`` or its URL (``open_store``).
        device: ``"auto"`` (CUDA when available), or a torch device.
        session_cache_bytes: bound of the session K/V cache; 0 turns it off.
        memory_dtype: ``"fp32"``, ``"fp16"`` or ``"bf16"``: how new memories are stored (a
            memory an archive computes; an append keeps the stored memory's bytes and dtype).
        seen_limit: archived item ids kept per user for ``exclude_seen`` (most recent
            first; older ones are dropped and the record says so); 0 keeps none.
        max_retries: compare-and-swap attempts of one ``observe`` before the conflict is raised.
    """

    def __init__(
        self,
        checkpoint_or_model,
        store: MemoryStore | str,
        *,
        device="auto",
        session_cache_bytes: int = 256 << 20,
        memory_dtype: str = "fp32",
        seen_limit: int = 1024,
        max_retries: int = 32,
    ):
        if memory_dtype not in TORCH_DTYPES:
            raise ValueError(f"memory_dtype must be one of {tuple(TORCH_DTYPES)}, got {memory_dtype!r}")
        if isinstance(seen_limit, bool) or not isinstance(seen_limit, int) or not 0 <= seen_limit <= 1 << 20:
            raise ValueError(f"seen_limit must be an int in 0..{1 << 20}, got {seen_limit!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 1:
            raise ValueError(f"max_retries must be an int >= 1 (compare-and-swap attempts), got {max_retries!r}")
        self.cache = SessionCache(session_cache_bytes)
        model = load_model(checkpoint_or_model)
        self.engine = engine_for(model)
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.model = model.to(self.device).eval()
        self.fingerprint = model_fingerprint(self.model)
        self.store = open_store(store)  # last: nothing after it can fail and leave it open
        self.memory_dtype, self.seen_limit, self.max_retries = memory_dtype, seen_limit, max_retries
        config = self.model.config
        self.num_items, self.segment_len = config.num_items, config.segment_len
        self._lock = threading.Lock()  # the model and the session cache
        self._write_lock = threading.Lock()  # this process's writers, one at a time

    # -- inputs --------------------------------------------------------------------------------
    def _user_keys(self, user_ids) -> list[str]:
        if isinstance(user_ids, torch.Tensor):
            user_ids = user_ids.tolist()
        if isinstance(user_ids, (str, int)):
            raise TypeError("user_ids must be a sequence of user ids (one per user of the batch), got a single id")
        keys = [user_key(u) for u in user_ids]
        if not keys:
            raise ValueError("user_ids is empty; expected at least one user")
        if len(set(keys)) != len(keys):
            twice = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(f"user_ids holds user {twice!r} more than once; send each user's events as one run")
        return keys

    def _events(self, keys: list[str], items, cu_seqlens) -> list[list[int]]:
        if cu_seqlens is None:
            if isinstance(items, torch.Tensor) or len(items) != len(keys):
                raise ValueError(
                    f"without cu_seqlens, items must be one sequence of item ids per user "
                    f"({len(keys)}), got {type(items).__name__} of {len(items)}"
                )
            runs = [list(x.tolist() if isinstance(x, torch.Tensor) else x) for x in items]
        else:
            flat = items.tolist() if isinstance(items, torch.Tensor) else list(items)
            cu = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
            if (
                len(cu) != len(keys) + 1
                or cu[0] != 0
                or cu[-1] != len(flat)
                or any(b < a for a, b in itertools.pairwise(cu))
            ):
                raise ValueError(
                    f"cu_seqlens must be {len(keys) + 1} non-decreasing offsets from 0 to "
                    f"len(items)={len(flat)}, got {cu[:8]}"
                )
            runs = [flat[a:b] for a, b in itertools.pairwise(cu)]
        for key, run in zip(keys, runs, strict=True):
            for item in run:
                if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= self.num_items:
                    raise ValueError(f"user {key!r}: item id {item!r} is outside the catalogue 1..{self.num_items}")
        return runs

    # -- memory bytes ------------------------------------------------------------------------
    def _memory_tensor(self, record: UserRecord) -> torch.Tensor:
        weight = self.model.item_embedding.weight
        if record.memory_width != self.engine.width:
            raise FingerprintMismatch(
                f"user {record.user!r}: stored memory rows hold {record.memory_width} floats, "
                f"this model uses {self.engine.width}"
            )
        if record.memory_rows == 0:
            return weight.new_zeros((0, self.engine.width))
        raw = torch.frombuffer(bytearray(record.memory), dtype=TORCH_DTYPES[record.memory_dtype])
        return raw.view(record.memory_rows, record.memory_width).to(self.device, weight.dtype)

    def _stored(self, memory: torch.Tensor) -> torch.Tensor:
        """The memory as it will read back from the store (rounded to ``memory_dtype``)."""
        return memory.to(TORCH_DTYPES[self.memory_dtype]).to(memory.dtype)

    def _memory_bytes(self, memory: torch.Tensor) -> bytes:
        stored = memory.detach().to("cpu", TORCH_DTYPES[self.memory_dtype]).contiguous()
        return stored.view(torch.uint8).numpy().tobytes()

    # -- observe -------------------------------------------------------------------------------
    def observe(self, user_ids: Sequence, items, cu_seqlens=None) -> ObserveResult:
        """Append events: ``items`` packed with ``cu_seqlens`` (B + 1 offsets), or one
        sequence per user.  Returns after the store committed them."""
        keys = self._user_keys(user_ids)
        runs = self._events(keys, items, cu_seqlens)
        active = [(k, run) for k, run in zip(keys, runs, strict=True) if run]
        segments: dict[str, int] = {}
        # Writers of this process take turns (no compare-and-swap conflicts among them); the
        # model lock is held only for the compute, so requests are not held up by store waits.
        with self._write_lock:
            for attempt in range(self.max_retries):
                records = self.store.get_many([k for k, _ in active], fingerprint=self.fingerprint)
                with self._lock, torch.no_grad():
                    states = {k: self._state(records.get(k), run) for k, run in active}
                    self._archive(states)
                    writes = [Write(self._record(k, s), s.version) for k, s in states.items()]
                try:
                    self._put(writes)
                    break
                except VersionConflict as conflict:
                    if attempt == self.max_retries - 1:
                        raise VersionConflict(
                            conflict.users,
                            f"still conflicting after {self.max_retries} "
                            "attempts (raise max_retries, or write fewer users per batch)",
                        ) from None
                    _back_off(attempt)
            for k, s in states.items():
                segments[k] = s.segments
                if s.segments:  # (a request checks its entry against the record anyway)
                    self.cache.invalidate(k)
        return ObserveResult(keys, [len(r) for r in runs], [segments.get(k, 0) for k in keys])

    def _put(self, writes: list[Write]) -> None:
        """``put_many``; when it fails without saying whether the batch landed (a reply lost
        to a timeout or a dropped connection), a read of its users decides: a batch any of
        whose records is stored (the same random ``write_id``) landed whole, and resending
        it or re-applying its events would store them twice.  Otherwise the error stands."""
        try:
            self.store.put_many(writes)
        except VersionConflict:
            raise
        except StoreError:
            try:
                stored = self.store.get_many([w.record.user for w in writes])
            except StoreError:
                stored = {}
            if not any(w.record.user in stored and stored[w.record.user].write_id == w.record.write_id for w in writes):
                raise

    def _state(self, record: UserRecord | None, run: list[int]) -> _UserState:
        if record is None:
            return _UserState(
                0, 0, list(run), self.model.item_embedding.weight.new_zeros((0, self.engine.width)), [], False
            )
        return _UserState(
            record.version,
            record.archived_events,
            list(record.recent) + list(run),
            self._memory_tensor(record),
            list(record.seen),
            record.seen_truncated,
            stored_memory=(record.memory, record.memory_dtype),
        )

    def _archive(self, states: dict[str, _UserState]) -> None:
        """Archive every full segment, oldest first, one batched update per round."""
        S = self.segment_len
        while True:
            due = [s for s in states.values() if len(s.recent) > S]
            if not due:
                return
            new = self.engine.archive(
                [s.memory for s in due], [s.recent[:S] for s in due], [s.archived_events // S for s in due]
            )
            for s, memory in zip(due, new, strict=True):
                self._remember_seen(s, s.recent[:S])
                s.memory, s.recent = self._stored(memory), s.recent[S:]
                s.archived_events += S
                s.segments += 1
                s.stored_memory = None

    def _remember_seen(self, state: _UserState, segment: list[int]) -> None:
        if not self.seen_limit:  # none kept: ids stored by a writer that kept some go too
            state.seen_truncated = state.seen_truncated or bool(segment) or bool(state.seen)
            state.seen = []
            return
        newest = list(dict.fromkeys(reversed(segment)))
        known = set(newest)
        merged = newest + [i for i in state.seen if i not in known]
        state.seen_truncated = state.seen_truncated or len(merged) > self.seen_limit
        state.seen = merged[: self.seen_limit]

    def _record(self, key: str, s: _UserState) -> UserRecord:
        memory, memory_dtype = s.stored_memory or (self._memory_bytes(s.memory), self.memory_dtype)
        return UserRecord(
            user=key,
            version=s.version + 1,
            archived_events=s.archived_events,
            recent=tuple(s.recent),
            memory=memory,
            memory_rows=s.memory.shape[0],
            memory_width=self.engine.width,
            memory_dtype=memory_dtype,
            fingerprint=self.fingerprint,
            seen=tuple(s.seen),
            seen_truncated=s.seen_truncated,
            write_id=os.urandom(8),
        )

    # -- backfill ------------------------------------------------------------------------------
    def backfill(
        self, user_ids: Sequence, items: torch.Tensor, cu_seqlens: torch.Tensor, *, iterative: bool = True
    ) -> ObserveResult:
        """Write each user's record from its whole history (``items`` packed by ``cu_seqlens``),
        replacing whatever is stored (another model's record, a corrupt one), with CAS on the
        stored versions.  ``iterative``: one memory update per segment, exactly what ``observe``
        computes; else one Stage 1 pass (token-memory methods)."""
        return self.commit_backfill(self.encode_backfill(user_ids, items, cu_seqlens, iterative=iterative))

    def encode_backfill(
        self, user_ids: Sequence, items: torch.Tensor, cu_seqlens: torch.Tensor, *, iterative: bool = True
    ) -> BackfillBatch:
        """The compute half of ``backfill``: every user's new state, without touching the store.

        The result is plain data (picklable), so ranks of a ``torchrun`` backfill can send
        theirs to the one rank that writes (``rec2pm.serving.backfill``)."""
        keys = self._user_keys(user_ids)
        runs = self._events(keys, items, cu_seqlens)
        if any(not run for run in runs):
            raise ValueError(f"user {keys[[len(r) for r in runs].index(0)]!r} has no events to encode")
        flat = torch.tensor([i for run in runs for i in run], dtype=torch.long, device=self.device)
        cu = torch.tensor([0] + [len(r) for r in runs], dtype=torch.long).cumsum(0).to(self.device)
        S = self.segment_len
        states = []
        with self._lock, torch.no_grad():
            memories, archived, tails = self.engine.encode(flat, cu, iterative)
            for run, memory, segments, tail in zip(runs, memories, archived, tails, strict=True):
                state = _UserState(0, segments * S, tail, self._stored(memory).cpu(), [], False)
                for h in range(segments):
                    self._remember_seen(state, run[h * S : (h + 1) * S])
                states.append(state)
        return BackfillBatch(keys, [len(r) for r in runs], list(archived), states)

    def commit_backfill(self, batch: BackfillBatch) -> ObserveResult:
        """The store half of ``backfill``: write ``batch``'s records with CAS on the stored
        versions (retried up to ``max_retries`` times), replacing whatever is stored."""
        with self._write_lock:
            for attempt in range(self.max_retries):
                versions = self.store.versions(batch.keys)
                writes = []
                for key, state in zip(batch.keys, batch.states, strict=True):
                    state = dataclasses.replace(state, version=versions.get(key, 0))
                    writes.append(Write(self._record(key, state), state.version))
                try:
                    self._put(writes)
                    break
                except VersionConflict as conflict:
                    if attempt == self.max_retries - 1:
                        raise VersionConflict(
                            conflict.users, f"still conflicting after {self.max_retries} attempts (raise max_retries)"
                        ) from None
                    _back_off(attempt)
            for key in batch.keys:
                self.cache.invalidate(key)
        return ObserveResult(batch.keys, batch.events, batch.archived)

    # -- recommend -----------------------------------------------------------------------------
    def records(self, user_ids) -> list[UserRecord]:
        """The stored records of ``user_ids``, in order; a user without one is an error."""
        keys = self._user_keys(user_ids)
        found = self.store.get_many(keys, fingerprint=self.fingerprint)
        missing = [k for k in keys if k not in found or not found[k].recent]
        if missing:
            raise UnknownUser(f"no events stored for user(s) {missing[:8]} in {self.store.url}; observe some first")
        return [found[k] for k in keys]

    def scores(self, user_ids) -> torch.Tensor:
        """Next-item logits ``(B, N + 1)`` from ``[M ; recent]``; column 0 (padding) is -inf."""
        records = self.records(user_ids)
        with self._lock, torch.no_grad():
            return self._scores(records)

    def recommend(self, user_ids, k: int, exclude_seen: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``k`` items and their scores, ``(B, k)`` each, best first.

        ``exclude_seen`` drops the user's recent events and its stored archived ids.  When
        fewer than k items remain, the rest of the row is item 0 with score -inf.
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_items:
            raise ValueError(f"k must be an int in 1..{self.num_items} (the catalogue), got {k!r}")
        records = self.records(user_ids)
        with self._lock, torch.no_grad():
            logits = self._scores(records)
        if exclude_seen:
            rows = [b for b, r in enumerate(records) for _ in r.recent + r.seen]
            cols = [i for r in records for i in r.recent + r.seen]
            logits[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)] = float("-inf")
        scores, items = logits.topk(k, dim=1)
        items = torch.where(torch.isneginf(scores), torch.zeros_like(items), items)
        return items.cpu(), scores.cpu()

    def _scores(self, records: list[UserRecord]) -> torch.Tensor:
        out: list[torch.Tensor | None] = [None] * len(records)
        hits, misses = [], []
        for b, record in enumerate(records):
            entry = self._entry_for(record) if self.cache.max_bytes else None
            if entry is not None:
                hits.append((b, entry))
            else:
                misses.append(b)
        self.cache.hits += len(hits)
        self.cache.misses += len(misses)
        stepped = []
        for b, entry in hits:
            if len(entry.cached_items) == len(records[b].recent):  # nothing new since the entry's last answer
                out[b] = entry.last_logits
                self.cache.touch(records[b].user)
            else:
                stepped.append((b, entry))
        if stepped:
            for (b, _), row in zip(stepped, self._step_hits([(records[b], e) for b, e in stepped]), strict=True):
                out[b] = row
        if misses:
            missed = [records[b] for b in misses]
            # Without a session cache nothing keeps the K/V: a forward pass, not a prefill.
            rows = self._prefill(missed) if self.cache.max_bytes else self._score_cold(missed)
            for b, row in zip(misses, rows, strict=True):
                out[b] = row
        return torch.stack(out)

    def _entry_for(self, record: UserRecord) -> SessionEntry | None:
        """The user's session entry if it holds this record's memory and a prefix of its recent
        events, grown first when the new events would not fit; ``None`` for a miss."""
        entry = self.cache.get(record.user)
        if entry is None:
            return None
        cached = entry.cached_items
        if not (
            entry.archived_events == record.archived_events
            and len(cached) <= len(record.recent)
            and tuple(record.recent[: len(cached)]) == cached
            and entry.memory_digest == _digest(record.memory)
        ):
            return None
        if entry.memory_rows + len(record.recent) > entry.capacity:
            entry = entry.grown(entry.memory_rows + self._recent_slots(len(record.recent)))
            self.cache.put(record.user, entry)  # served even if it no longer fits the cache
        return entry

    def _recent_slots(self, recent: int) -> int:
        """Cache slots an entry holds for ``recent`` events and the ones to come: the next power
        of two above ``recent`` (at least 16), at most S (an archive after S events replaces
        the entry).  An entry sized for S from the start held three times the slots a user with
        the average S/2 recent events fills; this one doubles, copying its slots, when full."""
        return min(self.segment_len, max(16, 1 << recent.bit_length()))

    def _step_hits(self, group: list[tuple[UserRecord, SessionEntry]]) -> torch.Tensor:
        """Step each user's events after its cached ones (one or more per user)."""
        starts = [len(e.cached_items) for _, e in group]
        new_items = [list(r.recent[s:]) for (r, _), s in zip(group, starts, strict=True)]
        seqlens = torch.tensor(
            [e.memory_rows + s for (_, e), s in zip(group, starts, strict=True)], dtype=torch.int32, device=self.device
        )
        entries = [e for _, e in group]
        # The step appends into the entries themselves: one user's as a batch of one (views),
        # several as caches held per user (not stacked into one batch and copied back).
        caches = entries[0].step_caches if len(group) == 1 else UserCaches([e.layers for e in entries])
        logits = self.engine.step(
            caches, seqlens, new_items, starts, [r.archived_events // self.segment_len for r, _ in group]
        )
        for (record, entry), row in zip(group, logits, strict=True):
            entry.cached_items = tuple(record.recent)
            entry.last_logits = row.clone()  # not a view that keeps the batch's rows alive
            self.cache.touch(record.user)
        return logits

    def _engine_inputs(self, records: list[UserRecord]) -> tuple[list[torch.Tensor], list[list[int]], list[int]]:
        """Each user's memory rows, recent events and archived segments, as the engine takes them."""
        return (
            [self._memory_tensor(r) for r in records],
            [list(r.recent) for r in records],
            [r.archived_events // self.segment_len for r in records],
        )

    def _score_cold(self, records: list[UserRecord]) -> torch.Tensor:
        return self.engine.score(*self._engine_inputs(records))

    def _prefill(self, records: list[UserRecord]) -> torch.Tensor:
        memories, recents, archived_segments = self._engine_inputs(records)
        # Each user's caches are its own tensors (UserCaches), kept as its entry without a copy.
        capacities = [m.shape[0] + self._recent_slots(len(r)) for m, r in zip(memories, recents, strict=True)]
        logits, caches, _ = self.engine.prefill(memories, recents, archived_segments, capacities)
        for b, (record, memory, layers) in enumerate(zip(records, memories, caches.layers, strict=True)):
            entry = SessionEntry(
                _digest(record.memory),
                record.archived_events,
                memory.shape[0],
                tuple(record.recent),
                layers,
                logits[b].clone(),  # not a view that keeps the batch's rows alive
            )
            self.cache.put(record.user, entry)
        return logits

    def close(self) -> None:
        self.store.close()
