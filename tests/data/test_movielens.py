import gzip
import random

import numpy as np
import pytest
import torch

from rec2pm.data import columns, leave_one_out, load_movielens

from .files import shared_file, write

HEADER = "userId,movieId,rating,timestamp\n"
ROWS = [  # user 1 rates 50 and 7 at the same second: (timestamp, movieId) puts 7 first
    "1,50,4.0,100",
    "1,7,3.5,100",
    "1,3,5.0,90",
    "2,3,1.0,10",  # a user with one event is kept by the loader
    "9,50,2.0,5",
    "9,7,2.0,6",
]


def original(data, u):
    return [data.item_ids[i - 1] for i in data.history(u).tolist()]


@pytest.mark.parametrize("name", ["ratings.csv", "ratings.csv.gz"])
def test_csv_orders_by_timestamp_then_movie_id(tmp_path, name):
    data = load_movielens(write(tmp_path / name, HEADER + "\n".join(ROWS) + "\n"), cache_dir=tmp_path / "c")
    assert data.user_ids == [1, 2, 9]
    assert data.item_ids == [3, 7, 50]
    assert [original(data, u) for u in range(3)] == [[3, 7, 50], [3], [50, 7]]
    assert data.lengths().tolist() == [3, 1, 2]
    assert data.timestamps.tolist() == [90, 100, 100, 10, 5, 6]
    assert data.skipped == {}
    assert "MovieLens ratings.csv" in data.source and name in data.source


def test_row_order_of_the_file_does_not_matter(tmp_path):
    ref = load_movielens(write(tmp_path / "a.csv", HEADER + "\n".join(ROWS)), cache_dir=False)
    rows = ROWS[:]
    random.Random(0).shuffle(rows)
    other = load_movielens(write(tmp_path / "b.csv", HEADER + "\n".join(rows)), cache_dir=False)
    assert torch.equal(ref.items, other.items) and torch.equal(ref.cu_seqlens, other.cu_seqlens)


@pytest.mark.parametrize("name", ["ratings.dat", "ratings.dat.gz"])
def test_dat_format(tmp_path, name):
    text = "\n".join(row.replace(",", "::") for row in ROWS) + "\n"
    data = load_movielens(write(tmp_path / name, text), cache_dir=False)
    assert [original(data, u) for u in range(3)] == [[3, 7, 50], [3], [50, 7]]
    assert "MovieLens ratings.dat" in data.source


def test_columns_in_another_order_and_crlf_and_no_final_newline(tmp_path):
    text = "timestamp,movieId,userId,rating\r\n100,50,1,4\r\n100,7,1,3\r\n90,3,1,5"
    data = load_movielens(write(tmp_path / "r.csv", text), cache_dir=False)
    assert original(data, 0) == [3, 7, 50]


def test_exact_duplicate_rows_are_skipped_and_counted(tmp_path):
    rows = ROWS + ["1,7,3.5,100", "9,50,2.0,5"]
    data = load_movielens(write(tmp_path / "r.csv", HEADER + "\n".join(rows)), cache_dir=False)
    assert data.skipped == {"duplicate rows": 2}
    assert data.items.numel() == len(ROWS)
    assert "duplicate rows: 2" in data.summary()


def test_blank_lines_are_counted(tmp_path):
    data = load_movielens(
        write(tmp_path / "r.csv", HEADER + "\n".join(ROWS[:3]) + "\n\n  \n" + ROWS[3] + "\n"), cache_dir=False
    )
    assert data.skipped == {"blank lines": 2}
    assert data.items.numel() == 4


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty file"),
        ("\n", "line 1: blank, expected MovieLens ratings"),
        ("\n" + HEADER + "1,2,3,4\n", "line 1: blank, expected MovieLens ratings"),
        (HEADER, "no data rows after the header"),
        ("userId,movieId,rating\n1,2,3\n", "missing column 'timestamp'"),
        ("user,movieId,rating,timestamp\n1,2,3,4\n", "missing column 'userId'"),
        ("1,31,2.5,1260759144\n", "missing column 'userId'"),  # a header-less csv
        (HEADER + "1,2,3,4\nx7,2,3,4\n", r"line 3: column 'userId' must be an integer id \(the user\), got 'x7'"),
        (HEADER + "1,2,3,4\n1,2.0,3,4\n", r"line 3: column 'movieId' must be an integer id"),
        (HEADER + "1,2,3,4\n1,3,3,soon\n", r"line 3: column 'timestamp' must be a finite number"),
        (HEADER + "1,2,3,4\n1,3,3,nan\n", r"line 3: column 'timestamp' must be a finite number"),
        (HEADER + "1,2,3,4\n1,3,3\n", r"line 3: expected 4 fields separated by ','"),
        (HEADER + "1,2,3,4,5\n", r"line 2: expected 4 fields"),
        (HEADER + "99999999999999999999,2,3,4\n", r"line 2: column 'userId' must be an integer id"),
        ("1::2::3::4\n1::2::3\n", r"line 2: expected 4 fields separated by '::'"),
        ("1::2::3::4\n1::b::3::4\n", r"line 2: column 2 must be an integer id \(the item\), got 'b'"),
    ],
)
def test_malformed_input_names_file_line_and_expectation(tmp_path, text, message):
    path = write(tmp_path / "ratings.csv", text)
    with pytest.raises(ValueError, match=message) as info:
        load_movielens(path, cache_dir=tmp_path / "c")
    assert str(path) in str(info.value)
    assert not (tmp_path / "c").exists()  # nothing is cached for a file that fails


def test_float_timestamps_are_kept_as_floats(tmp_path):
    data = load_movielens(write(tmp_path / "r.csv", HEADER + "1,5,1,2.5\n1,6,1,2.25\n1,7,1,3\n"), cache_dir=False)
    assert original(data, 0) == [6, 5, 7]


def test_blocks_split_anywhere_give_the_same_result_and_true_line_numbers(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    rows = [
        f"{u},{i},3.0,{t}"
        for u, i, t in zip(
            rng.integers(1, 30, 3000), rng.integers(1, 400, 3000), rng.integers(0, 50, 3000), strict=True
        )
    ]
    path = write(tmp_path / "r.csv", HEADER + "\n".join(rows) + "\n")
    ref = load_movielens(path, cache_dir=False)
    monkeypatch.setattr(columns, "BLOCK_CHARS", 97)  # blocks end mid-line: the reader must carry the rest
    small = load_movielens(path, cache_dir=False)
    assert torch.equal(ref.items, small.items) and torch.equal(ref.cu_seqlens, small.cu_seqlens)
    assert ref.skipped == small.skipped
    rows[2500] = "3,4,3.0,later"
    write(path, HEADER + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="line 2502: column 'timestamp'"):
        load_movielens(path, cache_dir=False)


def test_ml_latest_small_statistics(tmp_path):
    path = shared_file("movielens/ml-latest-small/ratings.csv.gz")
    data = load_movielens(path, cache_dir=tmp_path)
    # The data README: 610 users, 9,724 items, 100,836 interactions, lengths 20 / 70.5 / 165.3 / 2,698.
    assert (data.num_users(), data.num_items, data.items.numel()) == (610, 9724, 100836)
    assert data.skipped == {}
    assert "length min/median/mean/max 20 / 70.5 / 165.3 / 2,698" in data.summary()
    assert max(data.item_ids) == 193609
    # Ties: for 94 users the last two events share a timestamp; the movie id orders them.
    times = {}
    with gzip.open(path, "rt") as f:
        next(f)
        for line in f:
            u, m, _, t = line.split(",")
            times[int(u), int(m)] = int(t)
    last_two = [
        (data.user_ids[u], [data.item_ids[i - 1] for i in data.history(u)[-2:].tolist()])
        for u in range(data.num_users())
    ]
    tied = [(u, a, b) for u, (a, b) in last_two if times[u, a] == times[u, b]]
    assert len(tied) == 94
    assert all(a < b for _, a, b in tied)
    split = leave_one_out(data)
    assert split.test_targets.numel() == 610 and split.train.skipped["users with < 3 events"] == 0
