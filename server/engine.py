"""The one interface routes use to reach models.

A route asks the engine to admit a request (:meth:`Engine.admit`: once, before the body is read), hands it
the decoded body with the :class:`Ticket` it got, and gets a :class:`Prediction` back (or a
:class:`~server.errors.ServingError`); the registry, batchers and runtimes behind it are never touched by a
route. A request holds the model version it was admitted to for its whole life, so a hot swap in the
middle of it is invisible to it.

Example::

    ticket = engine.admit("criteo", None, arrival=time.monotonic(), timeout_s=0.1)
    try:
        prediction = await engine.predict(ticket, b'{"instances": [{"dense": [...], "categorical": [...]}]}')
    finally:
        engine.release(ticket)
    prediction.scores.probability        # float32 (B,)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from server.admission import LoopLag, Occupancy
from server.errors import BodyTimeout, FeatureStoreUnavailable, ModelNotFound, NotReady, ServingError
from server.features import FeatureStore
from server.featurize import Instances
from server.metrics import Metrics
from server.registry import ModelRegistry, ModelVersion, SwapResult
from server.settings import Settings
from server.types import Rows, Scores, Tensor

log = logging.getLogger("lma.server.engine")


@dataclass(frozen=True, slots=True)
class Prediction:
    model: str
    version: str
    scores: Scores


@dataclass(slots=True)
class Ticket:
    """An admitted request: the model version it holds until :meth:`Engine.release`, and its deadline."""

    mv: ModelVersion
    arrival: float  # time.monotonic() of the request's arrival
    deadline: float  # time.monotonic() by which it must be answered
    incoming: bool = True  # admitted, not yet in the batcher's queue (see Batcher.incoming)


class Engine:
    """Models, feature store and admission, behind ``admit`` / ``predict`` / ``infer`` / ``reload``."""

    def __init__(self, registry: ModelRegistry, store: FeatureStore, settings: Settings, metrics: Metrics) -> None:
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self.max_timeout_s = settings.request_timeout_ms / 1000.0
        self.max_queue_delay_s = settings.max_queue_delay_ms / 1000.0 or float("inf")
        self._store_timeout_s = settings.feature_store_timeout_ms / 1000.0
        self._max_instances = settings.max_instances_per_request
        self._closing = False
        self.loop_lag = LoopLag()
        self.occupancy = Occupancy()

    # --- state ---

    @property
    def ready(self) -> bool:
        """True while at least one model serves and the server is not shutting down."""
        return not self._closing and len(self.registry) > 0

    def model(self, name: str | None = None, version: str | None = None) -> ModelVersion:
        """The version serving ``name`` (None: the default model); ``version`` must be it if given."""
        if self._closing:
            raise NotReady("the server is shutting down")
        if name is None:
            name = self.registry.default_name
            if name is None:
                raise NotReady("no model is loaded yet")
            if name not in self.registry:
                raise NotReady(
                    f"the default model {name!r} (LMA_DEFAULT_MODEL) is not loaded; loaded models:"
                    f" {sorted(m.name for m in self.registry.versions())}"
                )
        mv = self.registry.get(name)
        if version is not None and version != mv.version:
            raise ModelNotFound(f"model {name!r} version {version!r} is not loaded; serving version {mv.version}")
        return mv

    def has_model(self, name: str) -> bool:
        return name in self.registry

    def models(self) -> list[dict[str, Any]]:
        return [self._info(mv) for mv in self.registry.versions()]

    def model_info(self, name: str, version: str | None = None) -> dict[str, Any]:
        return self._info(self.model(name, version))

    def _info(self, mv: ModelVersion) -> dict[str, Any]:
        return {**mv.info(), "default": mv.name == self.registry.default_name}

    # --- admission ---

    def admit(self, name: str | None, version: str | None, arrival: float, timeout_s: float) -> Ticket:
        """Admit a request that arrived at ``arrival`` with ``timeout_s`` to live, or refuse it now (404, 503).

        Called once per request, before its body is read (an overloaded server spends as little as it can on
        what it turns away). The deadline is ``arrival + timeout_s``; the model's batcher refuses a request it
        predicts it cannot answer by then (:meth:`server.batcher.Batcher.admit`). The returned ticket holds
        the model version until :meth:`release`, so a hot swap never pulls a version from under a request.
        """
        mv = self.model(name, version)
        now = time.monotonic()
        self.loop_lag.start()
        deadline = arrival + min(timeout_s, self.max_timeout_s)
        ahead = self.occupancy.wait_s()
        mv.batcher.admit(now, deadline, ahead_s=ahead, waited_s=now - arrival, max_wait_s=self.max_queue_delay_s)
        mv.acquire()
        self.occupancy.enter(now)
        return Ticket(mv, arrival, deadline)

    def tighten(self, ticket: Ticket, timeout_s: float) -> None:
        """A shorter deadline the request asked for in its body (the v2 ``timeout`` parameter); refuses now if
        it cannot be met."""
        deadline = ticket.arrival + timeout_s
        if deadline < ticket.deadline:
            ticket.deadline = deadline
            ticket.mv.batcher.check_deadline(
                time.monotonic(), deadline, ahead_s=self.occupancy.wait_s(), max_wait_s=self.max_queue_delay_s
            )

    async def read_body(self, ticket: Ticket, read: Awaitable[bytes]) -> bytes:
        """``await read``, a body that is still on its way, by the ticket's deadline (else :class:`BodyTimeout`).

        While it waits on the client, the request is not counted in this process (:meth:`Occupancy.step_out`)
        nor as coming to its model's queue: a stalled upload is no work of ours, and counting it would refuse
        every other request as if it waited behind it. The timeout frees the model version the ticket holds.
        """
        batcher = ticket.mv.batcher
        self.occupancy.step_out(time.monotonic())
        if ticket.incoming:
            batcher.leave()
        try:
            async with asyncio.timeout(max(0.0, ticket.deadline - time.monotonic())):
                return await read
        except TimeoutError:
            waited = (time.monotonic() - ticket.arrival) * 1000
            raise BodyTimeout(
                f"the request body did not arrive by the request's deadline ({waited:.0f} ms after its headers);"
                " closing the connection"
            ) from None
        finally:
            self.occupancy.enter(time.monotonic())
            if ticket.incoming:
                batcher.rejoin()

    def release(self, ticket: Ticket) -> None:
        if ticket.incoming:
            ticket.incoming = False
            ticket.mv.batcher.leave()
        ticket.mv.release()
        self.occupancy.leave(time.monotonic())

    # --- scoring ---

    async def predict(self, ticket: Ticket, body: bytes, timings: dict[str, float] | None = None) -> Prediction:
        """Score the instances of a native predict body (see :mod:`server.featurize`) with the ticket's model."""
        mv = ticket.mv
        start = time.perf_counter()
        parsed = mv.featurizer.parse_body(body, self._max_instances)
        if parsed.entities is not None:
            await self._merge_stored(mv, parsed, ticket.deadline)
        return await self._score(ticket, parsed.rows, start, timings)

    async def infer(
        self, ticket: Ticket, tensors: Sequence[Tensor], timings: dict[str, float] | None = None
    ) -> Prediction:
        """Score Open Inference Protocol input tensors with the ticket's model."""
        mv = ticket.mv
        start = time.perf_counter()
        rows = mv.featurizer.tensors_rows(tensors, self._max_instances)
        return await self._score(ticket, rows, start, timings)

    async def _score(self, ticket: Ticket, rows: Rows, start: float, timings: dict[str, float] | None) -> Prediction:
        mv = ticket.mv
        parsed = time.perf_counter()
        ticket.incoming = False
        mv.batcher.leave()  # now queued (or refused as closing): counted by the queue from here
        scores = await mv.batcher.submit(rows, ticket.deadline)
        if timings is not None:
            timings["parse_ms"] = parsed - start
            timings["model_ms"] = time.perf_counter() - parsed
        return Prediction(mv.name, mv.version, scores)

    async def _merge_stored(self, mv: ModelVersion, parsed: Instances, deadline: float) -> None:
        assert parsed.entities is not None
        unique = list(dict.fromkeys(e for e in parsed.entities if e is not None))
        start = time.perf_counter()
        try:
            # the store's own limit, or what is left of the request's budget if that is less
            async with asyncio.timeout(max(0.0, min(self._store_timeout_s, deadline - time.monotonic()))):
                rows = await self.store.fetch(unique)
            if len(rows) != len(unique):
                raise FeatureStoreUnavailable(f"feature store returned {len(rows)} rows for {len(unique)} entities")
        except TimeoutError:
            self.metrics.feature_store_errors.labels(mv.name).inc()
            raise FeatureStoreUnavailable(
                f"feature store did not answer within {self._store_timeout_s * 1000:.0f} ms"
            ) from None
        except ServingError:
            self.metrics.feature_store_errors.labels(mv.name).inc()
            raise
        except Exception as e:
            self.metrics.feature_store_errors.labels(mv.name).inc()
            log.exception("feature store fetch failed")
            raise FeatureStoreUnavailable(f"feature store failed: {e}") from None
        finally:
            self.metrics.feature_store_duration.labels(mv.name).observe(time.perf_counter() - start)
        hits = sum(1 for row in rows if row)
        self.metrics.feature_store_hits.labels(mv.name).inc(hits)
        self.metrics.feature_store_misses.labels(mv.name).inc(len(rows) - hits)
        stored = dict(zip(unique, rows, strict=True))
        mv.featurizer.merge_stored(parsed, [stored.get(e) if e else None for e in parsed.entities])

    # --- administration ---

    async def reload(self, name: str, path: str | None = None, version: str | None = None) -> SwapResult:
        return await self.registry.reload(name, path, version)

    def device_memory(self) -> list[tuple[str, str, int]]:
        rows = []
        for mv in self.registry.versions():
            used = mv.runtime.device_memory_bytes()
            if used is not None:
                rows.append((mv.name, mv.runtime.device, used))
        return rows

    async def close(self) -> None:
        """Refuse new work (readiness turns false), finish queued work, release models and the store."""
        self._closing = True
        await self.loop_lag.close()
        await self.registry.close()
        await self.store.close()
