import pytest
import torch

from rec2pm.data import load_s3rec

from .files import shared_file, write


@pytest.mark.parametrize("name", ["data.txt", "data.txt.gz"])
def test_file_order_and_repeats_are_kept(tmp_path, name):
    data = load_s3rec(write(tmp_path / name, "2 3 1 3\n1 2 4\n3 4\n"), cache_dir=False)
    assert data.user_ids == [1, 2, 3]  # ascending user id
    assert data.item_ids == [1, 2, 3, 4]  # ids already 1..N stay as they are
    assert [data.history(u).tolist() for u in range(3)] == [[2, 4], [3, 1, 3], [4]]
    assert data.skipped == {}
    assert "S3-Rec" in data.source


def test_sparse_ids_are_remapped_in_ascending_order(tmp_path):
    data = load_s3rec(write(tmp_path / "d.txt", "10 700 30 700\n"), cache_dir=False)
    assert data.item_ids == [30, 700]
    assert data.history(0).tolist() == [2, 1, 2]


def test_skips_are_counted(tmp_path):
    text = "1 5 6\n\n2\n1 5 6\n3 7\n"
    data = load_s3rec(write(tmp_path / "d.txt", text), cache_dir=False)
    assert data.skipped == {"blank lines": 1, "users without items": 1, "duplicate rows": 1}
    assert data.user_ids == [1, 3]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty file"),
        ("\n\n", r"no user with items"),
        ("1 2 3\n2 4 x5\n", r"line 2: field 3 \(item 2\) must be an integer id, got 'x5'"),
        ("u1 2 3\n", r"line 1: field 1 \(the user id\) must be an integer id"),
        ("1 2.5\n", r"line 1: field 2 \(item 1\)"),
        ("1 2 3\n2 4\n1 3 2\n", r"line 3: user 1 already has a different history on line 1"),
        ("1 0 5\n", r"line 1: field 2 \(item 1\) is 0; item ids start at 1 in this format \(0 is padding\)"),
        ("1 5 6\n2 5 -3\n", r"line 2: field 3 \(item 2\) is -3"),
    ],
)
def test_malformed_input(tmp_path, text, message):
    path = write(tmp_path / "d.txt", text)
    with pytest.raises(ValueError, match=message) as info:
        load_s3rec(path, cache_dir=tmp_path / "c")
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "name, users, items, interactions, lengths",
    [
        # The data README's table: users, items, interactions, length min / median / mean / max.
        ("Beauty", 22363, 12101, 198502, "5 / 6.0 / 8.9 / 204"),
        ("LastFM", 1090, 3646, 52551, "5 / 19.0 / 48.2 / 899"),
        ("Sports_and_Outdoors", 35598, 18357, 296337, "5 / 6.0 / 8.3 / 296"),
        ("Yelp", 30431, 20033, 316354, "5 / 7.0 / 10.4 / 350"),
    ],
)
def test_shared_s3rec_statistics(tmp_path, name, users, items, interactions, lengths):
    data = load_s3rec(shared_file(f"s3rec/{name}.txt.gz"), cache_dir=tmp_path)
    assert (data.num_users(), data.num_items, data.items.numel()) == (users, items, interactions)
    assert f"length min/median/mean/max {lengths}," in data.summary()
    assert data.skipped == {}
    # Ids run 1..U and 1..I in the published files, so the remap is the identity.
    assert data.item_ids == list(range(1, items + 1)) and data.user_ids == list(range(1, users + 1))


def test_yelp_keeps_repeated_items():
    data = load_s3rec(shared_file("s3rec/Yelp.txt.gz"), cache_dir=False)
    repeats = sum(h.numel() - torch.unique(h).numel() for h in map(data.history, range(data.num_users())))
    assert repeats == 11830  # the data README's count of repeat events
