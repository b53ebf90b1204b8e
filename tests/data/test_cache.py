import shutil

import pytest
import torch

from rec2pm.data import cache, load_interactions_table, load_movielens, load_processed, movielens, save_processed, table

from .files import write

TEXT = "userId,movieId,rating,timestamp\n1,50,4,100\n1,7,3,100\n2,3,1,10\n2,3,1,10\n"


def same(a, b):
    return (
        torch.equal(a.items, b.items)
        and torch.equal(a.cu_seqlens, b.cu_seqlens)
        and a.num_items == b.num_items
        and a.item_ids == b.item_ids
        and a.user_ids == b.user_ids
        and a.skipped == b.skipped
        and torch.equal(a.timestamps, b.timestamps)
    )


def refuse_to_parse(*args, **kwargs):
    raise AssertionError("parsed again instead of reading the cache")


def test_second_load_reads_the_cache(tmp_path, monkeypatch):
    path = write(tmp_path / "ratings.csv", TEXT)
    first = load_movielens(path, cache_dir=tmp_path / "cache")
    assert cache.CACHE_NOTE not in first.source
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".pt"]
    monkeypatch.setattr(movielens, "parse_movielens", refuse_to_parse)
    second = load_movielens(path, cache_dir=tmp_path / "cache")
    assert same(first, second) and second.skipped == {"duplicate rows": 1}
    assert cache.CACHE_NOTE in second.source and str(path) in second.source


def test_key_is_the_content_not_the_path(tmp_path, monkeypatch):
    path = write(tmp_path / "ratings.csv", TEXT)
    first = load_movielens(path, cache_dir=tmp_path / "cache")
    copy = tmp_path / "elsewhere.csv"
    shutil.copy(path, copy)
    monkeypatch.setattr(movielens, "parse_movielens", refuse_to_parse)
    hit = load_movielens(copy, cache_dir=tmp_path / "cache")
    assert same(first, hit) and str(copy) in hit.source
    write(path, TEXT + "3,9,1,1\n")  # changed content: a miss, parsed again
    with pytest.raises(AssertionError, match="parsed again"):
        load_movielens(path, cache_dir=tmp_path / "cache")


def test_key_includes_the_loader_arguments(tmp_path, monkeypatch):
    path = write(tmp_path / "t.csv", "u,i,t1,t2\n1,5,1,2\n1,6,2,1\n")
    a = load_interactions_table(path, user_col="u", item_col="i", time_col="t1", cache_dir=tmp_path / "c")
    b = load_interactions_table(path, user_col="u", item_col="i", time_col="t2", cache_dir=tmp_path / "c")
    assert a.history(0).tolist() == [1, 2] and b.history(0).tolist() == [2, 1]
    assert len(list((tmp_path / "c").glob("*.pt"))) == 2
    monkeypatch.setattr(table, "parse_table", refuse_to_parse)
    again = load_interactions_table(path, user_col="u", item_col="i", time_col="t2", cache_dir=tmp_path / "c")
    assert same(again, b)


def test_default_directory_and_switching_off(tmp_path, monkeypatch):
    path = write(tmp_path / "ratings.csv", TEXT)
    monkeypatch.setenv("REC2PM_CACHE", str(tmp_path / "env-cache"))
    load_movielens(path)
    assert len(list((tmp_path / "env-cache").glob("movielens-*.pt"))) == 1
    monkeypatch.setenv("REC2PM_CACHE", str(tmp_path / "unused"))
    load_movielens(path, cache_dir=False)
    assert not (tmp_path / "unused").exists()


def test_damaged_entry_is_rebuilt_with_a_warning(tmp_path):
    path = write(tmp_path / "ratings.csv", TEXT)
    first = load_movielens(path, cache_dir=tmp_path / "c")
    (pt,) = (tmp_path / "c").glob("*.pt")
    pt.write_bytes(b"not a tensor file")
    with pytest.warns(RuntimeWarning, match="damaged cache entry"):
        rebuilt = load_movielens(path, cache_dir=tmp_path / "c")
    assert same(first, rebuilt) and cache.CACHE_NOTE not in rebuilt.source
    assert same(first, load_movielens(path, cache_dir=tmp_path / "c"))


def test_save_and_load_processed_round_trip(tmp_path):
    data = load_movielens(write(tmp_path / "ratings.csv", TEXT), cache_dir=False)
    save_processed(data, tmp_path / "out" / "ml")
    back = load_processed(tmp_path / "out" / "ml")
    assert same(data, back) and back.source == data.source
