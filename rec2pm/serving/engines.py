"""How each method archives a segment and serves ``[M ; recent]``, over per-user memory rows.

A user's memory is a ``(rows, width)`` float tensor: token embeddings (``width = d``) for
Rec2PM and Tok-Serial, or the write tokens' per-layer keys and values for KV-Mask
(``width = 2 * layers * d``: layer after layer, keys then values).  Engines take and
return lists of them, one per user, and batch the work over the users.
"""

from __future__ import annotations

import itertools

import torch

from ..backbones.decoder import LayerCache, UserCaches, cache_capacity, caches_from_kv, check_cache_room
from ..layout import history_shape
from ..methods import KVMask, Memory, ServingState, TokenMemoryModel


def _packed(memories: list[torch.Tensor], width: int, like: torch.Tensor):
    counts = torch.tensor([m.shape[0] for m in memories], dtype=torch.long)
    vectors = torch.cat(memories) if memories else like.new_zeros((0, width))
    return vectors, counts


def _flat_items(lists: list[list[int]], device) -> torch.Tensor:
    return torch.tensor([i for x in lists for i in x], dtype=torch.long, device=device)


def _packed_items(lists: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = itertools.accumulate((len(x) for x in lists), initial=0)
    return _flat_items(lists, device), torch.tensor(list(offsets), dtype=torch.long, device=device)


class TokenMemoryEngine:
    """Rec2PM and Tok-Serial: ``update`` archives, ``prefill`` / ``step`` serve."""

    def __init__(self, model: TokenMemoryModel):
        self.model = model
        self.width = model.config.d_model

    def encode(self, items: torch.Tensor, cu: torch.Tensor, iterative: bool):
        """Whole histories -> (memories, archived segments, tails), one entry per user."""
        memory, tail, tail_cu = self.model.encode(items, cu, iterative=iterative)
        archived, _ = history_shape(cu.diff().cpu(), self.model.config.segment_len)
        return (
            list(memory.vectors.split(memory.counts.tolist())),
            archived.tolist(),
            [t.tolist() for t in tail.split(tail_cu.diff().tolist())],
        )

    def archive(self, memories, segments: list[list[int]], archived_segments: list[int]) -> list[torch.Tensor]:
        weight = self.model.item_embedding.weight
        vectors, counts = _packed(memories, self.width, weight)
        items, cu = _packed_items(segments, weight.device)
        new = self.model.update(Memory(vectors, counts), items, cu)
        return list(new.vectors.split(new.counts.tolist()))

    def score(self, memories, recents: list[list[int]], archived_segments: list[int]) -> torch.Tensor:
        """``prefill``'s logits without caches (a request whose K/V will not be kept): one
        forward pass, with no cache slots to allocate, fill and zero.  The inputs come from
        checked records (see ``TokenMemoryModel.score``'s ``validate``)."""
        weight = self.model.item_embedding.weight
        vectors, counts = _packed(memories, self.width, weight)
        items, cu = _packed_items(recents, weight.device)
        return self.model.score(Memory(vectors, counts), items, cu, validate=False)

    def prefill(self, memories, recents: list[list[int]], archived_segments: list[int], capacities: list[int]):
        """Logits, and each user's own caches (``UserCaches``) of ``capacities[b]`` slots."""
        weight = self.model.item_embedding.weight
        vectors, counts = _packed(memories, self.width, weight)
        items, cu = _packed_items(recents, weight.device)
        logits, state = self.model.prefill(Memory(vectors, counts), items, cu, capacities, validate=False)
        return logits, state.caches, state.seqlens

    def step(
        self,
        caches: list[LayerCache],
        seqlens: torch.Tensor,
        new_items: list[list[int]],
        recent_starts: list[int],
        archived_segments: list[int],
    ) -> torch.Tensor:
        # The caches are the engine's own (a prefill's, or views of one), the room for the new
        # events was checked when the entry was chosen, and the offsets are built here: the
        # model's checks of a caller's state are skipped, and every count stays on the host.
        items, cu = _packed_items(new_items, seqlens.device)
        counts = [len(x) for x in new_items]
        return self.model._step_checked(
            ServingState(caches, seqlens), items, cu, counts, seqlens.tolist(), validate=False
        )


class KVMaskEngine:
    """KV-Mask: the memory is the last write block's per-layer K/V (all of them in append
    mode); archiving runs ``[S_h ; w]`` through the cached step over it at the stream
    positions the kv-memory pattern trained them at."""

    def __init__(self, model: KVMask):
        self.model = model
        config = model.config
        self.layers, self.heads, self.head_dim = config.num_layers, config.num_heads, config.head_dim
        self.width = 2 * config.num_layers * config.d_model

    def _layers(self, vectors: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rows = vectors.view(-1, self.layers, 2, self.heads, self.head_dim)
        return [(rows[:, layer, 0], rows[:, layer, 1]) for layer in range(self.layers)]

    def _caches(self, memories, capacity: int):
        vectors, counts = _packed(memories, self.width, self.model.item_embedding.weight)
        memory_cu = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(vectors.device)
        caches, seqlens = caches_from_kv(self._layers(vectors), memory_cu, capacity)
        return caches, seqlens, counts

    def _run(self, x, positions, lengths: list[int], caches, seqlens):
        # The engine's own caches and offsets, as in TokenMemoryEngine.step: only the room is checked.
        check_cache_room(seqlens.tolist(), lengths, cache_capacity(caches))
        cu = torch.tensor(list(itertools.accumulate(lengths, initial=0)), dtype=torch.long, device=x.device)
        h = self.model.decoder.step(x, positions, cu, max(lengths, default=0), caches, seqlens, validate=False)
        seqlens += torch.tensor(lengths, dtype=torch.int32, device=seqlens.device)
        return h, cu

    def encode(self, items: torch.Tensor, cu: torch.Tensor, iterative: bool):
        """One kv-memory pass (the method has no separate iterative form: it is the same numbers)."""
        memory, tail, tail_cu, _ = self.model.encode(items, cu)
        rows = torch.stack([torch.stack([k, v], 1) for k, v in memory.layers], 1)  # (rows, layers, 2, H, D)
        archived, _ = history_shape(cu.diff().cpu(), self.model.config.segment_len)
        return (
            list(rows.reshape(rows.shape[0], self.width).split(memory.counts.tolist())),
            archived.tolist(),
            [t.tolist() for t in tail.split(tail_cu.diff().tolist())],
        )

    def archive(self, memories, segments, archived_segments):
        S, C = self.model.config.segment_len, self.model.config.num_memory_tokens
        caches, seqlens, counts = self._caches(memories, int(max(m.shape[0] for m in memories)) + S + C)
        device = seqlens.device
        items = torch.tensor(segments, dtype=torch.long, device=device)  # (B, S)
        batch = items.shape[0]
        x = torch.cat([self.model.item_embedding(items), self.model.write_tokens.expand(batch, C, -1)], dim=1).reshape(
            -1, self.model.config.d_model
        )
        units = torch.tensor(archived_segments, dtype=torch.long, device=device)
        positions = (units[:, None] * (S + C) + torch.arange(S + C, device=device)).flatten()
        self._run(x, positions, [S + C] * batch, caches, seqlens)
        out = []
        for b in range(batch):
            first = int(counts[b]) + S  # the write tokens' slots, after the memory and the segment
            new = torch.stack(
                [torch.stack([c.k[b, first : first + C], c.v[b, first : first + C]], 1) for c in caches], 1
            )
            new = new.reshape(C, self.width)
            out.append(new if self.model.options.mode == "overwrite" else torch.cat([memories[b], new]))
        return out

    def _tail_positions(self, new_items, recent_starts, archived_segments, device):
        S, C = self.model.config.segment_len, self.model.config.num_memory_tokens
        return torch.tensor(
            [
                a * (S + C) + start + t
                for items, start, a in zip(new_items, recent_starts, archived_segments, strict=True)
                for t in range(len(items))
            ],
            dtype=torch.long,
            device=device,
        )

    def score(self, memories, recents, archived_segments) -> torch.Tensor:
        """``prefill``'s logits, over caches with no room past each user's rows (not kept)."""
        rows = max(m.shape[0] + len(r) for m, r in zip(memories, recents, strict=True))
        caches, seqlens, _ = self._caches(memories, rows)
        return self._serve(caches, seqlens, recents, [0] * len(recents), archived_segments)

    def prefill(self, memories, recents, archived_segments, capacities: list[int]):
        """Logits, and each user's own caches (``UserCaches``): its memory's K/V, then its
        recent events' slots, in ``capacities[b]`` slots."""
        like = self.model.item_embedding.weight
        caches = UserCaches.allocate(capacities, self.layers, (self.heads, self.head_dim), like=like)
        for user_layers, memory in zip(caches.layers, memories, strict=True):
            for (k, v), (k_rows, v_rows) in zip(user_layers, self._layers(memory), strict=True):
                k[: k_rows.shape[0]], v[: v_rows.shape[0]] = k_rows, v_rows
        seqlens = torch.tensor([m.shape[0] for m in memories], dtype=torch.int32, device=like.device)
        logits = self._serve(caches, seqlens, recents, [0] * len(recents), archived_segments)
        return logits, caches, seqlens

    def step(self, caches, seqlens, new_items, recent_starts, archived_segments):
        return self._serve(caches, seqlens, new_items, recent_starts, archived_segments)

    def _serve(self, caches, seqlens, new_items, recent_starts, archived_segments):
        """Recent events ``recent_starts[b]...`` of each user over its cache; the last one's logits."""
        device = seqlens.device
        items = _flat_items(new_items, device)
        positions = self._tail_positions(new_items, recent_starts, archived_segments, device)
        lengths = [len(x) for x in new_items]
        h, cu = self._run(self.model.item_embedding(items), positions, lengths, caches, seqlens)
        return self.model.logits(h[(cu[1:] - 1).clamp(min=0)])


def engine_for(model) -> TokenMemoryEngine | KVMaskEngine:
    if isinstance(model, TokenMemoryModel):
        return TokenMemoryEngine(model)
    if isinstance(model, KVMask):
        return KVMaskEngine(model)
    raise TypeError(
        f"the Recommender serves methods with a memory (rec2pm-o/-a, tok-serial-o/-a, kv-mask-o/-a), "
        f"got a {type(model).__name__} ({getattr(model, 'method', '?')}), which keeps none"
    )
