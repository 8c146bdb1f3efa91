"""uvicorn's httptools HTTP/1.1 protocol, with what an admission-controlled scoring server needs from it.

``lma serve`` runs uvicorn with ``http=LmaHttpProtocol`` (``uvicorn --factory server.app:app_from_env
--http server.http_protocol:LmaHttpProtocol`` does the same). Without it the app works the same way, only
dearer under load. Four changes, each measured (docs/BENCHMARKS.md):

1. **The arrival time.** A request's deadline counts from when its first bytes were read
   (``scope["lma.arrival"]``), less the event loop's current lag (how long ready sockets wait to be read),
   not from when its ASGI task first runs.
2. **Admission as the headers arrive.** A scoring request whose deadline cannot be met is answered with its
   503 (+ Retry-After) straight from the parser callback, before uvicorn builds its request cycle and ASGI
   task and before its body is read (its body bytes are skipped as they come). This is what keeps
   refusals cheap enough at several times the capacity that the requests admitted still make their
   deadlines (goodput). An admitted request carries its ticket to the app in ``scope["lma.ticket"]``, so
   admission is decided once (:func:`server.protocols.routing.admit`).
3. **One write per response.** uvicorn writes the status line and headers, then the body, with two
   ``transport.write`` calls: two syscalls and two TCP segments on keep-alive connections for every
   answer. The headers are held back and sent with the body (:class:`_Corked`).
4. **Scoring replies without ASGI messages.** An admitted scoring request runs the app's scoring wrapper
   (:meth:`server.app.LmaApp.serve_scoring`, the one every server runs) in its own task on uvicorn's request
   cycle, as any request does, and its reply is written whole as the wrapper hands it over
   (:func:`_write_reply`): not as two ASGI messages that uvicorn's generic ``send`` checks header by header.
   Everything else about the cycle is uvicorn's: the body, disconnects, pipelining, keep-alive, draining.
   uvicorn's own wrappers of the app (proxy headers, trace logging) are not run for these requests; the
   scoring wrapper reads neither the client address nor the scheme.

It depends on uvicorn's internals of the version range pyproject.toml admits; tests/server/test_http_protocol.py
runs it through real uvicorn.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import urllib.parse
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from server.http import Reply
from server.protocols.routing import ARRIVAL, BODY_READ, ROUTE

log = logging.getLogger("lma.server")


class _Corked:
    """The transport of one response: the first write (status line and headers) waits for the second (body).

    A ``100 Continue`` goes out at once (the client waits for it before sending the body); anything held is
    flushed before the transport closes and when the response completes (a bodiless answer).
    """

    __slots__ = ("_held", "_started", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._held: bytes | None = None
        self._started = False

    def write(self, data: bytes) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self.transport.write(held + data)
        elif not self._started and not data.startswith(b"HTTP/1.1 100 "):
            self._started = True
            self._held = data
        else:
            self.transport.write(data)

    def flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self.transport.write(held)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def _lma_app(app: Any) -> Any:
    """The app that has the scoring hooks (``admit_early``, ``serve_scoring``), looked for through uvicorn's
    middleware wrappers (``.app``), or None."""
    for _ in range(8):
        if hasattr(app, "admit_early") and hasattr(app, "serve_scoring"):
            return app
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


async def _write_reply(cycle: RequestResponseCycle, reply: Reply, request_id: str) -> None:
    """``reply`` as the whole response of ``cycle``, in one write; what uvicorn's ``send`` does once a response is
    complete (keep-alive, the next pipelined request) follows."""
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()
    if cycle.disconnected:
        return
    data = reply.http11(cycle.default_headers, request_id, cycle.keep_alive)  # before the cycle counts as started
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    cycle.transport.write(data)
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()


async def _run_scoring(cycle: RequestResponseCycle, serve: Any, matched: Any) -> None:
    """uvicorn's ``run_asgi`` for a scoring request: the app's scoring wrapper, which answers every error itself."""
    try:
        await serve(cycle.scope, cycle.receive, matched, functools.partial(_write_reply, cycle))
    except BaseException as exc:  # as run_asgi: an answer the wrapper could not give is a 500 or a closed connection
        log.error("unhandled error answering a scoring request", exc_info=exc)
        if not cycle.response_started:
            await cycle.send_500_response()
        else:
            cycle.transport.close()
    finally:
        cycle.on_response = lambda: None


class LmaHttpProtocol(HttpToolsProtocol):
    """See the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        app = _lma_app(self.app)
        self._admit_early: Any = None if app is None else app.admit_early
        self._serve_scoring: Any = None if app is None else app.serve_scoring
        self._refused = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._refused = False
        self.scope[ARRIVAL] = time.monotonic()  # type: ignore[literal-required]

    def on_headers_complete(self) -> None:
        previous = self.cycle
        idle = previous is None or previous.response_complete  # answers go out in order: only when none pending
        if idle and self._admit_early is not None and self._refuse_early():
            return
        scoring = ROUTE in self.scope  # admitted early, so its reply is written whole (_start_asgi_task)
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not previous and cycle is not None and not scoring:
            cycle.transport = _Corked(self.transport)  # type: ignore[assignment]

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # ROUTE is only ever set by the early admission, so the app has serve_scoring; with reset_contextvars the
        # request goes the ASGI way (LmaApp.__call__ takes the match from the scope)
        if ROUTE not in cycle.scope or getattr(self.config, "reset_contextvars", False):
            super()._start_asgi_task(cycle, app)
            return
        matched = cycle.scope.pop(ROUTE)  # type: ignore[misc]
        task = self.loop.create_task(_run_scoring(cycle, self._serve_scoring, matched))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def _refuse_early(self) -> bool:
        scope: Any = self.scope
        scope["method"] = self.parser.get_method().decode("ascii")
        path = httptools.parse_url(self.url).path.decode("ascii", "replace")
        if "%" in path:  # as uvicorn decodes it: /v1/models/de%6Do:predict is the model 'demo'
            path = urllib.parse.unquote(path)
        scope["path"] = self.root_path + path
        keep_alive = self.parser.should_keep_alive() and self.parser.get_http_version() == "1.1"
        answer: bytes | None = self._admit_early(scope, self.server_state.default_headers, keep_alive)
        if answer is None:
            return False
        self._refused = True
        self.transport.write(answer)
        # the answer is complete: keep-alive bookkeeping as after any response
        if not keep_alive:
            self.transport.close()
        self.on_response_complete()
        return True

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            self.scope[BODY_READ] = True  # type: ignore[literal-required]
            super().on_message_complete()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        if cycle is not None and isinstance(cycle.transport, _Corked):
            cycle.transport.flush()
        super().on_response_complete()
