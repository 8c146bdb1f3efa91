"""Redis online feature store: stored features per entity, fetched for a whole batch in one round trip.

Layout: one Redis hash per entity, key ``<prefix><entity>`` (default prefix ``lma:features:``), field
name -> raw value as text (dense values in decimal, categorical values as the raw string of the data
file). An absent field is a missing value. One store can hold the features of several models; the
server ignores stored names a model does not know and merges stored values UNDER request-provided
ones (:meth:`server.featurize.Featurizer.merge_stored`).

:meth:`RedisFeatureStore.fetch` sends one ``HGETALL`` per distinct entity in a single pipeline (no
MULTI: a pipeline is one write and one read, not a transaction) under a deadline of
``LMA_FEATURE_STORE_TIMEOUT_MS`` covering everything: taking a pooled connection, connecting, the
round trip. Any failure, the deadline included, raises
:class:`~server.errors.FeatureStoreUnavailable` (503 naming the cause); the failed connection is
dropped, never handed to the next caller, and the pool opens a fresh one on the next fetch, so
the store comes back by itself when Redis does. An entity with nothing stored gives ``None``.

:func:`load_features` bulk-loads a Criteo/Avazu file or a CSV with a header (``lma features load``):
each entity's hash is replaced (DEL + HSET [+ EXPIRE]) in MULTI/EXEC batches, so a reader never
sees an entity half written.

Measure the fetch latency against a Redis (``docs/REDIS.md`` has the numbers)::

    lma features bench --redis redis://127.0.0.1:6379/0 --batch-sizes 1,32,256 --iterations 5000
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import math
import os
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from server.errors import FeatureStoreUnavailable, InvalidInput

DEFAULT_PREFIX = "lma:features:"
DEFAULT_TIMEOUT_MS = 50.0
DEFAULT_MAX_CONNECTIONS = 64
LOAD_FORMATS = ("criteo", "criteo-csv", "avazu", "csv")
ROW_ENTITY = "row"  # --entity-column row: the row's number among the rows read (0, 1, ...)
ID_ENTITY = "id"  # --entity-column id: the row id of formats that have one (criteo-csv, avazu)

MISSING_KEY = "missing_key"  # skip reason: the row's entity column is empty
FIELD_COUNT = "field_count"  # skip reason: a CSV row with more or fewer cells than the header

StoredFeatures = dict[str, object]  # field name -> raw value text
FeatureRow = tuple[str, dict[str, str]]  # (entity, {field name: raw value text}) to load


def redact_url(url: str) -> str:
    """``url`` without its password, for logs and error messages: ``redis://user:***@host:6379/0``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.hostname or ""
    netloc = f"{user}***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return parts._replace(netloc=netloc).geturl()


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"feature key prefix must be a non-empty string, got {prefix!r}")
    return prefix


class RedisFeatureStore:
    """Feature store on Redis (redis-py asyncio, one connection pool per store).

    Args:
        url: ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS) or ``unix:///path?db=0``,
            exactly as redis-py reads them (``ssl_cert_reqs``, ``ssl_ca_certs`` ... as query parameters).
        timeout_ms: deadline of one :meth:`fetch`, all included.
        prefix: key prefix of the entity hashes.
        max_connections: pool size; concurrent fetches beyond it wait for a connection (within the deadline).

    Example::

        store = RedisFeatureStore("redis://127.0.0.1:6379/0", timeout_ms=50)
        await store.fetch(["user-1", "user-2"])   # [{"I1": "3", "C1": "68fd1e64"}, None]
        await store.close()
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_ms: float = DEFAULT_TIMEOUT_MS,
        prefix: str = DEFAULT_PREFIX,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if not timeout_ms > 0:
            raise ValueError(f"feature-store timeout must be > 0 ms, got {timeout_ms}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.prefix = check_prefix(prefix)
        self.timeout_s = timeout_ms / 1000.0
        self.where = redact_url(url)
        # A blocking pool: a fetch beyond max_connections waits for a free connection (within its
        # deadline) instead of failing with "Too many connections". One retry without backoff: a
        # pooled connection that died while idle (Redis restarted) is replaced at once instead of
        # failing the request; a Redis that is down fails in one more connection attempt. The
        # deadline of each call (asyncio.timeout) bounds everything, so reads carry no timeout of
        # their own (redis-py would arm a timer per reply: 256 timers for a fetch of 256; and on
        # Python 3.11 its write timeout goes through asyncio.wait_for, which can swallow a
        # cancellation). RESP2: hiredis parses a hash reply as a flat array ~4x faster than as a
        # RESP3 map; measured here, a fetch of 256 Criteo-sized hashes costs ~25% less CPU.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=None,
            decode_responses=True,
            encoding_errors="replace",
            socket_timeout=None,
            socket_connect_timeout=self.timeout_s,
            retry=Retry(NoBackoff(), 1),
            protocol=2,
            client_name="lma-feature-store",
        )
        self._client = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() disconnects it
        self._available = True

    def key(self, entity: str) -> str:
        return self.prefix + entity

    @contextlib.asynccontextmanager
    async def _round_trip(self, what: str) -> AsyncIterator[None]:
        """Run the body under the deadline; any failure becomes :class:`FeatureStoreUnavailable`."""
        try:
            async with asyncio.timeout(self.timeout_s):
                yield
        except TimeoutError:
            # asyncio's deadline cancelled the read: redis-py closes a connection whose read was
            # cancelled, so a late reply can never be taken for the next caller's.
            self._available = False
            raise FeatureStoreUnavailable(
                f"feature store unavailable: Redis at {self.where} did not answer {what} within "
                f"{self.timeout_s * 1000:g} ms"
            ) from None
        except (redis.RedisError, OSError) as e:
            self._available = False
            raise FeatureStoreUnavailable(f"feature store unavailable: Redis at {self.where}: {e}") from None
        self._available = True

    async def fetch(self, entities: Sequence[str]) -> list[StoredFeatures | None]:
        """Stored features of each entity, in order (``None``: nothing stored), in one round trip.

        Raises:
            FeatureStoreUnavailable: Redis did not answer within the deadline, or failed.
            InvalidInput: an entity's key holds something other than a hash.
        """
        if not entities:
            return []
        distinct = list(dict.fromkeys(entities))  # a batch often names one entity many times
        async with self._round_trip("a fetch"), self._client.pipeline(transaction=False) as pipe:
            for entity in distinct:
                pipe.hgetall(self.key(entity))
            # an error reply (WRONGTYPE: the key holds no hash) is the stored data's fault, not Redis being
            # away: it is named, and the store stays available for every other entity
            replies: list[StoredFeatures] = await pipe.execute(raise_on_error=False)
        for entity, reply in zip(distinct, replies, strict=True):
            if isinstance(reply, redis.ResponseError):
                raise InvalidInput(
                    f"entity {entity!r}: what is stored at {self.key(entity)} is no feature hash ({reply})"
                )
        if len(distinct) == len(entities):
            return [reply or None for reply in replies]
        # Each instance gets a dict of its own: the caller may change one without touching another.
        found = dict(zip(distinct, replies, strict=True))
        return [dict(found[entity]) if found[entity] else None for entity in entities]

    @property
    def available(self) -> bool:
        """Whether the last round trip to Redis succeeded (fetches are tried whatever its value)."""
        return self._available

    async def ping(self) -> None:
        """Raise :class:`FeatureStoreUnavailable` unless Redis answers PING within the deadline."""
        async with self._round_trip("PING"):
            await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"RedisFeatureStore({self.where!r}, prefix={self.prefix!r}, timeout_ms={self.timeout_s * 1000:g})"


# ----------------------------------------------------------------------------------------------
# Bulk load


@dataclass
class LoadReport:
    """What :func:`load_features` did: rows written (one hash each; a key named by several rows keeps
    the last one), lines the reader skipped by reason, seconds taken."""

    rows: int = 0
    skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped += n
        self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + n


def format_dense(x: float) -> str:
    """Decimal text of a dense value that reads back as the same float: ``5.0 -> "5"``, ``0.1 -> "0.1"``."""
    if not math.isfinite(x):
        raise ValueError(f"dense value {x!r} is not a finite number")
    return str(int(x)) if x.is_integer() and abs(x) < 2**53 else repr(x)


def _entity_index(fmt: str, entity_column: str) -> int:
    """Where a Criteo/Avazu row's entity key comes from: -1 row number, -2 row id, else a value's index."""
    from models.data.reader import schema_for_format

    schema = schema_for_format(fmt)
    if entity_column == ROW_ENTITY:
        return -1
    if entity_column == ID_ENTITY and fmt != "criteo":
        return -2
    if entity_column in schema.categorical_names:
        return schema.num_dense + schema.categorical_names.index(entity_column)
    choices = f"{ROW_ENTITY!r}" + ("" if fmt == "criteo" else f", {ID_ENTITY!r}")
    raise ValueError(
        f"--entity-column {entity_column!r} is not a key column of format {fmt}: use {choices}"
        f" or a categorical field ({schema.categorical_names[0]}..{schema.categorical_names[-1]})"
    )


def _raw_rows(path: Path, fmt: str, entity_index: int, report: LoadReport) -> Iterator[FeatureRow]:
    from models.data.reader import ReadStats, iter_raw, schema_for_format

    schema = schema_for_format(fmt)
    names = (*schema.dense_names, *schema.categorical_names)
    stats = ReadStats()
    try:
        for n, row in enumerate(iter_raw(path, fmt, stats)):
            values: list[str | None] = [None if v is None else format_dense(v) for v in row.dense]
            values += row.categorical
            entity = str(n) if entity_index == -1 else row.id if entity_index == -2 else values[entity_index]
            if not entity:  # a row whose key is missing cannot be looked up: skipped and counted
                stats.skip(MISSING_KEY)
                continue
            yield entity, {name: v for name, v in zip(names, values, strict=True) if v is not None}
    finally:
        for reason, count in stats.reasons.items():
            report.skip(reason, count)


def _csv_header(path: Path, entity_column: str) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise ValueError(f"{path}: empty file; a CSV needs a header naming its columns")
    if entity_column not in header:
        raise ValueError(f"{path}: --entity-column {entity_column!r} is not in the header {header}")
    if len(set(header)) != len(header) or "" in header:
        raise ValueError(f"{path}: the header must name each column once: {header}")
    return header


def _csv_rows(path: Path, header: list[str], entity_column: str, report: LoadReport) -> Iterator[FeatureRow]:
    key = header.index(entity_column)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)
        for cells in reader:
            if len(cells) != len(header):
                if cells:  # a blank line is no row at all
                    report.skip(FIELD_COUNT)
                continue
            if not cells[key]:
                report.skip(MISSING_KEY)
                continue
            yield cells[key], {name: v for j, (name, v) in enumerate(zip(header, cells, strict=True)) if j != key and v}


def feature_rows(
    path: str | os.PathLike[str], fmt: str, entity_column: str, report: LoadReport
) -> Iterator[FeatureRow]:
    """(entity, {field: raw text}) of each row of a data file; missing values are left out.

    Criteo/Avazu (read by :func:`models.data.reader.iter_raw`): every schema field, the key field included;
    ``entity_column`` is ``row`` (the row's number among the rows read, from 0), ``id`` (the row id
    of criteo-csv and avazu) or a categorical field. CSV (UTF-8, a header row naming the columns):
    every column but ``entity_column``. Rows without a key, and CSV rows with the wrong number of
    cells, are skipped and counted in ``report``. Bad arguments raise here, before any row is read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if fmt == "csv":
        return _csv_rows(path, _csv_header(path, entity_column), entity_column, report)
    if fmt not in LOAD_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(LOAD_FORMATS)}")
    return _raw_rows(path, fmt, _entity_index(fmt, entity_column), report)


def _batches(rows: Iterable[FeatureRow], size: int) -> Iterator[list[FeatureRow]]:
    batch: list[FeatureRow] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_features(
    url: str,
    rows: Iterable[FeatureRow],
    *,
    prefix: str = DEFAULT_PREFIX,
    ttl_s: int | None = None,
    batch_size: int = 1000,
    report: LoadReport | None = None,
    progress: bool | None = None,
) -> LoadReport:
    """Write each (entity, features) as the hash ``<prefix><entity>``, replacing what was there.

    Args:
        url: Redis URL (as :class:`RedisFeatureStore` reads it).
        rows: from :func:`feature_rows` or any iterable of (entity, {field: text}).
        prefix: key prefix the server reads (``--prefix``).
        ttl_s: expire each hash this many seconds after loading; None: keep it.
        batch_size: entities per MULTI/EXEC round trip.
        report: filled in as rows are written (``feature_rows`` adds its skip counts to it).
        progress: tqdm progress bar; None: only on a terminal.
    """
    check_prefix(prefix)
    if ttl_s is not None and ttl_s < 1:
        raise ValueError(f"--ttl must be >= 1 second, got {ttl_s}")
    if batch_size < 1:
        raise ValueError(f"--batch must be >= 1, got {batch_size}")
    report = report if report is not None else LoadReport()
    t0 = time.perf_counter()
    client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10)
    try:
        with _progress_bar(progress) as bar:
            for batch in _batches(rows, batch_size):
                # MULTI/EXEC: the server's readers never see an entity between its DEL and its HSET.
                pipe = client.pipeline(transaction=True)
                for entity, features in batch:
                    key = prefix + entity
                    pipe.delete(key)
                    if features:
                        pipe.hset(key, mapping=features)  # type: ignore[arg-type]
                        if ttl_s is not None:
                            pipe.expire(key, ttl_s)
                pipe.execute()
                report.rows += len(batch)
                bar.update(len(batch))
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise ValueError(f"Redis at {redact_url(url)}: {e}") from None
    finally:
        client.close()
    report.seconds = time.perf_counter() - t0
    return report


class _NoBar:
    def update(self, n: int) -> None:
        pass


def _progress_bar(progress: bool | None) -> contextlib.AbstractContextManager[Any]:
    """tqdm's bar (None: only on a terminal); a silent one where tqdm (the [train] extra) is not installed."""
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return contextlib.nullcontext(_NoBar())
    return tqdm(desc="load features", unit=" rows", disable=None if progress is None else not progress)


# ----------------------------------------------------------------------------------------------
# Latency benchmark


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in [0, 100])."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def bench_fetch(
    url: str, batch_sizes: Sequence[int], iterations: int, *, warmup: int = 200, prefix: str = "lma:bench:"
) -> list[dict[str, float]]:
    """Latency of :meth:`RedisFeatureStore.fetch` per batch size, against stored Criteo-shaped hashes.

    Writes ``max(batch_sizes)`` entities of 39 fields under ``prefix``, times ``iterations`` fetches
    of each batch size (one at a time, after ``warmup``), deletes the entities, and returns rows of
    batch size, p50, p90, p99 and mean in milliseconds, and ``cpu_ms``: this process's CPU time per
    fetch (what a fetch costs the server's event loop; less sensitive to a busy machine than latency).
    """
    from models.schema import CRITEO_CATEGORICAL, CRITEO_DENSE

    n = max(batch_sizes)
    entities = [f"bench-{i}" for i in range(n)]
    features = {
        **{name: str(i * 7) for i, name in enumerate(CRITEO_DENSE)},
        **{c: "68fd1e64" for c in CRITEO_CATEGORICAL},
    }
    load_features(url, ((e, features) for e in entities), prefix=prefix, ttl_s=3600, progress=False)
    store = RedisFeatureStore(url, prefix=prefix, timeout_ms=1000)
    rows = []
    try:
        for size in batch_sizes:
            batch = entities[:size]
            for _ in range(warmup):
                await store.fetch(batch)
            times = []
            cpu0 = time.process_time()
            for _ in range(iterations):
                t0 = time.perf_counter()
                await store.fetch(batch)
                times.append(time.perf_counter() - t0)
            cpu_ms = (time.process_time() - cpu0) * 1000 / iterations
            times.sort()
            ms = [t * 1000 for t in times]
            rows.append({
                "batch": size, "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90),
                "p99_ms": percentile(ms, 99), "mean_ms": sum(ms) / len(ms), "cpu_ms": cpu_ms,
            })  # fmt: skip
    finally:
        await store.close()
        client = redis.Redis.from_url(url)
        client.delete(*(prefix + e for e in entities))
        client.close()
    return rows
