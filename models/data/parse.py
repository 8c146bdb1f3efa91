"""A block of clean lines -> model-ready columns, in one compiled pass (Numba; it runs without the GIL).

Per block of :func:`models.data.lines.text_blocks` (valid UTF-8, LF line ends, no NUL byte, no
overlong line), :func:`_scan` walks the bytes once and writes the columns straight into NumPy arrays:

- a line with the wrong number of separators is counted and dropped; a blank line is counted;
- the label must be exactly ``0`` or ``1``;
- a dense value that is an integer of at most 15 digits (optionally ``-``; Criteo's are) becomes its
  float64 (exact: below 2**53) as it is read; empty is missing (NaN). A row with any other dense text
  is marked, and its dense values are then converted by Python's ``float()`` of the bytes, so values
  and skip reasons are exactly those of ``float()``: ``2.5``, ``1e3``, ``+5``, `` 12``, ``1_000`` are
  numbers, ``nan``, ``inf`` and ``1e400`` are not finite, ``0x10`` is no number;
- a categorical value (and Avazu's ``hour``) of at most 8 bytes is packed into one ``uint64`` as it is
  read (its bytes little-endian, zero-padded: ``models.schema.PackedKeys``' packing, the key
  cache's input; ``""``, missing, is 0). A column that holds a longer value in a block is cut out of
  that block's lines in Python and factorised (:class:`Column`).

Everything else (ids, the Avazu hour's date check, the rare rows above) is Python over the block's
distinct values or marked rows only. Measured against pyarrow's CSV reader on one 8 MiB block of
synthetic Criteo lines: 0.34 us a row against 0.67-0.73 (docs/DATA.md).
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass

import numpy as np
from models.jit import inline, kernel

from models.data.formats import BLANK_LINE, DENSE_VALUE, FIELD_COUNT, HOUR, LABEL, Format, ReadStats
from models.schema import _texts

# Column roles in _scan
_SKIP, _LABEL, _DENSE, _PACKED = 0, 1, 2, 3
_BAD_LABEL = 2  # label code of a line whose label is neither "0" nor "1"
_MAX_DIGITS = 15  # integers of at most 15 digits are exact in float64; longer ones go through float()


@dataclass
class Column:
    """A factorised categorical column: value of row i = values[codes[i]] ("" = missing)."""

    codes: np.ndarray  # integer (n,)
    values: list[str]


@dataclass
class Block:
    """The rows of a block of lines with the right field count, good or bad, and which of them are good.

    Columns hold every parsed row; ``kept`` selects the good ones (what the readers return). A
    categorical column is a ``uint64`` array of packed values (:class:`models.schema.PackedKeys`'
    packing) or, for a column with a value longer than 8 bytes and Avazu's derived ``hour_of_day``
    and ``weekday``, a :class:`Column`.
    """

    labels: np.ndarray  # float32 (parsed,)
    dense: np.ndarray  # float64 (parsed, n_dense), NaN = missing
    categorical: list[np.ndarray | Column]  # F columns in schema order
    ids: list[str] | None
    line_ends: np.ndarray  # int64 (parsed,): byte offset just past each parsed row's newline
    kept: np.ndarray  # int64 (n,): index among the parsed rows of each good row

    @property
    def parsed_rows(self) -> int:
        return len(self.labels)

    @property
    def all_good(self) -> bool:
        return len(self.kept) == len(self.labels)

    def __len__(self) -> int:
        return len(self.kept)


@kernel
def _count_lines(buf):  # type: ignore[no-untyped-def]
    """Newlines in ``buf`` (bytes.count would hold the GIL that the other parser threads need)."""
    lines = 0
    for b in buf:
        lines += b == 10
    return lines


@inline
def _has_byte(w, b):  # type: ignore[no-untyped-def]
    """Whether a byte of the word ``w`` equals ``b`` (the has-zero-byte test of w XOR b repeated)."""
    x = w ^ (np.uint64(b) * np.uint64(0x0101010101010101))
    return ((x - np.uint64(0x0101010101010101)) & ~x & np.uint64(0x8080808080808080)) != 0


@kernel
def _scan(buf, sep, roles, slots, line_starts, line_ends, labels, odd, dense, packed, wide):  # type: ignore[no-untyped-def]
    """One pass over ``buf`` (LF-terminated lines); returns (parsed rows, blank lines, lines of a wrong field count).

    Row r's outputs go to index r of each array (sized by the caller for every kept row plus one); a
    line with a wrong field count is counted and its row index is reused. ``roles[c]``/``slots[c]``: what column c is
    and its index among the dense or packed columns. ``odd[r]``: a dense value of row r is neither
    empty nor a short integer (its values are then redone by the caller). ``wide[j]``: packed column j
    held a value longer than 8 bytes (the column is then redone by the caller).
    """
    ncols = roles.shape[0]
    n = buf.shape[0]
    row = 0
    blank = 0
    bad = 0
    pos = 0
    while pos < n:
        if buf[pos] == 10:
            blank += 1
            pos += 1
            continue
        p = pos
        ok = True
        is_odd = False
        for c in range(ncols):
            role = roles[c]
            j = slots[c]
            s = p
            if role == _PACKED:  # the first 8 bytes, little-endian
                if p + 9 <= n:  # the common values in one word: 8 bytes (Criteo's hex ids) or empty
                    w = np.uint64(0)
                    for k in range(8):
                        w |= np.uint64(buf[p + k]) << np.uint64(8 * k)
                    e = buf[p + 8]
                    if (e == sep or e == 10) and not (_has_byte(w, sep) or _has_byte(w, 10)):
                        packed[j, row] = w
                        p += 8
                        if c < ncols - 1:
                            if e == 10:  # too few fields
                                ok = False
                                break
                            p += 1
                        continue
                w = np.uint64(0)
                shift = np.uint64(0)
                while True:
                    b = buf[p]
                    if b == sep or b == 10:
                        break
                    if p - s < 8:
                        w |= np.uint64(b) << shift
                        shift += np.uint64(8)
                    p += 1
                if p - s > 8:
                    wide[j] = True
                packed[j, row] = w
            elif role == _DENSE:  # [-]digits
                neg = buf[p] == 45
                if neg:
                    p += 1
                q = p
                v = 0
                while True:
                    d = np.uint8(buf[p] - 48)  # wraps below "0": one compare for both ends
                    if d > 9:
                        break
                    v = v * 10 + d
                    p += 1
                b = buf[p]
                if (b == sep or b == 10) and p - q <= _MAX_DIGITS and (p > q or p == s):
                    if p == s:
                        dense[row, j] = np.nan  # empty: missing
                    else:
                        f = float(v)
                        dense[row, j] = -f if neg else f  # "-0" is -0.0, as float() gives
                else:
                    is_odd = True
                    dense[row, j] = np.nan
                    while buf[p] != sep and buf[p] != 10:
                        p += 1
            else:
                while True:
                    b = buf[p]
                    if b == sep or b == 10:
                        break
                    p += 1
                if role == _LABEL:
                    if p - s == 1 and (buf[s] == 48 or buf[s] == 49):
                        labels[row] = buf[s] - 48
                    else:
                        labels[row] = _BAD_LABEL
            if c < ncols - 1:
                if buf[p] == 10:  # too few fields
                    ok = False
                    break
                p += 1
        if ok and buf[p] != 10:  # too many fields
            ok = False
        while buf[p] != 10:
            p += 1
        if ok:
            line_starts[row] = pos
            line_ends[row] = p + 1
            odd[row] = is_odd
            row += 1
        else:
            bad += 1
        pos = p + 1
    return row, blank, bad


@dataclass(frozen=True)
class _Layout:
    """A format's columns as _scan takes them (one per format, made once)."""

    sep: int
    roles: np.ndarray
    slots: np.ndarray
    packed_columns: tuple[int, ...]  # file column of each packed slot: categorical columns, then Avazu's hour


_LAYOUTS: dict[str, _Layout] = {}


def _layout(fmt: Format) -> _Layout:
    layout = _LAYOUTS.get(fmt.name)
    if layout is None:
        roles = np.full(fmt.num_columns, _SKIP, np.int8)
        slots = np.zeros(fmt.num_columns, np.int64)
        roles[fmt.label_column] = _LABEL
        for j, c in enumerate(fmt.dense_columns):
            roles[c], slots[c] = _DENSE, j
        packed_columns = (*fmt.categorical_columns, *(() if fmt.hour_column is None else (fmt.hour_column,)))
        for j, c in enumerate(packed_columns):
            roles[c], slots[c] = _PACKED, j
        layout = _LAYOUTS[fmt.name] = _Layout(ord(fmt.sep), roles, slots, packed_columns)
    return layout


def _fields(data: bytes, fmt: Format, starts: np.ndarray, ends: np.ndarray, column: int) -> list[bytes]:
    """The bytes of one column of the given lines (all of the right field count)."""
    sep = fmt.sep.encode()
    return [data[s : e - 1].split(sep)[column] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]


def _redo_dense(data: bytes, fmt: Format, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """Convert the dense values of ``rows`` (their lines: ``starts[rows]``, ``ends[rows]``) with ``float()``, into
    ``dense``; returns the rows among them that hold a value that is no finite number."""
    sep = fmt.sep.encode()
    bad = []
    for r in rows.tolist():
        fields = data[starts[r] : ends[r] - 1].split(sep)
        for j, c in enumerate(fmt.dense_columns):
            text = fields[c]
            try:
                v = float(text) if text else math.nan
            except ValueError:
                v = math.inf
            if text and not math.isfinite(v):
                bad.append(r)
                v = math.nan
            dense[r, j] = v
    return np.unique(np.array(bad, np.int64))


def _text_column(values: list[bytes]) -> Column:
    index: dict[bytes, int] = {}
    codes = np.fromiter((index.setdefault(v, len(index)) for v in values), np.int64, len(values))
    return Column(codes, [v.decode("utf-8") for v in index])


def factorize(column: np.ndarray | Column) -> Column:
    """A packed column -> codes into its distinct values (missing as "")."""
    if isinstance(column, Column):
        return column
    distinct, codes = np.unique(column, return_inverse=True)
    return Column(codes.reshape(-1), _texts(distinct))


_HOUR_CACHE: dict[str, tuple[str, str] | None] = {}
_UNSEEN = ("", "")  # not in _HOUR_CACHE (compared by identity)


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
        parsed = _HOUR_CACHE.get(s, _UNSEEN)  # one lookup: another worker may clear the cache between two
        if parsed is _UNSEEN:
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


def parse_block(data: bytes, fmt: Format, stats: ReadStats, want_ids: bool = False) -> Block:
    """Parse a clean block of LF-terminated lines; malformed lines are skipped and counted in ``stats``."""
    if data and data[-1] != 10:  # the kernel finds each line's end by its LF: without one it would read past the data
        raise ValueError(f"parse_block takes LF-terminated lines; the data ends in {data[-20:]!r}")
    layout = _layout(fmt)
    buf = np.frombuffer(data, np.uint8)
    # Rows: at most one per line, and a kept row takes at least num_columns bytes (its separators and LF), so a
    # block of blank or junk lines does not reserve a row per line; + 1 for a bad last line's writes, which land at
    # the index after the kept rows before the line is found bad.
    cap = min(_count_lines(buf), len(data) // fmt.num_columns + 1)
    line_starts, line_ends = np.empty(cap, np.int64), np.empty(cap, np.int64)
    codes, odd = np.empty(cap, np.int8), np.empty(cap, np.bool_)
    dense = np.empty((cap, len(fmt.dense_columns)), np.float64)
    packed = np.empty((len(layout.packed_columns), cap), np.uint64)  # column-major: each column contiguous
    wide = np.zeros(len(layout.packed_columns), np.bool_)
    n, blank, wrong = _scan(
        buf, layout.sep, layout.roles, layout.slots,
        line_starts, line_ends, codes, odd, dense, packed, wide,
    )  # fmt: skip
    stats.skip(BLANK_LINE, blank)
    stats.skip(FIELD_COUNT, wrong)
    line_starts, line_ends, codes, odd, dense = line_starts[:n], line_ends[:n], codes[:n], odd[:n], dense[:n]

    bad = codes == _BAD_LABEL
    stats.skip(LABEL, int(np.count_nonzero(bad)))
    labels = (codes == 1).astype(np.float32)

    if odd.any():  # rare: rows with dense text that is not a short integer, through float()
        bad_dense = np.zeros(n, bool)
        bad_dense[_redo_dense(data, fmt, np.flatnonzero(odd), line_starts, line_ends, dense)] = True
        bad_dense &= ~bad
        stats.skip(DENSE_VALUE, int(np.count_nonzero(bad_dense)))
        bad |= bad_dense

    columns: list[np.ndarray | Column] = [
        _text_column(_fields(data, fmt, line_starts, line_ends, c)) if wide[j] else packed[j, :n]
        for j, c in enumerate(layout.packed_columns)
    ]
    categorical = columns[: len(fmt.categorical_columns)]
    if fmt.hour_column is not None:
        bad_hour, hour_of_day, weekday = _hour_fields(factorize(columns[-1]))
        bad_hour &= ~bad
        stats.skip(HOUR, int(np.count_nonzero(bad_hour)))
        bad |= bad_hour
        categorical = [hour_of_day, weekday, *categorical]
    ids = None
    if want_ids and fmt.id_column is not None:
        ids = [v.decode("utf-8") for v in _fields(data, fmt, line_starts, line_ends, fmt.id_column)]

    kept = np.flatnonzero(~bad)
    stats.rows += len(kept)
    return Block(labels, dense, categorical, ids, line_ends, kept)


def line_end(block: Block, row: int) -> int:
    """Byte offset, in the data ``block`` was parsed from, just past the line of good row ``row``."""
    return int(block.line_ends[block.kept[row]])
