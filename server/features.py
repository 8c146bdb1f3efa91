"""Online feature store: stored features per entity key, fetched for a whole batch in one call.

A request instance may name an ``entity``; the engine fetches the stored features of every entity
of the request in ONE :meth:`FeatureStore.fetch` call and fills what the request left missing
(request values win; see :meth:`server.featurize.Featurizer.merge_stored`).

:class:`InMemoryFeatureStore` is the default (no Redis needed), optionally loaded from a JSON or
CSV file (``LMA_FEATURE_STORE_PATH``). With ``LMA_REDIS_URL`` set, :func:`open_feature_store` is
where the Redis implementation plugs in: same protocol, a pipelined round trip per fetch, and
:class:`~server.errors.FeatureStoreUnavailable` (503) when Redis is down.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, TextIO, runtime_checkable

from server.settings import Settings

ENTITY_COLUMN = "entity"


@runtime_checkable
class FeatureStore(Protocol):
    """What the engine needs from a feature store."""

    @property
    def available(self) -> bool:
        """False while the store cannot serve fetches (e.g. Redis down); readiness does not depend on it."""
        ...

    async def fetch(self, entities: list[str]) -> list[dict[str, object] | None]:
        """Stored features of each entity, in order (None: nothing stored). Raises
        :class:`~server.errors.FeatureStoreUnavailable` when the store cannot answer."""
        ...

    async def close(self) -> None: ...


class InMemoryFeatureStore:
    """A dict of entity -> {feature name: value}; values as a request would send them.

    Example::

        >>> store = InMemoryFeatureStore({"u1": {"I1": 3, "C1": "68fd1e64"}})
        >>> import asyncio; asyncio.run(store.fetch(["u1", "u2"]))
        [{'I1': 3, 'C1': '68fd1e64'}, None]
    """

    def __init__(self, rows: Mapping[str, Mapping[str, object]] | None = None) -> None:
        self._rows: dict[str, dict[str, object]] = {str(k): dict(v) for k, v in (rows or {}).items()}

    @classmethod
    def from_file(cls, path: Path) -> InMemoryFeatureStore:
        """JSON: ``{"entity": {name: value}}`` or ``[{"entity": ..., name: value}]``; CSV: a header row
        with an ``entity`` column (empty cells are missing values)."""
        path = Path(path)
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                reader = _csv_rows(path, f)
                try:
                    return cls(
                        {r[ENTITY_COLUMN]: {k: v for k, v in r.items() if k != ENTITY_COLUMN and v} for r in reader}
                    )
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}: not UTF-8 text ({e})") from None
                except csv.Error as e:  # e.g. a field over csv's field size limit
                    raise ValueError(f"{path}, line {reader.reader.line_num}: {e}") from None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
            return cls(data)
        if isinstance(data, list) and all(isinstance(r, dict) and ENTITY_COLUMN in r for r in data):
            return cls({str(r[ENTITY_COLUMN]): {k: v for k, v in r.items() if k != ENTITY_COLUMN} for r in data})
        raise ValueError(f"{path}: expected {{entity: {{feature: value}}}} or [{{'entity': ..., feature: value}}]")

    @classmethod
    def check_file(cls, path: Path) -> None:
        """What :meth:`from_file` would refuse, for ``lma serve``'s start-up check: a CSV's header row only
        (its rows are read once, by each worker); a JSON file is read whole, as it must be to be checked."""
        path = Path(path)
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                try:
                    _csv_rows(path, f)
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}: not UTF-8 text ({e})") from None
        else:
            cls.from_file(path)

    @property
    def available(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._rows)

    def put(self, entity: str, features: Mapping[str, object]) -> None:
        self._rows[entity] = dict(features)

    async def fetch(self, entities: list[str]) -> list[dict[str, object] | None]:
        rows = self._rows
        return [rows.get(e) for e in entities]

    async def close(self) -> None:
        return None


def _csv_rows(path: Path, f: TextIO) -> csv.DictReader[str]:
    """The rows of a feature CSV, its header row checked first (it must name the entity column)."""
    reader = csv.DictReader(f)
    if reader.fieldnames is None or ENTITY_COLUMN not in reader.fieldnames:
        raise ValueError(f"{path}: a feature CSV needs a header row with an {ENTITY_COLUMN!r} column")
    return reader


def open_feature_store(settings: Settings) -> FeatureStore:
    """The store the settings ask for: in-memory (default, optionally from a file), or Redis."""
    if settings.redis_url:
        from server.redis_store import RedisFeatureStore

        return RedisFeatureStore(
            settings.redis_url, timeout_ms=settings.feature_store_timeout_ms, prefix=settings.feature_store_prefix
        )
    if settings.feature_store_path is not None:
        return InMemoryFeatureStore.from_file(settings.feature_store_path)
    return InMemoryFeatureStore()
