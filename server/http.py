"""HTTP plumbing of every route: the one request wrapper's parts, the one reply (and error) renderer, body reading.

The request wrapper (:class:`server.app.LmaApp`: ``__call__``, and ``serve_scoring`` for the scoring routes) runs
around every HTTP request the app serves, scoring routes and FastAPI routes alike. With the parts here, it gives
the request its id (the client's ``X-Request-ID`` when it is a safe token, else a new one), turns a
:class:`~server.errors.ServingError` into its status and body (:meth:`Reply.error`; an unexpected exception into a
logged 500), adds ``X-Request-ID`` to the response, counts and times the request (:class:`RequestRecorder`) and
formats its access-log line, which a background thread writes (:class:`AccessLog`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import http
import logging
import os
import random
import threading
import time
import zlib
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from server.errors import (
    ClientDisconnected,
    HttpError,
    InvalidInput,
    PayloadTooLarge,
    ServingError,
    UnsupportedMediaType,
    status_of,
)
from server.logs import json_entry, json_line, lines_handler, timestamp
from server.metrics import Metrics

log = logging.getLogger("lma.server")
access_log = logging.getLogger("lma.server.access")
T = TypeVar("T")
_MAX_REQUEST_ID = 128
JSON = b"application/json"
_ids = random.Random()  # seeded from os.urandom; reseeded in forked children so that ids never repeat across them
os.register_at_fork(after_in_child=_ids.seed)
Headers = list[tuple[bytes, bytes]]
_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in http.HTTPStatus}


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status,
        headers=headers,
        media_type="application/json",
    )


def header(headers: Headers, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower case) in an ASGI header list, or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


# --- bodies ---


async def read_body(request: Request, limit: int) -> bytes:
    """The body of a FastAPI route's request (gzip/deflate decoded), refusing more than ``limit`` bytes."""
    return await receive_body(request.scope["headers"], request.receive, limit)


async def receive_body(headers: Headers, receive: Receive, limit: int) -> bytes:
    """The body of an ASGI request (gzip/deflate decoded), refusing more than ``limit`` bytes with 413."""
    length = header(headers, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"body: {length.decode()} bytes, more than the limit of {limit} (LMA_MAX_BODY_BYTES)")
    message = await receive()
    if message["type"] != "http.request":  # http.disconnect
        raise ClientDisconnected("client closed the connection while sending the body")
    body: bytes = message.get("body", b"")
    if message.get("more_body", False):
        chunks = [body]
        size = len(body)
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ClientDisconnected("client closed the connection while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body: more than the limit of {limit} bytes (LMA_MAX_BODY_BYTES)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
    elif len(body) > limit:
        raise PayloadTooLarge(f"body: more than the limit of {limit} bytes (LMA_MAX_BODY_BYTES)")
    encoding = header(headers, b"content-encoding")
    if encoding is not None and encoding != b"identity":
        body = decompress(body, encoding.decode("latin-1"), limit)
    return body


CONTENT_ENCODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15, "identity": 0}  # name -> zlib wbits (0: as is)


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` decoded from its Content-Encoding (RFC 9110 8.4: a list, applied in order; decoded in reverse).

    An encoding we cannot decode is 415 Unsupported Media Type; a stream that is corrupt, truncated or
    followed by other bytes is 422; more than ``limit`` decoded bytes is 413.
    """
    codings = [c.strip().lower() for c in encoding.split(",") if c.strip()]
    for coding in codings:
        if coding not in CONTENT_ENCODINGS:
            raise UnsupportedMediaType(f"Content-Encoding {coding!r} is not supported; use gzip, deflate or identity")
    for coding in reversed(codings):
        wbits = CONTENT_ENCODINGS[coding]
        if wbits == 0:
            continue
        d = zlib.decompressobj(wbits)
        try:
            out = d.decompress(body, limit + 1)
        except zlib.error as e:
            raise InvalidInput(f"body: not valid {coding} data ({e})") from None
        if len(out) > limit or d.unconsumed_tail:
            raise PayloadTooLarge(f"body: decompresses to more than the limit of {limit} bytes (LMA_MAX_BODY_BYTES)")
        if not d.eof:
            raise InvalidInput(f"body: the {coding} data is truncated (the stream does not end)")
        if d.unused_data:
            raise InvalidInput(f"body: {len(d.unused_data)} bytes follow the end of the {coding} data")
        body = out
    return body


# --- clients that go away ---

# A request still running after this long starts watching for its client going away. Most requests are
# answered sooner and never pay for a watcher; a client that left earlier is still noticed then, as
# receive() reports a past disconnect at once. So a vanished client's request costs the model at most this
# much more than before. One sweeper task per app checks every DISCONNECT_WATCH_AFTER_S (no timer per request).
DISCONNECT_WATCH_AFTER_S = 0.010


class _Watched:
    """A request awaiting its answer: cancelled when ``receive()`` reports that the client disconnected."""

    __slots__ = ("gone", "receive", "since", "task", "watcher")

    def __init__(self, task: asyncio.Task[Any], receive: Receive, since: float) -> None:
        self.task = task
        self.receive = receive
        self.since = since
        self.watcher: asyncio.Future[Message] | None = None
        self.gone = False

    def start(self) -> None:
        self.watcher = asyncio.ensure_future(self.receive())
        self.watcher.add_done_callback(self._on_message)

    def _on_message(self, watcher: asyncio.Future[Message]) -> None:
        if watcher.cancelled() or watcher.exception() is not None:
            return
        if watcher.result().get("type") == "http.disconnect":
            self.gone = True
            self.task.cancel()

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()


class DisconnectWatch:
    """Cancels the awaited work of requests whose clients went away (see :meth:`wait`)."""

    def __init__(self) -> None:
        self._waiting: dict[int, _Watched] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    async def wait(self, receive: Receive, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable``; if the client disconnects first, cancel it and raise :class:`ClientDisconnected`.

        After the body is read, the server's next ``receive()`` message is ``http.disconnect``, sent when
        the client goes away or the response is complete. Cancelling our own task cancels the awaited
        batcher future, so the batcher drops the request before it costs the model anything.
        """
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        w = _Watched(task, receive, loop.time())
        key = id(w)
        self._waiting[key] = w
        if self._sweeper is None:
            self._sweeper = loop.call_later(DISCONNECT_WATCH_AFTER_S, self._sweep)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if w.gone and task.uncancel() == 0:
                raise ClientDisconnected("client closed the connection before the response was ready") from None
            raise
        finally:
            del self._waiting[key]
            w.stop()

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() - DISCONNECT_WATCH_AFTER_S
        for w in self._waiting.values():
            if w.watcher is None and w.since <= due:
                w.start()
        self._sweeper = loop.call_later(DISCONNECT_WATCH_AFTER_S, self._sweep) if self._waiting else None


# --- request context, replies ---


class RequestContext:
    """What a request's handler tells the wrapper: which model answered, and a few timings."""

    __slots__ = ("model", "request_id", "timings", "version")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.model = ""
        self.version = ""
        self.timings: dict[str, float] = {}


def request_context(request: Request) -> RequestContext:
    ctx = request.scope.get("lma")
    if ctx is None:  # app used without the wrapper (never in build_app)
        ctx = request.scope["lma"] = RequestContext(new_request_id())
    return ctx  # type: ignore[no-any-return]


def new_request_id() -> str:
    """24 random hex digits (from the process's PRNG: an id must be unique, not unguessable; no syscall)."""
    return f"{_ids.getrandbits(96):024x}"


def client_request_id(headers: Headers) -> str | None:
    """The client's X-Request-ID when it is a safe token (printable ASCII, no spaces, at most 128 bytes)."""
    value = header(headers, b"x-request-id")
    if value is not None and 0 < len(value) <= _MAX_REQUEST_ID and all(33 <= c < 127 for c in value):
        return value.decode("ascii")
    return None


class Reply:
    """A response: body, status, media type, extra headers. The one renderer of answers and errors alike."""

    __slots__ = ("body", "headers", "media_type", "status")

    def __init__(
        self, body: bytes, status: int = 200, media_type: bytes = JSON, headers: Headers | None = None
    ) -> None:
        self.body = body
        self.status = status
        self.media_type = media_type
        self.headers = headers or []

    @classmethod
    def error(cls, exc: ServingError, protocol: str = "native") -> Reply:
        """The answer to ``exc``: ``{"error", "kind"}`` on native routes, ``{"error"}`` on v2 routes (the OIP
        spec's error shape), with the status of :func:`server.errors.status_of`."""
        content = {"error": exc.message} if protocol == "v2" else {"error": exc.message, "kind": exc.kind}
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers().items()]
        return cls(orjson.dumps(content), status_of(exc, protocol), JSON, headers)

    def response(self) -> Response:
        response = Response(self.body, status_code=self.status)
        response.raw_headers = self.raw_headers()
        return response

    def raw_headers(self) -> Headers:
        # the headers (and order) Starlette's Response gives: extra headers, content-length, content-type
        return [*self.headers, (b"content-length", b"%d" % len(self.body)), (b"content-type", self.media_type)]

    def http11(self, default_headers: Headers, request_id: str, keep_alive: bool) -> bytes:
        """The whole HTTP/1.1 response as bytes (for answers written straight to a transport)."""
        lines = [_STATUS_LINES.get(self.status) or b"HTTP/1.1 %d \r\n" % self.status]
        for name, value in (*default_headers, *self.raw_headers(), (b"x-request-id", request_id.encode("ascii"))):
            lines += (name, b": ", value, b"\r\n")
        if not keep_alive:
            lines.append(b"connection: close\r\n")
        lines += (b"\r\n", self.body)
        return b"".join(lines)

    async def send(self, send: Send, request_id: str) -> None:
        """As ASGI messages, with ``X-Request-ID``."""
        headers = [*self.raw_headers(), (b"x-request-id", request_id.encode("ascii"))]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


# --- what each finished request leaves behind: metrics, access log ---


class AccessLog:
    """The access log: the event loop formats each request's line, a background thread writes them in batches.

    A line costs the loop a dict and an ``orjson`` call (:func:`access_line`); every ``interval`` seconds the
    thread takes the lines queued and writes them (with none queued, it sleeps until one comes). Formatting stays
    on the loop on purpose: a thread that formats a batch holds the GIL for milliseconds at a time, and the loop
    waits for it (a higher p99, in docs/BENCHMARKS.md); on the loop it is a few µs a request. The thread writes through
    :meth:`~server.logs.JsonLinesHandler.write_lines` when that handler (the one
    :func:`~server.logs.configure_logging` installs) is the only one the lines reach: a few writes per batch,
    each cut at a line end and at most ``PIPE_BUF`` bytes (unless one line is longer), so lines of workers
    sharing stderr never interleave. Otherwise each line becomes a record handed to the logger's handlers, as any
    log line (tests, embedding apps). Each line's ``ts`` is the time its request finished, not the time it was
    written.

    The queue holds at most ``max_queued`` lines: while the stream does not keep up (a stalled log collector),
    newer lines are dropped rather than growing the server's memory without bound. Those, and lines a failing
    stream did not take, are counted in ``dropped`` and logged as a warning. Nothing that goes wrong in a batch
    stops the thread.
    """

    def __init__(
        self, dropped: Any = None, interval: float = 0.05, max_queued: int = 65_536, logger: logging.Logger = access_log
    ) -> None:
        self._logger = logger
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._dropped = dropped
        self._interval = interval
        self._max_queued = max_queued
        self._full = 0  # lines refused by a full queue, ever (only write() adds to it)
        self._full_counted = 0  # of those, the ones counted and logged (only the thread adds to it)
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by the first line after the thread went idle
        self._idle = False  # the thread waits for a line (instead of waking every interval with nothing to do)
        self._thread = threading.Thread(target=self._run, name="lma-access-log", daemon=True)
        self._thread.start()

    def write(self, finished: float, line: bytes) -> None:
        """Queue one line (from :func:`access_line`) of a request that finished at ``finished`` (:func:`time.time`)."""
        if len(self._queue) < self._max_queued:
            self._queue.append((finished, line))
        else:
            self._full += 1
        if self._idle:
            self._idle = False
            self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._queue:
                # Idle: wait for a line. ``_idle`` is published before the queue is looked at again, so a line
                # appended meanwhile is either seen here or sets ``_wake`` (write() reads ``_idle`` after it appends).
                self._idle = True
                if not self._queue:
                    self._wake.wait()
                self._idle = False
                self._wake.clear()
            if not self._stop.wait(self._interval):  # let a batch gather
                self._write_safely()
        self._write_safely()

    def _write_safely(self) -> None:
        try:
            self._write_queued()
        except Exception:  # the thread must live on: without it, every later line would be dropped unseen
            with contextlib.suppress(Exception):
                log.exception("access log: writing a batch failed")

    def _write_queued(self) -> None:
        queued = self._queue
        batch = [queued.popleft() for _ in range(len(queued))]
        full = self._full - self._full_counted
        self._full_counted += full
        unwritten = 0
        logger = self._logger
        if batch and logger.isEnabledFor(logging.INFO):
            handler = lines_handler(logger, logging.INFO)
            if handler is not None:
                unwritten = handler.write_lines([line for _, line in batch])
            else:
                for finished, line in batch:
                    try:
                        logger.handle(_record(logger, finished, line))
                    except Exception:
                        unwritten += 1
        if full or unwritten:
            if self._dropped is not None:
                self._dropped.inc(full + unwritten)
            log.warning(
                "access log: lines dropped",
                extra={"fields": {"queue_full": full, "not_written": unwritten, "max_queued": self._max_queued}},
            )

    def close(self) -> None:
        """Write what is queued, then stop the thread (waiting at most 10 s for it); lines queued later are not
        written."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            log.warning("access log: the writer did not finish within 10 s; its last lines may be lost")


def _record(logger: logging.Logger, finished: float, line: bytes) -> logging.LogRecord:
    """``line`` as the record it was made from: ``fields`` under the logger's name, created at ``finished``."""
    fields = orjson.loads(line)
    for key in _LINE_KEYS:
        del fields[key]
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, "request", (), None, extra={"fields": fields})
    record.created = finished
    record.msecs = (finished - int(finished)) * 1000 // 1
    return record


_LINE_KEYS = ("ts", "level", "logger", "msg")  # what json_entry puts before a line's fields


def access_line(finished: float, method: str, route: str, ctx: RequestContext, status: int, elapsed: float) -> bytes:
    """A request's access line: where it went, who answered, how it ended, its timings in ms (never its body)."""
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
    return json_line(json_entry(timestamp(finished), "info", access_log.name, "request", None, fields))


class RequestRecorder:
    """Counts, times and logs each finished request (one per app)."""

    def __init__(self, metrics: Metrics, log_requests: bool = True) -> None:
        self.metrics = metrics
        self.access_log = AccessLog(metrics.access_log_dropped) if log_requests else None
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._histograms: dict[tuple[str, str], Any] = {}

    def finish(self, method: str, route: str, ctx: RequestContext, status: int, elapsed: float) -> None:
        key = (ctx.model, route, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.metrics.requests.labels(ctx.model, route, str(status))
        pending = self.metrics.pending
        pending.inc(counter)
        hkey = (ctx.model, route)
        histogram = self._histograms.get(hkey)
        if histogram is None:
            histogram = self._histograms[hkey] = self.metrics.request_duration.labels(*hkey)
        pending.observe(histogram, elapsed)
        if self.access_log is not None:
            finished = time.time()
            self.access_log.write(finished, access_line(finished, method, route, ctx, status, elapsed))

    def close(self) -> None:
        if self.access_log is not None:
            self.access_log.close()


def internal_error(request_id: str) -> ServingError:
    return ServingError(f"internal server error (request id {request_id})")


def route_path(scope: Scope) -> str:
    """The path the app routes on: the request's path without the app's ``root_path`` prefix."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def protocol_of(scope: Scope) -> str:
    """Which protocol's error shape a request gets: ``v2`` under /v2, else ``native``."""
    path = route_path(scope)
    return "v2" if path == "/v2" or path.startswith("/v2/") else "native"


def register_error_handlers(app: FastAPI) -> None:
    """FastAPI routes' errors through the one renderer (:meth:`Reply.error`)."""

    async def on_serving_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServingError)
        return Reply.error(exc, protocol_of(request.scope)).response()

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        # Only path and query parameters are declared to FastAPI (bodies are parsed by hand).
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        error = InvalidInput(f"{where}: {first['msg']}" if where else str(first["msg"]))
        return Reply.error(error, protocol_of(request.scope)).response()

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        kind = "not_found" if exc.status_code == 404 else "http_error"
        error = HttpError(str(exc.detail), exc.status_code, kind, dict(exc.headers or {}))
        return Reply.error(error, protocol_of(request.scope)).response()

    async def on_unexpected_error(request: Request, exc: Exception) -> Response:
        # Starlette's ServerErrorMiddleware asks this for the 500 it sends, then re-raises ``exc`` to the
        # request wrapper, which logs it with its traceback.
        return Reply.error(internal_error(request_context(request).request_id), protocol_of(request.scope)).response()

    app.add_exception_handler(ServingError, on_serving_error)
    app.add_exception_handler(Exception, on_unexpected_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
