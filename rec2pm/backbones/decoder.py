"""The decoder: embeddings in, a stack of blocks over a packed stream, final norm out.

The same decoder predicts items and writes memory (``docs/method.md``); what changes between uses
is only the stream it runs on and the attention pattern.  ``forward`` runs a whole packed
stream through ``segment_attention``; ``step`` runs new rows against per-layer K/V caches
through ``cached_step_attention`` (serving).  In inference on the CPU, ``step``, ``prefill``
and a causal ``forward`` run the whole stack in one C++ call (``fused_step.py``).

Both call the kernels with ``validate=False``: the methods check their inputs (item ids,
offsets, memories) where they enter the model, and a NaN scan of every layer's
activations and caches is not input validation (on the CPU it was 30% of a serving step).
The O(batch) index checks on host tensors still run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from rec2pm_kernels import cached_step_attention, segment_attention
from rec2pm_kernels.varlen import prepare_sequence_and_position_ids

from ..config import ModelConfig
from . import fused_step
from .hstu import HSTUBlock
from .sasrec import SASRecBlock


@dataclass
class LayerCache:
    """One layer's keys and values, ``(batch, capacity, heads, head_dim)``."""

    k: torch.Tensor
    v: torch.Tensor


@dataclass
class UserCaches:
    """Caches held per user: ``layers[b][l] = (k, v)``, user ``b``'s layer-``l`` keys and
    values, each ``(capacity_b, heads, head_dim)`` (a serving session's entries).
    ``Decoder.step`` appends into them in place, without stacking them into one batch."""

    layers: list[list[tuple[torch.Tensor, torch.Tensor]]]

    @classmethod
    def allocate(
        cls, capacities: list[int], num_layers: int, shape: tuple[int, int], like: torch.Tensor, zero: bool = True
    ) -> UserCaches:
        """Empty caches: user ``b``'s K and V of every layer, ``(capacities[b], *shape)``, zero
        (a step appends after the filled slots and attends to nothing past them).
        ``zero=False`` leaves them uninitialised, for a step over empty caches that writes
        each user's rows and zeroes the slots after them itself (the C++ step does).

        One tensor each, not views of one block per user: a block of a user's 32 HSTU
        caches (1.7 MB) is above the allocator's mmap threshold, so each miss would fault its
        pages in afresh (64 users: 22.5 ms to allocate and write, against 19.0 ms for
        separate tensors that the heap recycles, and 32 ms for those zeroed first)."""
        new = like.new_zeros if zero else like.new_empty
        return cls([[(new(slots, *shape), new(slots, *shape)) for _ in range(num_layers)] for slots in capacities])

    def capacities(self) -> list[int]:
        return [user[0][0].shape[0] if user else 0 for user in self.layers]


class Decoder(nn.Module):
    # Serving steps go through the one-call C++ step where it applies (rec2pm/backbones/fused_step.py).
    use_fused_step = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d, heads = config.d_model, config.num_heads
        if config.backbone == "sasrec":
            self.blocks = nn.ModuleList(SASRecBlock(d, heads, config.dropout) for _ in range(config.num_layers))
            self.position = nn.Embedding(config.max_positions, d)
        else:
            self.blocks = nn.ModuleList(
                HSTUBlock(d, heads, config.dropout, config.num_buckets, config.attention_norm, config.num_time_buckets)
                for _ in range(config.num_layers)
            )
            self.position = None  # HSTU's positions enter through the relative bias only
        # Why an input norm: see ModelConfig.input_norm.
        self.input_norm = nn.LayerNorm(d) if config.input_norm else None
        self.input_dropout = nn.Dropout(config.dropout)
        self.final_norm = nn.LayerNorm(d)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Positions and linear weights ~ N(0, init_std), biases 0, LayerNorms and HSTU's
        relative bias as built (gain 1, bias 0).

        Why not torch's defaults: ``nn.Embedding`` starts at N(0, 1), a position vector of norm
        ~sqrt(d) next to item embeddings of norm ~sqrt(d)·init_std, so every block first sees
        the position and hardly the item; ``nn.Linear``'s uniform init makes each block's
        update several times larger than the item embedding it adds to.
        """
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.position is not None:
            nn.init.normal_(self.position.weight, std=std)

    def _check_positions(self, positions: torch.Tensor, max_position: int | None = None) -> None:
        if not positions.numel():
            return
        largest = int(positions.max()) if max_position is None else max_position
        if largest >= self.config.max_positions:
            raise ValueError(
                f"a stream position reaches {largest}, but the model was configured "
                f"with max_positions={self.config.max_positions}; shorten the history or raise it"
            )

    def _stream_input(self, x: torch.Tensor, positions: torch.Tensor, max_position: int | None = None) -> torch.Tensor:
        """The first block's input: ``x`` plus SASRec's positions, through the input norm."""
        self._check_positions(positions, max_position)
        if self.position is not None:
            x = x + self.position(positions)
        return x if self.input_norm is None else self.input_norm(x)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        *,
        pattern: str = "causal",
        segment_len: int | None = None,
        num_memory_tokens: int | None = None,
        collect_kv: bool = False,
        times: tuple[torch.Tensor, torch.Tensor] | None = None,
        max_position: int | None = None,
        last_rows_only: bool = False,
    ):
        """``x (T, d)`` token embeddings at ``positions (T,)`` (the layout's λ) -> ``(T, d)``.

        With ``collect_kv`` also returns every layer's packed ``(k, v)``, ``(T, H, D)`` each.
        ``times``: ``(key_times, query_times)`` of the tokens (``PackedLayout.token_times``),
        required when the model has HSTU's timestamp bias (``num_time_buckets > 0``).
        ``max_position``: the largest of ``positions`` when the caller has it on the host
        (``PackedLayout.max_position``), so that checking them reads nothing back from the device.
        ``last_rows_only``: return only each sequence's last row, ``(batch, d)`` (every sequence
        must be non-empty): what scoring the next item reads.  The fused CPU pass then runs the
        last layer's work after attention, and its attention, for those rows only (about 5% of
        an HSTU-16 forward over 1,000 rows); the other paths compute every row and pick them.
        """
        fused = pattern == "causal" and not collect_kv and not self.config.num_time_buckets
        if fused and fused_step.applies(self, x, []):  # inference on the CPU: one C++ call
            self._check_positions(positions, max_position)
            return fused_step.fused_forward(self, x, positions, cu_seqlens, last_rows_only=last_rows_only)
        if last_rows_only:
            if collect_kv:
                raise ValueError("last_rows_only returns the last rows alone; collect_kv needs every row's K/V")
            fused_step.check_last_rows(cu_seqlens.diff())
            out = self(
                x,
                positions,
                cu_seqlens,
                max_seqlen,
                pattern=pattern,
                segment_len=segment_len,
                num_memory_tokens=num_memory_tokens,
                times=times,
                max_position=max_position,
            )
            return _last_rows(out, cu_seqlens)
        time_options = self._time_options(times, x.device)
        h = self.input_dropout(self._stream_input(x, positions, max_position))
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        kernels = self.config.kernels

        def attend(q, k, v, **score_options):
            if collect_kv:
                kv.append((k, v))
            return segment_attention(
                q,
                k,
                v,
                cu_seqlens,
                max_seqlen,
                pattern=pattern,
                segment_len=segment_len,
                num_memory_tokens=num_memory_tokens,
                validate=False,
                backend=kernels.backend,
                allow_tf32=kernels.allow_tf32,
                deterministic=kernels.deterministic,
                **score_options,
                **(time_options if "ts_bias" in score_options else {}),
            )

        for block in self.blocks:
            h = block(h, attend)
        out = self.final_norm(h)
        return (out, kv) if collect_kv else out

    def prefill(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        capacity: int | list[int],
        max_position: int | None = None,
        last_rows_only: bool = False,
    ) -> tuple[torch.Tensor, list[LayerCache] | UserCaches, torch.Tensor]:
        """A ``causal`` ``forward`` over whole blocks that also returns per-layer caches of
        ``capacity`` slots holding each block's K/V, and their ``cache_seqlens`` (int32).
        ``positions`` are each block's offsets ``0..n-1``, as the cached step gives its slots.
        A list of capacities (one per block) returns ``UserCaches``: each user's own tensors,
        zero past its rows (a session entry keeps them without a copy out of a batch).

        Where the fused step applies, this is one ``step`` of every block's rows over empty
        caches: the cached step attends causally over the rows it appends, so it is the same
        numbers (``tests/model/test_fused_step.py``), in one C++ call instead of a Python
        pass per layer and a scatter of every layer's K/V into the caches.  The caches are
        allocated uninitialised: a step over empty caches writes each user's rows and zeroes
        the slots after them.  ``last_rows_only``: the first result holds each block's last
        row alone, ``(batch, d)``, as in ``forward`` (the caches still hold every row).
        """
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        if last_rows_only:
            fused_step.check_last_rows(lengths)
        if isinstance(capacity, list):
            return self._prefill_users(
                x, positions, cu_seqlens, max_seqlen, lengths, capacity, max_position, last_rows_only
            )
        if lengths.numel() and int(lengths.max()) > capacity:
            raise ValueError(f"capacity {capacity} is smaller than the longest sequence ({int(lengths.max())})")
        if fused_step.applies(self, x, []):
            self._refuse_time_bias()
            self._check_positions(positions, max_position)
            shape = (lengths.numel(), capacity, self.config.num_heads, self.config.head_dim)
            caches = [LayerCache(x.new_empty(shape), x.new_empty(shape)) for _ in self.blocks]
            seqlens = torch.zeros(lengths.numel(), dtype=torch.int32, device=x.device)
            out = fused_step.fused_step(
                self, x, positions, cu_seqlens, caches, seqlens, fresh_caches=True, last_rows_only=last_rows_only
            )
            return out, caches, seqlens.add_(lengths.to(seqlens.device, torch.int32))
        out, kv = self(x, positions, cu_seqlens, max_seqlen, collect_kv=True, max_position=max_position)
        caches, seqlens = caches_from_kv(kv, cu_seqlens, capacity)
        return _last_rows(out, cu_seqlens) if last_rows_only else out, caches, seqlens

    def _prefill_users(
        self, x, positions, cu_seqlens, max_seqlen, lengths, capacities: list[int], max_position, last_rows_only
    ):
        """``prefill`` into caches held per user: one step of every block's rows over each
        user's own empty caches, so the same numbers as a prefill into one batch of caches."""
        held = lengths.tolist()
        if len(capacities) != len(held):
            raise ValueError(f"capacity must hold one int per sequence ({len(held)}), got {len(capacities)}")
        for user, (n, slots) in enumerate(zip(held, capacities, strict=True)):
            if isinstance(slots, bool) or not isinstance(slots, int) or slots < n:
                raise ValueError(f"capacity {slots!r} of sequence {user} is smaller than its length ({n})")
        shape = (self.config.num_heads, self.config.head_dim)
        # The C++ step over empty caches zeroes the slots after each user's rows: no need to zero them twice.
        fused = fused_step.applies_to_new_users(self, x)
        caches = UserCaches.allocate(capacities, len(self.blocks), shape, like=x, zero=not fused)
        seqlens = torch.zeros(len(held), dtype=torch.int32, device=x.device)
        if fused and caches.layers:
            self._refuse_time_bias()
            self._check_positions(positions, max_position)
            out = fused_step.fused_step_users(
                self, x, positions, cu_seqlens, caches.layers, seqlens, last_rows_only=last_rows_only
            )
        else:
            out = self.step(x, positions, cu_seqlens, max_seqlen, caches, seqlens, max_position=max_position)
            out = _last_rows(out, cu_seqlens) if last_rows_only else out
        return out, caches, seqlens.add_(lengths.to(seqlens.device, torch.int32))

    def _time_options(self, times, device) -> dict:
        if not self.config.num_time_buckets:
            return {}
        if times is None:
            raise ValueError(
                f"this model has HSTU's timestamp bias (num_time_buckets={self.config.num_time_buckets}): "
                "pass the token times (the inputs' timestamps)"
            )
        key_times, query_times = times
        return {"timestamps": key_times.to(device), "query_timestamps": query_times.to(device)}

    def _refuse_time_bias(self) -> None:
        if self.config.num_time_buckets:
            raise ValueError(
                "the cached serving step has no timestamp bias yet: a model with num_time_buckets > 0 "
                "scores with full passes (score_history), not prefill/step"
            )

    def step(
        self,
        x_new: torch.Tensor,
        positions_new: torch.Tensor,
        cu_seqlens_new: torch.Tensor,
        max_new: int,
        caches: list[LayerCache] | UserCaches,
        cache_seqlens: torch.Tensor,
        max_position: int | None = None,
        validate: bool = True,
    ) -> torch.Tensor:
        """New rows over per-layer caches (appended in place); call under ``torch.no_grad()``.
        ``caches``: one ``LayerCache`` per layer, or ``UserCaches`` (each user's own, appended
        in place as they are; the C++ step checks every one).

        ``max_position``: the largest of ``positions_new`` when the caller has it on the host.
        ``validate=False`` skips the checks of ``cu_seqlens_new`` and of every layer's caches
        (layouts, filled lengths, room for the new rows): for a caller that built the caches
        and offsets itself and checked the room (the serving engine, through
        ``TokenMemoryModel._step_checked``)."""
        if isinstance(caches, UserCaches):
            return self._step_users(x_new, positions_new, cu_seqlens_new, max_new, caches, cache_seqlens, max_position)
        if len(caches) != len(self.blocks):
            raise ValueError(f"caches must hold one LayerCache per layer ({len(self.blocks)}), got {len(caches)}")
        self._refuse_time_bias()
        if fused_step.applies(self, x_new, caches):
            self._check_positions(positions_new, max_position)
            return fused_step.fused_step(
                self, x_new, positions_new, cu_seqlens_new, caches, cache_seqlens, validate=validate
            )
        h = self._stream_input(x_new, positions_new, max_position)
        kernels = self.config.kernels
        for block, cache in zip(self.blocks, caches, strict=True):

            def attend(q, k, v, cache=cache, **score_options):
                return cached_step_attention(
                    q,
                    k,
                    v,
                    cu_seqlens_new,
                    max_new,
                    cache.k,
                    cache.v,
                    cache_seqlens,
                    validate=False,
                    backend=kernels.backend,
                    allow_tf32=kernels.allow_tf32,
                    **score_options,
                )

            h = block(h, attend)
        return self.final_norm(h)

    def _step_users(
        self, x_new, positions_new, cu_seqlens_new, max_new, caches: UserCaches, cache_seqlens, max_position
    ):
        if len(caches.layers) != cache_seqlens.numel() or any(len(user) != len(self.blocks) for user in caches.layers):
            raise ValueError(
                f"caches must hold one list of (k, v) per layer ({len(self.blocks)}) for each of the "
                f"{cache_seqlens.numel()} users"
            )
        self._refuse_time_bias()
        if caches.layers and fused_step.applies_to_users(self, x_new, caches.layers):
            self._check_positions(positions_new, max_position)
            return fused_step.fused_step_users(self, x_new, positions_new, cu_seqlens_new, caches.layers, cache_seqlens)
        return _step_users_stacked(
            self, x_new, positions_new, cu_seqlens_new, max_new, caches, cache_seqlens, max_position
        )


def _last_rows(h: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Each (non-empty) sequence's last row of ``h``."""
    return h[(cu_seqlens[1:] - 1).long().to(h.device)]


def _step_users_stacked(decoder, x_new, positions_new, cu_seqlens_new, max_new, caches, cache_seqlens, max_position):
    """``Decoder.step`` over ``UserCaches`` where the fused step does not apply: the users'
    caches stacked into one batch (padded to the largest capacity, so each user's own room is
    checked first), stepped, and the new slots copied back."""
    held, counts = cache_seqlens.tolist(), cu_seqlens_new.diff().tolist()
    check_cache_room(held, counts, caches.capacities())
    stacked = [
        LayerCache(*(pad_sequence([user[layer][i] for user in caches.layers], batch_first=True) for i in (0, 1)))
        for layer in range(len(decoder.blocks))
    ]
    h = decoder.step(x_new, positions_new, cu_seqlens_new, max_new, stacked, cache_seqlens, max_position)
    for b, user in enumerate(caches.layers):
        first, end = held[b], held[b] + counts[b]
        for (k, v), cache in zip(user, stacked, strict=True):
            k[first:end] = cache.k[b, first:end]
            v[first:end] = cache.v[b, first:end]
    return h


def cache_capacity(caches: list[LayerCache] | UserCaches) -> int | list[int]:
    """Slots per user: one number for a batch of caches, one per user for ``UserCaches``."""
    if isinstance(caches, UserCaches):
        return caches.capacities()
    return caches[0].k.shape[1] if caches else 0


def check_cache_room(held: list[int], counts: list[int], capacity: int | list[int]) -> None:
    """Each user's ``counts[b]`` new rows fit after its ``held[b]`` filled slots (host ints)
    in its ``capacity`` slots (one for all, or one per user): the check a caller of
    ``Decoder.step(validate=False)`` makes itself."""
    capacities = capacity if isinstance(capacity, list) else [capacity] * len(held)
    for user, (filled, n, capacity) in enumerate(zip(held, counts, capacities, strict=True)):
        if filled + n > capacity:
            raise ValueError(
                f"the serving state is full: user {user} holds {filled} of {capacity} cache slots and "
                f"got {n} new events; prefill with a larger capacity"
            )


def caches_from_kv(
    kv: list[tuple[torch.Tensor, torch.Tensor]], cu_seqlens: torch.Tensor, capacity: int
) -> tuple[list[LayerCache], torch.Tensor]:
    """Per-layer caches holding each packed sequence's K/V in slots ``[0, n_b)``.

    Returns the caches and ``cache_seqlens`` (int32, the sequence lengths).
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if lengths.numel() and int(lengths.max()) > capacity:
        raise ValueError(f"capacity {capacity} is smaller than the longest sequence ({int(lengths.max())})")
    batch = lengths.numel()
    seq, slot = prepare_sequence_and_position_ids(cu_seqlens)
    caches = []
    for k, v in kv:
        kc = k.new_zeros((batch, capacity, *k.shape[1:]))
        vc = v.new_zeros((batch, capacity, *v.shape[1:]))
        kc[seq, slot] = k
        vc[seq, slot] = v
        caches.append(LayerCache(kc, vc))
    return caches, lengths.to(torch.int32)
