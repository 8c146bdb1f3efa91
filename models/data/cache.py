"""The parsed-array cache: a data file parsed once into memory-mapped arrays, and its splits.

:func:`prepare` parses a file once (:func:`models.data.reader.iter_chunks`) into ``.npy`` arrays
(transformed dense values, token keys, labels) under a cache folder keyed by the source file and the
schema; training then reads binary arrays (:mod:`models.data.batches`), never text.

Example::

    schema = criteo_schema()
    data = prepare("data/train.txt.gz", "criteo", "data/cache", schema)
    parts = data.split("order", val_fraction=0.1, test_fraction=0.1)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from models.data import reader
from models.data.formats import ReadStats, check_schema, spec
from models.schema import FeatureSchema

log = logging.getLogger(__name__)

# Version of what a cache folder holds (file names, dtypes, layout, meta.json, the parser that filled
# it). A folder written by another version is rebuilt, never read. 2: pyarrow parser, arrays appended
# without a line-counting pass, "cache_version" at the top of meta.json. The compiled parser that replaced
# pyarrow's fills the same arrays (same SHA-256 of every array and the same skip counts on synth_1m.tsv and on
# fuzzed files of the three formats), so version 2 caches stay valid.
CACHE_VERSION = 2
ARRAYS = ("dense", "keys", "labels")
META_FILE = "meta.json"


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
        "source": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "format": fmt,
        "schema": schema.to_dict(),
        "max_rows": max_rows,
    }


def _expected(rows: int, schema: FeatureSchema) -> dict[str, tuple[tuple[int, ...], type]]:
    return {
        "dense": ((rows, schema.num_dense), np.float32),
        "keys": ((rows, schema.num_fields), np.int64),
        "labels": ((rows,), np.float32),
    }


def _load_cached(folder: Path, identity: dict[str, object], schema: FeatureSchema) -> Prepared | None:
    """The cache in ``folder`` if it is complete, of this CACHE_VERSION and built from exactly ``identity``."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
        if meta.get("cache_version") != CACHE_VERSION:
            log.info(
                "cache %s has format version %r, this build reads %d", folder, meta.get("cache_version"), CACHE_VERSION
            )
            return None
        if meta.get("identity") != identity:
            return None
        rows = int(meta["rows"])
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in ARRAYS}
        stats = ReadStats.from_dict(meta["stats"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    for name, (shape, dtype) in _expected(rows, schema).items():
        if arrays[name].shape != shape or arrays[name].dtype != dtype:
            return None
    return Prepared(
        folder, Path(str(identity["source"])), str(identity["format"]), rows, stats, schema,
        arrays["dense"], arrays["keys"], arrays["labels"],
    )  # fmt: skip


def _folder(path: Path, fmt: str, schema: FeatureSchema, max_rows: int, cache_dir: Path) -> tuple[Path, dict]:
    identity = _identity(path, fmt, schema, max_rows)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir / digest, identity


def _check_args(path: str | os.PathLike[str], fmt: str, schema: FeatureSchema, max_rows: int) -> tuple[Path, str]:
    layout = spec(fmt)
    check_schema(layout, schema)
    if max_rows < 0:
        raise ValueError(f"max_rows must be >= 0 (0: all rows), got {max_rows}")
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"data file not found: {source}")
    return source, layout.name


def lookup(
    path: str | os.PathLike[str], fmt: str, cache_dir: str | os.PathLike[str], schema: FeatureSchema, max_rows: int = 0
) -> Prepared | None:
    """The complete, current cache of this file if there is one; None (nothing is parsed) otherwise."""
    source, name = _check_args(path, fmt, schema, max_rows)
    target, identity = _folder(source, name, schema, max_rows, Path(cache_dir))
    return _load_cached(target, identity, schema)


class _NpyAppender:
    """A C-order ``.npy`` file written by appending rows; the header's row count is set on close.

    NumPy pads every header so the first axis can grow to 21 digits in place (GROWTH_AXIS_MAX_DIGITS),
    so the header written for 0 rows has the length of the final one: no second pass, no copy.
    """

    def __init__(self, path: Path, dtype: type, row_shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.row_shape, self.rows = path, np.dtype(dtype), row_shape, 0
        self._file = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._header_len = self._write_header()

    def _write_header(self) -> int:
        header = io.BytesIO()
        d = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.rows, *self.row_shape),
        }
        np.lib.format.write_array_header_1_0(header, d)
        self._file.write(header.getvalue())
        return len(header.getvalue())

    def append(self, rows: np.ndarray) -> None:
        if rows.dtype != self.dtype or rows.shape[1:] != self.row_shape:
            raise ValueError(
                f"{self.path.name}: rows {rows.dtype}{rows.shape} do not match {self.dtype}{self.row_shape}"
            )
        self._file.write(np.ascontiguousarray(rows).data)  # the array's own buffer: no copy
        self.rows += len(rows)

    def close(self) -> None:
        self._file.seek(0)
        if self._write_header() != self._header_len:
            raise RuntimeError(f"{self.path}: the .npy header changed length for {self.rows} rows")
        self._file.close()

    def __enter__(self) -> _NpyAppender:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self._file.close()


def prepare(
    path: str | os.PathLike[str],
    fmt: str,
    cache_dir: str | os.PathLike[str],
    schema: FeatureSchema,
    max_rows: int = 0,
    progress: bool = True,
    workers: int = 0,
) -> Prepared:
    """Parse a data file once into memory-mapped arrays under ``cache_dir`` and return them.

    The cache folder ``cache_dir/<digest>/`` is named by a digest of the source (resolved path, size,
    mtime), the format, the schema and ``max_rows``; it holds ``dense.npy``, ``keys.npy``,
    ``labels.npy`` and ``meta.json``. A complete matching cache of this :data:`CACHE_VERSION` is
    reused; a changed source gets a new folder; an incomplete, damaged or older-version one is
    rebuilt. Building writes to a temporary folder that is renamed into place only when complete, so
    a crash never leaves a cache that looks valid.

    Args:
        path: plain or gzip file in format ``fmt``.
        fmt: one of :data:`models.data.formats.FORMATS`.
        cache_dir: folder for caches (created if needed).
        schema: the format's schema (its hash seed decides the keys).
        max_rows: keep only the first this many good rows (0: all).
        progress: show a tqdm progress bar (rows/s) while parsing.
        workers: parser threads (0: one per core).
    """
    source, name = _check_args(path, fmt, schema, max_rows)
    cache_root = Path(cache_dir)
    target, identity = _folder(source, name, schema, max_rows, cache_root)
    cached = _load_cached(target, identity, schema)
    if cached is not None:
        log.info("using parsed cache %s for %s (%d rows)", target, source, cached.rows)
        return cached
    if target.exists():
        log.warning("rebuilding incomplete, stale or older-version cache %s", target)
        shutil.rmtree(target)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_root))
    try:
        stats = _build(source, name, schema, tmp, max_rows, progress, workers)
        if _identity(source, name, schema, max_rows) != identity:
            raise ValueError(f"{source} changed while it was being read; run again")
        meta = {"cache_version": CACHE_VERSION, "identity": identity, "rows": stats.rows, "stats": stats.to_dict()}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
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


def _build(
    source: Path, fmt: str, schema: FeatureSchema, out: Path, max_rows: int, progress: bool, workers: int
) -> ReadStats:
    """Parse ``source`` into the three .npy files in ``out``, appending chunk by chunk."""
    from tqdm import tqdm

    stats = ReadStats()
    shapes: dict[str, Any] = {name: (shape[1:], dtype) for name, (shape, dtype) in _expected(0, schema).items()}
    with (
        _NpyAppender(out / "dense.npy", shapes["dense"][1], shapes["dense"][0]) as dense,
        _NpyAppender(out / "keys.npy", shapes["keys"][1], shapes["keys"][0]) as keys,
        _NpyAppender(out / "labels.npy", shapes["labels"][1], shapes["labels"][0]) as labels,
        tqdm(unit="rows", unit_scale=True, desc=f"parsing {source.name}", disable=not progress) as bar,
    ):
        for chunk in reader.iter_chunks(source, fmt, schema, None, stats, max_rows, workers):
            dense.append(chunk.dense)
            keys.append(chunk.keys)
            labels.append(chunk.labels)
            bar.update(len(chunk))
    if stats.rows == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.reasons.items())) or "the file has no data lines"
        raise ValueError(f"{source}: no valid {fmt} rows ({reasons})")
    return stats
