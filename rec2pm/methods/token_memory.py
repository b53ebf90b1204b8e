"""Inference shared by the token-memory methods (Rec2PM and Tok-Serial).

The memory of a user is C token embeddings (overwriting mode) or ``h*C`` of them
(appending mode), written by the decoder at the write tokens.  Memories of a batch are
packed: ``Memory.vectors`` ``(sum(counts), d)``, user after user.

* ``encode``: history -> (memory, tail), one-shot (one Stage 1 pass) or iterative (one
  ``update`` per archived segment).
* ``update``: ``[M ; S_h ; w]`` -> new memory.
* ``score``: ``[M ; recent]`` -> next-item logits from the last position.
* ``prefill`` / ``step``: ``score`` and then one event at a time through the cached step.

With HSTU's timestamp bias the memory carries a time per vector (that of the write token
that wrote it: the last item of its segment), and the one-shot ``encode`` and ``score``
take the items' ``timestamps``; the iterative update and the cached step refuse such a
model for now (``docs/timestamps.md``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..backbones.decoder import LayerCache, UserCaches, cache_capacity, check_cache_room
from ..layout import WRITE, cached_layout, packed_rows, serving_layout, split_history, stage1_layout, update_layout
from .base import RecModel


@dataclass
class Memory:
    """Packed memories: ``vectors (sum(counts), d)``, ``counts (B,)`` int64 (CPU); with a
    timestamp bias ``times (sum(counts),)`` int64, the time of each vector."""

    vectors: torch.Tensor
    counts: torch.Tensor
    times: torch.Tensor | None = None


@dataclass
class ServingState:
    """Per-layer K/V caches of ``[M ; recent]`` for the cached step (or ``UserCaches``: each
    user's own, as the serving session keeps them); ``seqlens`` (B,) int32."""

    caches: list[LayerCache] | UserCaches
    seqlens: torch.Tensor


def memory_rows(layout, archived: torch.Tensor, mode: str, num_memory_tokens: int):
    """Stage-1-shaped stream rows that hold the memory after the whole history, and the
    memory tokens per user: the last write block (overwrite) or every one (append)."""
    write = layout.role == WRITE
    if mode == "append":
        return torch.nonzero(write).flatten(), archived * num_memory_tokens
    keep = write & (layout.segment == archived[layout.user] - 1)
    return torch.nonzero(keep).flatten(), torch.where(archived > 0, num_memory_tokens, 0)


class TokenMemoryModel(RecModel):
    """Adds the memory inference API to ``RecModel``."""

    uses_write_tokens = True
    supports_time_bias = True

    # -- memory ------------------------------------------------------------------------------
    def empty_memory(self, batch: int) -> Memory:
        w = self.item_embedding.weight
        times = torch.zeros(0, dtype=torch.long, device=w.device) if self.config.num_time_buckets else None
        return Memory(w.new_zeros((0, self.config.d_model)), torch.zeros(batch, dtype=torch.long), times)

    def stage1(self, items: torch.Tensor, lengths: torch.Tensor, timestamps: torch.Tensor | None = None):
        """The Stage 1 pass (``global`` pattern): ``(layout, outputs)``."""
        layout, out, _ = self.stage1_with_times(items, lengths, timestamps)
        return layout, out

    def stage1_with_times(self, items: torch.Tensor, lengths: torch.Tensor, timestamps: torch.Tensor | None):
        """``stage1`` and the stream's key times (``None`` without ``timestamps``): what the
        memory tokens read after it."""
        S, C = self.config.segment_len, self.config.num_memory_tokens
        layout = cached_layout(stage1_layout, lengths, S, C)
        x = layout.embed(self.item_embedding(items), self.write_tokens)
        times = layout.token_times(timestamps) if timestamps is not None else None
        out = self.run(layout, x, times=times, pattern="global", segment_len=S, num_memory_tokens=C)
        return layout, out, None if times is None else times[0]

    def encode(self, items: torch.Tensor, cu_seqlens: torch.Tensor, *, iterative: bool = False, timestamps=None):
        """History -> ``(Memory, tail_items, tail_cu)``; one Stage 1 pass unless ``iterative``."""
        lengths = self.check_history(items, cu_seqlens)
        timestamps = self.check_times(timestamps, items)
        S, C = self.config.segment_len, self.config.num_memory_tokens
        archived, tail_items, tail_cu = split_history(items, lengths, S)
        if iterative:
            self.require_no_time_bias("the iterative encode (one update per segment)")
            memory = self.empty_memory(lengths.numel())
            starts = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
            for h in range(int(archived.max())):
                users = torch.nonzero(archived > h).flatten()
                rows = (starts[users][:, None] + h * S + torch.arange(S)).flatten()
                memory = self.update_some(memory, users, items[rows.to(items.device)])
            return memory, tail_items, tail_cu
        layout, out, key_times = self.stage1_with_times(items, lengths, timestamps)
        rows, counts = memory_rows(layout, archived, self.options.mode, C)
        memory_times = key_times[rows] if key_times is not None else None
        return Memory(out[rows.to(out.device)], counts, memory_times), tail_items, tail_cu

    def update(self, memory: Memory, segment_items: torch.Tensor, segment_cu: torch.Tensor) -> Memory:
        """Archive one segment per user: ``[M ; S_h ; w]`` -> the new memory (each segment
        exactly ``segment_len`` items, as training wrote every memory)."""
        self.require_no_time_bias("update")
        lengths = self.check_history(segment_items, segment_cu, "segment_items")
        S = self.config.segment_len
        if bool((lengths != S).any()):
            raise ValueError(f"segment_items: every segment must hold segment_len={S} items, got {lengths.tolist()}")
        self.check_memory(memory.vectors, memory.counts, lengths.numel())
        self.check_times(memory.times, memory.vectors[:, 0], "memory.times")  # refused: update has no time bias
        return self._update(memory, segment_items, lengths)

    def update_some(self, memory: Memory, users: torch.Tensor, segment_items: torch.Tensor) -> Memory:
        """``update`` for a subset of users, each archiving ``S`` items; others keep theirs."""
        counts = memory.counts
        starts = counts.cumsum(0) - counts
        device = memory.vectors.device
        sub = Memory(memory.vectors[packed_rows(starts[users], counts[users]).to(device)], counts[users])
        new = self._update(sub, segment_items, torch.full((users.numel(),), self.config.segment_len))
        # Each user's memory comes from the new vectors if it updated, else from the old ones.
        source = torch.cat([memory.vectors, new.vectors])
        merged_counts, source_starts = counts.clone(), starts.clone()
        merged_counts[users] = new.counts
        source_starts[users] = counts.sum() + new.counts.cumsum(0) - new.counts
        return Memory(source[packed_rows(source_starts, merged_counts).to(device)], merged_counts)

    def _update(self, memory: Memory, segment_items: torch.Tensor, lengths: torch.Tensor) -> Memory:
        C = self.config.num_memory_tokens
        layout = cached_layout(update_layout, memory.counts, lengths, C)
        x = layout.embed(self.item_embedding(segment_items), self.write_tokens, self.memory_input(memory.vectors))
        out = self.run(layout, x)
        new = out[layout.to(out.device).rows(WRITE)]  # C rows per user, user after user
        if self.options.mode == "overwrite":
            return Memory(new, torch.full_like(memory.counts, C))
        # Append: each user's old memories, then its new C (two ranges per user of one source).
        batch = memory.counts.numel()
        source = torch.cat([memory.vectors, new])
        old_starts = memory.counts.cumsum(0) - memory.counts
        new_starts = memory.counts.sum() + C * torch.arange(batch)
        starts = torch.stack([old_starts, new_starts], 1).flatten()
        sizes = torch.stack([memory.counts, torch.full_like(memory.counts, C)], 1).flatten()
        vectors = source[packed_rows(starts, sizes).to(new.device)]
        counts = memory.counts + C
        return Memory(vectors, counts)

    # -- serving -----------------------------------------------------------------------------
    def _serving_inputs(
        self, memory: Memory, recent_items, recent_cu, recent_times=None, request_times=None, *, validate: bool = True
    ):
        """The checked ``[M ; recent]`` blocks: their layout (on the items' device), token
        embeddings and token times (``None`` without a timestamp bias).  ``validate=False``
        skips the checks of the items, offsets, memory and times (see ``score``)."""
        if validate:
            lengths = self.check_history(recent_items, recent_cu, "recent_items")
            self.check_memory(memory.vectors, memory.counts, lengths.numel())
            self.check_times(memory.times, memory.vectors[:, 0], "memory.times")  # one time per memory row
            recent_times = self.check_times(recent_times, recent_items, "recent_times")
            request_times = self.check_request_times(request_times, lengths.numel())
        else:
            lengths = recent_cu.cpu().diff()
        layout = cached_layout(serving_layout, memory.counts, lengths, self.config.num_memory_tokens)
        times = None
        if recent_times is not None:
            times = layout.token_times(recent_times, memory_times=memory.times, request_times=request_times)
        layout = layout.to(recent_items.device)
        x = layout.embed(self.item_embedding(recent_items), self.write_tokens, self.memory_input(memory.vectors))
        return layout, x, times

    def score(
        self,
        memory: Memory,
        recent_items: torch.Tensor,
        recent_cu: torch.Tensor,
        recent_times=None,
        request_times=None,
        *,
        validate: bool = True,
    ) -> torch.Tensor:
        """``[M ; recent]`` -> next-item logits ``(B, N + 1)`` from each block's last position.
        With a timestamp bias: ``recent_times`` (one per recent item), ``memory.times`` and
        optionally ``request_times`` (one per user).

        ``validate=False`` skips the checks of the items, offsets, memory and times, for a
        caller that built them from checked data (the serving engine: records whose items
        were checked when observed and whose memory passed its checksum and fingerprint); a
        cold request of 100 events spent about 0.03 ms of its ~1.7 ms on them.
        """
        layout, x, times = self._serving_inputs(
            memory, recent_items, recent_cu, recent_times, request_times, validate=validate
        )
        return self.logits(self.run(layout, x, times=times, last_rows_only=True))

    @torch.no_grad()
    def prefill(
        self,
        memory: Memory,
        recent_items: torch.Tensor,
        recent_cu: torch.Tensor,
        capacity: int | list[int],
        *,
        validate: bool = True,
    ) -> tuple[torch.Tensor, ServingState]:
        """``score`` that also keeps every layer's K/V of ``[M ; recent]`` for ``step``.

        ``capacity``: cache slots per user, at least the longest ``[M ; recent]`` block plus
        the events ``step`` will add; or one int per user, for caches held per user
        (``UserCaches``: each user's own tensors).  ``validate``: as in ``score``.
        """
        self.require_no_time_bias("prefill (the cached serving step)")
        capacities = capacity if isinstance(capacity, list) else [capacity]
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in capacities):
            raise TypeError(
                f"capacity must be an int >= 1 (cache slots per user) or a list of them, one per user, got {capacity!r}"
            )
        layout, x, _ = self._serving_inputs(memory, recent_items, recent_cu, validate=validate)
        h, caches, seqlens = self.decoder.prefill(
            x,
            layout.position,
            layout.cu_seqlens,
            layout.max_seqlen,
            capacity,
            max_position=layout.max_position,
            last_rows_only=True,
        )
        return self.logits(h), ServingState(caches, seqlens)

    @torch.no_grad()
    def step(self, state: ServingState, new_items: torch.Tensor, new_cu: torch.Tensor) -> torch.Tensor:
        """New events (packed, 0 or more per user) through the cached step; advances ``state``.

        Returns logits ``(B, N + 1)`` after each user's last new event; the rows of users
        without new events are NaN (nothing was computed for them).
        """
        if not isinstance(state, ServingState):
            raise TypeError(f"state must be the ServingState that prefill returned, got {type(state).__name__}")
        counts = self.check_packed_items(new_items, new_cu, "new_items", batch=state.seqlens.numel())  # host
        if new_items.device != state.seqlens.device or new_cu.device != state.seqlens.device:
            raise ValueError(
                f"new_items and new_cu must be on the serving state's device {state.seqlens.device}, "
                f"got {new_items.device} and {new_cu.device}"
            )
        return self._step_checked(state, new_items, new_cu, counts.tolist(), state.seqlens.tolist(), validate=True)

    @torch.no_grad()
    def _step_checked(
        self,
        state: ServingState,
        new_items: torch.Tensor,
        new_cu: torch.Tensor,
        counts: list[int],
        held: list[int],
        *,
        validate: bool,
    ) -> torch.Tensor:
        """``step`` once the new events are known to be well formed: ``counts`` (new events)
        and ``held`` (filled slots) per user, on the host.  The serving engine builds its
        inputs and caches itself and comes here directly with ``validate=False``, which skips
        the decoder's per-layer cache checks (``Decoder.step``); the capacity check stays, as
        the C++ step writes the caches through raw pointers."""
        check_cache_room(held, counts, cache_capacity(state.caches))
        device = state.seqlens.device
        # A user's new rows take the stream positions after its filled slots.
        positions = [filled + t for filled, n in zip(held, counts, strict=True) for t in range(n)]
        h = self.decoder.step(
            self.item_embedding(new_items),
            torch.tensor(positions, dtype=torch.long, device=device),
            new_cu,
            max(counts, default=0),
            state.caches,
            state.seqlens,
            max_position=max(positions, default=None),
            validate=validate,
        )
        state.seqlens += torch.tensor(counts, dtype=torch.int32, device=device)
        if not positions:
            return h.new_full((len(counts), self.config.num_items + 1), float("nan"))
        last = list(itertools.accumulate(counts, initial=-1))[1:]  # each user's last new row
        logits = self.logits(h[torch.tensor([max(row, 0) for row in last], dtype=torch.long, device=device)])
        if 0 in counts:  # such a user's row above is another user's: never let it pass as an answer
            logits[torch.tensor([n == 0 for n in counts], device=device)] = float("nan")
        return logits

    def score_history(
        self, items: torch.Tensor, cu_seqlens: torch.Tensor, timestamps=None, request_times=None, *, iterative=False
    ):
        memory, tail, tail_cu = self.encode(items, cu_seqlens, iterative=iterative, timestamps=timestamps)
        tail_times = None
        if timestamps is not None:  # the tail's rows, as encode cut them
            tail_times = split_history(timestamps, cu_seqlens.cpu().long().diff(), self.config.segment_len)[1]
        return self.score(memory, tail, tail_cu, tail_times, request_times)
