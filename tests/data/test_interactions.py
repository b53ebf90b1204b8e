import numpy as np
import pytest
import torch

from rec2pm.data import InteractionData, from_events


def test_from_events_orders_by_time_then_item_and_remaps_sorted_ids():
    users = [7, 3, 7, 7, 3, 7]
    items = [500, 40, 30, 20, 500, 10]
    times = [5, 9, 5, 1, 2, 5]  # user 7 has three events at time 5: items 10, 30, 500 in id order
    data = from_events(np.array(users), np.array(items), np.array(times))
    assert data.user_ids == [3, 7]
    assert data.item_ids == [10, 20, 30, 40, 500]
    assert data.num_items == 5
    assert data.cu_seqlens.tolist() == [0, 2, 6]

    def original(u):
        return [data.item_ids[i - 1] for i in data.history(u).tolist()]

    assert original(0) == [500, 40]
    assert original(1) == [20, 10, 30, 500]
    assert data.items.dtype == torch.int64 and data.skipped == {}
    assert data.timestamps.tolist() == [2, 9, 1, 5, 5, 5]  # each event keeps its time


def test_float_times_order_the_events_but_are_not_timestamps():
    data = from_events(np.array([1, 1]), np.array([4, 3]), np.array([2.5, 1.5]))
    assert data.items.tolist() == [1, 2] and data.timestamps is None


def test_from_events_is_independent_of_row_order():
    rng = np.random.default_rng(0)
    users, items, times = rng.integers(0, 20, 400), rng.integers(0, 50, 400), rng.integers(0, 10, 400)
    ref = from_events(users, items, times)
    for _ in range(3):
        p = rng.permutation(400)
        other = from_events(users[p], items[p], times[p])
        assert torch.equal(other.items, ref.items) and torch.equal(other.cu_seqlens, ref.cu_seqlens)
        assert other.skipped == ref.skipped


def test_duplicate_events_are_counted_not_dropped_silently():
    data = from_events(
        np.array([1, 1, 1, 2]), np.array([5, 5, 5, 5]), np.array([3, 3, 4, 3]), skipped={"blank lines": 2}
    )
    assert data.skipped == {"blank lines": 2, "duplicate rows": 1}
    assert data.lengths().tolist() == [2, 1]
    assert data.timestamps.tolist() == [3, 4, 3]


def test_empty_input_is_an_error():
    with pytest.raises(ValueError, match="no interactions"):
        from_events(np.array([]), np.array([]), np.array([]))


def test_accessors_and_summary():
    data = InteractionData(
        items=torch.tensor([1, 2, 3, 1, 2, 3, 3]),
        cu_seqlens=torch.tensor([0, 1, 3, 7]),
        num_items=3,
        item_ids=[10, 20, 30],
        user_ids=["a", "b", "c"],
        skipped={"duplicate rows": 1234},
        source="t",
    )
    assert data.num_users() == 3
    assert data.lengths().tolist() == [1, 2, 4]
    assert data.history(2).tolist() == [1, 2, 3, 3]
    assert data.history(-1).tolist() == [1, 2, 3, 3]
    with pytest.raises(IndexError):
        data.history(3)
    line = data.summary()
    assert "\n" not in line
    assert line == (
        "3 users, 3 items, 7 interactions, length min/median/mean/max 1 / 2.0 / 2.3 / 4, skipped: duplicate rows: 1,234"
    )


def test_median_is_the_mean_of_the_middle_two():
    # lengths 1, 2, 3, 10: median (2 + 3) / 2 as in the data README's tables, not the lower middle 2.
    data = InteractionData(
        items=torch.ones(16, dtype=torch.int64),
        cu_seqlens=torch.tensor([0, 1, 3, 6, 16]),
        num_items=1,
        item_ids=[1],
        user_ids=[0, 1, 2, 3],
    )
    assert "1 / 2.5 / 4.0 / 10, skipped: none" in data.summary()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(items=torch.tensor([1, 2], dtype=torch.int32)), "int64"),
        (dict(cu_seqlens=torch.tensor([0, 3])), "from 0 to len"),
        (dict(cu_seqlens=torch.tensor([0, 0, 2])), "at least one event"),
        (dict(items=torch.tensor([1, 0])), r"1\.\.num_items"),
        (dict(items=torch.tensor([1, 3])), r"1\.\.num_items"),
        (dict(item_ids=[5]), "item_ids"),
        (dict(user_ids=[1, 2]), "user_ids"),
    ],
)
def test_invalid_contents_are_rejected(change, message):
    fields = dict(
        items=torch.tensor([1, 2]), cu_seqlens=torch.tensor([0, 2]), num_items=2, item_ids=[5, 6], user_ids=[9]
    )
    fields.update(change)
    with pytest.raises(ValueError, match=message):
        InteractionData(**fields)
