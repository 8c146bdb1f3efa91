"""HTTP plumbing shared by all routes: JSON responses, bounded body reading, client-disconnect
detection, and the middleware that gives every response an ``X-Request-ID``, counts it and logs it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import zlib
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ClientDisconnected, InvalidInput, PayloadTooLarge, error_response
from server.metrics import Metrics

log = logging.getLogger("lma.server")
access_log = logging.getLogger("lma.server.access")
T = TypeVar("T")
REQUEST_ID = "x-request-id"
_MAX_REQUEST_ID = 128


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status,
        headers=headers,
        media_type="application/json",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body (gzip/deflate decoded), refusing more than ``limit`` bytes with 413."""
    length = request.headers.get("content-length")
    if length is not None and length.isascii() and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"body: {length} bytes, more than the limit of {limit} (LMA_MAX_BODY_BYTES)")
    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body: more than the limit of {limit} bytes (LMA_MAX_BODY_BYTES)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnected("client closed the connection while sending the body") from None
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    encoding = request.headers.get("content-encoding")
    if encoding and encoding != "identity":
        body = _decompress(body, encoding, limit)
    return body


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    wbits = {"gzip": 31, "deflate": 15}.get(encoding.strip().lower())
    if wbits is None:
        raise InvalidInput(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidInput(f"body: not valid {encoding} data ({e})") from None
    if len(out) > limit or d.unconsumed_tail:
        raise PayloadTooLarge(f"body: decompresses to more than the limit of {limit} bytes (LMA_MAX_BODY_BYTES)")
    return out


async def await_unless_disconnected(receive: Receive, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``; if the client disconnects first, cancel it and raise :class:`ClientDisconnected`.

    After the body is read, the server's next ``receive()`` message is ``http.disconnect``, sent when
    the client goes away or the response is complete. Cancelling our own task cancels the awaited
    batcher future, so the batcher drops the request before it costs the model anything.
    """
    task = asyncio.current_task()
    assert task is not None
    state = {"finished": False, "gone": False}

    def on_message(watcher: asyncio.Future[Message]) -> None:
        if state["finished"] or watcher.cancelled() or watcher.exception() is not None:
            return
        if watcher.result().get("type") == "http.disconnect":
            state["gone"] = True
            task.cancel()

    watcher = asyncio.ensure_future(receive())
    watcher.add_done_callback(on_message)
    try:
        return await awaitable
    except asyncio.CancelledError:
        if state["gone"] and task.uncancel() == 0:
            raise ClientDisconnected("client closed the connection before the response was ready") from None
        raise
    finally:
        state["finished"] = True
        watcher.cancel()


class RequestContext:
    """What a request's handler tells the middleware: which model answered, and a few timings."""

    __slots__ = ("model", "request_id", "timings", "version")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.model = ""
        self.version = ""
        self.timings: dict[str, float] = {}


def request_context(request: Request) -> RequestContext:
    ctx = request.scope.get("lma")
    if ctx is None:  # app used without the middleware (never in build_app)
        ctx = request.scope["lma"] = RequestContext(_new_request_id())
    return ctx  # type: ignore[no-any-return]


def _new_request_id() -> str:
    return os.urandom(12).hex()


def _client_request_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    for key, value in headers:
        if key == b"x-request-id":
            if 0 < len(value) <= _MAX_REQUEST_ID and all(33 <= c < 127 for c in value):
                return value.decode("ascii")
            return None
    return None


class RequestContextMiddleware:
    """Pure ASGI (no per-request task): request id, request metrics, access log, last-resort 500.

    An exception nothing else handled becomes a 500 with the usual error body and the request id,
    logged with its traceback; the server carries on.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, log_requests: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.log_requests = log_requests
        self._counters: dict[tuple[str, str, str], Any] = {}
        self._histograms: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = _client_request_id(scope["headers"]) or _new_request_id()
        ctx = scope["lma"] = RequestContext(request_id)
        id_header = (b"x-request-id", request_id.encode("ascii"))
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
            if status == 0:
                response = error_response(500, "internal", f"internal server error (request id {request_id})")
                await response(scope, receive, send_with_id)
            status = status or 500
        route = scope.get("route")
        template = getattr(route, "path", "unmatched")
        elapsed = time.perf_counter() - start
        self._observe(ctx.model, template, status, elapsed)
        if self.log_requests:
            fields: dict[str, Any] = {
                "request_id": request_id,
                "method": scope["method"],
                "route": template,
                "model": ctx.model,
                "version": ctx.version,
                "status": status,
                "duration_ms": round(elapsed * 1000, 3),
            }
            for k, v in ctx.timings.items():
                fields[k] = round(v * 1000, 3)
            access_log.info("request", extra={"fields": fields})

    def _observe(self, model: str, route: str, status: int, elapsed: float) -> None:
        key = (model, route, str(status))
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.metrics.requests.labels(*key)
        counter.inc()
        hkey = (model, route)
        histogram = self._histograms.get(hkey)
        if histogram is None:
            histogram = self._histograms[hkey] = self.metrics.request_duration.labels(*hkey)
        histogram.observe(elapsed)
