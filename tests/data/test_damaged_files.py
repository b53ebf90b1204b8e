"""Files that are not what a loader expects fail with a ValueError naming the file (and line).

Binary and Latin-1 files, truncated gzip streams and gzip files whose CRC or deflate data is
corrupt, for every text loader.
"""

import gzip

import pytest

from rec2pm.data import load_dataset

from .files import write

USERS = range(1, 400)
FORMATS = {
    # kind: (loader kwargs, text of a valid file)
    "s3rec": ({}, "".join(f"{u} " + " ".join(str(i) for i in range(1, 40)) + "\n" for u in USERS)),
    "movielens": (
        {},
        "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},4.0,{1000 + i}\n" for u in USERS for i in range(1, 12)),
    ),
    "table": (
        dict(user_col="u", item_col="i", time_col="t"),
        "u,i,t\n" + "".join(f"{u},{i},{i}\n" for u in USERS for i in range(1, 12)),
    ),
}


def damage(kind: str, how: str, tmp_path):
    text = FORMATS[kind][1]
    if how == "binary":
        path = tmp_path / "data.txt"
        path.write_bytes(bytes(range(256)) * 64)
        return path, "line 2: not UTF-8 text"
    if how == "latin-1":
        path = tmp_path / "data.txt"
        lines = text.splitlines(keepends=True)
        lines[5] = lines[5].replace("1", "é", 1)
        path.write_bytes("".join(lines).encode("latin-1"))
        return path, "line 6: not UTF-8 text"
    packed = bytearray(gzip.compress(text.encode()))
    if how == "truncated gzip":
        packed = packed[: len(packed) // 2]
        expected = "damaged gzip file (Compressed file ended"
    elif how == "bad crc":
        packed[-6] ^= 0xFF  # the CRC32 in the trailer
        expected = "damaged gzip file (CRC check failed"
    else:  # corrupt deflate data: zlib notices, or the garbled text fails to parse first
        packed[len(packed) // 2] ^= 0xFF
        expected = ("damaged gzip file", ", line ")
    path = tmp_path / "data.txt.gz"
    path.write_bytes(bytes(packed))
    return path, expected


@pytest.mark.parametrize("how", ["binary", "latin-1", "truncated gzip", "bad crc", "corrupt deflate"])
@pytest.mark.parametrize("kind", list(FORMATS))
def test_damaged_files_raise_value_errors_naming_the_file(kind, how, tmp_path):
    path, expected = damage(kind, how, tmp_path)
    with pytest.raises(ValueError) as info:
        load_dataset(kind, path, cache_dir=False, **FORMATS[kind][0])
    message = str(info.value)
    alternatives = expected if isinstance(expected, tuple) else (expected,)
    assert message.startswith(str(path)) and any(text in message for text in alternatives), message


@pytest.mark.parametrize("kind", list(FORMATS))
def test_the_valid_files_load(kind, tmp_path):
    for name in ("data.txt", "data.txt.gz"):
        data = load_dataset(kind, write(tmp_path / name, FORMATS[kind][1]), cache_dir=False, **FORMATS[kind][0])
        assert data.num_users() == len(USERS)


def test_a_damaged_parquet_file_is_named(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "events.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ValueError, match=f"{path}: not a readable Parquet file"):
        load_dataset("table", path, user_col="u", item_col="i", time_col="t", cache_dir=False)


@pytest.mark.parametrize("kind", list(FORMATS))
def test_a_directory_is_not_a_data_file(kind, tmp_path):
    with pytest.raises(IsADirectoryError, match=f"{tmp_path}: is a directory, expected a data file"):
        load_dataset(kind, tmp_path, **FORMATS[kind][0])
