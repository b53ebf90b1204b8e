"""``InteractionData``: every user's history packed into one tensor, and the builder from raw events.

Format (shared by every loader, the synthetic generator and the splits):

* ``items``: ``(total,)`` int64, remapped item ids in ``1..num_items`` (0 is the padding id and
  never occurs), each user's events oldest first, users one after another.
* ``cu_seqlens``: ``(num_users + 1,)`` int64 offsets into ``items``; user ``u`` owns
  ``items[cu_seqlens[u]:cu_seqlens[u + 1]]`` and every user has at least one event.
* ``item_ids[i - 1]`` is the original id of remapped item ``i``; ``user_ids[u]`` the original id of user ``u``.
* ``timestamps``: ``(total,)`` int64, the time of each event in ``items`` (the loader's time
  column: MovieLens seconds, a table's integer or datetime column), or ``None`` when the
  source has no integer times (S3-Rec lines, float time columns, the synthetic histories).
  HSTU's timestamp bias reads them (``docs/timestamps.md``).
* ``skipped``: reason -> number of input rows (or users) left out, so nothing is dropped silently.

``from_events`` is the one place that turns raw ``(user, item, time)`` columns into this format,
so every tabular loader orders, deduplicates and remaps the same way:

* users in ascending original id;
* each user's events by ``(time, original item id)``: the item id breaks timestamp ties, so the
  order (and the leave-one-out targets) never depends on the row order of the file;
* rows repeating the ``(user, item, time)`` of an earlier row are the same event: all but one are
  skipped and counted in ``skipped["duplicate rows"]``;
* items remapped to ``1..N`` in ascending original id.  The map is monotone, so the tie-break by
  original id and by remapped id agree, and data sets whose ids already run ``1..N`` keep them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class InteractionData:
    """Packed user histories; see the module docstring for the format of each field."""

    items: torch.Tensor
    cu_seqlens: torch.Tensor
    num_items: int
    item_ids: list
    user_ids: list
    skipped: dict = field(default_factory=dict)
    source: str = ""
    timestamps: torch.Tensor | None = None

    def __post_init__(self):
        # O(total) checks: cheap next to any parse, and they catch a bad builder before training does.
        items, cu = self.items, self.cu_seqlens
        if items.dtype != torch.int64 or items.dim() != 1:
            raise ValueError(f"items must be a 1-D int64 tensor, got {items.dtype} of shape {tuple(items.shape)}")
        if cu.dtype != torch.int64 or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"cu_seqlens must be a non-empty 1-D int64 tensor, got {cu.dtype} {tuple(cu.shape)}")
        if cu[0].item() != 0 or cu[-1].item() != items.numel():
            raise ValueError(
                f"cu_seqlens must run from 0 to len(items) = {items.numel()}, got {cu[0].item()} .. {cu[-1].item()}"
            )
        if cu.numel() > 1 and bool((cu[1:] <= cu[:-1]).any()):
            raise ValueError("every user needs at least one event (cu_seqlens must be strictly increasing)")
        if items.numel() and (items.min().item() < 1 or items.max().item() > self.num_items):
            raise ValueError(
                f"item ids must lie in 1..num_items = {self.num_items}, "
                f"got {items.min().item()} .. {items.max().item()}"
            )
        times = self.timestamps
        if times is not None and (times.dtype != torch.int64 or times.shape != items.shape):
            raise ValueError(
                f"timestamps must be an int64 tensor shaped like items {tuple(items.shape)}, "
                f"got {times.dtype} of shape {tuple(times.shape)}"
            )
        if len(self.item_ids) != self.num_items:
            raise ValueError(f"item_ids has {len(self.item_ids)} entries for num_items = {self.num_items}")
        if len(self.user_ids) != cu.numel() - 1:
            raise ValueError(f"user_ids has {len(self.user_ids)} entries for {cu.numel() - 1} users")

    def num_users(self) -> int:
        return self.cu_seqlens.numel() - 1

    def lengths(self) -> torch.Tensor:
        """``(num_users,)`` int64: events per user."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def history(self, u: int) -> torch.Tensor:
        """Remapped item ids of user index ``u`` (0-based position, not the original id), oldest first."""
        n = self.num_users()
        if not -n <= u < n:
            raise IndexError(f"user index {u} out of range for {n} users")
        u %= n
        return self.items[self.cu_seqlens[u] : self.cu_seqlens[u + 1]]

    def first_users(self, count: int) -> InteractionData:
        """The first ``count`` users (all of them if there are fewer); the catalogue is kept whole."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an int >= 1, got {count!r}")
        if count >= self.num_users():
            return self
        end = int(self.cu_seqlens[count])
        return InteractionData(
            items=self.items[:end].clone(),
            cu_seqlens=self.cu_seqlens[: count + 1].clone(),
            num_items=self.num_items,
            item_ids=self.item_ids,
            user_ids=self.user_ids[:count],
            skipped={**self.skipped, "users beyond the first": self.num_users() - count},
            source=f"{self.source} [first {count} users]",
            timestamps=None if self.timestamps is None else self.timestamps[:end].clone(),
        )

    def summary(self) -> str:
        """One line: users, items, interactions, length min/median/mean/max and skipped counts."""
        lengths = self.lengths().numpy()
        if lengths.size:
            # numpy's median averages the two middle values (the data README's convention, e.g. 70.5).
            stats = f"{lengths.min():,} / {np.median(lengths):,.1f} / {lengths.mean():,.1f} / {lengths.max():,}"
        else:
            stats = "- / - / - / -"
        skipped = ", ".join(f"{reason}: {count:,}" for reason, count in sorted(self.skipped.items())) or "none"
        return (
            f"{self.num_users():,} users, {self.num_items:,} items, {self.items.numel():,} interactions, "
            f"length min/median/mean/max {stats}, skipped: {skipped}"
        )


def from_events(
    users: np.ndarray, items: np.ndarray, times: np.ndarray, *, skipped: dict | None = None, source: str = ""
) -> InteractionData:
    """Build ``InteractionData`` from raw event columns (order, deduplicate, remap; see the module docstring).

    ``users`` and ``items`` are ``(rows,)`` integer arrays of original ids, ``times`` a ``(rows,)``
    numeric array (kept as ``timestamps`` when it holds integers).  ``skipped`` (copied)
    receives the ``"duplicate rows"`` count when there are any.
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    times = np.asarray(times)
    if not users.shape == items.shape == times.shape or users.ndim != 1:
        raise ValueError(
            f"users, items and times must be 1-D of one length, got {users.shape}, {items.shape}, {times.shape}"
        )
    if users.size == 0:
        raise ValueError(f"{source or 'input'}: no interactions")
    skipped = dict(skipped or {})
    order = np.lexsort((items, times, users))  # last key is primary: user, then time, then item
    users, items, times = users[order], items[order], times[order]
    same = (users[1:] == users[:-1]) & (items[1:] == items[:-1]) & (times[1:] == times[:-1])
    if same.any():
        keep = np.concatenate(([True], ~same))
        skipped["duplicate rows"] = skipped.get("duplicate rows", 0) + int(same.sum())
        users, items, times = users[keep], items[keep], times[keep]
    item_ids, remapped = np.unique(items, return_inverse=True)
    user_ids, counts = np.unique(users, return_counts=True)
    cu = np.concatenate(([0], np.cumsum(counts)))
    return InteractionData(
        items=torch.from_numpy((remapped.reshape(-1) + 1).astype(np.int64)),
        cu_seqlens=torch.from_numpy(cu.astype(np.int64)),
        num_items=len(item_ids),
        item_ids=item_ids.tolist(),
        user_ids=user_ids.tolist(),
        skipped=skipped,
        source=source,
        timestamps=torch.from_numpy(times.astype(np.int64)) if np.issubdtype(times.dtype, np.integer) else None,
    )
