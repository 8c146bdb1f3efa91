"""The scoring routes as one table: it drives their dispatch, their admission and their OpenAPI entries.

A :class:`ScoringRoute` names its path template, its handler, the protocol whose error shape it answers
with, and what the OpenAPI document says of it (request and response bodies, error statuses). The app's
request wrapper (:class:`server.app.LmaApp`) matches each request against :class:`RouteTable` first and
serves a match itself, without FastAPI's routing, dependency solving and Request/Response objects (the
requests that carry the load); every other route is FastAPI's. :func:`openapi_paths` writes the same
table into ``/openapi.json``.

Serving a scoring request (:meth:`ScoringRoute.serve`):

1. admission, once, before the body is read: the model (404), the deadline (from the arrival, at most
   ``LMA_REQUEST_TIMEOUT_MS``, less when ``X-Request-Timeout-Ms`` asks) and whether it can be met
   (:meth:`server.engine.Engine.admit`: 503 + Retry-After at once when not). When the server runs on its
   own HTTP protocol (:mod:`server.http_protocol`) this has already happened as the headers arrived, and
   the request brings its :class:`~server.engine.Ticket` in ``scope["lma.ticket"]``;
2. the handler reads and decodes the body, scores it through the engine and encodes the answer.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from starlette.types import Receive, Scope

from server.engine import Engine, Ticket
from server.errors import InvalidInput
from server.http import DisconnectWatch, Headers, Reply, RequestContext, header, receive_body, route_path

TIMEOUT_HEADER = b"x-request-timeout-ms"
TICKET = "lma.ticket"  # scope key: the admission ticket of the early (HTTP protocol) admission
ROUTE = "lma.route"  # scope key: the (route, path parameters) the early admission matched
ARRIVAL = "lma.arrival"  # scope key: time.monotonic() at which the request's first bytes were read
BODY_READ = "lma.body_read"  # scope key: True once the HTTP protocol holds the whole body (no wait to read it)


@dataclass(slots=True)
class ScoringRequest:
    """What a scoring handler gets: the request, its context, path parameters and admission ticket."""

    scope: Scope
    receive: Receive
    ctx: RequestContext
    params: dict[str, str]
    ticket: Ticket
    max_body_bytes: int
    disconnects: DisconnectWatch
    engine: Engine

    @property
    def headers(self) -> Headers:
        return self.scope["headers"]  # type: ignore[no-any-return]

    def body(self) -> Awaitable[bytes]:
        """The body. Read at once when the HTTP protocol already holds all of it (``lma serve``: nearly always);
        else waited for by the request's deadline, and not counted as work meanwhile (:meth:`Engine.read_body`)."""
        read = receive_body(self.scope["headers"], self.receive, self.max_body_bytes)
        return read if self.scope.get(BODY_READ) else self.engine.read_body(self.ticket, read)

    def wait(self, awaitable: Awaitable[Any]) -> Awaitable[Any]:
        """``awaitable``, cancelled if the client goes away meanwhile (:class:`~server.errors.ClientDisconnected`)."""
        return self.disconnects.wait(self.receive, awaitable)


Handler = Callable[[Engine, ScoringRequest], Awaitable[Reply]]


@dataclass(frozen=True)
class ScoringRoute:
    """One scoring route: ``POST template`` served by ``handler`` (see the module docstring).

    Args:
        template: the path, with ``{name}`` and ``{version}`` parameters (each matches ``[^/]+``).
        handler: the coroutine that decodes, scores and encodes.
        protocol: ``native`` or ``v2``: the error shape and status of bad input (:func:`server.errors.status_of`).
        summary, tags, body, response, errors: the route's OpenAPI entry.
    """

    template: str
    handler: Handler
    protocol: str
    summary: str
    tags: tuple[str, ...]
    body: type[BaseModel]
    response: type[BaseModel]
    errors: tuple[int, ...]
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _prefix: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(self.template))
        object.__setattr__(self, "_pattern", re.compile(regex + r"\Z"))
        object.__setattr__(self, "_prefix", self.template.split("{", 1)[0])

    @property
    def parameters(self) -> tuple[str, ...]:
        return tuple(self._pattern.groupindex)

    def match(self, path: str) -> dict[str, str] | None:
        if not path.startswith(self._prefix):
            return None
        m = self._pattern.match(path)
        return m.groupdict() if m else None

    async def serve(
        self, engine: Engine, ctx: RequestContext, params: dict[str, str], scope: Scope, receive: Receive, app: Any
    ) -> Reply:
        """Admit (unless the HTTP protocol already did), then run the handler; the model is held until it ends."""
        name = params.get("name")
        if name is not None and engine.has_model(name):
            ctx.model = name  # label metrics with known names only (bounded cardinality)
        ticket: Ticket | None = scope.pop(TICKET, None)
        if ticket is None:
            ticket = admit(engine, scope, name, params.get("version"), app.max_timeout_s)
        try:
            request = ScoringRequest(scope, receive, ctx, params, ticket, app.max_body_bytes, app.disconnects, engine)
            reply = await self.handler(engine, request)
            if time.monotonic() > ticket.deadline:  # answered, but later than the client asked for
                engine.metrics.pending.inc(engine.metrics.answered_late.labels(ticket.mv.name, self.template))
            return reply
        finally:
            engine.release(ticket)


class RouteTable:
    """The scoring routes, matched in order on POST requests (path without the app's root_path)."""

    def __init__(self, routes: Sequence[ScoringRoute]) -> None:
        self.routes = tuple(routes)

    def match(self, scope: Scope) -> tuple[ScoringRoute, dict[str, str]] | None:
        """The route of a request's path (whatever its method: the wrapper answers 405 to all but POST)."""
        path = route_path(scope)
        for route in self.routes:
            params = route.match(path)
            if params is not None:
                return route, params
        return None


def request_timeout_s(headers: Headers, max_timeout_s: float) -> float:
    """The request's time budget: ``X-Request-Timeout-Ms`` when given (capped), else the server's maximum."""
    value = header(headers, TIMEOUT_HEADER)
    if value is None:
        return max_timeout_s
    try:
        ms = float(value)
    except ValueError:
        ms = math.nan
    if not (ms > 0 and math.isfinite(ms)):
        raise InvalidInput(
            f"X-Request-Timeout-Ms: expected a positive number of milliseconds, got {value.decode('latin-1')!r}"
        )
    return min(ms / 1000.0, max_timeout_s)


def arrival_of(scope: Scope, engine: Engine) -> float:
    """When the request arrived: when the HTTP protocol read its first bytes (else now), less the event loop's
    lag, the time ready sockets wait before they are read."""
    read: float | None = scope.get(ARRIVAL)
    return (time.monotonic() if read is None else read) - engine.loop_lag.lag_s


def admit(engine: Engine, scope: Scope, name: str | None, version: str | None, max_timeout_s: float) -> Ticket:
    """The one admission decision of a scoring request (raises 404, 422, 503)."""
    timeout_s = request_timeout_s(scope["headers"], max_timeout_s)
    return engine.admit(name, version, arrival_of(scope, engine), timeout_s)


# --- the OpenAPI document ---


def timeout_parameter(max_timeout_ms: float) -> dict[str, Any]:
    """The ``X-Request-Timeout-Ms`` header of a scoring route; its default and maximum are this server's deadline."""
    return {
        "name": "X-Request-Timeout-Ms",
        "in": "header",
        "required": False,
        "description": "the request's deadline in milliseconds from its arrival, at most LMA_REQUEST_TIMEOUT_MS (the"
        " default); a request that cannot be answered in time is refused at once with 503 + Retry-After, one whose"
        " deadline passes in the queue gets 504",
        "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": max_timeout_ms, "default": max_timeout_ms},
    }


def openapi_paths(routes: Sequence[ScoringRoute], max_timeout_ms: float) -> dict[str, dict[str, Any]]:
    """The ``paths`` entries of ``routes`` (refs to ``#/components/schemas/...``, see :func:`component_schemas`)."""
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        responses: dict[str, Any] = {
            "200": {"description": "Successful Response", "content": _json_ref(r.response)},
        }
        error = "V2ErrorResponse" if r.protocol == "v2" else "ErrorResponse"
        for status in r.errors:
            responses[str(status)] = {"description": _REASONS.get(status, "Error"), "content": _json_ref(error)}
        parameters: list[dict[str, Any]] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string", "title": p.title()}}
            for p in r.parameters
        ]
        parameters.append(timeout_parameter(max_timeout_ms))
        operation_id = re.sub(r"\W+", "_", r.template.strip("/")) + "_post"
        paths[r.template] = {
            "post": {
                "tags": list(r.tags),
                "summary": r.summary,
                "operationId": operation_id,
                "parameters": parameters,
                "requestBody": {"required": True, "content": _json_ref(r.body)},
                "responses": responses,
            }
        }
    return paths


def _json_ref(model: type[BaseModel] | str) -> dict[str, Any]:
    name = model if isinstance(model, str) else model.__name__
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


_REASONS = {
    400: "Invalid input (Open Inference Protocol)",
    404: "Unknown model or entity",
    408: "The body did not arrive by the deadline (the connection is closed)",
    413: "Too large",
    415: "Unsupported Content-Encoding",
    422: "Invalid input",
    503: "Overloaded, not ready, or a feature store that cannot answer (Retry-After)",
    504: "Deadline passed in the queue",
}
