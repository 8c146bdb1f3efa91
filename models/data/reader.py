"""The readers of Criteo and Avazu files: raw rows, or model-ready chunks, in constant memory.

    from models.data.reader import ReadStats, iter_chunks, iter_raw, schema_for_format

Blocks of lines are read and cleaned in the calling thread (:mod:`models.data.lines`: gzip, BOM, CRLF,
bad bytes, overlong lines) and parsed on a pool of worker threads (:mod:`models.data.parse`, one compiled
pass per block, which runs without the GIL); for :func:`iter_chunks` the workers also hash the values and
transform the dense features. At most ``workers + 1`` blocks are in flight, and results come back in
file order, so memory stays constant however large the file and the output does not depend on the
number of workers. A malformed line (wrong field count, bad label, non-numeric dense value, bad hour,
undecodable bytes, blank, or absurdly long) is skipped and counted by reason in :class:`ReadStats`; it
never stops the read.

The serving side imports this module (``lma features load``, load-test payloads): it pulls in neither
the parsed-array cache nor torch.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from models.data.formats import FORMATS, Format, ReadStats, check_schema, schema_for_format, spec
from models.data.keys import KeyCache
from models.data.lines import text_blocks
from models.data.parse import Block, factorize, line_end, parse_block
from models.schema import FeatureSchema, transform_dense

__all__ = ["FORMATS", "Chunk", "RawRow", "ReadStats", "iter_chunks", "iter_raw", "schema_for_format"]

MAX_WORKERS = 8


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


def default_workers() -> int:
    """Parser threads: one per core this process may run on (at most MAX_WORKERS)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_WORKERS))


def _work(
    data: bytes, fmt: Format, want_ids: bool, finish: Callable[[Block], Any] | None
) -> tuple[Block, ReadStats, Any]:
    stats = ReadStats()
    block = parse_block(data, fmt, stats, want_ids)
    return block, stats, finish(block) if finish is not None else None


def _blocks(
    path: str | os.PathLike[str],
    fmt: Format,
    stats: ReadStats,
    max_rows: int = 0,
    want_ids: bool = False,
    finish: Callable[[Block], Any] | None = None,
    workers: int = 0,
) -> Iterator[tuple[Block, Any]]:
    """(parsed block, ``finish(block)``) in file order; with max_rows > 0, exactly the first max_rows good rows.

    Stats count every line up to the last row returned, except that ``decode`` and ``line_too_long``
    lines are counted for the whole block the last row is in.
    """
    if max_rows < 0:
        raise ValueError(f"max_rows must be >= 0 (0: all rows), got {max_rows}")
    workers = workers or default_workers()
    remaining = max_rows or -1
    blocks = text_blocks(Path(path), fmt)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="lma-parse")
    pending: deque[tuple[bytes, ReadStats, Future[tuple[Block, ReadStats, Any]] | None]] = deque()
    try:
        exhausted = False
        while True:
            while not exhausted and len(pending) <= workers:  # keep the workers busy, read ahead by one
                item = next(blocks, None)
                if item is None:
                    exhausted = True
                else:
                    data, line_stats = item
                    future = pool.submit(_work, data, fmt, want_ids, finish) if data else None
                    pending.append((data, line_stats, future))
            if not pending:
                return
            data, line_stats, future = pending.popleft()
            stats.add(line_stats)
            if future is None:
                continue
            block, block_stats, out = future.result()
            if 0 <= remaining < len(block):  # the limit falls inside this block: parse only up to its last row
                block, block_stats, out = _work(data[: line_end(block, remaining - 1)], fmt, want_ids, finish)
            stats.add(block_stats)
            if len(block):
                yield block, out
            if remaining >= 0:
                remaining -= len(block)
                if remaining == 0:
                    return
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        blocks.close()


def iter_raw(
    path: str | os.PathLike[str], fmt: str, stats: ReadStats | None = None, workers: int = 0
) -> Iterator[RawRow]:
    """Rows of a data file as raw values (no transform, no hashing), malformed lines skipped and counted.

    Args:
        path: plain or gzip file in format ``fmt``.
        fmt: one of :data:`FORMATS`.
        stats: collects rows kept and lines skipped (by reason), if given.
        workers: parser threads (0: one per core).
    """
    layout = spec(fmt)
    stats = stats if stats is not None else ReadStats()
    for block, _ in _blocks(path, layout, stats, want_ids=True, workers=workers):
        kept = block.kept
        dense = block.dense[kept]
        dense_obj = dense.astype(object)
        dense_obj[np.isnan(dense)] = None
        dense_rows = dense_obj.tolist()
        labels = block.labels[kept].astype(np.int64).tolist()
        columns = []
        for column in block.categorical:
            col = factorize(column)
            columns.append([col.values[i] or None for i in col.codes[kept].tolist()])
        ids = [block.ids[i] for i in kept.tolist()] if block.ids is not None else repeat(None)
        for label, dense, cats, row_id in zip(labels, dense_rows, zip(*columns, strict=True), ids, strict=False):
            yield RawRow(label, dense, list(cats), row_id)


class _ThreadKeyCaches(threading.local):
    """One :class:`KeyCache` per thread that asks (the reader's workers, and the caller for a cut block)."""

    def __init__(self, schema: FeatureSchema) -> None:
        self.cache = KeyCache(schema)


def _chunk_of(block: Block, caches: _ThreadKeyCaches) -> Chunk:
    """Hash the categorical values (through this thread's key cache) and transform the dense values."""
    cache = caches.cache
    keys = np.empty((block.parsed_rows, cache.schema.num_fields), np.int64)  # (parsed, F)
    for f, column in enumerate(block.categorical):
        cache.keys(f, column, keys[:, f])
    dense, labels = block.dense, block.labels
    if not block.all_good:
        keys, dense, labels = keys[block.kept], dense[block.kept], labels[block.kept]
    return Chunk(transform_dense(dense), keys, labels)


def _concat(chunks: list[Chunk]) -> Chunk:
    if len(chunks) == 1:
        return chunks[0]
    return Chunk(*(np.concatenate([getattr(c, a) for c in chunks]) for a in ("dense", "keys", "labels")))


def iter_chunks(
    path: str | os.PathLike[str],
    fmt: str,
    schema: FeatureSchema,
    chunk_rows: int | None = 65536,
    stats: ReadStats | None = None,
    max_rows: int = 0,
    workers: int = 0,
) -> Iterator[Chunk]:
    """Model-ready chunks of a data file: exactly ``chunk_rows`` rows each, the last one fewer.

    Args:
        path: plain or gzip file in format ``fmt``.
        fmt: one of :data:`FORMATS`.
        schema: the format's schema (:func:`schema_for_format`); its seed decides the keys.
        chunk_rows: rows per chunk; None: the parsed blocks as they come (sizes vary; no copy).
        stats: collects rows kept and lines skipped (by reason), if given.
        max_rows: stop after this many good rows (0: read everything).
        workers: parser threads (0: one per core).
    """
    layout = spec(fmt)
    check_schema(layout, schema)
    if chunk_rows is not None and chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    stats = stats if stats is not None else ReadStats()
    pending: list[Chunk] = []
    have = 0
    finish = functools.partial(_chunk_of, caches=_ThreadKeyCaches(schema))
    for _, chunk in _blocks(path, layout, stats, max_rows, finish=finish, workers=workers):
        if chunk_rows is None:
            yield chunk
            continue
        pending.append(chunk)
        have += len(chunk)
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
