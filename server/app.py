"""App factory: ``build_app(settings)`` and the lifespan that owns every resource.

Start-up (in order): feature store, model registry (load, verify and warm up every model of
``LMA_MODEL_DIR``, start their batchers), model-update source (folder watcher; with Redis, the
update channel), then the garbage collector tuned for serving (:mod:`server.heap`). Shutdown runs in
reverse after the HTTP server has stopped accepting and has answered every request in flight: stop
updates, finish every queued request, release runtimes, close the store. Nothing happens at import time.

Run it with ``lma serve PATH`` or ``uvicorn --factory server.app:app_from_env`` (settings from
``LMA_*`` environment variables).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import Message, Receive, Scope, Send

from server import heap, logs, schemas
from server.engine import Engine
from server.errors import HttpError, ServingError
from server.features import open_feature_store
from server.http import (
    DisconnectWatch,
    Reply,
    RequestContext,
    RequestRecorder,
    client_request_id,
    internal_error,
    new_request_id,
    protocol_of,
    register_error_handlers,
)
from server.logs import configure_logging
from server.metrics import Metrics, multiprocess_dir
from server.protocols.native import routes as native_routes
from server.protocols.routing import ROUTE, TICKET, RouteTable, ScoringRoute, admit, openapi_paths
from server.protocols.v2 import routes as v2_routes
from server.registry import ModelRegistry
from server.routes import admin
from server.routes import metrics as metrics_routes
from server.settings import Settings, load_settings

log = logging.getLogger("lma.server")
Respond = Callable[[Reply, str], Awaitable[None]]  # writes a scoring request's reply (request id given)


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
    """FastAPI, behind the one request wrapper every HTTP request goes through.

    The wrapper makes the request id, renders errors (:meth:`server.http.Reply.error`), adds
    ``X-Request-ID``, counts, times and logs the request (:class:`server.http.RequestRecorder`). It serves
    the scoring routes of :data:`SCORING_ROUTES` itself (:meth:`serve_scoring`, which the server's HTTP protocol
    also calls directly: :mod:`server.http_protocol`) and hands every other request to FastAPI's routing.
    """

    routes_table: RouteTable
    recorder: RequestRecorder
    disconnects: DisconnectWatch
    max_body_bytes: int
    max_timeout_s: float

    def _lifespan_send(self, send: Send) -> Send:
        """A start-up refused for a known cause (``state.startup_error``, set by the lifespan) is reported as that
        one line, which the server logs, not as the traceback Starlette puts in ``lifespan.startup.failed``."""

        async def lifespan_send(message: Message) -> None:
            error = getattr(self.state, "startup_error", None)
            if message["type"] == "lifespan.startup.failed" and error:
                message = {**message, "message": error}
            await send(message)

        return lifespan_send

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, self._lifespan_send(send) if scope["type"] == "lifespan" else send)
            return
        matched = scope.pop(ROUTE, None) or self.routes_table.match(scope)  # the protocol may have matched it
        if matched is not None:
            await self.serve_scoring(scope, receive, matched, lambda reply, request_id: reply.send(send, request_id))
            return
        start = time.perf_counter()
        ctx = _begin(scope)
        scope["lma"] = ctx
        id_header = (b"x-request-id", ctx.request_id.encode("ascii"))
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        try:
            await super().__call__(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error", extra={"fields": {"request_id": ctx.request_id}})
            if status == 0:
                reply = Reply.error(internal_error(ctx.request_id), protocol_of(scope))
                await reply.send(send, ctx.request_id)
            status = status or 500
        template = getattr(scope.get("route"), "path", "unmatched")
        self.recorder.finish(scope["method"], template, ctx, status, time.perf_counter() - start)

    async def serve_scoring(
        self, scope: Scope, receive: Receive, matched: tuple[ScoringRoute, dict[str, str]], respond: Respond
    ) -> None:
        """The wrapper of a scoring request: its reply (an error too) goes out through ``respond(reply, request_id)``,
        then the request is counted, timed and logged. ``respond`` writes ASGI messages (:meth:`__call__`) or, on the
        server's own HTTP protocol, the whole response at once (:mod:`server.http_protocol`)."""
        start = time.perf_counter()
        ctx = _begin(scope)
        route, params = matched
        try:
            if scope["method"] != "POST":
                raise HttpError("Method Not Allowed", 405, headers={"Allow": "POST"})
            reply = await route.serve(self.state.engine, ctx, params, scope, receive, self)
        except ServingError as e:
            reply = Reply.error(e, route.protocol)
        except Exception:
            log.exception("unhandled error", extra={"fields": {"request_id": ctx.request_id}})
            reply = Reply.error(internal_error(ctx.request_id), route.protocol)
        status = reply.status
        try:
            await respond(reply, ctx.request_id)
        except Exception:
            status = 500  # the server's own answer to a reply it could not send (uvicorn's, or a closed connection)
            raise
        finally:
            self.recorder.finish(scope["method"], route.template, ctx, status, time.perf_counter() - start)

    def admit_early(self, scope: Scope, default_headers: list[tuple[bytes, bytes]], keep_alive: bool) -> bytes | None:
        """Admission as the headers arrive (:mod:`server.http_protocol`): None to go on, or the refusal to write.

        ``scope`` has the request's method, path and headers. An admitted scoring request takes its ticket
        along in the scope; a refused one is counted and logged here like any answered request.
        """
        matched = self.routes_table.match(scope)
        engine = getattr(self.state, "engine", None)
        if matched is None or scope["method"] != "POST" or engine is None:
            return None
        scope[ROUTE] = matched  # the wrapper need not match it again
        route, params = matched
        start = time.perf_counter()
        name = params.get("name")
        try:
            scope[TICKET] = admit(engine, scope, name, params.get("version"), self.max_timeout_s)
            return None
        except ServingError as e:
            ctx = RequestContext(client_request_id(scope["headers"]) or new_request_id())
            if name is not None and engine.has_model(name):
                ctx.model = name
            reply = Reply.error(e, route.protocol)
            self.recorder.finish("POST", route.template, ctx, reply.status, time.perf_counter() - start)
            return reply.http11(default_headers, ctx.request_id, keep_alive)
        except Exception:
            return None  # the request goes the usual way, which logs what went wrong


def _begin(scope: Scope) -> RequestContext:
    """A request's context: its id (the client's, when safe, else a new one), which every log line of the request's
    task (context) carries from here on."""
    request_id = client_request_id(scope["headers"]) or new_request_id()
    logs.request_id.set(request_id)
    return RequestContext(request_id)


SCORING_ROUTES = RouteTable((*native_routes.SCORING, *v2_routes.SCORING))


def build_app(settings: Settings) -> LmaApp:
    """A FastAPI app serving the bundles of ``settings.model_dir``; models load when its lifespan starts."""
    metrics = Metrics()
    recorder = RequestRecorder(metrics, log_requests=settings.access_log)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            store = open_feature_store(settings)
        except (OSError, ValueError) as e:
            app.state.startup_error = f"{'LMA_REDIS_URL' if settings.redis_url else 'LMA_FEATURE_STORE_PATH'}: {e}"
            raise
        registry = ModelRegistry(settings, metrics)
        engine = Engine(registry, store, settings, metrics)
        try:
            await registry.load_repository()
        except BaseException as e:
            if isinstance(e, ValueError):  # a model that cannot be served (its load failure is logged too)
                app.state.startup_error = str(e)
            await engine.close()
            raise
        app.state.engine = engine
        metrics.set_device_memory_source(engine.device_memory)
        flusher = asyncio.get_running_loop().create_task(metrics.flush_forever(), name="lma-metrics-flush")
        updates = await _start_model_updates(settings, registry)
        heap.tune(settings.gc_threshold)  # after start-up's allocations: see server/heap.py
        log.info(
            "ready",
            extra={"fields": {"models": [f"{m['name']}:{m['version']}" for m in engine.models()],
                              "runtime": registry.runtime, "device": registry.device}},
        )  # fmt: skip
        try:
            yield
        finally:
            try:
                log.info("shutting down: finishing queued requests")
                if updates is not None:
                    updates.cancel()
                    await asyncio.gather(updates, return_exceptions=True)
                await engine.close()
                flusher.cancel()
                await asyncio.gather(flusher, return_exceptions=True)
                metrics.pending.flush()
                if multiprocess_dir() is not None:
                    from prometheus_client import multiprocess

                    multiprocess.mark_process_dead(os.getpid())
                log.info("stopped")
                recorder.close()
            finally:
                heap.restore()  # even when shutting down failed: an embedding process gets its collector back

    app = LmaApp(
        title="LMA CTR server",
        summary="Click-through-rate models with LMA embeddings: native and Open Inference Protocol v2 APIs.",
        version="1",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    for router in (native_routes.router, admin.router, v2_routes.router, metrics_routes.router):
        app.include_router(router)
    register_error_handlers(app)
    app.routes_table = SCORING_ROUTES
    app.recorder = recorder
    app.disconnects = DisconnectWatch()
    app.max_body_bytes = settings.max_body_bytes
    app.max_timeout_s = settings.request_timeout_ms / 1000.0
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: LmaApp) -> dict[str, Any]:
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        paths = doc.setdefault("paths", {})
        for path, operations in openapi_paths(app.routes_table.routes, app.max_timeout_s * 1000).items():
            paths.setdefault(path, {}).update(operations)
        doc["paths"] = dict(sorted(paths.items()))
        doc.setdefault("components", {}).setdefault("schemas", {}).update(schemas.component_schemas())
        app.openapi_schema = doc
    return app.openapi_schema


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory server.app:app_from_env``: settings from ``LMA_*``, JSON logs."""
    settings = load_settings()
    configure_logging(settings.log_level)
    return build_app(settings)
