"""Packing ragged histories into the token streams of Rec2PM, and back.

A history of ``L >= 1`` items has ``K = (L - 1) // S`` archived segments and a tail of
``L - K*S`` items (1..S).  The streams (``docs/method.md``, ``docs/patterns.md``):

* **Stage 1** (``stage1_layout``), one sequence per user, attended with ``pattern="global"``::

      [S_0 w  S_1 w  ...  S_{K-1} w  tail]

  Positions are the ``global`` λ: item ``j`` of the history has position ``j``; write
  token ``c`` after segment ``h`` has ``(h + 1) * S + c``.
* **Stage 2** (``stage2_layout``), ``K + 1`` blocks per user, each attended with
  ``pattern="causal"``::

      [S_0 w] [m_0 S_1 w] ... [m_{K-1} tail]        (mode="overwrite")
      [S_0 w] [m_0 S_1 w] ... [m_0..m_{K-1} tail]   (mode="append")

  where ``m_h`` are the C reference memories that Stage 1 wrote after segment ``h``.
* **Memory update** (``update_layout``): ``[M ; S_h ; w]`` per user.
* **Serving** (``serving_layout``): ``[M ; recent items]`` per user.

**Positions inside blocks** (Stage 2, update, serving) are offsets from the block start:
memory tokens ``0..m-1``, then items, then write tokens.  So an item gets the same
position in a Stage 2 block and in the update (or serving) block that reproduces it,
whenever both carry the same number of memory tokens (C in overwrite mode from segment 1
on, ``h*C`` in append mode).  These are also the λ that ``causal`` attention biases use.

Every layout is a ``PackedLayout``: per-token index tensors (all ``int64``, ``-1`` where a
field does not apply) plus ``cu_seqlens`` / ``max_seqlen`` for the kernels.  Item inputs are
*packed histories*: the items of all users back to back, user ``u`` owning rows
``[items_cu[u], items_cu[u + 1])``; ``item_index`` and ``target_index`` index those rows.

**Host and device.**  Layouts are built on the host, from the host lengths that input checks
read anyway (sizing a layout on the device would read its sizes back).  A layout never changes
once built, so it keeps what is derived from it: ``to(device)`` copies it once (one transfer
of all per-token fields) and returns that copy on every later call, and the row sets
(``rows``, ``target_rows``) and ``max_position`` are computed once on the host and moved with
it, so no use site copies a layout or reads a device tensor back.  ``LayoutCache`` (the shared
one: ``cached_layout``) keeps the layouts of recent calls by their builder and arguments,
so that a batch with the lengths of an earlier one builds nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from rec2pm_kernels.patterns import bias_positions, is_write_token, unit_of
from rec2pm_kernels.varlen import expand_lengths, prepare_offsets, range_rows

ITEM, WRITE, MEMORY = 0, 1, 2
MODES = ("overwrite", "append")
# The per-token fields of a PackedLayout, which travel to a device together as one tensor.
PER_TOKEN_FIELDS = (
    "role",
    "user",
    "segment",
    "slot",
    "position",
    "item_index",
    "target_index",
    "memory_index",
    "reference_index",
)


@dataclass(frozen=True)
class PackedLayout:
    """Per-token bookkeeping of one packed stream; ``T`` tokens in ``num_sequences`` sequences.

    Attributes:
        cu_seqlens: ``(num_sequences + 1,)`` int32 offsets, for the kernels.
        max_seqlen: the longest sequence.
        role: ``(T,)`` ``ITEM``, ``WRITE`` or ``MEMORY``.
        user: ``(T,)`` the batch row (user) the token belongs to.
        segment: ``(T,)`` items and write tokens: the history segment ``h``; memory tokens
            in Stage 2: the segment they summarise.  ``-1`` in update and serving blocks,
            which do not know the absolute segment.
        slot: ``(T,)`` write and memory tokens: ``c`` in ``[0, C)``, else ``-1``.
        position: ``(T,)`` the positions λ (Stage 1: ``global`` λ; blocks: offset in block).
        item_index: ``(T,)`` items: row in the packed histories, else ``-1``.
        target_index: ``(T,)`` items: row of the next item of the same history that this
            position predicts, ``-1`` if none in this layout.
        memory_index: ``(T,)`` memory tokens: row of the memory bank the token reads (Stage 2:
            the Stage 1 stream row of the write token that wrote it; update and serving: the
            row of the packed memories passed in), else ``-1``.
        reference_index: ``(T,)`` Stage 2 write tokens: the Stage 1 stream row of the write
            token with the same (user, segment, slot), whose output is the reference memory
            that ``L_con`` compares with; else ``-1``.

    The tensors are never changed in place: device copies and row sets are kept with the
    layout (module docstring, "Host and device"), and cached layouts are shared by calls.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    role: torch.Tensor
    user: torch.Tensor
    segment: torch.Tensor
    slot: torch.Tensor
    position: torch.Tensor
    item_index: torch.Tensor
    target_index: torch.Tensor
    memory_index: torch.Tensor
    reference_index: torch.Tensor
    # Device copies, row sets and host values derived from the fields, kept on first use;
    # a device copy also keeps the host layout it came from under "host".
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return self.role.numel()

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def host(self) -> PackedLayout:
        """The layout as built (on the host); a device copy returns the layout it was copied from."""
        return self._derived.get("host", self)

    def _kept(self, key, make: Callable[[], object]):
        """``make()``, computed on the first call and kept with the layout."""
        if key not in self._derived:
            with torch.inference_mode(False):  # kept for later calls, which may need autograd
                self._derived[key] = make()
        return self._derived[key]

    def _host_rows(self, key, find: Callable[[PackedLayout], torch.Tensor]) -> torch.Tensor:
        """Rows that ``find`` picks on the host layout, on this layout's device (no read back)."""
        host = self.host
        if host is self:
            return self._kept(key, lambda: find(self))
        return self._kept(key, lambda: host._host_rows(key, find).to(self.role.device))

    def rows(self, role: int) -> torch.Tensor:
        """Stream rows holding tokens of ``role``, in stream order."""
        return self._host_rows(("rows", role), lambda layout: torch.nonzero(layout.role == role).flatten())

    @property
    def target_rows(self) -> torch.Tensor:
        """Item rows that predict a next item (``target_index >= 0``), in stream order."""
        return self._host_rows(
            "target_rows",
            lambda layout: torch.nonzero((layout.role == ITEM) & (layout.target_index >= 0)).flatten(),
        )

    @property
    def max_position(self) -> int:
        """The largest position (``-1`` with no tokens), read on the host."""
        host = self.host
        return host._kept("max_position", lambda: int(host.position.max()) if host.num_tokens else -1)

    @property
    def last_rows(self) -> torch.Tensor:
        """The last row of every sequence (serving scores the next item from it)."""
        return self.cu_seqlens[1:].long() - 1

    def embed(
        self, items: torch.Tensor, write_tokens: torch.Tensor | None = None, memory: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Input embeddings of the stream, ``(T, d)``.

        Args:
            items: ``(total_items, d)`` embeddings of the packed histories.
            write_tokens: ``(C, d)`` the learned write-token embeddings.
            memory: ``(bank_rows, d)`` the memory bank ``memory_index`` points into.
        """
        if self.role.device != items.device:
            return self.to(items.device).embed(items, write_tokens, memory)
        out = items.new_zeros((self.num_tokens, items.shape[-1]))
        rows = self.rows(ITEM)
        out = out.index_put((rows,), items[self.item_index[rows]])
        rows = self.rows(WRITE)
        if rows.numel():
            if write_tokens is None:
                raise ValueError("write_tokens is required: this layout has write tokens")
            out = out.index_put((rows,), write_tokens[self.slot[rows]].to(out.dtype))
        rows = self.rows(MEMORY)
        if rows.numel():
            if memory is None:
                raise ValueError("memory is required: this layout has memory tokens")
            out = out.index_put((rows,), memory[self.memory_index[rows]].to(out.dtype))
        return out

    def to_history(self, outputs: torch.Tensor, total_items: int) -> torch.Tensor:
        """Item rows of ``outputs`` (``(T, ...)``) put back in packed-history order.

        Rows of history items absent from this layout are zero.
        """
        rows = self.rows(ITEM)
        back = outputs.new_zeros((total_items, *outputs.shape[1:]))
        return back.index_put((self.item_index[rows],), outputs[rows])

    def token_times(
        self,
        item_times: torch.Tensor,
        memory_times: torch.Tensor | None = None,
        request_times: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key_times, query_times)``, ``(T,)`` int64 each, for HSTU's timestamp bias
        (``docs/timestamps.md``).

        Key times: an item has its event's time (``item_times``, ``(total_items,)`` aligned with
        the packed histories); a write token the time of the last item of its segment (the
        item just before its write block); a memory token the time of the write token that
        wrote it (``memory_times``, aligned with the memory bank ``memory_index`` points into).
        Query times: an item that predicts a next item queries at that item's time; the last
        item of a history queries at its user's ``request_times`` (``(batch,)``) when given,
        else at its own time; write and memory tokens query at their own time.

        The times are on ``item_times``' device, computed there from row sets found on the host.
        """
        device = item_times.device
        on_device = self.to(device)
        item_times = item_times.detach().long()
        key = torch.zeros(self.num_tokens, dtype=torch.int64, device=device)
        items = on_device.rows(ITEM)
        key[items] = item_times[on_device.item_index[items]]
        writes = on_device.rows(WRITE)
        if writes.numel():
            # Each write token takes the time of the nearest item row before it (found on the host).
            key[writes] = key[on_device._host_rows("write_time_rows", _write_time_rows)]
        memory = on_device.rows(MEMORY)
        if memory.numel():
            if memory_times is None:
                raise ValueError("memory_times is required: this layout has memory tokens, and they carry a time")
            key[memory] = memory_times.detach().to(device).long()[on_device.memory_index[memory]]
        query = key.clone()
        predicts = on_device.target_rows
        query[predicts] = item_times[on_device.target_index[predicts]]
        if request_times is not None:
            last = on_device._host_rows(
                "last_item_rows", lambda layout: layout.rows(ITEM)[layout.target_index[layout.rows(ITEM)] < 0]
            )
            query[last] = request_times.detach().to(device).long()[on_device.user[last]]
        return key, query

    def to(self, device) -> PackedLayout:
        """This layout on ``device``: copied on the first call, the same copy on every later one."""
        device = torch.device(device)
        if self.role.device == device:
            return self
        host = self.host
        if host.role.device == device:
            return host
        return host._kept(("on", device), lambda: host._copy_to(device))

    def _copy_to(self, device: torch.device) -> PackedLayout:
        # One transfer for the per-token fields (views of one block on the device), one for the offsets.
        per_token = torch.stack([getattr(self, name) for name in PER_TOKEN_FIELDS]).to(device)
        copy = PackedLayout(
            cu_seqlens=self.cu_seqlens.to(device),
            max_seqlen=self.max_seqlen,
            **dict(zip(PER_TOKEN_FIELDS, per_token.unbind(0), strict=True)),
        )
        copy._derived["host"] = self
        return copy


def _write_time_rows(layout: PackedLayout) -> torch.Tensor:
    """For each write token, the nearest item row at or before it: the row whose time it takes.
    Blocks put write tokens right after their items."""
    writes = layout.rows(WRITE)
    item_rows = torch.where(layout.role == ITEM, torch.arange(layout.num_tokens), -1)
    last_item = torch.cummax(item_rows, 0).values[writes]
    starts = layout.cu_seqlens.long()[:-1]
    sequence = torch.searchsorted(layout.cu_seqlens.long(), writes, right=True) - 1
    if bool((last_item < starts[sequence]).any()):
        raise ValueError("a write token has no item before it in its sequence; its time is undefined")
    return last_item


def _as_counts(name: str, values, minimum: int) -> torch.Tensor:
    t = torch.as_tensor(values if not isinstance(values, torch.Tensor) else values.cpu())
    if t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D sequence of ints, got shape {tuple(t.shape)}")
    if t.numel() and (t.is_floating_point() or t.dtype == torch.bool):
        raise TypeError(f"{name} must hold ints, got dtype {t.dtype}")
    t = t.long()
    if t.numel() and int(t.min()) < minimum:
        bad = int(torch.nonzero(t < minimum)[0, 0])
        raise ValueError(f"{name}[{bad}] must be >= {minimum}, got {int(t[bad])}")
    return t


def _check_sizes(segment_len: int, num_memory_tokens: int) -> None:
    for name, value in (("segment_len", segment_len), ("num_memory_tokens", num_memory_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def packed_rows(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row indices (on the host) of the ranges ``[starts[i], starts[i] + counts[i])``, in order."""
    return range_rows(starts.cpu(), counts.cpu())


def _layout(counts: torch.Tensor, **per_token: torch.Tensor) -> PackedLayout:
    cu = prepare_offsets(counts).to(torch.int32)
    return PackedLayout(cu_seqlens=cu, max_seqlen=int(counts.max()) if counts.numel() else 0, **per_token)


def history_shape(lengths, segment_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K, tail)`` per history: archived segments ``(L - 1) // S`` and tail ``L - K*S``."""
    _check_sizes(segment_len, 1)
    lengths = _as_counts("lengths", lengths, 1)
    archived = torch.div(lengths - 1, segment_len, rounding_mode="floor")
    return archived, lengths - archived * segment_len


def stage1_layout(lengths: Sequence[int] | torch.Tensor, segment_len: int, num_memory_tokens: int) -> PackedLayout:
    """The Stage 1 interleaved stream ``[S_0 w ... S_{K-1} w tail]``, one sequence per user.

    ``lengths``: history length of each user (>= 1).  Attend it with ``pattern="global"``,
    ``segment_len=S``, ``num_memory_tokens=C``.
    """
    _check_sizes(segment_len, num_memory_tokens)
    lengths = _as_counts("lengths", lengths, 1)
    S, C = segment_len, num_memory_tokens
    archived, _ = history_shape(lengths, S)
    counts = lengths + archived * C
    user, p = expand_lengths(counts)
    # The pattern rule of the kernels (rec2pm_kernels.patterns): the same write-token roles
    # and the same λ that ``global`` attention biases use.
    unit = unit_of(p, S, C)
    is_write = is_write_token(p, S, C)
    in_unit = p - (S + C) * unit
    history = bias_positions("global", p, S, C)  # for items, the index in the history
    items_cu = prepare_offsets(lengths)
    item_index = torch.where(is_write, -1, items_cu[:-1][user] + history)
    has_next = ~is_write & (history + 1 < lengths[user])
    minus = torch.full_like(p, -1)
    return _layout(
        counts,
        role=torch.where(is_write, WRITE, ITEM),
        user=user,
        segment=unit,
        slot=torch.where(is_write, in_unit - S, -1),
        position=history,
        item_index=item_index,
        target_index=torch.where(has_next, item_index + 1, -1),
        memory_index=minus,
        reference_index=minus.clone(),
    )


def _blocks(block_user, mem_count, item_first, item_count, with_write, items_cu, item_limit, C):
    """Pack blocks ``[memory ; items ; write tokens]``; see the public builders.

    Returns the layout fields plus each token's block and offset (memory ordinal for memory
    tokens), for the caller to fill ``segment`` / ``memory_index`` / ``reference_index``.
    """
    counts = mem_count + item_count + with_write.long() * C
    block, offset = expand_lengths(counts)
    m, n = mem_count[block], item_count[block]
    is_mem = offset < m
    is_item = ~is_mem & (offset < m + n)
    is_write = ~is_mem & ~is_item
    user = block_user[block]
    j = item_first[block] + offset - m  # index in the user's history, for items
    item_index = torch.where(is_item, items_cu[:-1][user] + j, -1)
    has_next = is_item & (j + 1 < item_limit[block])
    fields_ = dict(
        role=torch.where(is_mem, MEMORY, torch.where(is_item, ITEM, WRITE)),
        user=user,
        slot=torch.where(is_write, offset - m - n, torch.where(is_mem, offset % C, -1)),
        position=offset,
        item_index=item_index,
        target_index=torch.where(has_next, item_index + 1, -1),
    )
    return counts, block, offset, is_mem, is_write, fields_


def stage2_layout(
    lengths: Sequence[int] | torch.Tensor, segment_len: int, num_memory_tokens: int, mode: str = "overwrite"
) -> PackedLayout:
    """The Stage 2 blocks of every user, ``K + 1`` per user in history order.

    Memory tokens read the reference memories from the Stage 1 stream of the same
    ``lengths`` (``memory_index`` = Stage 1 row), write tokens name their reference in
    ``reference_index``, and the last item of block ``h`` predicts the first item of
    segment ``h + 1``.  Attend it with ``pattern="causal"``.
    """
    _check_sizes(segment_len, num_memory_tokens)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    S, C = segment_len, num_memory_tokens
    lengths = _as_counts("lengths", lengths, 1)
    archived, _ = history_shape(lengths, S)
    block_user, h = expand_lengths(archived + 1)  # block h of user u
    is_last = h == archived[block_user]
    item_first = h * S
    item_count = torch.where(is_last, lengths[block_user] - h * S, S)
    mem_count = (h * C) if mode == "append" else torch.where(h > 0, C, 0)
    counts, block, offset, is_mem, is_write, f = _blocks(
        block_user, mem_count, item_first, item_count, ~is_last, prepare_offsets(lengths), lengths[block_user], C
    )
    user, hb = f["user"], h[block]
    stage1_start = prepare_offsets(lengths + archived * C)[:-1][user]
    # Memory token i reads segment g = h-1 (overwrite) or i // C (append), slot i % C.
    mem_segment = torch.div(offset, C, rounding_mode="floor") if mode == "append" else hb - 1
    mem_row = stage1_start + mem_segment * (S + C) + S + offset % C
    write_row = stage1_start + hb * (S + C) + S + f["slot"]
    return _layout(
        counts,
        segment=torch.where(is_mem, mem_segment, hb),
        memory_index=torch.where(is_mem, mem_row, -1),
        reference_index=torch.where(is_write, write_row, -1),
        **f,
    )


def block_layout(
    memory_counts: Sequence[int] | torch.Tensor,
    item_counts: Sequence[int] | torch.Tensor,
    num_memory_tokens: int,
    *,
    with_write: bool | Sequence[bool] = False,
    users: Sequence[int] | torch.Tensor | None = None,
    item_first: Sequence[int] | torch.Tensor | None = None,
    history_lengths: Sequence[int] | torch.Tensor | None = None,
) -> PackedLayout:
    """General blocks ``[M ; items ; (w)]``, one per entry; ``update_layout`` and
    ``serving_layout`` are its common cases.

    Block ``i`` belongs to user ``users[i]`` (default ``i``), carries ``memory_counts[i]``
    memory tokens (read from packed memories, block after block), the items
    ``[item_first[i], item_first[i] + item_counts[i])`` of that user's history, and write
    tokens if ``with_write`` (one flag, or one per block).  Histories are packed by
    ``history_lengths`` (default: each block's items alone), and an item's target is the
    next item of its history, even when that item lies in a later block.
    """
    _check_sizes(1, num_memory_tokens)
    memory_counts = _as_counts("memory_counts", memory_counts, 0)
    item_counts = _as_counts("item_counts", item_counts, 1)
    n = item_counts.numel()
    if memory_counts.numel() != n:
        raise ValueError(
            f"memory_counts and item_counts must have one entry per block, got {memory_counts.numel()} and {n}"
        )
    users = torch.arange(n) if users is None else _as_counts("users", users, 0)
    item_first = torch.zeros_like(item_counts) if item_first is None else _as_counts("item_first", item_first, 0)
    history = item_counts if history_lengths is None else _as_counts("history_lengths", history_lengths, 1)
    writes = torch.as_tensor(with_write, dtype=torch.bool)
    if writes.dim() > 1 or (writes.dim() == 1 and writes.numel() != n):
        raise ValueError(f"with_write must be one bool, or one per block ({n}), got shape {tuple(writes.shape)}")
    writes = writes.expand(n) if n else torch.zeros(0, dtype=torch.bool)
    for name, t in (("users", users), ("item_first", item_first)):
        if t.numel() != n:
            raise ValueError(f"{name} must have one entry per block ({n}), got {t.numel()}")
    if n and int(users.max()) >= history.numel():
        raise ValueError(f"users names user {int(users.max())}, but history_lengths has {history.numel()} entries")
    if n and bool((item_first + item_counts > history[users]).any()):
        raise ValueError("item_first + item_counts runs past the end of a history (history_lengths)")
    counts, block, offset, is_mem, _, f = _blocks(
        users,
        memory_counts,
        item_first,
        item_counts,
        writes,
        prepare_offsets(history),
        history[users],
        num_memory_tokens,
    )
    minus = torch.full_like(offset, -1)
    return _layout(
        counts,
        segment=minus,
        memory_index=torch.where(is_mem, prepare_offsets(memory_counts)[:-1][block] + offset, -1),
        reference_index=minus.clone(),
        **f,
    )


def update_layout(
    memory_counts: Sequence[int] | torch.Tensor, segment_lengths: Sequence[int] | torch.Tensor, num_memory_tokens: int
) -> PackedLayout:
    """Memory-update blocks ``[M ; S_h ; w]``, one per user.

    ``memory_counts[u]``: memory tokens of user ``u`` (0 before the first segment, C in
    overwrite mode, ``h*C`` in append mode); the memories are packed user after user
    (``memory_index``).  ``segment_lengths[u]``: items of the segment being archived, packed
    likewise (``item_index``).  The outputs at the write tokens are the new memory.
    """
    segment_lengths = _as_counts("segment_lengths", segment_lengths, 1)
    return block_layout(memory_counts, segment_lengths, num_memory_tokens, with_write=True)


def serving_layout(
    memory_counts: Sequence[int] | torch.Tensor, recent_lengths: Sequence[int] | torch.Tensor, num_memory_tokens: int
) -> PackedLayout:
    """Serving blocks ``[M ; recent items]``, one per user; score from ``last_rows``."""
    recent_lengths = _as_counts("recent_lengths", recent_lengths, 1)
    return block_layout(memory_counts, recent_lengths, num_memory_tokens)


def split_history(items: torch.Tensor, lengths: torch.Tensor, segment_len: int):
    """``(K, tail_items, tail_cu)`` of packed histories: archived segments per user, and
    each user's tail (its last ``L - K*S`` items) packed with its offsets."""
    archived, tail = history_shape(lengths, segment_len)
    rows = packed_rows(lengths.cumsum(0) - tail, tail)
    return archived, items[rows.to(items.device)], prepare_offsets(tail)


def _cache_key(value):
    """A hashable stand-in for a builder argument; tensors by dtype, shape and values, so that
    a float or bool tensor never finds the layout of an int one."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), tuple(value.flatten().tolist()))
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(_cache_key(v) for v in value))
    return (type(value).__name__, value)


class LayoutCache:
    """Layouts by their builder and arguments, least recently used out first.

    A call with the arguments of an earlier one returns that call's layout, with the device
    copies and row sets it keeps, instead of building (and moving) it again.  Bounded twice:
    at most ``max_entries`` layouts and ``max_tokens`` tokens among them (their device copies
    hold as many on each device); a layout larger than ``max_tokens`` is built and not kept.
    Safe to share between threads.  ``builds`` counts the layouts built through the cache.

    A token costs about 72 bytes (nine int64 fields), so the default bound is about 19 MB per
    device: room for many serving blocks and the streams of a few training batches.  Keeping a
    layout is not free when no call repeats its lengths (its memory is not reused by the next
    build), which is why the bound is small.
    """

    def __init__(self, max_entries: int = 256, max_tokens: int = 1 << 18):
        for name, value in (("max_entries", max_entries), ("max_tokens", max_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.max_entries, self.max_tokens = max_entries, max_tokens
        self.builds = 0
        self._entries: OrderedDict[tuple, PackedLayout] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tokens(self) -> int:
        """Tokens in the layouts kept now."""
        return self._tokens

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._tokens = 0

    def get(self, builder: Callable[..., PackedLayout], *args, **kwargs) -> PackedLayout:
        """``builder(*args, **kwargs)``, built on the first call with these arguments."""
        try:
            key = (builder, _cache_key(args), _cache_key(tuple(sorted(kwargs.items()))))
            hash(key)
        except TypeError:  # an argument that has no value to compare: build it every time
            return builder(*args, **kwargs)
        with self._lock:
            layout = self._entries.get(key)
            if layout is not None:
                self._entries.move_to_end(key)
                return layout
        # Built outside the lock, so that threads build different layouts side by side; never as
        # inference tensors, which a later training call could not save for backward.
        with torch.inference_mode(False):
            layout = builder(*args, **kwargs)
        with self._lock:
            self.builds += 1
            if key in self._entries or layout.num_tokens > self.max_tokens:
                return layout
            self._entries[key] = layout
            self._tokens += layout.num_tokens
            while len(self._entries) > self.max_entries or self._tokens > self.max_tokens:
                _, dropped = self._entries.popitem(last=False)
                self._tokens -= dropped.num_tokens
        return layout


# The layouts of the model's calls, shared by every model of the process: a layout depends on
# its builder's arguments alone (lengths, S, C, mode), not on any model.
layout_cache = LayoutCache()


def cached_layout(builder: Callable[..., PackedLayout], *args, **kwargs) -> PackedLayout:
    """``builder(*args, **kwargs)`` through the shared ``layout_cache``."""
    return layout_cache.get(builder, *args, **kwargs)
