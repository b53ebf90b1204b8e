import sys

import numpy as np
import pytest
import torch

from rec2pm.data import load_dataset, load_interactions_table, load_movielens, load_s3rec

from .files import write

COLS = dict(user_col="uid", item_col="iid", time_col="ts")


def original(data, u):
    return [data.item_ids[i - 1] for i in data.history(u).tolist()]


def test_csv_with_extra_and_quoted_columns(tmp_path):
    text = 'note,uid,ts,iid\n"a, quoted note",4,20,9\nplain,4,10,8\n"x",2,5,9\ntie,4,20,1\n'
    data = load_interactions_table(write(tmp_path / "t.csv", text), **COLS, cache_dir=False)
    assert data.user_ids == [2, 4]
    assert [original(data, u) for u in range(2)] == [[9], [8, 1, 9]]  # (time, item): 1 before 9 at ts 20
    assert "table" in data.source


def test_tab_separated_gzip_with_duplicates(tmp_path):
    text = "uid\tiid\tts\n1\t5\t3\n1\t5\t3\n1\t6\t1\n"
    data = load_interactions_table(write(tmp_path / "t.tsv.gz", text), **COLS, sep="\t", cache_dir=False)
    assert original(data, 0) == [6, 5]
    assert data.skipped == {"duplicate rows": 1}


@pytest.mark.parametrize(
    "text, message",
    [
        ("uid,iid\n1,2\n", "missing column 'ts' for the time"),
        ("uid,iid,ts,ts\n1,2,3,4\n", "ambiguous column 'ts'"),
        ("uid,iid,ts\n1,2,3\n1,two,4\n", r"line 3: column 'iid' must be an integer id \(the item\), got 'two'"),
        ("uid,iid,ts\n", "no data rows"),
        ("", "empty file"),
        # A quoted field holding the separator: never split as two fields (the fast path is skipped).
        ('uid,a,b,iid,ts\n1,"x,y",5,6\n', r"line 2: expected 5 fields .*, got 4: '1,\"x,y\",5,6'"),
        # Times float64 would round into ties: integers beyond 2^53 beside a fractional time.
        ("uid,iid,ts\n1,5,1700000000000000001\n1,3,1700000000000000002\n1,4,1.5\n", "integers beyond 2\\^53"),
        ("uid,iid,ts\n1,5,99999999999999999999\n1,3,2\n", "column 'ts' must be a finite number"),
    ],
)
def test_malformed_tables(tmp_path, text, message):
    path = write(tmp_path / "t.csv", text)
    with pytest.raises(ValueError, match=message) as info:
        load_interactions_table(path, **COLS, cache_dir=False)
    assert str(path) in str(info.value)


def test_parquet_without_pandas_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # makes `import pandas` fail
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match=r"rec2pm\[data\]"):
        load_interactions_table(path, **COLS, cache_dir=False)


def test_parquet_matches_csv(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "uid": rng.integers(0, 9, 200),
            "iid": rng.integers(0, 30, 200),
            "ts": rng.integers(0, 20, 200),
            "other": ["x"] * 200,
        }
    )
    frame.to_parquet(tmp_path / "t.parquet")
    frame.to_csv(tmp_path / "t.csv", index=False)
    a = load_interactions_table(tmp_path / "t.parquet", **COLS, cache_dir=tmp_path / "c")
    b = load_interactions_table(tmp_path / "t.csv", **COLS, cache_dir=False)
    assert torch.equal(a.items, b.items) and torch.equal(a.cu_seqlens, b.cu_seqlens)
    assert a.item_ids == b.item_ids and a.user_ids == b.user_ids and a.skipped == b.skipped
    frame.loc[7, "iid"] = None
    frame.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="row 7: column 'iid'"):
        load_interactions_table(tmp_path / "bad.parquet", **COLS, cache_dir=False)
    with pytest.raises(ValueError, match="missing column 'when'"):
        load_interactions_table(
            tmp_path / "t.parquet", user_col="uid", item_col="iid", time_col="when", cache_dir=False
        )


def test_load_dataset_dispatches(tmp_path):
    ml = write(tmp_path / "r.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n")
    s3 = write(tmp_path / "s.txt", "1 2 3\n")
    tb = write(tmp_path / "t.csv", "uid,iid,ts\n1,2,3\n")
    for kind, path, kwargs, loader in [
        ("movielens", ml, {}, load_movielens),
        ("s3rec", s3, {}, load_s3rec),
        ("table", tb, COLS, load_interactions_table),
    ]:
        got = load_dataset(kind, path, cache_dir=False, **kwargs)
        want = loader(path, cache_dir=False, **kwargs)
        assert torch.equal(got.items, want.items) and got.source == want.source
    with pytest.raises(ValueError, match="unknown dataset kind 'imdb'"):
        load_dataset("imdb", ml)


def test_parquet_time_types(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    base = {"uid": [1, 1, 1], "iid": [5, 6, 7]}
    when = pd.to_datetime(["2020-01-02", "2020-01-01", "2020-01-03"])
    # With a zone, by the instants (stored as Berlin times, ordered as the UTC ones).
    utc = ["2020-01-01 08:00", "2020-01-01 07:00", "2020-01-02 00:00"]
    zoned = pd.Series(pd.to_datetime(utc)).dt.tz_localize("UTC").dt.tz_convert("Europe/Berlin")
    for ts, order in [(when, [6, 5, 7]), ([0.5, 0.25, 1.0], [6, 5, 7]), (zoned, [6, 5, 7])]:
        pd.DataFrame({**base, "ts": ts}).to_parquet(tmp_path / "t.parquet")
        data = load_interactions_table(tmp_path / "t.parquet", **COLS, cache_dir=False)
        assert original(data, 0) == order
    for column, value, message in [
        ("ts", ["a", "b", "c"], "row 0: column 'ts' must be a finite number"),
        ("ts", [1.0, float("nan"), 2.0], "row 1: column 'ts'"),
        ("iid", [1.5, 2.0, 3.0], r"row 0: column 'iid' must be an integer id"),
        ("iid", np.array([5, 2**63 + 5, 2**64 - 1], dtype=np.uint64), r"row 1: column 'iid' .* within int64"),
        ("ts", np.array([1, 2, 2**64 - 1], dtype=np.uint64), r"row 2: column 'ts' .* within int64"),
    ]:
        frame = pd.DataFrame({**base, "ts": [1, 2, 3]})
        frame[column] = value
        frame.to_parquet(tmp_path / "bad.parquet")
        with pytest.raises(ValueError, match=message):
            load_interactions_table(tmp_path / "bad.parquet", **COLS, cache_dir=False)
