"""A block of clean lines -> columns, with pyarrow's CSV reader (C++; it releases the GIL while it parses).

Per block of :func:`models.data.lines.text_blocks` (valid UTF-8, LF line ends, no overlong line):

- ``pyarrow.csv.read_csv`` without quoting, every column typed up front: the label as bytes, dense
  columns as float64, categorical columns and ids as strings ("" = missing), or, for Criteo (whose
  values are 8 hex digits), as fixed-size 8-byte values, which are the packed keys of
  :mod:`models.data.keys` as they come. A column found with a value of another length is read as
  strings from then on (:class:`Plan`). Rows with a wrong field count go to an invalid-row handler,
  which counts them; Arrow skips blank lines, counted here from the block's newlines.
- Fast path for dense values: Arrow parses them as float64 while it reads. A block whose dense text
  is not all numbers makes Arrow refuse the whole block; it is then read again with dense columns as
  text and converted column by column: Arrow's cast where the whole column is numbers, else Python's
  ``float()`` per value. Arrow accepts a subset of what ``float()`` accepts and gives the same value
  where both do (``tests/models/test_data.py`` pins the edge cases), so values and skip reasons are
  those of ``float()``: ``2.5`` and ``1e3`` are numbers, ``nan``, ``inf`` and ``1e400`` are not finite.
- Categorical columns are dictionary-encoded in Arrow (one dictionary per block), so only each
  block's distinct values become Python strings and go through the schema's hash.
"""

from __future__ import annotations

import datetime
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from models.data.formats import BLANK_LINE, DENSE_VALUE, FIELD_COUNT, HOUR, LABEL, Format, ReadStats
from models.data.lines import MAX_LINE_BYTES

ARROW_BLOCK_BYTES = 1 << 21  # Arrow parses a block in pieces of this size (measured: 8 MiB pieces ran 2x slower)


@dataclass
class Column:
    """A factorised categorical column: value of row i = values[codes[i]] ("" = missing)."""

    codes: np.ndarray  # integer (n,)
    values: list[str]


@dataclass
class Block:
    """The parsed rows of a block of lines (right field count), good or bad, and which of them are good.

    Columns hold every parsed row; ``kept`` selects the good ones (what the readers return). A
    categorical column is Arrow's string column as read, or (Avazu's derived ``hour_of_day`` and
    ``weekday``) a :class:`Column`.
    """

    labels: np.ndarray  # float32 (parsed,)
    dense: np.ndarray  # float64 (parsed, n_dense), NaN = missing
    categorical: list[pa.ChunkedArray | Column]  # F columns in schema order
    ids: list[str] | None
    invalid_lines: np.ndarray  # int64: Arrow's numbers (1-based, among non-blank lines) of rejected lines
    kept: np.ndarray  # int64 (n,): index among the parsed rows of each good row

    @property
    def parsed_rows(self) -> int:
        return len(self.labels)

    @property
    def all_good(self) -> bool:
        return len(self.kept) == len(self.labels)

    def __len__(self) -> int:
        return len(self.kept)


@dataclass
class Plan:
    """How one read types its columns; learnt as blocks come (one per read, shared by its workers).

    ``wide_columns``: categorical columns of an eight-byte format that held a value of another length,
    read as strings from then on (a set only grows; a stale read by another worker costs one retry).
    """

    wide_columns: set[int] = field(default_factory=set)


_FAILED_COLUMN = re.compile(r"^In CSV column #(\d+):")


def _read(
    data: bytes, fmt: Format, stats: ReadStats, dense_as_text: bool, fixed: frozenset[int]
) -> tuple[pa.Table, list[int]]:
    invalid: list[int] = []

    def on_invalid(row: pa_csv.InvalidRow) -> str:  # called from Arrow with the GIL held: rare rows only
        invalid.append(row.number if row.number is not None else -1)
        return "skip"

    types: dict[str, pa.DataType] = {str(k): pa.string() for k in range(fmt.num_columns)}
    types[str(fmt.label_column)] = pa.binary()
    for k in fmt.dense_columns:
        types[str(k)] = pa.binary() if dense_as_text else pa.float64()
    for k in fixed:
        types[str(k)] = pa.binary(8)
    table = pa_csv.read_csv(
        pa.py_buffer(data),
        read_options=pa_csv.ReadOptions(
            column_names=list(types), use_threads=False, block_size=max(ARROW_BLOCK_BYTES, 2 * MAX_LINE_BYTES + 2)
        ),
        parse_options=pa_csv.ParseOptions(
            delimiter=fmt.sep, quote_char=False, double_quote=False, escape_char=False,
            newlines_in_values=False, ignore_empty_lines=True, invalid_row_handler=on_invalid,
        ),
        convert_options=pa_csv.ConvertOptions(
            column_types=types, null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=True,
            check_utf8=False,  # lines.clean_block dropped every line that is not UTF-8
        ),
    )  # fmt: skip
    stats.skip(FIELD_COUNT, len(invalid))
    return table, invalid


def _dense_from_text(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A dense column read as bytes -> (float64 values, NaN = missing; mask of values that are no finite number)."""
    try:
        numbers = pc.cast(column, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # some value is no number Arrow knows
        values = np.full(len(column), np.nan)
        bad = np.zeros(len(column), bool)
        for i, text in enumerate(column.to_pylist()):
            if text is None:
                continue
            try:
                v = float(text)
            except ValueError:
                v = math.nan
            if math.isfinite(v):
                values[i] = v
            else:
                bad[i] = True
        return values, bad
    return _dense_from_numbers(numbers)


def _dense_from_numbers(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A float64 column -> (values, NaN = missing; mask of non-finite values such as ``nan``, ``inf``, ``1e400``)."""
    values = np.asarray(column.to_numpy(), np.float64)  # nulls (missing) become NaN
    if np.count_nonzero(~np.isfinite(values)) == column.null_count:  # the common case: no NaN but the missing
        return values, np.zeros(len(values), bool)
    bad = pc.fill_null(pc.invert(pc.is_finite(column)), False).to_numpy(zero_copy_only=False)
    return values, np.asarray(bad, bool)


def factorize(column: pa.ChunkedArray | Column) -> Column:
    """A string column -> codes into its distinct values, missing (null) as the extra value ""."""
    if isinstance(column, Column):
        return column
    encoded = pc.dictionary_encode(column)  # the chunks share one dictionary
    values = encoded.chunks[0].dictionary.to_pylist() if encoded.num_chunks else []
    if pa.types.is_fixed_size_binary(column.type):
        values = [v.decode("utf-8") for v in values]
    indices = pa.chunked_array([c.indices for c in encoded.chunks], pa.int32())
    codes = pc.fill_null(indices, len(values)).to_numpy()
    return Column(codes, [*values, ""])


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


def _hour_fields(hour: Column) -> tuple[np.ndarray, Column, Column]:
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
        Column(hour_code[hour.codes], [f"{h:02d}" for h in range(24)]),
        Column(weekday_code[hour.codes], [str(d) for d in range(7)]),
    )


def _count_blank_lines(data: bytes, non_blank: int, stats: ReadStats) -> None:
    lines = int(np.count_nonzero(np.frombuffer(data, np.uint8) == 10))  # one "\n" per line; NumPy drops the GIL
    stats.skip(BLANK_LINE, lines - non_blank)


def parse_block(data: bytes, fmt: Format, stats: ReadStats, want_ids: bool = False, plan: Plan | None = None) -> Block:
    """Parse a clean block of LF-terminated lines; malformed lines are skipped and counted in ``stats``."""
    plan = plan if plan is not None else Plan()
    dense_as_text = False
    while True:  # the fast path first; each failure widens one column's type, so this ends
        scratch = ReadStats()  # count only the read that stands
        fixed = frozenset(fmt.categorical_columns if fmt.eight_byte_values else ()) - plan.wide_columns
        try:
            table, invalid = _read(data, fmt, scratch, dense_as_text, fixed)
            break
        except pa.ArrowInvalid as e:
            match = _FAILED_COLUMN.match(str(e))
            column = int(match.group(1)) if match else None
            if column in fixed:
                plan.wide_columns.add(column)  # a value of another length: strings, for the rest of the read
            elif not dense_as_text and (column is None or column in fmt.dense_columns):
                dense_as_text = True  # a dense value Arrow could not read as a number: this block as text
            elif fixed:
                plan.wide_columns.update(fixed)
            else:
                raise ValueError(f"cannot parse a block of {fmt.name} lines: {e}") from e
    parse = _dense_from_text if dense_as_text else _dense_from_numbers
    dense_parts = [parse(table.column(k)) for k in fmt.dense_columns]
    stats.add(scratch)
    n = table.num_rows
    _count_blank_lines(data, n + len(invalid), stats)

    label = table.column(fmt.label_column)
    is_one = pc.fill_null(pc.equal(label, pa.scalar(b"1", pa.binary())), False).to_numpy(zero_copy_only=False)
    is_zero = pc.fill_null(pc.equal(label, pa.scalar(b"0", pa.binary())), False).to_numpy(zero_copy_only=False)
    bad = ~(is_one | is_zero)
    stats.skip(LABEL, int(bad.sum()))
    labels = is_one.astype(np.float32)

    if dense_parts:
        dense = np.stack([v for v, _ in dense_parts], axis=1)  # (n, n_dense)
        bad_dense = np.stack([b for _, b in dense_parts], axis=1).any(1) & ~bad
    else:
        dense, bad_dense = np.zeros((n, 0)), np.zeros(n, bool)
    stats.skip(DENSE_VALUE, int(bad_dense.sum()))
    bad |= bad_dense

    categorical: list[pa.ChunkedArray | Column] = [table.column(k) for k in fmt.categorical_columns]
    if fmt.hour_column is not None:
        bad_hour, hour_of_day, weekday = _hour_fields(factorize(table.column(fmt.hour_column)))
        bad_hour &= ~bad
        stats.skip(HOUR, int(bad_hour.sum()))
        bad |= bad_hour
        categorical = [hour_of_day, weekday, *categorical]
    ids = None
    if want_ids and fmt.id_column is not None:
        ids = [i if i is not None else "" for i in table.column(fmt.id_column).to_pylist()]

    kept = np.flatnonzero(~bad)
    stats.rows += len(kept)
    return Block(labels, dense, categorical, ids, np.array(sorted(invalid), np.int64), kept)


def line_end(data: bytes, block: Block, row: int) -> int:
    """Byte offset in ``data`` just past the line of good row ``row`` of ``block`` (parsed from ``data``)."""
    buf = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(buf == 10)
    starts = np.concatenate([[0], ends[:-1] + 1])
    non_blank = np.flatnonzero(ends > starts)  # line index of each non-blank line
    parsed = np.ones(len(non_blank), bool)
    parsed[block.invalid_lines - 1] = False  # Arrow numbers non-blank lines from 1
    parsed_lines = non_blank[parsed]
    assert len(parsed_lines) == block.parsed_rows, (len(parsed_lines), block.parsed_rows)
    return int(ends[parsed_lines[block.kept[row]]]) + 1
