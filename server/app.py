"""App factory: ``build_app(settings)`` and the lifespan that owns every resource.

Start-up (in order): feature store, model registry (load, verify and warm up every model of
``LMA_MODEL_DIR``, start their batchers), model-update source (folder watcher; with Redis, the
update channel). Shutdown runs in reverse after the HTTP server has stopped accepting and has
answered every request in flight: stop updates, finish every queued request, release runtimes,
close the store. Nothing happens at import time.

Run it with ``lma serve PATH`` or ``uvicorn --factory server.app:app_from_env`` (settings from
``LMA_*`` environment variables).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import Receive, Scope, Send

from server import schemas
from server.engine import Engine
from server.errors import register_error_handlers
from server.features import open_feature_store
from server.http import RequestContextMiddleware, RequestRecorder
from server.logs import configure_logging
from server.metrics import Metrics, multiprocess_dir
from server.registry import ModelRegistry
from server.routes import ROUTERS
from server.routes.scoring import ScoringRoutes
from server.settings import Settings, load_settings

log = logging.getLogger("lma.server")


# How long start-up waits for the Redis channel to catch up with the published versions before it
# reports ready with the folder's versions (a replica must not serve a stale version when Redis is up,
# and must not hang when Redis is down).
CHANNEL_CATCH_UP_S = 5.0


async def _start_model_updates(settings: Settings, registry: ModelRegistry) -> asyncio.Task[None] | None:
    """The source of new model versions: with LMA_REDIS_URL, the Redis model-update subscriber
    (``lma publish`` announces, every replica swaps through ``registry.swap``); without Redis, the
    repository folder watcher (DESIGN section 8).
    """
    if settings.redis_url:
        from server.model_channel import ModelUpdateSubscriber, registry_callback

        subscriber = ModelUpdateSubscriber(settings.redis_url, registry_callback(registry))
        task = asyncio.get_running_loop().create_task(subscriber.run(), name="lma-model-updates")
        try:
            await asyncio.wait_for(subscriber.connected.wait(), CHANNEL_CATCH_UP_S)
        except TimeoutError:
            log.warning(
                "model-update channel not caught up within %.0f s; serving the folder's versions meanwhile",
                CHANNEL_CATCH_UP_S,
            )
        return task
    if settings.watch_interval_s <= 0:
        return None
    return asyncio.get_running_loop().create_task(registry.watch(settings.watch_interval_s), name="lma-model-watch")


class LmaApp(FastAPI):
    """FastAPI, with the scoring routes served as plain ASGI in front of it (see :mod:`server.routes.scoring`)."""

    scoring: ScoringRoutes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = self.scoring.route(scope)
            if route is not None:
                await self.scoring(scope, receive, send, route)
                return
        await super().__call__(scope, receive, send)


def build_app(settings: Settings) -> FastAPI:
    """A FastAPI app serving the bundles of ``settings.model_dir``; models load when its lifespan starts."""
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = open_feature_store(settings)
        registry = ModelRegistry(settings, metrics)
        engine = Engine(registry, store, settings, metrics)
        try:
            await registry.load_repository()
        except BaseException:
            await engine.close()
            raise
        app.state.engine = engine
        metrics.set_device_memory_source(engine.device_memory)
        updates = await _start_model_updates(settings, registry)
        log.info(
            "ready",
            extra={"fields": {"models": [f"{m['name']}:{m['version']}" for m in engine.models()],
                              "runtime": registry.runtime, "device": registry.device}},
        )  # fmt: skip
        try:
            yield
        finally:
            log.info("shutting down: finishing queued requests")
            if updates is not None:
                updates.cancel()
                await asyncio.gather(updates, return_exceptions=True)
            await engine.close()
            if multiprocess_dir() is not None:
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(os.getpid())
            log.info("stopped")

    app = LmaApp(
        title="LMA CTR server",
        summary="Click-through-rate models with LMA embeddings: native and Open Inference Protocol v2 APIs.",
        version="1",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    for router in ROUTERS:
        app.include_router(router)
    register_error_handlers(app)
    recorder = RequestRecorder(metrics, log_requests=settings.access_log)
    app.add_middleware(RequestContextMiddleware, recorder=recorder)
    app.scoring = ScoringRoutes(app.state, settings, recorder)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        doc.setdefault("components", {}).setdefault("schemas", {}).update(schemas.component_schemas())
        app.openapi_schema = doc
    return app.openapi_schema


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory server.app:app_from_env``: settings from ``LMA_*``, JSON logs."""
    settings = load_settings()
    configure_logging(settings.log_level)
    return build_app(settings)
