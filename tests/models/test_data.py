"""Readers, parsed-array cache, splits and batches (models/data/), on hand-written rows in the real formats."""

import datetime
import gzip
import json
import math
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.data import batches as data_batches
from models.data import lines, reader
from models.data.batches import distinct_tokens, iter_batches
from models.data.cache import Prepared, prepare
from models.data.formats import spec
from models.data.reader import FORMATS, Chunk, RawRow, ReadStats, iter_chunks, iter_raw, schema_for_format
from models.schema import AVAZU_COLUMNS, CRITEO_CATEGORICAL, CRITEO_DENSE, FeatureSchema, criteo_schema

# Criteo Kaggle train.txt lines: label, I1..I13, C1..C26, tab-separated, empty = missing.
CRITEO_LINES = [
    "0\t1\t1\t5\t0\t1382\t4\t15\t2\t181\t1\t2\t\t2\t68fd1e64\t80e26c9b\tfb936136\t7b4723c4\t25c83c98\t7e0ccccf"
    "\tde7995b8\t1f89b562\ta73ee510\ta8cd5504\tb2cb9c98\t37c9c164\t2824a5f6\t1adce6ef\t8ba8b39a\t891b62e7"
    "\te5ba7672\tf54016b9\t21ddcdc9\tb1252a9d\t07b5194c\t\t3a171ecb\tc5c50484\te8b83407\t9727dd16",
    "1\t\t-1\t\t\t8\t0\t0\t0\t0\t\t0\t\t\t05db9164\t38a947a1\t\t\t25c83c98\t\t3e1a4e6d\t0b153874\ta73ee510"
    "\t\t\t\t\t07d13a8f\t\t\t3486227d\t\t\t\t\t\t\t\t\t",
    "0\t0\t-3\t44\t1\t102\t8\t2\t2\t4\t1\t1\t\t4\t68fd1e64\tf0cf0024\t6f67f7e5\t41274cd7\t25c83c98\tfe6b92e5"
    "\t922afcc0\t0b153874\ta73ee510\t2b53e5fb\t4f1b46f3\t623049e6\td7020589\tb28479f6\te6c5b5cd\tc92f3b61"
    "\t07c540c4\tb04e4670\t21ddcdc9\t5840adea\t60f6221e\t\t3a171ecb\t43f13e8b\te8b83407\t731c3655",
]
N = None
CRITEO_DENSE_RAW = [
    [1.0, 1.0, 5.0, 0.0, 1382.0, 4.0, 15.0, 2.0, 181.0, 1.0, 2.0, N, 2.0],
    [N, -1.0, N, N, 8.0, 0.0, 0.0, 0.0, 0.0, N, 0.0, N, N],
    [0.0, -3.0, 44.0, 1.0, 102.0, 8.0, 2.0, 2.0, 4.0, 1.0, 1.0, N, 4.0],
]


def _cats(line: str) -> list[str | None]:
    return [v or None for v in line.split("\t")[14:]]


def _log1p(row: list[float | None]) -> list[np.float32]:
    return [np.float32(math.log1p(max(v, 0.0))) if v is not None else np.float32(0.0) for v in row]


def _write(path: Path, text: str | bytes, compress: bool = False) -> Path:
    raw = text.encode() if isinstance(text, str) else text
    path.write_bytes(gzip.compress(raw, mtime=0) if compress else raw)
    return path


def _one_chunk(path: Path, fmt: str, schema: FeatureSchema, stats: ReadStats | None = None) -> Chunk:
    chunks = list(iter_chunks(path, fmt, schema, stats=stats))
    assert len(chunks) == 1
    return chunks[0]


# ---------------------------------------------------------------------------------------------
# Criteo TSV


def test_criteo_raw_rows_exact(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.txt", "\n".join(CRITEO_LINES) + "\n")
    stats = ReadStats()
    rows = list(iter_raw(path, "criteo", stats))
    assert rows == [
        RawRow(label, dense, _cats(line), None)
        for label, dense, line in zip([0, 1, 0], CRITEO_DENSE_RAW, CRITEO_LINES, strict=True)
    ]
    assert rows[1].categorical[:3] == ["05db9164", "38a947a1", None]
    assert stats.to_dict() == {"rows": 3, "skipped": 0, "reasons": {}}


def test_criteo_chunks_exact(tmp_path: Path) -> None:
    schema = criteo_schema(3)
    path = _write(tmp_path / "train.txt", "\n".join(CRITEO_LINES))  # no final newline
    chunk = _one_chunk(path, "criteo", schema)
    assert chunk.dense.dtype == np.float32 and chunk.keys.dtype == np.int64 and chunk.labels.dtype == np.float32
    np.testing.assert_array_equal(chunk.labels, np.array([0, 1, 0], np.float32))
    np.testing.assert_array_equal(chunk.dense, np.array([_log1p(r) for r in CRITEO_DENSE_RAW], np.float32))
    assert chunk.dense[0, 0] == np.float32(0.6931472)  # log(1 + 1)
    assert chunk.dense[2, 1] == 0.0  # -3 clipped to 0
    expected_keys = [[schema.key(f, v) for f, v in enumerate(_cats(line))] for line in CRITEO_LINES]
    assert chunk.keys.tolist() == expected_keys
    assert chunk.keys[0, 0] == schema.key(0, "68fd1e64")
    assert chunk.keys[1, 2] == schema.key(2, None)  # missing C3


def test_malformed_lines_skipped_and_counted(tmp_path: Path) -> None:
    good = CRITEO_LINES[0]
    fields = good.split("\t")

    def variant(i: int, value: str) -> str:
        return "\t".join([*fields[:i], value, *fields[i + 1 :]])

    lines = [
        good.encode(),
        "\t".join(fields[:-1]).encode(),  # 39 fields
        (good + "\textra").encode(),  # 41 fields
        variant(0, "2").encode(),  # bad label
        variant(0, "").encode(),  # empty label
        variant(3, "abc").encode(),  # non-numeric dense
        variant(3, "nan").encode(),  # not a finite number
        variant(3, "1e400").encode(),  # overflows to inf
        variant(3, "2.5").encode(),  # a decimal is a number: kept
        variant(20, "ab\xffcd").encode("latin-1"),  # not UTF-8
        variant(21, "a\x00b").encode(),  # NUL byte
        b"",  # blank line
        variant(2, "-7").encode(),  # negative dense: kept
        variant(14, "caf\u00e9").encode(),  # non-ASCII UTF-8: kept
    ]
    path = _write(tmp_path / "bad.txt", b"\r\n".join(lines) + b"\r\n")  # CRLF line endings
    stats = ReadStats()
    chunk = _one_chunk(path, "criteo", criteo_schema(), stats)
    assert stats.to_dict() == {
        "rows": 4,
        "skipped": 10,
        "reasons": {"blank_line": 1, "decode": 2, "dense_value": 3, "field_count": 2, "label": 2},
    }
    raw = list(iter_raw(path, "criteo"))
    assert [r.dense[2] for r in raw] == [5.0, 2.5, 5.0, 5.0]
    assert [r.dense[1] for r in raw] == [1.0, 1.0, -7.0, 1.0]
    assert raw[3].categorical[0] == "caf\u00e9"
    assert raw[3].categorical[-1] == "9727dd16"  # no "\r" left on the last field
    assert chunk.keys[3, 0] == criteo_schema().key(0, "caf\u00e9")
    assert chunk.dense[1, 2] == np.float32(math.log1p(2.5))


def test_gzip_detected_by_magic_bytes(tmp_path: Path) -> None:
    text = "\n".join(CRITEO_LINES) + "\n"
    plain = _one_chunk(_write(tmp_path / "a.txt", text), "criteo", criteo_schema())
    for path in (
        _write(tmp_path / "b.txt.gz", text, compress=True),
        _write(tmp_path / "c.txt", text, compress=True),  # gzip without the suffix
        _write(tmp_path / "d.gz", text),  # the suffix without gzip
    ):
        chunk = _one_chunk(path, "criteo", criteo_schema())
        np.testing.assert_array_equal(chunk.dense, plain.dense)
        np.testing.assert_array_equal(chunk.keys, plain.keys)
        np.testing.assert_array_equal(chunk.labels, plain.labels)


def test_corrupt_gzip_is_a_clear_error(tmp_path: Path) -> None:
    blob = gzip.compress(("\n".join(CRITEO_LINES) + "\n").encode() * 50)
    path = _write(tmp_path / "cut.gz", blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="cannot read compressed data"):
        list(iter_raw(path, "criteo"))


def test_small_read_blocks_give_the_same_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "\ufeff" + "\r\n".join(CRITEO_LINES * 7) + "\r\n\n" + CRITEO_LINES[1]  # BOM, CRLF, no final newline
    path = _write(tmp_path / "t.txt", text)
    expected = list(iter_raw(path, "criteo"))
    assert len(expected) == 22
    for block in (1, 7, 100, 333):  # lines and CRLF pairs split across reads
        monkeypatch.setattr(lines, "READ_BYTES", block)
        stats = ReadStats()
        assert list(iter_raw(path, "criteo", stats)) == expected
        assert stats.to_dict() == {"rows": 22, "skipped": 1, "reasons": {"blank_line": 1}}


def test_overlong_line_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lines, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(lines, "READ_BYTES", 64)
    long_line = CRITEO_LINES[0].replace("68fd1e64", "x" * 5000)
    mid_line = CRITEO_LINES[0].replace("68fd1e64", "y" * 700)  # longer than most, within the limit
    path = _write(tmp_path / "t.txt", "\n".join([CRITEO_LINES[0], long_line, CRITEO_LINES[2], mid_line]) + "\n")
    stats = ReadStats()
    rows = list(iter_raw(path, "criteo", stats))
    assert [r.categorical[0] for r in rows] == ["68fd1e64", "68fd1e64", "y" * 700]
    assert stats.to_dict() == {"rows": 3, "skipped": 1, "reasons": {"line_too_long": 1}}
    monkeypatch.setattr(lines, "READ_BYTES", 1 << 20)  # the whole long line inside one block
    stats = ReadStats()
    assert list(iter_raw(path, "criteo", stats)) == rows
    assert stats.reasons == {"line_too_long": 1}


def test_long_categorical_values(tmp_path: Path) -> None:
    """Values longer than one word (and longer than the NumPy path) hash like any other."""
    values = ["a" * 9, "b" * 100, "a" * 9, "b" * 100, ""]
    fields = CRITEO_LINES[0].split("\t")
    lines = ["\t".join([*fields[:14], v, *fields[15:]]) for v in values]
    schema = criteo_schema()
    chunk = _one_chunk(_write(tmp_path / "t.txt", "\n".join(lines)), "criteo", schema)
    assert chunk.keys[:, 0].tolist() == [schema.key(0, v) for v in values]


def test_max_rows_and_chunk_sizes(tmp_path: Path) -> None:
    lines = [CRITEO_LINES[0], "junk", CRITEO_LINES[1], "", CRITEO_LINES[2], "junk"] * 3
    path = _write(tmp_path / "t.txt", "\n".join(lines) + "\n")
    stats = ReadStats()
    chunks = list(iter_chunks(path, "criteo", criteo_schema(), chunk_rows=4, stats=stats))
    assert [len(c) for c in chunks] == [4, 4, 1]
    assert stats.to_dict() == {"rows": 9, "skipped": 9, "reasons": {"blank_line": 3, "field_count": 6}}
    stats = ReadStats()
    chunks = list(iter_chunks(path, "criteo", criteo_schema(), chunk_rows=4, stats=stats, max_rows=5))
    assert [len(c) for c in chunks] == [4, 1]
    # Exactly the lines up to the 5th good row were read: 3 + 3 + ... (the 5th good row is line 9).
    assert stats.to_dict() == {"rows": 5, "skipped": 4, "reasons": {"blank_line": 1, "field_count": 3}}
    np.testing.assert_array_equal(chunks[1].labels, np.array([1], np.float32))


def test_bad_arguments(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.txt", CRITEO_LINES[0])
    with pytest.raises(ValueError, match="unknown data format 'parquet'"):
        list(iter_raw(path, "parquet"))
    with pytest.raises(ValueError, match="schema does not match format 'avazu'"):
        list(iter_chunks(path, "avazu", criteo_schema()))
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        list(iter_raw(tmp_path / "nope.txt", "criteo"))
    with pytest.raises(ValueError, match="chunk_rows must be positive, got 0"):
        list(iter_chunks(path, "criteo", criteo_schema(), chunk_rows=0))
    with pytest.raises(ValueError, match="max_rows must be >= 0"):
        list(iter_chunks(path, "criteo", criteo_schema(), max_rows=-1))


def test_schema_for_format() -> None:
    assert FORMATS == ("criteo", "criteo-csv", "avazu")
    assert schema_for_format("criteo-csv", 5) == criteo_schema(5)
    avazu = schema_for_format("avazu")
    assert avazu.num_dense == 0 and avazu.categorical_names[:3] == ("hour_of_day", "weekday", "C1")
    assert avazu.num_fields == len(AVAZU_COLUMNS) - 3 + 2


# ---------------------------------------------------------------------------------------------
# Criteo CSV and Avazu


def test_criteo_csv(tmp_path: Path) -> None:
    header = ",".join(["Id", "Label", *CRITEO_DENSE, *CRITEO_CATEGORICAL])
    body = [f"{10000000 + i}," + line.replace("\t", ",") for i, line in enumerate(CRITEO_LINES)]
    text = "\ufeff" + "\r\n".join([header, *body, ",".join(["x"] * 40)]) + "\r\n"  # with a UTF-8 BOM
    path = _write(tmp_path / "train.csv", text)
    stats = ReadStats()
    rows = list(iter_raw(path, "criteo-csv", stats))
    assert [r.id for r in rows] == ["10000000", "10000001", "10000002"]
    assert [r.label for r in rows] == [0, 1, 0]
    assert [r.dense for r in rows] == CRITEO_DENSE_RAW
    assert [r.categorical for r in rows] == [_cats(line) for line in CRITEO_LINES]
    assert stats.reasons == {"field_count": 1}
    tsv = _one_chunk(_write(tmp_path / "train.txt", "\n".join(CRITEO_LINES)), "criteo", criteo_schema())
    csv = _one_chunk(path, "criteo-csv", criteo_schema())
    np.testing.assert_array_equal(csv.keys, tsv.keys)
    np.testing.assert_array_equal(csv.dense, tsv.dense)


def test_csv_header_is_required(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.csv", "\n".join(line.replace("\t", ",") for line in CRITEO_LINES))
    with pytest.raises(ValueError, match="not a criteo-csv file: its first line must be the header Id,Label"):
        list(iter_raw(path, "criteo-csv"))
    path = _write(tmp_path / "empty.csv", "")
    assert list(iter_raw(path, "criteo-csv")) == []


AVAZU_HEADER = ",".join(AVAZU_COLUMNS)
AVAZU_ROWS = [
    # id > 2**63 (9223372036854775808): must stay a string
    "10000174058809263569,0,14102100,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,"
    "ddd2926e,44956a24,1,2,15706,320,50,1722,0,35,-1,79",
    "1000009418151094273,1,14102923,1002,1,85f751fd,c4e18dd6,50e219e0,9c13b419,2347f47a,f95efa07,a99f214a,"
    "7801e8d9,be6db1d7,1,0,18993,320,50,2161,0,35,100034,157",
    "10000371904215119486,0,14102101,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,"
    ",711ee120,1,0,15704,320,50,1722,0,35,,79",
]


def test_avazu(tmp_path: Path) -> None:
    bad_hour = [AVAZU_ROWS[0].replace(",14102100,", f",{h},") for h in ("14102124", "14133100", "1410210", "1410210x")]
    path = _write(tmp_path / "train.gz", "\n".join([AVAZU_HEADER, *AVAZU_ROWS, *bad_hour]) + "\n", compress=True)
    stats = ReadStats()
    rows = list(iter_raw(path, "avazu", stats))
    assert stats.to_dict() == {"rows": 3, "skipped": 4, "reasons": {"hour": 4}}
    assert [r.id for r in rows] == ["10000174058809263569", "1000009418151094273", "10000371904215119486"]
    assert [r.label for r in rows] == [0, 1, 0]
    assert all(r.dense == [] for r in rows)
    # 14102100: 2014-10-21 (a Tuesday) 00h; 14102923: 2014-10-29 (a Wednesday) 23h
    assert [r.categorical[:2] for r in rows] == [["00", "1"], ["23", "2"], ["01", "1"]]
    assert rows[0].categorical[2:] == AVAZU_ROWS[0].split(",")[3:]
    assert rows[2].categorical[11] is None and rows[2].categorical[-2] is None  # device_ip, C20 missing
    schema = schema_for_format("avazu", 11)
    chunk = _one_chunk(path, "avazu", schema)
    assert chunk.dense.shape == (3, 0)
    assert chunk.keys.tolist() == [[schema.key(f, v) for f, v in enumerate(r.categorical)] for r in rows]
    assert chunk.keys[0, 0] == schema.key(0, "00") and chunk.keys[0, 1] == schema.key(1, "1")


def test_avazu_header_mismatch(tmp_path: Path) -> None:
    header = AVAZU_HEADER.replace("id,click,", "id,")  # Avazu's test.csv: no click column
    path = _write(tmp_path / "test.csv", "\n".join([header, *AVAZU_ROWS]))
    with pytest.raises(ValueError, match="not a avazu file"):
        list(iter_raw(path, "avazu"))


# ---------------------------------------------------------------------------------------------
# prepare() and the cache


def _criteo_file(path: Path, repeats: int) -> Path:
    lines = ([*CRITEO_LINES, "broken line"]) * repeats
    return _write(path, "\n".join(lines) + "\n")


def test_prepare_matches_reader_and_trims(tmp_path: Path) -> None:
    src = _criteo_file(tmp_path / "train.txt", 4)
    schema = criteo_schema()
    p = prepare(src, "criteo", tmp_path / "cache", schema, progress=False)
    assert p.rows == len(p) == 12
    assert p.stats.to_dict() == {"rows": 12, "skipped": 4, "reasons": {"field_count": 4}}
    chunk = _one_chunk(src, "criteo", schema)
    np.testing.assert_array_equal(p.dense, chunk.dense)
    np.testing.assert_array_equal(p.keys, chunk.keys)
    np.testing.assert_array_equal(p.labels, chunk.labels)
    assert isinstance(p.keys, np.memmap) and not p.keys.flags.writeable
    for name, shape in (("dense", (12, 13)), ("keys", (12, 26)), ("labels", (12,))):
        assert np.load(p.path / f"{name}.npy").shape == shape  # trimmed from the 16 counted lines
    meta = json.loads((p.path / "meta.json").read_text())
    assert meta["rows"] == 12 and meta["stats"] == p.stats.to_dict()
    assert meta["identity"]["source"] == str(src.resolve()) and meta["identity"]["format"] == "criteo"
    assert meta["identity"]["schema"] == schema.to_dict() and meta["identity"]["size"] == src.stat().st_size
    assert [q.name for q in (tmp_path / "cache").iterdir()] == [p.path.name]  # no temp folders left


def test_prepare_reuses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _criteo_file(tmp_path / "train.txt", 2)
    first = prepare(src, "criteo", tmp_path / "cache", criteo_schema(), progress=False)

    def no_parsing(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(reader, "iter_chunks", no_parsing)
    again = prepare(src, "criteo", tmp_path / "cache", criteo_schema(), progress=False)
    assert again.path == first.path and again.rows == first.rows
    assert again.stats == first.stats
    np.testing.assert_array_equal(again.keys, first.keys)


def test_prepare_rebuilds_on_change(tmp_path: Path) -> None:
    src = _criteo_file(tmp_path / "train.txt", 2)
    cache = tmp_path / "cache"
    first = prepare(src, "criteo", cache, criteo_schema(), progress=False)
    _criteo_file(src, 3)  # the source changed (size and mtime)
    second = prepare(src, "criteo", cache, criteo_schema(), progress=False)
    assert second.rows == 9 and second.path != first.path
    other_seed = prepare(src, "criteo", cache, criteo_schema(1), progress=False)
    assert other_seed.path != second.path and not np.array_equal(other_seed.keys, second.keys)
    limited = prepare(src, "criteo", cache, criteo_schema(), max_rows=4, progress=True)
    assert limited.rows == 4 and limited.path != second.path
    np.testing.assert_array_equal(limited.keys, second.keys[:4])


@pytest.mark.parametrize("damage", ["meta", "array", "missing"])
def test_prepare_rebuilds_damaged_cache(tmp_path: Path, damage: str) -> None:
    src = _criteo_file(tmp_path / "train.txt", 2)
    first = prepare(src, "criteo", tmp_path / "cache", criteo_schema(), progress=False)
    keys = np.array(first.keys)
    folder = first.path
    del first
    if damage == "meta":
        (folder / "meta.json").write_text("{")
    elif damage == "array":
        with open(folder / "keys.npy", "r+b") as f:
            f.truncate(200)
    else:
        (folder / "labels.npy").unlink()
    again = prepare(src, "criteo", tmp_path / "cache", criteo_schema(), progress=False)
    assert again.path == folder and again.rows == 6
    np.testing.assert_array_equal(again.keys, keys)


@pytest.mark.parametrize("version", [1, 3, None])
def test_a_cache_of_another_format_version_is_rebuilt_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: int | None
) -> None:
    from models.data.cache import CACHE_VERSION, lookup

    src = _criteo_file(tmp_path / "train.txt", 2)
    first = prepare(src, "criteo", tmp_path / "cache", criteo_schema(), progress=False)
    meta_path = first.path / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert CACHE_VERSION == 2 and meta["cache_version"] == 2
    keys = np.array(first.keys)
    del first
    # What another build left: same folder, same identity, other version, arrays that must not be read.
    if version is None:
        del meta["cache_version"]
    else:
        meta["cache_version"] = version
    meta_path.write_text(json.dumps(meta))
    np.save(meta_path.parent / "keys.npy", np.zeros_like(keys))
    assert lookup(src, "criteo", tmp_path / "cache", criteo_schema()) is None
    calls = []
    real = reader.iter_chunks
    monkeypatch.setattr(reader, "iter_chunks", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = prepare(src, "criteo", tmp_path / "cache", criteo_schema(), progress=False)
    assert calls == [1]  # parsed again
    np.testing.assert_array_equal(again.keys, keys)
    assert json.loads(meta_path.read_text())["cache_version"] == 2


def test_prepare_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        prepare(tmp_path / "missing.txt", "criteo", tmp_path / "cache", criteo_schema(), progress=False)
    src = _write(tmp_path / "junk.txt", "a\tb\n\nc\n")
    with pytest.raises(ValueError, match=r"no valid criteo rows \(blank_line: 1, field_count: 2\)"):
        prepare(src, "criteo", tmp_path / "cache", criteo_schema(), progress=False)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written left behind


# ---------------------------------------------------------------------------------------------
# Splits, batches, distinct tokens (on in-memory arrays: they only need the Prepared fields)


def _prepared(rows: int, keys: np.ndarray | None = None) -> Prepared:
    schema = FeatureSchema(("I1",), ("C1", "C2"))
    if keys is None:
        keys = np.arange(rows * 2, dtype=np.int64).reshape(rows, 2)
    dense = np.arange(rows, dtype=np.float32)[:, None]
    labels = (np.arange(rows) % 2).astype(np.float32)
    return Prepared(Path("."), Path("x"), "criteo", rows, ReadStats(rows), schema, dense, keys, labels)


def test_split_order_exact() -> None:
    parts = _prepared(10).split("order", val_fraction=0.2, test_fraction=0.1)
    assert {k: v.tolist() for k, v in parts.items()} == {
        "train": [0, 1, 2, 3, 4, 5, 6],
        "val": [7, 8],
        "test": [9],
    }
    parts = _prepared(10).split("order", val_fraction=0.0, test_fraction=0.0)
    assert parts["train"].tolist() == list(range(10)) and len(parts["val"]) == len(parts["test"]) == 0


def test_split_random_deterministic_disjoint_covering() -> None:
    p = _prepared(20_000)
    parts = p.split("random", val_fraction=0.1, test_fraction=0.2, seed=3)
    again = p.split("random", val_fraction=0.1, test_fraction=0.2, seed=3)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    joined = np.concatenate(list(parts.values()))
    assert len(joined) == 20_000 and np.array_equal(np.sort(joined), np.arange(20_000))
    assert abs(len(parts["val"]) - 2000) < 200 and abs(len(parts["test"]) - 4000) < 250
    other = p.split("random", val_fraction=0.1, test_fraction=0.2, seed=4)
    assert not np.array_equal(other["test"], parts["test"])
    # A row's part depends only on (seed, index): the first 5000 rows split the same way in a shorter file.
    short = _prepared(5000).split("random", val_fraction=0.1, test_fraction=0.2, seed=3)
    assert all(np.array_equal(short[k], parts[k][parts[k] < 5000]) for k in parts)
    # Contiguous rows are not grouped: test rows are spread over the whole file.
    assert np.histogram(parts["test"], bins=10, range=(0, 20_000))[0].min() > 300


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 1.2}, "val_fraction must be in \\[0, 1\\), got 1.2"),
        ({"test_fraction": -0.1}, "test_fraction must be in \\[0, 1\\), got -0.1"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction \\+ test_fraction must be < 1, got 0.5 \\+ 0.5"),
        ({"kind": "time"}, "split kind must be 'order' or 'random', got 'time'"),
    ],
)
def test_split_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _prepared(10).split(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("shuffle", [False, True])
def test_iter_batches_cover_each_index_once(monkeypatch: pytest.MonkeyPatch, shuffle: bool) -> None:
    monkeypatch.setattr(data_batches, "_window_rows", lambda batch_size: 3 * batch_size)  # several windows
    p = _prepared(100)
    indices = np.arange(3, 95, dtype=np.int64)
    batches = list(iter_batches(p, indices, batch_size=8, shuffle=shuffle, seed=1))
    assert [len(b[0]) for b in batches] == [8] * 11 + [4]
    dense = np.concatenate([b[0].numpy() for b in batches])
    keys = np.concatenate([b[1].numpy() for b in batches])
    labels = np.concatenate([b[2].numpy() for b in batches])
    order = dense[:, 0].astype(np.int64)  # the dense value is the row index
    assert np.array_equal(np.sort(order), indices)
    assert np.array_equal(keys, p.keys[order]) and np.array_equal(labels, p.labels[order])
    assert [t.dtype for t in batches[0]] == [torch.float32, torch.int64, torch.float32]
    assert batches[0][0].shape == (8, 1) and batches[0][1].shape == (8, 2) and batches[0][2].shape == (8,)
    if shuffle:
        assert not np.array_equal(order, indices)
        again = np.concatenate([b[0].numpy() for b in iter_batches(p, indices, 8, shuffle=True, seed=1)])
        other = np.concatenate([b[0].numpy() for b in iter_batches(p, indices, 8, shuffle=True, seed=2)])
        assert np.array_equal(again[:, 0], order) and not np.array_equal(other[:, 0], order)
        # Windows are read sorted but batches keep the permutation's order (not sorted within a window).
        assert not all(np.all(np.diff(b[0].numpy()[:, 0]) > 0) for b in batches)
    else:
        assert np.array_equal(order, indices)


def test_iter_batches_validation() -> None:
    p = _prepared(10)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        list(iter_batches(p, np.arange(5), 0, shuffle=False, seed=0))
    with pytest.raises(ValueError, match=r"indices must be in \[0, 10\)"):
        list(iter_batches(p, np.array([3, 10]), 4, shuffle=False, seed=0))


def test_distinct_tokens_exact() -> None:
    keys = np.array([[5, 9], [1, 9], [5, 2], [7, 9], [1, 1]], np.int64)
    p = _prepared(5, keys)
    for chunk_rows in (1, 2, 100):
        tokens, counts = distinct_tokens(p, np.array([4, 0, 2, 1]), chunk_rows=chunk_rows)
        assert tokens.tolist() == [1, 2, 5, 9] and counts.tolist() == [3, 1, 2, 2]
        assert tokens.dtype == np.int64 and counts.dtype == np.int64
    tokens, counts = distinct_tokens(p, np.array([], np.int64))
    assert len(tokens) == len(counts) == 0


def test_distinct_tokens_on_prepared_file(tmp_path: Path) -> None:
    src = _criteo_file(tmp_path / "train.txt", 3)
    p = prepare(src, "criteo", tmp_path / "cache", criteo_schema(), progress=False)
    rows = np.array([0, 1, 3, 7])
    expected = Counter(np.asarray(p.keys[rows]).ravel().tolist())
    tokens, counts = distinct_tokens(p, rows, chunk_rows=3)
    assert dict(zip(tokens.tolist(), counts.tolist(), strict=True)) == expected
    assert tokens.tolist() == sorted(expected)


def test_a_column_that_turns_wide_later_is_read_as_strings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Criteo's ids are 8 hex digits, packed into one word as they are read; a later block with a longer
    value takes that column (and only it) as strings, with the same keys either way."""
    fields = CRITEO_LINES[0].split("\t")
    values = [f"{i:08x}" for i in range(40)] + ["abc", "0123456789", "", "ff"]
    rows = ["\t".join([*fields[:20], v, *fields[21:]]) for v in values]
    path = _write(tmp_path / "t.txt", "\n".join(rows) + "\n")
    monkeypatch.setattr(lines, "READ_BYTES", 3000)  # several blocks: the first all 8-byte
    schema = criteo_schema()
    chunk = _one_chunk(path, "criteo", schema)
    assert chunk.keys[:, 6].tolist() == [schema.key(6, v) for v in values]
    assert chunk.keys[:, 0].tolist() == [schema.key(0, "68fd1e64")] * len(values)
    assert [r.categorical[6] for r in iter_raw(path, "criteo")] == [v or None for v in values]


def test_dense_values_are_read_as_python_float_reads_them(tmp_path: Path) -> None:
    """The parser reads short integers itself; a row with any other dense text is read again value by value
    with float(), so values and skip reasons are float()'s whatever the parser (docs/DATA.md)."""
    fields = CRITEO_LINES[0].split("\t")
    texts = [
        " 12",
        "1_000",
        "+5",
        ".5",
        "5.",
        "1e3",
        "007",
        "-0",
        "inf",
        "-nan",
        "1e400",
        "0x10",
        "1,5",
        "\u0661\u0662",
    ]
    lines = ["\t".join([*fields[:3], t, *fields[4:]]) for t in texts]
    path = _write(tmp_path / "t.txt", "\n".join(lines) + "\n")
    stats = ReadStats()
    rows = list(iter_raw(path, "criteo", stats))

    def python_float(t: str) -> float | None:  # of the bytes, as the old reader did: no non-ASCII digits
        try:
            v = float(t.encode())
        except ValueError:
            return None
        return v if math.isfinite(v) else None

    kept = [python_float(t) for t in texts if python_float(t) is not None]
    assert [r.dense[2] for r in rows] == kept == [12.0, 1000.0, 5.0, 0.5, 5.0, 1000.0, 7.0, -0.0]
    assert stats.to_dict() == {"rows": 8, "skipped": 6, "reasons": {"dense_value": 6}}
    # Each row takes its own path: the same texts without the bad ones give the same values.
    plain = list(iter_raw(_write(tmp_path / "p.txt", "\n".join(lines[:1] + lines[2:8]) + "\n"), "criteo"))
    assert [r.dense[2] for r in plain] == [12.0, 5.0, 0.5, 5.0, 1000.0, 7.0, -0.0]


# ---------------------------------------------------------------------------------------------
# The parser against a reference written from docs/DATA.md's rules, on lines drawn from tricky values

_DENSE_TEXTS = [
    "", "0", "7", "-1", "-0", "007", "2.5", "1e3", "+5", " 12", "1_000", "nan", "inf", "1e400", "0x10", "-", "abc",
    "123456789012345", "1234567890123456", "99999999999999999999", "3 ", ".5", "1e-3",
]  # fmt: skip
_TOKENS = [
    "", "68fd1e64", "abc", "1", "12345678", "123456789", "\u00e4", "\u00e9" * 5, "x y", "ffffffff", "long_value_here",
    " ", "1005",
]  # fmt: skip
_LABELS = ["0", "1", "2", "", "01", " 1"]
_HOURS = [
    "14102100",
    "14102123",
    "14102124",
    "14023000",
    "1410210",
    "141021000",
    "abcdefgh",
    "",
    "16022900",
    "15022900",
]


@st.composite
def _lines(draw: st.DrawFn, fmt: str) -> str:
    layout = spec(fmt)

    def pick(tricky: list[str], plain: list[str]) -> str:  # one field in 10 tricky, so that rows with one survive
        return draw(st.sampled_from(tricky if draw(st.integers(0, 9)) == 0 else plain))

    fields = [pick(_TOKENS, ["", "68fd1e64", "1005"]) for _ in range(layout.num_columns)]
    fields[layout.label_column] = pick(_LABELS, ["0", "1"])
    for c in layout.dense_columns:
        fields[c] = pick(_DENSE_TEXTS, ["", "0", "7", "-1"])
    if layout.hour_column is not None:
        fields[layout.hour_column] = pick(_HOURS, ["14102100"])
    if layout.id_column is not None:
        fields[layout.id_column] = str(draw(st.integers(0, 2**64)))
    cut = draw(st.sampled_from([0, 0, 0, 0, -1, 1, layout.num_columns]))  # a wrong field count, or none at all
    if cut > 0:
        fields = fields[:-cut] if cut < layout.num_columns else []
    elif cut < 0:
        fields.append("x")
    return layout.sep.join(fields)


def _reference(lines_: list[str], fmt: str) -> tuple[list[RawRow], dict[str, int]]:
    layout = spec(fmt)
    rows, reasons = [], Counter[str]()
    for line in lines_:
        f = line.split(layout.sep)
        if not line:
            reasons["blank_line"] += 1
            continue
        if len(f) != layout.num_columns:
            reasons["field_count"] += 1
            continue
        if f[layout.label_column] not in ("0", "1"):
            reasons["label"] += 1
            continue
        dense: list[float | None] = []
        for c in layout.dense_columns:
            try:
                v = float(f[c].encode()) if f[c] else None
            except ValueError:
                v = math.nan
            dense.append(v)
        if any(v is not None and not math.isfinite(v) for v in dense):
            reasons["dense_value"] += 1
            continue
        cats: list[str | None] = [f[c] or None for c in layout.categorical_columns]
        if layout.hour_column is not None:
            h = f[layout.hour_column]
            try:
                assert len(h) == 8 and h.isdigit() and int(h[6:]) < 24
                day = datetime.date(2000 + int(h[:2]), int(h[2:4]), int(h[4:6]))
            except (AssertionError, ValueError):
                reasons["hour"] += 1
                continue
            cats = [h[6:], str(day.weekday()), *cats]
        row_id = f[layout.id_column] if layout.id_column is not None else None
        rows.append(RawRow(int(f[layout.label_column]), dense, cats, row_id))
    return rows, dict(reasons)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_parser_reads_every_line_as_the_documented_rules_do(fmt: str) -> None:
    header = ",".join(spec(fmt).header) + "\n" if spec(fmt).header else ""

    @settings(max_examples=40, deadline=None)
    @given(st.lists(_lines(fmt), min_size=1, max_size=60), st.sampled_from([2000, 1 << 23]))
    def check(lines_: list[str], read_bytes: int) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = _write(Path(tmp) / "data", header + "\n".join(lines_) + "\n")
            expected, reasons = _reference(lines_, fmt)
            stats = ReadStats()
            old, lines.READ_BYTES = lines.READ_BYTES, read_bytes  # small: lines spread over several blocks
            try:
                assert list(iter_raw(path, fmt, stats)) == expected
                schema = schema_for_format(fmt)
                chunks = [c.keys for c in iter_chunks(path, fmt, schema)]
            finally:
                lines.READ_BYTES = old
            assert stats.to_dict() == {"rows": len(expected), "skipped": sum(reasons.values()), "reasons": reasons}
            keys = np.concatenate(chunks).tolist() if chunks else []
            assert keys == [schema.keys_for([r.categorical])[0].tolist() for r in expected]

    check()


def test_parse_block_sizes_its_rows_by_bytes_and_refuses_data_without_a_last_lf() -> None:
    from models.data.parse import parse_block

    fmt = spec("criteo")
    # rows of the least size a row can have (39 tabs and a LF, so its label is empty), then a short bad line: the
    # arrays hold len // 40 + 1 rows, and the bad line's writes land inside them
    data = b"\t" * 39 + b"\n"
    stats = ReadStats()
    block = parse_block(data * 50 + b"x\n" + b"\n" * 1000, fmt, stats)
    assert (block.parsed_rows, len(block)) == (50, 0)
    assert stats.to_dict() == {
        "rows": 0, "skipped": 1051, "reasons": {"label": 50, "field_count": 1, "blank_line": 1000}
    }  # fmt: skip
    good = CRITEO_LINES[0].encode() + b"\n"
    assert len(parse_block(good * 3 + b"\n" * 10_000, fmt, ReadStats())) == 3
    with pytest.raises(ValueError, match=r"^parse_block takes LF-terminated lines; the data ends in b'.*\\t'$"):
        parse_block(good + b"1" + b"\t" * 39, fmt, ReadStats())  # once a read past the data (heap corruption)
    assert len(parse_block(b"", fmt, ReadStats())) == 0
