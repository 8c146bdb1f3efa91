"""Bytes -> blocks of clean text lines, in constant memory however large the file.

Files are read as bytes in blocks of :data:`READ_BYTES` (gzip detected by its magic bytes, not the
suffix), cut at the last newline of each block. A block is then made safe for the column parser:
CRLF becomes LF, a last line without newline gets one, and lines that are not text (invalid UTF-8, a
NUL byte) or longer than :data:`MAX_LINE_BYTES` are dropped and counted. A line that grows past
MAX_LINE_BYTES across reads is dropped as it streams past, so one broken line can never take the
memory of the whole file. Everything here runs at memory speed in the common case (``bytes.isascii``,
``bytes.find``); only a block that holds a bad line is split into lines in Python.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from models.data.formats import DECODE, LINE_TOO_LONG, Format, ReadStats

MAX_LINE_BYTES = 1 << 20  # a longer line is skipped (and never held whole in memory)
READ_BYTES = 1 << 23  # bytes read per block
_GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"


def open_binary(path: Path) -> BinaryIO:
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


def byte_blocks(path: Path) -> Iterator[tuple[bytes, int]]:
    """Blocks of whole lines (each ending in b"\\n", except possibly the file's last), each with the number
    of overlong lines dropped since the previous block (a last ``(b"", n)`` carries any dropped at the end).

    A line that grows past MAX_LINE_BYTES without ending is dropped as it streams past and counted
    (shorter blocks that still hold a too-long line are caught by :func:`clean_block`, which counts
    them the same way).
    """
    dropped = 0
    with open_binary(path) as f:
        tail = b""
        too_long = False  # inside a line already counted as too long
        while True:
            try:
                data = f.read(READ_BYTES)
            except (EOFError, OSError, zlib.error) as e:  # truncated or corrupt gzip stream
                raise ValueError(f"{path}: cannot read compressed data ({e})") from e
            if not data:
                break
            nl = data.rfind(b"\n")
            if nl < 0:  # no line ends in this block
                if not too_long:
                    tail += data
                    if len(tail) > MAX_LINE_BYTES:
                        dropped += 1
                        too_long, tail = True, b""
                continue
            if too_long:  # drop the rest of the long line, up to its newline
                start = data.find(b"\n") + 1
                too_long = False
                head, tail = data[start : nl + 1], data[nl + 1 :]
            else:
                head = b"".join((tail, memoryview(data)[: nl + 1]))  # one copy, not two
                tail = data[nl + 1 :]
            if len(tail) > MAX_LINE_BYTES:
                dropped += 1
                too_long, tail = True, b""
            if head:
                yield head, dropped
                dropped = 0
        if tail and not too_long:
            yield tail, dropped
        elif dropped:
            yield b"", dropped


def _may_hold_long_line(data: bytes) -> bool:
    """False when no line of ``data`` is longer than MAX_LINE_BYTES; True when one may be.

    A line longer than 2S covers a whole aligned window of S bytes, which then holds no newline; with
    S = MAX_LINE_BYTES // 2 a check costs one ``find`` per window (16 for an 8 MiB block).
    """
    if len(data) <= MAX_LINE_BYTES:
        return False
    window = max(1, MAX_LINE_BYTES // 2)
    return any(data.find(b"\n", i, i + window) < 0 for i in range(0, len(data) - window, window))


def _drop_long_lines(data: bytes, stats: ReadStats) -> bytes:
    buf = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(buf == 10)
    starts = np.concatenate([[0], ends[:-1] + 1])
    long = ends - starts > MAX_LINE_BYTES
    if not long.any():
        return data
    stats.skip(LINE_TOO_LONG, int(long.sum()))
    return b"".join(data[s : e + 1] for s, e in zip(starts[~long].tolist(), ends[~long].tolist(), strict=True))


def clean_block(data: bytes, stats: ReadStats) -> bytes:
    """LF-terminated lines of a block, CRLF turned into LF; lines that are not text or too long dropped and counted.

    Not text: invalid UTF-8, a NUL byte (which no CSV/TSV value contains) or a bare CR (one not
    followed by LF: in a Criteo or Avazu file it is a broken line end, and CSV readers take it for one).
    A line both not text and too long counts as ``decode``.
    """
    bare_cr = False
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
        bare_cr = b"\r" in data
    if not data.endswith(b"\n"):  # the file's last line had no newline
        data += b"\n"
    if bare_cr or b"\x00" in data or not (data.isascii() or _is_utf8(data)):
        good = []
        for line in data.split(b"\n")[:-1]:  # rare: find the bad lines one by one
            if b"\x00" in line or b"\r" in line or not _is_utf8(line):
                stats.skip(DECODE)
            else:
                good.append(line + b"\n")
        data = b"".join(good)
    if _may_hold_long_line(data):
        data = _drop_long_lines(data, stats)
    return data


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def check_header(data: bytes, fmt: Format, path: Path) -> bytes:
    """Check the header line at the start of ``data`` and return the rest."""
    assert fmt.header is not None
    end = data.find(b"\n")
    got = [c.strip().lower() for c in data[:end].decode("utf-8", "replace").split(fmt.sep)]
    if got != [c.lower() for c in fmt.header]:
        shown = ",".join(got[:6]) + (",..." if len(got) > 6 else "")
        raise ValueError(
            f"{path}: not a {fmt.name} file: its first line must be the header "
            f"{','.join(fmt.header[:6])},... ({fmt.num_columns} columns), got {shown!r} ({len(got)} columns)"
        )
    return data[end + 1 :]


def text_blocks(path: Path, fmt: Format) -> Generator[tuple[bytes, ReadStats], None, None]:
    """Clean blocks of whole data lines (header checked and dropped), each with the counts of the lines
    dropped on its way (``decode``, ``line_too_long``); a block may be empty when all its lines were."""
    need_header = fmt.header is not None
    first = True
    for data, dropped in byte_blocks(path):
        stats = ReadStats()
        stats.skip(LINE_TOO_LONG, dropped)
        if first and data:  # the first block holds at least the whole first line, so a BOM is whole too
            first = False
            if data.startswith(_UTF8_BOM):
                data = data[len(_UTF8_BOM) :]
        data = clean_block(data, stats) if data else data
        if need_header and data:
            data = check_header(data, fmt, path)
            need_header = False
        yield data, stats
