import pytest
import torch

from rec2pm.data import InteractionData, leave_one_out, lifelong_histories


def hand_data(**extra):
    """Three users of 4, 2 and 3 events (items 1..9 in order); the second is too short to split."""
    return InteractionData(
        items=torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9]),
        cu_seqlens=torch.tensor([0, 4, 6, 9]),
        num_items=9,
        item_ids=list(range(11, 20)),
        user_ids=["a", "b", "c"],
        **extra,
    )


def test_leave_one_out_by_hand():
    data = hand_data(skipped={"duplicate rows": 3}, source="hand")
    split = leave_one_out(data)
    assert split.train.user_ids == ["a", "c"]
    assert [split.train.history(u).tolist() for u in range(2)] == [[1, 2], [7]]
    assert [split.valid_history.history(u).tolist() for u in range(2)] == [[1, 2], [7]]
    assert split.valid_targets.tolist() == [3, 8]
    assert [split.test_history.history(u).tolist() for u in range(2)] == [[1, 2, 3], [7, 8]]
    assert split.test_targets.tolist() == [4, 9]
    for part in (split.train, split.valid_history, split.test_history):
        assert part.skipped == {"duplicate rows": 3, "users with < 3 events": 1}
        assert part.num_items == 9 and part.item_ids == data.item_ids and part.user_ids == ["a", "c"]
    assert split.valid_targets.dtype == split.test_targets.dtype == torch.int64
    assert "users with < 3 events: 1" in split.train.summary()
    assert split.train.timestamps is None and split.test_target_times is None  # no times in, none out


def test_timestamps_follow_their_events():
    data = hand_data(timestamps=torch.arange(100, 109))
    split = leave_one_out(data)
    assert split.train.timestamps.tolist() == [100, 101, 106]
    assert split.valid_history.timestamps.tolist() == [100, 101, 106]
    assert split.test_history.timestamps.tolist() == [100, 101, 102, 106, 107]
    assert split.valid_target_times.tolist() == [102, 107]
    assert split.test_target_times.tolist() == [103, 108]


def test_no_user_long_enough():
    data = InteractionData(
        items=torch.tensor([1, 1, 1]), cu_seqlens=torch.tensor([0, 2, 3]), num_items=1, item_ids=[1], user_ids=[0, 1]
    )
    with pytest.raises(ValueError, match="no user has >= 3 events"):
        leave_one_out(data)


def test_parts_rebuild_the_histories():
    data = lifelong_histories(50, 40, 100, min_length=1, seed=3)
    kept = data.lengths() >= 3
    split = leave_one_out(data)
    assert split.train.num_users() == int(kept.sum()) == split.test_targets.numel()
    assert split.train.skipped["users with < 3 events"] == int((~kept).sum()) > 0
    assert torch.equal(split.test_history.lengths(), split.train.lengths() + 1)
    for v, u in enumerate(torch.nonzero(kept).flatten().tolist()):
        full = data.history(u).tolist()
        assert split.test_history.history(v).tolist() + [split.test_targets[v].item()] == full
        assert split.valid_history.history(v).tolist() + [split.valid_targets[v].item()] == full[:-1]
