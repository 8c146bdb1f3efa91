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

from server import schemas
from server.engine import Engine
from server.errors import register_error_handlers
from server.features import open_feature_store
from server.http import RequestContextMiddleware
from server.logs import configure_logging
from server.metrics import Metrics, multiprocess_dir
from server.registry import ModelRegistry
from server.routes import ROUTERS
from server.settings import Settings, load_settings

log = logging.getLogger("lma.server")


def _start_model_updates(settings: Settings, registry: ModelRegistry) -> asyncio.Task[None] | None:
    """The source of new model versions: the repository folder watcher.

    With LMA_REDIS_URL set, the Redis model-update subscriber (which calls ``registry.swap``) takes
    this place (DESIGN section 8).
    """
    if settings.watch_interval_s <= 0:
        return None
    return asyncio.get_running_loop().create_task(registry.watch(settings.watch_interval_s), name="lma-model-watch")


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
        updates = _start_model_updates(settings, registry)
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

    app = FastAPI(
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
    app.add_middleware(RequestContextMiddleware, metrics=metrics, log_requests=settings.access_log)
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
