"""HTTP plumbing shared by all routes: JSON responses, bounded body reading, client-disconnect
detection, and the middleware that gives every response an ``X-Request-ID``, counts it and logs it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import zlib
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ClientDisconnected, InvalidInput, PayloadTooLarge, ServingError, error_response
from server.metrics import Metrics

log = logging.getLogger("lma.server")
access_log = logging.getLogger("lma.server.access")
T = TypeVar("T")
REQUEST_ID = "x-request-id"
_MAX_REQUEST_ID = 128
JSON = b"application/json"
_ids = random.Random()  # seeded from os.urandom; reseeded in forked children so that ids never repeat across them
os.register_at_fork(after_in_child=_ids.seed)


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status,
        headers=headers,
        media_type="application/json",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body (gzip/deflate decoded), refusing more than ``limit`` bytes with 413."""
    return await receive_body(request.scope["headers"], request.receive, limit)


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The value of header ``name`` (lower case) in an ASGI header list, or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


async def receive_body(headers: list[tuple[bytes, bytes]], receive: Receive, limit: int) -> bytes:
    """The body of an ASGI request (gzip/deflate decoded), refusing more than ``limit`` bytes with 413."""
    length = header(headers, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"body: {length.decode()} bytes, more than the limit of {limit} (LMA_MAX_BODY_BYTES)")
    body = b""
    chunks: list[bytes] | None = None
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise ClientDisconnected("client closed the connection while sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body: more than the limit of {limit} bytes (LMA_MAX_BODY_BYTES)")
        if not message.get("more_body", False):
            if chunks is None:
                body = chunk
            else:
                chunks.append(chunk)
                body = b"".join(chunks)
            break
        if chunks is None:
            chunks = []
        chunks.append(chunk)
    encoding = header(headers, b"content-encoding")
    if encoding and encoding != b"identity":
        body = _decompress(body, encoding.decode("latin-1"), limit)
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


# A request still running after this long starts watching for its client going away. Most requests are
# answered sooner (the batcher waits LMA_MAX_WAIT_MS, 2 ms by default) and never pay for a watcher task;
# a client that left earlier is still noticed at once then, as receive() reports a past disconnect
# immediately. So a vanished client's request costs the model at most this much more than before.
DISCONNECT_WATCH_AFTER_S = 0.010


class _DisconnectWatch:
    """Cancels ``task`` when ``receive()`` reports that the client disconnected (see await_unless_disconnected)."""

    __slots__ = ("finished", "gone", "receive", "task", "watcher")

    def __init__(self, task: asyncio.Task[Any], receive: Receive) -> None:
        self.task = task
        self.receive = receive
        self.watcher: asyncio.Future[Message] | None = None
        self.finished = False
        self.gone = False

    def start(self) -> None:
        if not self.finished:
            self.watcher = asyncio.ensure_future(self.receive())
            self.watcher.add_done_callback(self._on_message)

    def _on_message(self, watcher: asyncio.Future[Message]) -> None:
        if self.finished or watcher.cancelled() or watcher.exception() is not None:
            return
        if watcher.result().get("type") == "http.disconnect":
            self.gone = True
            self.task.cancel()

    def stop(self) -> None:
        self.finished = True
        if self.watcher is not None:
            self.watcher.cancel()


async def await_unless_disconnected(receive: Receive, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``; if the client disconnects first, cancel it and raise :class:`ClientDisconnected`.

    After the body is read, the server's next ``receive()`` message is ``http.disconnect``, sent when
    the client goes away or the response is complete. Cancelling our own task cancels the awaited
    batcher future, so the batcher drops the request before it costs the model anything.
    """
    task = asyncio.current_task()
    assert task is not None
    watch = _DisconnectWatch(task, receive)
    timer = asyncio.get_running_loop().call_later(DISCONNECT_WATCH_AFTER_S, watch.start)
    try:
        return await awaitable
    except asyncio.CancelledError:
        if watch.gone and task.uncancel() == 0:
            raise ClientDisconnected("client closed the connection before the response was ready") from None
        raise
    finally:
        timer.cancel()
        watch.stop()


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
        ctx = request.scope["lma"] = RequestContext(new_request_id())
    return ctx  # type: ignore[no-any-return]


def new_request_id() -> str:
    """24 random hex digits (from the process's PRNG: an id must be unique, not unguessable; no syscall)."""
    return f"{_ids.getrandbits(96):024x}"


def client_request_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The client's X-Request-ID when it is a safe token (printable ASCII, no spaces, at most 128 bytes)."""
    value = header(headers, b"x-request-id")
    if value is not None and 0 < len(value) <= _MAX_REQUEST_ID and all(33 <= c < 127 for c in value):
        return value.decode("ascii")
    return None


class Reply:
    """A response body with its media type and extra headers, sent by FastAPI routes and raw ASGI alike."""

    __slots__ = ("body", "headers", "media_type", "status")

    def __init__(
        self, body: bytes, status: int = 200, media_type: bytes = JSON, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        self.body = body
        self.status = status
        self.media_type = media_type
        self.headers = headers or []

    @classmethod
    def error(cls, exc: ServingError) -> Reply:
        body = orjson.dumps({"error": exc.message, "kind": exc.kind})
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers().items()]
        return cls(body, exc.status, JSON, headers)

    def response(self) -> Response:
        response = Response(self.body, status_code=self.status)
        response.raw_headers = self._headers()
        return response

    def _headers(self) -> list[tuple[bytes, bytes]]:
        # the headers (and order) Starlette's Response gives: extra headers, content-length, content-type
        return [*self.headers, (b"content-length", b"%d" % len(self.body)), (b"content-type", self.media_type)]

    async def send(self, send: Send, extra: tuple[bytes, bytes]) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": [*self._headers(), extra]})
        await send({"type": "http.response.body", "body": self.body})


class RequestRecorder:
    """Counts, times and logs each finished request (one per app: the middleware and the scoring routes)."""

    def __init__(self, metrics: Metrics, log_requests: bool = True) -> None:
        self.metrics = metrics
        self.log_requests = log_requests
        self._counters: dict[tuple[str, str, str], Any] = {}
        self._histograms: dict[tuple[str, str], Any] = {}

    def finish(self, method: str, route: str, ctx: RequestContext, status: int, elapsed: float) -> None:
        key = (ctx.model, route, str(status))
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.metrics.requests.labels(*key)
        counter.inc()
        hkey = (ctx.model, route)
        histogram = self._histograms.get(hkey)
        if histogram is None:
            histogram = self._histograms[hkey] = self.metrics.request_duration.labels(*hkey)
        histogram.observe(elapsed)
        if self.log_requests:
            fields: dict[str, Any] = {
                "request_id": ctx.request_id,
                "method": method,
                "route": route,
                "model": ctx.model,
                "version": ctx.version,
                "status": status,
                "duration_ms": round(elapsed * 1000, 3),
            }
            for k, v in ctx.timings.items():
                fields[k] = round(v * 1000, 3)
            access_log.info("request", extra={"fields": fields})


class RequestContextMiddleware:
    """Pure ASGI (no per-request task): request id, request metrics, access log, last-resort 500.

    An exception nothing else handled becomes a 500 with the usual error body and the request id,
    logged with its traceback; the server carries on.
    """

    def __init__(self, app: ASGIApp, recorder: RequestRecorder) -> None:
        self.app = app
        self.recorder = recorder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = client_request_id(scope["headers"]) or new_request_id()
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
        template = getattr(scope.get("route"), "path", "unmatched")
        self.recorder.finish(scope["method"], template, ctx, status, time.perf_counter() - start)
