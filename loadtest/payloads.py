"""Request bodies for the load tests: rows replayed from a data file (or synthesized), encoded once.

Every body is JSON-encoded before the test starts, so at request time a locust worker only picks the
next ``bytes`` object from a list (stdlib + orjson; no NumPy, no hashing, no model code on the hot path).

Four kinds of bodies, one per user class of ``loadtest/locustfile.py`` (DESIGN sections 7 and 9):

- native, one instance per request, and native, ``batch_size`` instances per request
  (``{"instances": [{"dense": [...], "categorical": [...]}]}``; missing values are ``null``);
- Open Inference Protocol v2 (``inputs``: ``dense`` FP32 ``[B, n_dense]``, ``categorical`` BYTES
  ``[B, n_fields]``; a missing dense value is sent as 0, which the server's transform maps to the same
  model input as a missing value, and a missing categorical value as ``""``, the per-field missing token);
- feature-store requests: ``{"entity": "user:<e>", "dense": {...}, "categorical": {...}}`` carrying only the
  second half of each feature list (the "context"); the first half (the "profile") is what the feature store
  holds for that entity, see :func:`entity_features` and :func:`write_feature_csv`. With the store loaded
  from that file, the merged instance of entity ``e`` equals row ``e``.

Example::

    >>> rows = synthetic_rows(64, seed=0)
    >>> pools = build_pools(rows, batch_size=32, entities=16)
    >>> len(pools.native_batch), pools.native_batch.samples
    (2, 32)
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import random
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from models.data.reader import FORMATS, iter_raw, schema_for_format
from models.schema import CRITEO_CATEGORICAL, CRITEO_DENSE

ENTITY_PREFIX = "user:"
# Criteo Kaggle distinct values per categorical field (C1..C26): synthetic rows draw from ranges this wide.
CRITEO_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip

Value = float | str | None


@dataclass(frozen=True)
class Row:
    """One raw sample: dense values (``None`` = missing) and categorical values (``None`` = missing)."""

    dense: tuple[float | None, ...]
    categorical: tuple[str | None, ...]


@dataclass(frozen=True)
class Rows:
    """Raw samples of one data format, with the feature names the server's schema uses for it."""

    format: str
    dense_names: tuple[str, ...]
    categorical_names: tuple[str, ...]
    rows: tuple[Row, ...]

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError(f"no {self.format} rows to build payloads from")
        for i, row in enumerate(self.rows):
            if len(row.dense) != len(self.dense_names) or len(row.categorical) != len(self.categorical_names):
                raise ValueError(
                    f"{self.format} row {i} has {len(row.dense)} dense and {len(row.categorical)} categorical values, "
                    f"expected {len(self.dense_names)} and {len(self.categorical_names)}"
                )

    def __len__(self) -> int:
        return len(self.rows)


def read_rows(path: str | Path, fmt: str = "criteo", limit: int = 4096) -> Rows:
    """The first ``limit`` rows of a data file in one of ``models.data.reader.FORMATS`` (Criteo TSV/CSV, Avazu CSV)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS}")
    schema = schema_for_format(fmt)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load-test data file {path} does not exist")
    rows = tuple(Row(tuple(raw.dense), tuple(raw.categorical)) for raw in itertools.islice(iter_raw(path, fmt), limit))
    if not rows:
        raise ValueError(f"{path}: no {fmt} rows could be read")
    return Rows(fmt, schema.dense_names, schema.categorical_names, rows)


def synthetic_rows(n: int, seed: int = 0) -> Rows:
    """``n`` Criteo-shaped rows: Criteo-like missing rates, heavy-tailed counts and Zipf-like tokens.

    Only the shape and the spread of tokens matter to a load test (how many distinct keys the model sees,
    how many have stored signatures); labels and the relation to clicks do not, so none is modelled.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)

    def dense_value() -> float | None:
        if rng.random() < 0.2:
            return None
        return float(int(rng.lognormvariate(1.0, 1.5)))

    def token(field: int, cardinality: int) -> str | None:
        if rng.random() < 0.05:
            return None
        # Inverse CDF of a power law with exponent 1.1 on [1, cardinality]: a few tokens take most draws.
        a = 1.0 - 1.1
        rank = int((1.0 + rng.random() * (cardinality**a - 1.0)) ** (1.0 / a))
        return f"{(rank * 2654435761 + field * 40503) & 0xFFFFFFFF:08x}"  # Criteo-style 8-digit hex

    rows = tuple(
        Row(
            tuple(dense_value() for _ in CRITEO_DENSE),
            tuple(token(f, c) for f, c in enumerate(CRITEO_CARDINALITIES)),
        )
        for _ in range(n)
    )
    return Rows("criteo", CRITEO_DENSE, CRITEO_CATEGORICAL, rows)


# ----------------------------------------------------------------------------------------------------------
# bodies


def native_instance(row: Row) -> dict[str, object]:
    """The native-API instance of a row, features as lists in schema order (``dense`` left out when empty)."""
    instance: dict[str, object] = {"categorical": list(row.categorical)}
    if row.dense:
        instance["dense"] = list(row.dense)
    return instance


def native_body(rows: Sequence[Row]) -> bytes:
    """``POST /v1/models/{name}:predict`` body scoring ``rows``."""
    return orjson.dumps({"instances": [native_instance(r) for r in rows]})


def v2_body(rows: Sequence[Row]) -> bytes:
    """``POST /v2/models/{name}/infer`` body scoring ``rows``: row-major data, categorical values as BYTES."""
    n_dense, n_fields = len(rows[0].dense), len(rows[0].categorical)
    inputs: list[dict[str, object]] = []
    if n_dense:
        dense = [0.0 if v is None else v for r in rows for v in r.dense]
        inputs.append({"name": "dense", "shape": [len(rows), n_dense], "datatype": "FP32", "data": dense})
    categorical = ["" if v is None else v for r in rows for v in r.categorical]
    inputs.append({"name": "categorical", "shape": [len(rows), n_fields], "datatype": "BYTES", "data": categorical})
    return orjson.dumps({"inputs": inputs, "outputs": [{"name": "probability"}]})


def v2_binary_body(rows: Sequence[Row]) -> tuple[bytes, int]:
    """:func:`v2_body` with the binary tensor data extension, as tritonclient sends it by default: the JSON
    header, then ``dense`` as little-endian FP32 and ``categorical`` as BYTES elements (4-byte little-endian
    length, then the UTF-8 bytes). Returns (body, length of the JSON header: Inference-Header-Content-Length)."""
    n_dense, n_fields = len(rows[0].dense), len(rows[0].categorical)
    inputs: list[dict[str, object]] = []
    parts: list[bytes] = []
    if n_dense:
        dense = struct.pack(f"<{len(rows) * n_dense}f", *(0.0 if v is None else v for r in rows for v in r.dense))
        inputs.append({"name": "dense", "shape": [len(rows), n_dense], "datatype": "FP32",
                       "parameters": {"binary_data_size": len(dense)}})  # fmt: skip
        parts.append(dense)
    tokens = [("" if v is None else str(v)).encode() for r in rows for v in r.categorical]
    categorical = b"".join(struct.pack("<I", len(t)) + t for t in tokens)
    inputs.append({"name": "categorical", "shape": [len(rows), n_fields], "datatype": "BYTES",
                   "parameters": {"binary_data_size": len(categorical)}})  # fmt: skip
    head = orjson.dumps({"inputs": inputs, "outputs": [{"name": "probability"}]})
    return b"".join([head, *parts, categorical]), len(head)


def entity_key(e: int) -> str:
    return f"{ENTITY_PREFIX}{e}"


def _profile_size(names: Sequence[str]) -> int:
    """The first half of each feature list is the stored profile, the rest the request's context."""
    return len(names) // 2


def _split(names: Sequence[str], values: Sequence[Value]) -> tuple[dict[str, Value], dict[str, Value]]:
    """(profile, context) parts of one feature list, by name."""
    half = _profile_size(names)
    pairs = list(zip(names, values, strict=True))
    return dict(pairs[:half]), dict(pairs[half:])


def feature_store_instance(rows: Rows, e: int) -> dict[str, object]:
    """Instance of entity ``e``: its key plus the context half of row ``e`` (by name; ``null`` = missing)."""
    row = rows.rows[e]
    instance: dict[str, object] = {"entity": entity_key(e)}
    if rows.dense_names:
        instance["dense"] = _split(rows.dense_names, row.dense)[1]
    instance["categorical"] = _split(rows.categorical_names, row.categorical)[1]
    return instance


def entity_features(rows: Rows, entities: int) -> Iterator[tuple[str, dict[str, Value]]]:
    """What the feature store holds for the load test: (entity key, profile half of row e), e < entities.

    Missing values are left out (an absent stored feature is a missing value).
    """
    for e in range(min(entities, len(rows))):
        row = rows.rows[e]
        stored = _split(rows.dense_names, row.dense)[0] | _split(rows.categorical_names, row.categorical)[0]
        yield entity_key(e), {k: v for k, v in stored.items() if v is not None}


def write_feature_csv(rows: Rows, entities: int, path: str | Path) -> Path:
    """Write :func:`entity_features` as a CSV with an ``entity`` column (empty cell = missing), the file both
    stores load: ``LMA_FEATURE_STORE_PATH=FILE`` (in-memory) or ``lma features load FILE --format csv
    --entity-column entity`` (Redis)."""
    dense, categorical = rows.dense_names, rows.categorical_names
    names = [*dense[: _profile_size(dense)], *categorical[: _profile_size(categorical)]]
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["entity", *names])
        writer.writeheader()
        for entity, features in entity_features(rows, entities):
            writer.writerow({"entity": entity, **features})
    return path


# ----------------------------------------------------------------------------------------------------------
# response checks


def _probabilities_problem(values: Any, expected: int) -> str | None:
    if not isinstance(values, list) or len(values) != expected:
        got = len(values) if isinstance(values, list) else type(values).__name__
        return f"expected {expected} probabilities, got {got}"
    if not all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p <= 1.0 for p in values):
        return "a probability is not a number in [0, 1]"
    return None


def native_response_problem(body: Any, expected: int) -> str | None:
    """Why a decoded native response is not ``expected`` predictions, or None when it is."""
    return _probabilities_problem(body.get("predictions") if isinstance(body, dict) else None, expected)


def v2_response_problem(body: Any, expected: int) -> str | None:
    """Why a decoded v2 infer response is not a ``probability`` output of shape [expected, 1], or None."""
    outputs = body.get("outputs") if isinstance(body, dict) else None
    output = next((o for o in outputs or [] if isinstance(o, dict) and o.get("name") == "probability"), None)
    if output is None:
        return "no 'probability' output"
    if output.get("shape") != [expected, 1]:
        return f"'probability' has shape {output.get('shape')}, expected [{expected}, 1]"
    data = output.get("data")
    if isinstance(data, list) and data and isinstance(data[0], list):  # nested by shape instead of flat
        data = [v for row in data for v in row]
    return _probabilities_problem(data, expected)


# ----------------------------------------------------------------------------------------------------------
# pools


class BodyPool:
    """Pre-encoded request bodies carrying ``samples`` instances each, replayed round robin.

    Args:
        bodies: the encoded bodies (at least one).
        samples: instances per body, so a caller can check the response length.
    """

    def __init__(self, bodies: Sequence[bytes], samples: int) -> None:
        if not bodies:
            raise ValueError("a body pool needs at least one body")
        self.bodies = tuple(bodies)
        self.samples = samples

    def __len__(self) -> int:
        return len(self.bodies)

    def cursor(self, start: int = 0) -> Iterator[bytes]:
        """Endless iterator over the bodies from index ``start`` (each user starts at its own offset)."""
        start %= len(self.bodies)
        return itertools.cycle(self.bodies[start:] + self.bodies[:start])


def _batches(rows: Sequence[Row], size: int) -> Iterator[list[Row]]:
    """Consecutive batches of ``size`` rows, wrapping around when there are fewer rows than one batch."""
    for k in range(max(1, len(rows) // size)):
        yield [rows[(k * size + j) % len(rows)] for j in range(size)]


@dataclass(frozen=True)
class Pools:
    native_single: BodyPool
    native_batch: BodyPool
    v2: BodyPool
    feature_store: BodyPool


def build_pools(rows: Rows, batch_size: int = 32, v2_batch_size: int = 1, entities: int = 1000) -> Pools:
    """Encode every body the user classes send."""
    for name, value in (("batch_size", batch_size), ("v2_batch_size", v2_batch_size), ("entities", entities)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    data = rows.rows
    return Pools(
        native_single=BodyPool([native_body([r]) for r in data], 1),
        native_batch=BodyPool([native_body(b) for b in _batches(data, batch_size)], batch_size),
        v2=BodyPool([v2_body(b) for b in _batches(data, v2_batch_size)], v2_batch_size),
        feature_store=BodyPool(
            [orjson.dumps({"instances": [feature_store_instance(rows, e)]}) for e in range(min(entities, len(rows)))],
            1,
        ),
    )


# ----------------------------------------------------------------------------------------------------------
# configuration from the environment


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class LoadTestConfig:
    """Settings of the locustfile, from ``LMA_LOADTEST_*`` environment variables.

    - ``LMA_LOADTEST_DATA``: Criteo TSV / Avazu CSV to replay (empty: synthetic Criteo-shaped rows)
    - ``LMA_LOADTEST_FORMAT``: one of ``models.data.reader.FORMATS`` (default ``criteo``)
    - ``LMA_LOADTEST_MODEL``: model name (empty: the server's default model on ``/v1/predict``; the v2 and
      feature-store users then ask ``GET /v1/models`` for it)
    - ``LMA_LOADTEST_ROWS`` (4096), ``LMA_LOADTEST_BATCH`` (32), ``LMA_LOADTEST_V2_BATCH`` (1),
      ``LMA_LOADTEST_ENTITIES`` (1000), ``LMA_LOADTEST_SEED`` (0)
    - ``LMA_LOADTEST_RATE``: requests per second per user (empty: closed loop, the next request as soon as
      the last one is answered)
    """

    data: Path | None = None
    format: str = "criteo"
    model: str | None = None
    rows: int = 4096
    batch_size: int = 32
    v2_batch_size: int = 1
    entities: int = 1000
    seed: int = 0
    rate: float | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> LoadTestConfig:
        fmt = env.get("LMA_LOADTEST_FORMAT", "").strip() or "criteo"
        if fmt not in FORMATS:
            raise ValueError(f"LMA_LOADTEST_FORMAT must be one of {FORMATS}, got {fmt!r}")
        data = env.get("LMA_LOADTEST_DATA", "").strip()
        rate_raw = env.get("LMA_LOADTEST_RATE", "").strip()
        rate = None
        if rate_raw:
            try:
                rate = float(rate_raw)
            except ValueError:
                raise ValueError(f"LMA_LOADTEST_RATE must be a number, got {rate_raw!r}") from None
            if not (math.isfinite(rate) and rate > 0):
                raise ValueError(f"LMA_LOADTEST_RATE must be > 0, got {rate_raw!r}")
        seed_raw = env.get("LMA_LOADTEST_SEED", "").strip() or "0"
        try:
            seed = int(seed_raw)
        except ValueError:
            raise ValueError(f"LMA_LOADTEST_SEED must be an integer, got {seed_raw!r}") from None
        return cls(
            data=Path(data) if data else None,
            format=fmt,
            model=env.get("LMA_LOADTEST_MODEL", "").strip() or None,
            rows=_env_int(env, "LMA_LOADTEST_ROWS", cls.rows),
            batch_size=_env_int(env, "LMA_LOADTEST_BATCH", cls.batch_size),
            v2_batch_size=_env_int(env, "LMA_LOADTEST_V2_BATCH", cls.v2_batch_size),
            entities=_env_int(env, "LMA_LOADTEST_ENTITIES", cls.entities),
            seed=seed,
            rate=rate,
        )

    def load_rows(self) -> Rows:
        if self.data is None:
            if schema_for_format(self.format).dense_names != CRITEO_DENSE:
                raise ValueError(f"synthetic load-test rows are Criteo-shaped: set LMA_LOADTEST_DATA for {self.format}")
            return synthetic_rows(self.rows, self.seed)
        return read_rows(self.data, self.format, self.rows)

    def build_pools(self) -> Pools:
        return build_pools(self.load_rows(), self.batch_size, self.v2_batch_size, self.entities)
