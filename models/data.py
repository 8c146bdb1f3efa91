"""Streaming readers for Criteo and Avazu files, and the parsed-array cache that training reads.

Formats (docs/DATA.md has the details):

- ``criteo``: Criteo Kaggle / Terabyte TSV, 40 columns: label, I1..I13, C1..C26, no header;
- ``criteo-csv``: the Kaggle CSV variant, header ``Id,Label,I1,...,I13,C1,...,C26`` (41 columns);
- ``avazu``: Avazu CSV, header of the 24 columns of :data:`models.schema.AVAZU_COLUMNS`; ``hour``
  (YYMMDDHH) becomes the fields ``hour_of_day`` and ``weekday``; ids stay strings (they overflow int64).

Files are read as bytes in blocks (gzip detected by its magic bytes, not the suffix), so memory stays
constant however large the file. A malformed line (wrong field count, bad label, non-numeric dense
value, bad hour, undecodable bytes, blank, or absurdly long) is skipped and counted by reason in
:class:`ReadStats`; it never stops the read. Each block is parsed in NumPy on its raw bytes, all
lines at once (field boundaries from separator positions, integers from 64-bit words, categorical
values factorised with np.unique), so only a block's distinct values become Python strings.

:func:`prepare` parses a file once into memory-mapped ``.npy`` arrays (transformed dense values, token
keys, labels) under a cache folder keyed by the source file and the schema; training then reads binary
arrays through :func:`iter_batches`, never text.

Example::

    schema = criteo_schema()
    data = prepare("data/train.txt.gz", "criteo", "data/cache", schema)
    parts = data.split("order", val_fraction=0.1, test_fraction=0.1)
    for dense, keys, labels in iter_batches(data, parts["train"], 1024, shuffle=True, seed=0):
        ...  # (B, 13) float32, (B, 26) int64, (B,) float32
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from models.names import FORMATS
from models.schema import (
    AVAZU_CATEGORICAL,
    AVAZU_COLUMNS,
    CRITEO_CATEGORICAL,
    CRITEO_DENSE,
    FeatureSchema,
    avazu_schema,
    criteo_schema,
    transform_dense,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


# Reasons a line is skipped (the keys of ReadStats.reasons).
DECODE = "decode"  # bytes that are not UTF-8 text (or hold a NUL)
BLANK_LINE = "blank_line"
FIELD_COUNT = "field_count"
LABEL = "label"  # not "0" or "1"
DENSE_VALUE = "dense_value"  # not a finite number
HOUR = "hour"  # Avazu `hour` not a valid YYMMDDHH
LINE_TOO_LONG = "line_too_long"

CACHE_VERSION = 1
MAX_LINE_BYTES = 1 << 20  # a longer line is skipped (and never held whole in memory)
_READ_BYTES = 1 << 22  # bytes read per block
_GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass
class ReadStats:
    """What a read kept and skipped. One instance can be passed to a reader to collect its counts."""

    rows: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, n: int = 1) -> None:
        if n:
            self.skipped += n
            self.reasons[reason] = self.reasons.get(reason, 0) + n

    def add(self, other: ReadStats) -> None:
        self.rows += other.rows
        for reason, n in other.reasons.items():
            self.skip(reason, n)

    def to_dict(self) -> dict[str, object]:
        return {"rows": self.rows, "skipped": self.skipped, "reasons": dict(sorted(self.reasons.items()))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReadStats:
        return cls(int(d["rows"]), int(d["skipped"]), {str(k): int(v) for k, v in d["reasons"].items()})


@dataclass(frozen=True)
class RawRow:
    """One parsed line before hashing.

    ``dense`` holds the raw numbers (``None`` = missing, negatives kept); ``categorical`` the raw
    strings in schema order (``None`` = missing); ``id`` the row id where the format has one
    (Criteo CSV, Avazu), as the string in the file.
    """

    label: int
    dense: list[float | None]
    categorical: list[str | None]
    id: str | None = None


@dataclass(frozen=True)
class Chunk:
    """Model-ready rows.

    ``dense`` float32 (n, n_dense) after transform_dense, ``keys`` int64 (n, F), ``labels`` float32 (n,).
    """

    dense: np.ndarray
    keys: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class _Format:
    """Column layout of one file format."""

    name: str
    sep: str
    header: tuple[str, ...] | None
    num_columns: int
    label_column: int
    dense_columns: tuple[int, ...]
    categorical_columns: tuple[int, ...]  # copied as fields, after any derived ones
    id_column: int | None = None
    hour_column: int | None = None  # Avazu: derives hour_of_day and weekday, the first two fields
    dense_names: tuple[str, ...] = ()
    categorical_names: tuple[str, ...] = ()


_CRITEO_CSV_HEADER = ("Id", "Label", *CRITEO_DENSE, *CRITEO_CATEGORICAL)
_SPECS = {
    "criteo": _Format(
        "criteo", "\t", None, 40, 0, tuple(range(1, 14)), tuple(range(14, 40)),
        dense_names=CRITEO_DENSE, categorical_names=CRITEO_CATEGORICAL,
    ),
    "criteo-csv": _Format(
        "criteo-csv", ",", _CRITEO_CSV_HEADER, 41, 1, tuple(range(2, 15)), tuple(range(15, 41)), id_column=0,
        dense_names=CRITEO_DENSE, categorical_names=CRITEO_CATEGORICAL,
    ),
    "avazu": _Format(
        "avazu", ",", AVAZU_COLUMNS, 24, 1, (), tuple(range(3, 24)), id_column=0, hour_column=2,
        categorical_names=AVAZU_CATEGORICAL,
    ),
}  # fmt: skip


def _spec(fmt: str) -> _Format:
    try:
        return _SPECS[fmt]
    except KeyError:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}") from None


def schema_for_format(fmt: str, hash_seed: int = 0) -> FeatureSchema:
    """The feature schema of a file format (Criteo: 13 dense + 26 fields; Avazu: 22 fields)."""
    return avazu_schema(hash_seed) if _spec(fmt).name == "avazu" else criteo_schema(hash_seed)


def _check_schema(spec: _Format, schema: FeatureSchema) -> None:
    if schema.dense_names != spec.dense_names or schema.categorical_names != spec.categorical_names:
        raise ValueError(
            f"schema does not match format {spec.name!r}: expected dense {list(spec.dense_names)} and "
            f"categorical {list(spec.categorical_names)}, got {list(schema.dense_names)} and "
            f"{list(schema.categorical_names)} (use schema_for_format)"
        )


# ----------------------------------------------------------------------------------------------
# Bytes -> lines


def _open_binary(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when it starts with the gzip magic (whatever its name)."""
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if not path.is_file():
        raise ValueError(f"data path is not a file: {path}")
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == _GZIP_MAGIC:
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _byte_blocks(path: Path, stats: ReadStats) -> Iterator[bytes]:
    """Blocks of whole lines (each ending in b"\\n", except possibly the file's last).

    A line that grows past MAX_LINE_BYTES without ending is dropped as it streams past and counted,
    so one broken line can never take the memory of the whole file (shorter blocks that still hold
    a too-long line are caught by the parser, which counts them the same way).
    """
    with _open_binary(path) as f:
        tail = b""
        too_long = False  # inside a line already counted as too long
        while True:
            try:
                data = f.read(_READ_BYTES)
            except (EOFError, OSError, zlib.error) as e:  # truncated or corrupt gzip stream
                raise ValueError(f"{path}: cannot read compressed data ({e})") from e
            if not data:
                break
            nl = data.rfind(b"\n")
            if nl < 0:  # no line ends in this block
                if not too_long:
                    tail += data
                    if len(tail) > MAX_LINE_BYTES:
                        stats.skip(LINE_TOO_LONG)
                        too_long, tail = True, b""
                continue
            if too_long:  # drop the rest of the long line, up to its newline
                start = data.find(b"\n") + 1
                too_long = False
                head, tail = data[start : nl + 1], data[nl + 1 :]
            else:
                head, tail = tail + data[: nl + 1], data[nl + 1 :]
            if len(tail) > MAX_LINE_BYTES:
                stats.skip(LINE_TOO_LONG)
                too_long, tail = True, b""
            if head:
                yield head
        if tail and not too_long:
            yield tail


def _clean_block(data: bytes, stats: ReadStats) -> bytes:
    """LF-terminated lines of a block, CRLF turned into LF; lines that are not text dropped and counted.

    Not text: invalid UTF-8, or a NUL byte (which no CSV/TSV value contains; the parser relies on it).
    """
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    if not data.endswith(b"\n"):  # the file's last line had no newline
        data += b"\n"
    if b"\x00" not in data:
        if data.isascii():  # the common case, checked at memory speed
            return data
        try:
            data.decode("utf-8")
            return data
        except UnicodeDecodeError:
            pass
    good = []
    for line in data.split(b"\n")[:-1]:  # rare: find the bad lines one by one
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            stats.skip(DECODE)
            continue
        if b"\x00" in line:
            stats.skip(DECODE)
            continue
        good.append(line + b"\n")
    return b"".join(good)


def _check_header(data: bytes, spec: _Format, path: Path) -> bytes:
    """Check the header line at the start of ``data`` and return the rest."""
    assert spec.header is not None
    end = data.find(b"\n")
    got = [c.strip().lower() for c in data[:end].decode("utf-8", "replace").split(spec.sep)]
    if got != [c.lower() for c in spec.header]:
        shown = ",".join(got[:6]) + (",..." if len(got) > 6 else "")
        raise ValueError(
            f"{path}: not a {spec.name} file: its first line must be the header "
            f"{','.join(spec.header[:6])},... ({spec.num_columns} columns), got {shown!r} ({len(got)} columns)"
        )
    return data[end + 1 :]


def _text_blocks(path: Path, spec: _Format, stats: ReadStats) -> Iterator[bytes]:
    """Clean blocks of whole data lines (header checked and dropped)."""
    need_header = spec.header is not None
    first = True
    for data in _byte_blocks(path, stats):
        if first:  # the first block holds at least the whole first line, so a BOM is whole too
            first = False
            if data.startswith(_UTF8_BOM):
                data = data[len(_UTF8_BOM) :]
        data = _clean_block(data, stats)
        if need_header and data:
            data = _check_header(data, spec, path)
            need_header = False
        if data:
            yield data


def count_lines(path: str | os.PathLike[str]) -> int:
    """Lines in a file (a CSV header counts too): its newlines, plus an unterminated last line."""
    n = 0
    last = b"\n"
    with _open_binary(Path(path)) as f:
        while True:
            try:
                data = f.read(_READ_BYTES)
            except (EOFError, OSError, zlib.error) as e:
                raise ValueError(f"{path}: cannot read compressed data ({e})") from e
            if not data:
                break
            n += data.count(b"\n")
            last = data[-1:]
    return n + (last != b"\n")


# ----------------------------------------------------------------------------------------------
# Lines -> columns, in NumPy on the raw bytes
#
# A block's bytes are viewed as a uint8 array; newline and separator positions give every field's
# [start, end) in one pass, for all lines at once. Numbers are parsed from fixed-width digit windows,
# categorical values are packed into fixed-width byte strings and factorised with np.unique, so only
# each block's distinct values ever become Python strings (and go through the schema's hash).

_SHORT = 64  # categorical values up to this many bytes are factorised in NumPy, longer ones in Python


@dataclass
class _Column:
    """A factorised categorical column: value of row i = values[codes[i]] ("" = missing)."""

    codes: np.ndarray  # int64 (n,)
    values: list[str]

    def take(self, rows: np.ndarray) -> _Column:
        return _Column(self.codes[rows], self.values)


@dataclass
class _Block:
    """Parsed good rows of a block of lines."""

    labels: np.ndarray  # float32 (n,)
    dense: np.ndarray  # float64 (n, n_dense), NaN = missing
    categorical: list[_Column]  # F columns in schema order
    ids: list[str] | None
    line_ends: np.ndarray  # int64 (n,): byte offset just past each row's line in the block

    def __len__(self) -> int:
        return len(self.labels)


def _parse_numbers(
    buf: np.ndarray, words: np.ndarray, start: np.ndarray, end: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Dense fields -> (float64 values, NaN = missing; bool mask of values that are not finite numbers).

    Plain integers of up to 8 characters (optional "-") are parsed in NumPy from one word each;
    anything else (longer numbers, decimals, exponents, junk) goes through Python's float() and is
    bad unless that gives a finite number.
    """
    n = len(start)
    length = end - start
    values = np.full(n, np.nan)
    bad = np.zeros(n, bool)
    # The field's bytes, first byte lowest: the word ending at `end`, shifted down past what precedes it.
    x = words[end] >> (np.uint64(8) * (8 - np.clip(length, 1, 8)).astype(np.uint64))
    negative = (x & np.uint64(0xFF)) == 45  # "-"
    plain = (length > 0) & (length <= 8)
    magnitude = np.zeros(n, np.int64)
    for k in range(8):
        in_field = k < length
        digit = ((x >> np.uint64(8 * k)) & np.uint64(0xFF)).astype(np.int64) - 48
        is_digit = (digit >= 0) & (digit <= 9)
        sign = negative & (length >= 2) if k == 0 else False
        plain &= is_digit | sign | ~in_field
        magnitude = np.where(in_field & is_digit, magnitude * 10 + digit, magnitude)
    values[plain] = np.where(negative, -magnitude, magnitude)[plain]
    for i in np.flatnonzero(~plain & (length > 0)).tolist():  # rare in Criteo files
        try:
            v = float(buf[start[i] : end[i]].tobytes())
        except ValueError:
            v = math.nan
        if math.isfinite(v):
            values[i] = v
        else:
            bad[i] = True
    return values, bad


def _words(data: bytes) -> np.ndarray:
    """Overlapping little-endian uint64 view: element j holds data[j - 8 : j] (zero bytes outside ``data``).

    So ``words[end]`` is the word ending at ``end`` and ``words[start + 8]`` the one starting at ``start``.
    """
    padded = bytes(8) + data + bytes(8)
    return np.ndarray((len(data) + 9,), dtype="<u8", buffer=padded, strides=(1,))


# _LOW_BYTES[L]: mask of the first L bytes of a little-endian word.
_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [2**64 - 1], dtype=np.uint64)


def _factorize(buf: np.ndarray, words: np.ndarray, start: np.ndarray, end: np.ndarray) -> _Column:
    """Categorical fields -> codes into their distinct values (decoded UTF-8; "" = missing)."""
    n = len(start)
    length = end - start
    if length.max(initial=0) <= 8:  # the common case (Criteo, Avazu): one word per value
        packed = words[start + 8] & _LOW_BYTES[length]
        distinct, codes = np.unique(packed, return_inverse=True)
        values = distinct.astype("<u8").view("S8").tolist()  # S views drop the zero padding
        return _Column(codes.reshape(n), [b.decode("utf-8") for b in values])
    short = length <= _SHORT
    width = max(8, -(-int(length[short].max(initial=0)) // 8) * 8)
    chars = buf[np.minimum(start[short, None] + np.arange(width), len(buf) - 1)]  # (n_short, W), left-aligned
    chars[np.arange(width) >= length[short, None]] = 0  # zero padding (lines never contain NUL bytes)
    distinct, short_codes = np.unique(chars.view(f"S{width}")[:, 0], return_inverse=True)
    values = [b.decode("utf-8") for b in distinct.tolist()]
    codes = np.empty(n, np.int64)
    codes[short] = short_codes.reshape(-1)
    index: dict[str, int] = {}
    for i in np.flatnonzero(~short).tolist():  # values longer than _SHORT bytes: rare, done in Python
        v = buf[start[i] : end[i]].tobytes().decode("utf-8")
        codes[i] = index.setdefault(v, len(values) + len(index))
    return _Column(codes, values + list(index))


_HOUR_CACHE: dict[str, tuple[str, str] | None] = {}


def _parse_hour(s: str) -> tuple[str, str] | None:
    """Avazu ``hour`` YYMMDDHH -> (hour of day "00".."23", weekday "0".."6", Monday = 0); None if invalid."""
    if len(s) != 8 or not s.isascii() or not s.isdigit():
        return None
    hour = int(s[6:8])
    if hour > 23:
        return None
    try:
        day = datetime.date(2000 + int(s[0:2]), int(s[2:4]), int(s[4:6]))
    except ValueError:
        return None
    return s[6:8], str(day.weekday())


def _hour_fields(hour: _Column) -> tuple[np.ndarray, _Column, _Column]:
    """Avazu ``hour`` column -> (bool mask of invalid rows, hour_of_day column, weekday column)."""
    n = len(hour.values)
    invalid, hour_code, weekday_code = np.zeros(n, bool), np.zeros(n, np.int64), np.zeros(n, np.int64)
    for i, s in enumerate(hour.values):
        if s in _HOUR_CACHE:
            parsed = _HOUR_CACHE[s]
        else:
            if len(_HOUR_CACHE) > 100_000:  # only ~10^5 valid values exist; junk must not grow it forever
                _HOUR_CACHE.clear()
            parsed = _HOUR_CACHE[s] = _parse_hour(s)
        if parsed is None:
            invalid[i] = True
        else:
            hour_code[i], weekday_code[i] = int(parsed[0]), int(parsed[1])
    return (
        invalid[hour.codes],
        _Column(hour_code[hour.codes], [f"{h:02d}" for h in range(24)]),
        _Column(weekday_code[hour.codes], [str(d) for d in range(7)]),
    )


def _parse_block(data: bytes, spec: _Format, stats: ReadStats, want_ids: bool = False) -> _Block:
    """Parse a clean block of LF-terminated lines; malformed lines are skipped and counted."""
    buf = np.frombuffer(data, np.uint8)
    words = _words(data)
    ncol = spec.num_columns
    ends = np.flatnonzero(buf == 10)  # one "\n" per line
    starts = np.concatenate([[0], ends[:-1] + 1])
    seps = np.flatnonzero(buf == ord(spec.sep))
    per_line = np.diff(np.searchsorted(seps, ends), prepend=0)  # separators in each line
    good = per_line == ncol - 1
    too_long = ends - starts > MAX_LINE_BYTES
    if too_long.any() or not good.all():
        blank = starts == ends
        stats.skip(BLANK_LINE, int((~good & blank).sum()))
        stats.skip(LINE_TOO_LONG, int(too_long.sum()))
        stats.skip(FIELD_COUNT, int((~good & ~blank & ~too_long).sum()))
        good &= ~too_long
        seps, starts, ends = seps[np.repeat(good, per_line)], starts[good], ends[good]
    n = len(ends)
    inner = seps.reshape(n, ncol - 1)  # separator positions of each good line

    def field(k: int) -> tuple[np.ndarray, np.ndarray]:
        """[start, end) byte offsets of column k of every good line."""
        return (starts if k == 0 else inner[:, k - 1] + 1), (ends if k == ncol - 1 else inner[:, k])

    s, e = field(spec.label_column)
    first = buf[np.minimum(s, len(buf) - 1)]
    bad = ~((e - s == 1) & ((first == 48) | (first == 49)))  # exactly "0" or "1"
    stats.skip(LABEL, int(bad.sum()))
    labels = (first - 48).astype(np.float32)

    bounds = [field(k) for k in spec.dense_columns]  # all dense columns parsed as one (n, n_dense) array
    dense_start = np.stack([b[0] for b in bounds], axis=1) if bounds else np.zeros((n, 0), np.int64)
    dense_end = np.stack([b[1] for b in bounds], axis=1) if bounds else np.zeros((n, 0), np.int64)
    dense, bad_values = _parse_numbers(buf, words, dense_start.ravel(), dense_end.ravel())
    dense = dense.reshape(dense_start.shape)
    bad_dense = bad_values.reshape(dense_start.shape).any(1) & ~bad
    stats.skip(DENSE_VALUE, int(bad_dense.sum()))
    bad |= bad_dense

    categorical = [_factorize(buf, words, *field(k)) for k in spec.categorical_columns]
    if spec.hour_column is not None:
        bad_hour, hour_of_day, weekday = _hour_fields(_factorize(buf, words, *field(spec.hour_column)))
        bad_hour &= ~bad
        stats.skip(HOUR, int(bad_hour.sum()))
        bad |= bad_hour
        categorical = [hour_of_day, weekday, *categorical]
    ids = None
    if want_ids and spec.id_column is not None:
        s, e = field(spec.id_column)
        ids = [data[a:b].decode("utf-8") for a, b in zip(s.tolist(), e.tolist(), strict=True)]

    if bad.any():
        keep = np.flatnonzero(~bad)
        labels, dense, ends = labels[keep], dense[keep], ends[keep]
        categorical = [c.take(keep) for c in categorical]
        ids = [ids[i] for i in keep.tolist()] if ids is not None else None
    stats.rows += len(labels)
    return _Block(labels, dense, categorical, ids, ends + 1)


def _blocks(
    path: str | os.PathLike[str], spec: _Format, stats: ReadStats, max_rows: int = 0, want_ids: bool = False
) -> Iterator[_Block]:
    """Parsed blocks of a file; with max_rows > 0, exactly the first max_rows good rows (and exact stats)."""
    if max_rows < 0:
        raise ValueError(f"max_rows must be >= 0 (0: all rows), got {max_rows}")
    remaining = max_rows or -1
    for data in _text_blocks(Path(path), spec, stats):
        scratch = ReadStats()
        block = _parse_block(data, spec, scratch, want_ids)
        if 0 <= remaining < len(block):  # the limit falls inside this block: parse only up to its last row
            scratch = ReadStats()
            block = _parse_block(data[: int(block.line_ends[remaining - 1])], spec, scratch, want_ids)
        stats.add(scratch)
        if len(block):
            yield block
        if remaining >= 0:
            remaining -= len(block)
            if remaining == 0:
                return


# ----------------------------------------------------------------------------------------------
# Public readers


def iter_raw(path: str | os.PathLike[str], fmt: str, stats: ReadStats | None = None) -> Iterator[RawRow]:
    """Rows of a data file as raw values (no transform, no hashing), malformed lines skipped and counted.

    Args:
        path: plain or gzip file in format ``fmt``.
        fmt: one of :data:`FORMATS`.
        stats: collects rows kept and lines skipped (by reason), if given.
    """
    spec = _spec(fmt)
    stats = stats if stats is not None else ReadStats()
    for block in _blocks(path, spec, stats, want_ids=True):
        dense_obj = block.dense.astype(object)
        dense_obj[np.isnan(block.dense)] = None
        dense_rows = dense_obj.tolist()
        labels = block.labels.astype(np.int64).tolist()
        columns = [[c.values[i] or None for i in c.codes.tolist()] for c in block.categorical]
        ids = block.ids if block.ids is not None else repeat(None)
        for label, dense, cats, row_id in zip(labels, dense_rows, zip(*columns, strict=True), ids, strict=False):
            yield RawRow(label, dense, list(cats), row_id)


def _chunk_of(block: _Block, schema: FeatureSchema) -> Chunk:
    """Transform the dense values and hash every distinct categorical value once through the schema."""
    keys = np.empty((len(block), schema.num_fields), np.int64)  # (n, F)
    for f, col in enumerate(block.categorical):
        keys[:, f] = np.array([schema.key(f, v) for v in col.values], np.int64)[col.codes]
    return Chunk(transform_dense(block.dense), keys, block.labels)


def _concat(chunks: list[Chunk]) -> Chunk:
    if len(chunks) == 1:
        return chunks[0]
    return Chunk(*(np.concatenate([getattr(c, a) for c in chunks]) for a in ("dense", "keys", "labels")))


def iter_chunks(
    path: str | os.PathLike[str],
    fmt: str,
    schema: FeatureSchema,
    chunk_rows: int = 65536,
    stats: ReadStats | None = None,
    max_rows: int = 0,
) -> Iterator[Chunk]:
    """Model-ready chunks of a data file: exactly ``chunk_rows`` rows each, the last one fewer.

    Args:
        path: plain or gzip file in format ``fmt``.
        fmt: one of :data:`FORMATS`.
        schema: the format's schema (:func:`schema_for_format`); its seed decides the keys.
        chunk_rows: rows per chunk.
        stats: collects rows kept and lines skipped (by reason), if given.
        max_rows: stop after this many good rows (0: read everything).
    """
    spec = _spec(fmt)
    _check_schema(spec, schema)
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    stats = stats if stats is not None else ReadStats()
    pending: list[Chunk] = []
    have = 0
    for block in _blocks(path, spec, stats, max_rows):
        pending.append(_chunk_of(block, schema))
        have += len(block)
        if have >= chunk_rows:
            whole = _concat(pending)
            start = 0
            while have - start >= chunk_rows:
                yield Chunk(*(a[start : start + chunk_rows] for a in (whole.dense, whole.keys, whole.labels)))
                start += chunk_rows
            pending = [Chunk(*(a[start:] for a in (whole.dense, whole.keys, whole.labels)))] if have > start else []
            have -= start
    if have:
        yield _concat(pending)


# ----------------------------------------------------------------------------------------------
# Parsed-array cache


def _split_mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 (wrapping arithmetic): a well-mixed hash of row indices."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


@dataclass
class Prepared:
    """A parsed data file in the cache: memory-mapped arrays plus what produced them.

    ``dense`` float32 (rows, n_dense) (already transform_dense'd), ``keys`` int64 (rows, F),
    ``labels`` float32 (rows,), all read-only memory maps.
    """

    path: Path  # the cache folder
    source: Path
    fmt: str
    rows: int
    stats: ReadStats
    schema: FeatureSchema
    dense: np.ndarray
    keys: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return self.rows

    def split(
        self, kind: str = "order", val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """Row indices (int64, ascending) of the train, val and test parts; disjoint, covering all rows.

        ``order``: the last ``test_fraction`` of the rows are test and the ``val_fraction`` before them
        val (Criteo's "last day" protocol). ``random``: each row goes to a part by a seeded hash of its
        index, so a row's part depends only on (seed, index), not on the file's length.
        """
        _check_fraction("val_fraction", val_fraction)
        _check_fraction("test_fraction", test_fraction)
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
        n = self.rows
        if kind == "order":
            n_test, n_val = round(n * test_fraction), round(n * val_fraction)
            n_train = max(n - n_test - n_val, 0)
            return {
                "train": np.arange(0, n_train, dtype=np.int64),
                "val": np.arange(n_train, n - n_test, dtype=np.int64),
                "test": np.arange(n - n_test, n, dtype=np.int64),
            }
        if kind == "random":
            if not 0 <= seed < 2**63:
                raise ValueError(f"seed must be in [0, 2**63), got {seed}")
            salt = _split_mix(np.array([seed], np.uint64))[0]
            idx = np.arange(n, dtype=np.uint64)
            u = (_split_mix((idx + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15) ^ salt) >> np.uint64(11)).astype(
                np.float64
            ) * 2.0**-53  # uniform in [0, 1)
            test = u < test_fraction
            val = ~test & (u < test_fraction + val_fraction)
            return {
                "train": np.flatnonzero(~test & ~val),
                "val": np.flatnonzero(val),
                "test": np.flatnonzero(test),
            }
        raise ValueError(f"split kind must be 'order' or 'random', got {kind!r}")


def _identity(path: Path, fmt: str, schema: FeatureSchema, max_rows: int) -> dict[str, object]:
    st = path.stat()
    return {
        "cache_version": CACHE_VERSION,
        "source": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "format": fmt,
        "schema": schema.to_dict(),
        "max_rows": max_rows,
    }


def _load_cached(folder: Path, identity: dict[str, object], schema: FeatureSchema) -> Prepared | None:
    """The cache in ``folder`` if it is complete and was built from exactly ``identity``; else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("identity") != identity:
            return None
        rows = int(meta["rows"])
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("dense", "keys", "labels")}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    expected = {
        "dense": ((rows, schema.num_dense), np.float32),
        "keys": ((rows, schema.num_fields), np.int64),
        "labels": ((rows,), np.float32),
    }
    for name, (shape, dtype) in expected.items():
        if arrays[name].shape != shape or arrays[name].dtype != dtype:
            return None
    return Prepared(
        folder,
        Path(str(identity["source"])),
        str(identity["format"]),
        rows,
        ReadStats.from_dict(meta["stats"]),
        schema,
        arrays["dense"],
        arrays["keys"],
        arrays["labels"],
    )


def _truncate_npy(path: Path, rows: int) -> None:
    """Shrink a C-order .npy file in place to its first ``rows`` rows (rewrites the header's shape)."""
    with open(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
        assert not fortran
        new_shape = (rows, *shape[1:])
        header = io.BytesIO()
        d = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": new_shape}
        if version == (1, 0):
            np.lib.format.write_array_header_1_0(header, d)
        else:
            np.lib.format.write_array_header_2_0(header, d)
        if len(header.getvalue()) == offset:  # numpy pads headers so the row count can change in place
            f.seek(0)
            f.write(header.getvalue())
            f.truncate(offset + rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
            return
    data = np.array(np.load(path, mmap_mode="r")[:rows])
    np.save(path, data)


def prepare(
    path: str | os.PathLike[str],
    fmt: str,
    cache_dir: str | os.PathLike[str],
    schema: FeatureSchema,
    max_rows: int = 0,
    progress: bool = True,
) -> Prepared:
    """Parse a data file once into memory-mapped arrays under ``cache_dir`` and return them.

    The cache folder ``cache_dir/<digest>/`` is named by a digest of the source (resolved path, size,
    mtime), the format, the schema and ``max_rows``; it holds ``dense.npy``, ``keys.npy``,
    ``labels.npy`` and ``meta.json``. A complete matching cache is reused; a changed source gets a
    new folder; an incomplete or damaged one is rebuilt. Building writes to a temporary folder that
    is renamed into place only when complete, so a crash never leaves a cache that looks valid.

    Args:
        path: plain or gzip file in format ``fmt``.
        fmt: one of :data:`FORMATS`.
        cache_dir: folder for caches (created if needed).
        schema: the format's schema (its hash seed decides the keys).
        max_rows: keep only the first this many good rows (0: all).
        progress: show a tqdm progress bar (rows/s) while parsing.
    """
    spec = _spec(fmt)
    _check_schema(spec, schema)
    if max_rows < 0:
        raise ValueError(f"max_rows must be >= 0 (0: all rows), got {max_rows}")
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"data file not found: {source}")
    identity = _identity(source, spec.name, schema, max_rows)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    cache_root = Path(cache_dir)
    target = cache_root / digest
    cached = _load_cached(target, identity, schema)
    if cached is not None:
        log.info("using parsed cache %s for %s (%d rows)", target, source, cached.rows)
        return cached
    if target.exists():
        log.warning("rebuilding incomplete or stale cache %s", target)
        shutil.rmtree(target)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=cache_root))
    try:
        stats = _build(source, spec, schema, tmp, max_rows, progress)
        if _identity(source, spec.name, schema, max_rows) != identity:
            raise ValueError(f"{source} changed while it was being read; run again")
        meta = {"identity": identity, "rows": stats.rows, "stats": stats.to_dict()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same cache first: use theirs
            if _load_cached(target, identity, schema) is None:
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("parsed %s: %s -> %s", source, stats.to_dict(), target)
    prepared = _load_cached(target, identity, schema)
    assert prepared is not None
    return prepared


def _build(source: Path, spec: _Format, schema: FeatureSchema, out: Path, max_rows: int, progress: bool) -> ReadStats:
    """Parse ``source`` into preallocated .npy memmaps in ``out`` (trimmed to the good rows)."""
    from tqdm import tqdm

    log.info("counting lines of %s", source)
    capacity = count_lines(source) - (spec.header is not None)
    capacity = max(min(capacity, max_rows) if max_rows else capacity, 0)
    open_memmap = np.lib.format.open_memmap
    dense = open_memmap(out / "dense.npy", mode="w+", dtype=np.float32, shape=(capacity, schema.num_dense))
    keys = open_memmap(out / "keys.npy", mode="w+", dtype=np.int64, shape=(capacity, schema.num_fields))
    labels = open_memmap(out / "labels.npy", mode="w+", dtype=np.float32, shape=(capacity,))
    stats = ReadStats()
    row = 0
    with tqdm(total=capacity, unit="rows", unit_scale=True, desc=f"parsing {source.name}", disable=not progress) as bar:
        # capacity bounds the read even if the file grew after counting (then the identity check fails)
        for chunk in iter_chunks(source, spec.name, schema, stats=stats, max_rows=capacity or 1):
            end = row + len(chunk)
            if end > capacity:
                raise ValueError(f"{source} changed while it was being read; run again")
            dense[row:end], keys[row:end], labels[row:end] = chunk.dense, chunk.keys, chunk.labels
            row = end
            bar.update(min(stats.rows + stats.skipped, capacity) - bar.n)
    for a in (dense, keys, labels):
        a.flush()
    del dense, keys, labels
    if stats.rows == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.reasons.items())) or "the file has no data lines"
        raise ValueError(f"{source}: no valid {spec.name} rows ({reasons})")
    if stats.rows < capacity:
        for name in ("dense", "keys", "labels"):
            _truncate_npy(out / f"{name}.npy", stats.rows)
    return stats


# ----------------------------------------------------------------------------------------------
# Reading the cache


def _window_rows(batch_size: int) -> int:
    """Rows read from the memmaps at once: a whole number of batches, about 128k rows."""
    return batch_size * max(1, (1 << 17) // batch_size)


def iter_batches(
    prepared: Prepared, indices: np.ndarray, batch_size: int, shuffle: bool, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches (dense (B, n_dense) float32, keys (B, F) int64, labels (B,) float32) of the given rows.

    Every index is read exactly once per call; the last batch may be smaller. With ``shuffle`` the
    indices are permuted by ``seed`` (pass epoch-dependent seeds for a new order each epoch). Rows
    are read a window of ~128k at a time in ascending order, so disk reads stay local even for data
    larger than memory, then put back in the permuted order: batches are exactly the permutation's.
    """
    import torch

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be a 1-D integer array, got shape {indices.shape} dtype {indices.dtype}")
    if len(indices) and (indices.min() < 0 or indices.max() >= prepared.rows):
        raise ValueError(f"indices must be in [0, {prepared.rows}), got [{indices.min()}, {indices.max()}]")
    order = np.random.default_rng(seed).permutation(indices) if shuffle else indices
    window = _window_rows(batch_size)
    for start in range(0, len(order), window):
        idx = order[start : start + window]
        ascending = np.argsort(idx, kind="stable")
        rows = idx[ascending]
        parts = []
        for a in (prepared.dense, prepared.keys, prepared.labels):
            out = np.empty((len(idx), *a.shape[1:]), a.dtype)
            out[ascending] = a[rows]  # read ascending, place in the permuted order
            parts.append(out)
        dense, keys, labels = parts
        for b in range(0, len(idx), batch_size):
            yield (
                torch.from_numpy(dense[b : b + batch_size]),
                torch.from_numpy(keys[b : b + batch_size]),
                torch.from_numpy(labels[b : b + batch_size]),
            )


def _merge_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Merge (keys, counts) pairs into sorted unique keys with summed counts."""
    keys = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    if len(keys) == 0:
        return keys.astype(np.int64), counts.astype(np.int64)
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[starts], np.add.reduceat(counts, starts)


def distinct_tokens(
    prepared: Prepared, indices: np.ndarray, chunk_rows: int = 1 << 18
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct token keys over all fields of the given rows, ascending, with their occurrence counts.

    Works ``chunk_rows`` rows at a time (np.unique per field, then a merge), so memory is bounded by
    the number of distinct tokens, not the number of rows. Returns (keys int64, counts int64).
    """
    indices = np.sort(np.asarray(indices, dtype=np.int64))  # ascending reads stay local on disk
    merged: tuple[np.ndarray, np.ndarray] = (np.empty(0, np.int64), np.empty(0, np.int64))
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    pending_size = 0
    for start in range(0, len(indices), chunk_rows):
        keys = prepared.keys[indices[start : start + chunk_rows]]  # (n, F)
        for f in range(keys.shape[1]):
            u, c = np.unique(keys[:, f], return_counts=True)
            pending.append((u, c.astype(np.int64)))
            pending_size += len(u)
        # Merge when the pending parts outgrow the merged set: each key is re-sorted O(log) times.
        if pending_size >= max(len(merged[0]), 1 << 20):
            merged = _merge_counts([merged, *pending])
            pending, pending_size = [], 0
    if pending:
        merged = _merge_counts([merged, *pending])
    return merged
