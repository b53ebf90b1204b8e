"""Leave-one-out split by time: the last event of each user is the test target, the one before the
validation target, and the rest the training history (the standard protocol; see the data README).

For a user with events ``x_1 .. x_n`` (``n >= 3``):

* ``train``: ``x_1 .. x_{n-2}``;
* ``valid_history``: ``x_1 .. x_{n-2}`` (the same events), ``valid_targets``: ``x_{n-1}``;
* ``test_history``: ``x_1 .. x_{n-1}``, ``test_targets``: ``x_n``.

Users with fewer than 3 events are left out of all three and counted in each part's
``skipped["users with < 3 events"]``.  Item ids, ``num_items`` and ``item_ids`` are those of the
input (a target may be an item no training history contains); ``user_ids`` keeps the users left.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rec2pm_kernels.varlen import prepare_sequence_and_position_ids

from .interactions import InteractionData

SKIP_SHORT = "users with < 3 events"


@dataclass
class LeaveOneOut:
    """The three parts; targets are ``(users,)`` int64 remapped item ids, one per kept user,
    and ``*_target_times`` their events' times (``None`` without timestamps)."""

    train: InteractionData
    valid_history: InteractionData
    valid_targets: torch.Tensor
    test_history: InteractionData
    test_targets: torch.Tensor
    valid_target_times: torch.Tensor | None = None
    test_target_times: torch.Tensor | None = None


def leave_one_out(data: InteractionData) -> LeaveOneOut:
    """Split ``data`` by time, per user (see the module docstring)."""
    lengths = data.lengths()
    kept = lengths >= 3
    if not bool(kept.any()):
        raise ValueError(f"leave_one_out: no user has >= 3 events ({data.source})")
    ends = data.cu_seqlens[1:][kept]
    user_ids = [u for u, keep in zip(data.user_ids, kept.tolist(), strict=True) if keep]
    skipped = dict(data.skipped)
    skipped[SKIP_SHORT] = skipped.get(SKIP_SHORT, 0) + int((~kept).sum())
    train = _cut(data, kept, drop_last=2, user_ids=user_ids, skipped=skipped, part="train")
    return LeaveOneOut(
        train=train,
        valid_history=replace(train, skipped=dict(skipped), source=f"{data.source} [leave-one-out valid history]"),
        valid_targets=data.items[ends - 2].clone(),
        test_history=_cut(data, kept, drop_last=1, user_ids=user_ids, skipped=skipped, part="test history"),
        test_targets=data.items[ends - 1].clone(),
        valid_target_times=None if data.timestamps is None else data.timestamps[ends - 2].clone(),
        test_target_times=None if data.timestamps is None else data.timestamps[ends - 1].clone(),
    )


def _cut(
    data: InteractionData, kept: torch.Tensor, *, drop_last: int, user_ids: list, skipped: dict, part: str
) -> InteractionData:
    """Kept users' histories without their last ``drop_last`` events (one vectorised mask)."""
    lengths = data.lengths()
    user, position = prepare_sequence_and_position_ids(data.cu_seqlens, data.items.numel())
    limit = torch.where(kept, lengths - drop_last, 0)[user]
    new_lengths = (lengths - drop_last)[kept]
    keep = position < limit
    return InteractionData(
        items=data.items[keep],
        timestamps=None if data.timestamps is None else data.timestamps[keep],
        cu_seqlens=torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(new_lengths, 0)]),
        num_items=data.num_items,
        item_ids=data.item_ids,
        user_ids=list(user_ids),
        skipped=dict(skipped),
        source=f"{data.source} [leave-one-out {part}]",
    )
