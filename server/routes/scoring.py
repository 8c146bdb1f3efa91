"""The scoring routes as plain ASGI: the requests that carry the load skip FastAPI's per-request machinery.

``POST /v1/models/{name}:predict``, ``POST /v1/predict``, ``POST /v2/models/{name}/infer`` and
``POST /v2/models/{name}/versions/{version}/infer`` are matched here by string tests on the path and
served by the same functions as their FastAPI routes (:func:`server.routes.native.score_instances`,
:func:`server.routes.v2.score_tensors`), with the same error contract (:class:`~server.errors.ServingError`
-> its status, anything else -> a logged 500), the same ``X-Request-ID``, metrics and access log
(:class:`~server.http.RequestRecorder`). Everything else, and these paths under a ``root_path``, goes
to FastAPI, whose routes also keep documenting these four in ``/openapi.json``.

What this saves per request (measured with ``lma bench``, see docs/BENCHMARKS.md): routing through
every registered route's regex, dependency solving, query-parameter parsing, the exception, body-limit
and telemetry middleware layers and their wrapped ``send`` callables, and Starlette's Request/Response
objects.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import Receive, Scope, Send

from server.errors import ServingError
from server.http import Reply, RequestContext, RequestRecorder, client_request_id, new_request_id
from server.routes.native import score_instances
from server.routes.v2 import score_tensors
from server.settings import Settings

log = logging.getLogger("lma.server")

PREDICT = "/v1/models/{name}:predict"
PREDICT_DEFAULT = "/v1/predict"
INFER = "/v2/models/{name}/infer"
INFER_VERSION = "/v2/models/{name}/versions/{version}/infer"
_MODELS = "/v1/models/"
_V2_MODELS = "/v2/models/"
_PREDICT_SUFFIX = ":predict"
_INFER_SUFFIX = "/infer"

Route = tuple[str, str | None, str | None]  # (template, name, version)


def match(path: str) -> Route | None:
    """The scoring route of ``path`` with its parameters, as Starlette would match it (``{x}`` = ``[^/]+``)."""
    if path == PREDICT_DEFAULT:
        return PREDICT_DEFAULT, None, None
    if path.startswith(_MODELS) and path.endswith(_PREDICT_SUFFIX):
        name = path[len(_MODELS) : -len(_PREDICT_SUFFIX)]
        return (PREDICT, name, None) if name and "/" not in name else None
    if path.startswith(_V2_MODELS) and path.endswith(_INFER_SUFFIX):
        parts = path[len(_V2_MODELS) : -len(_INFER_SUFFIX)].split("/")
        if len(parts) == 1 and parts[0]:
            return INFER, parts[0], None
        if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
            return INFER_VERSION, parts[0], parts[2]
    return None


class ScoringRoutes:
    """Serves the scoring routes of one app (see the module docstring).

    Args:
        state: the app's state; ``state.engine`` exists once the lifespan has started.
        settings: the server settings (body size limit).
        recorder: the app's request recorder (metrics, access log).
    """

    def __init__(self, state: Any, settings: Settings, recorder: RequestRecorder) -> None:
        self.state = state
        self.max_body_bytes = settings.max_body_bytes
        self.recorder = recorder

    def route(self, scope: Scope) -> Route | None:
        if scope["method"] != "POST" or scope.get("root_path"):
            return None
        return match(scope["path"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send, route: Route) -> None:
        start = time.perf_counter()
        headers = scope["headers"]
        request_id = client_request_id(headers) or new_request_id()
        ctx = RequestContext(request_id)
        template, name, version = route
        try:
            engine = self.state.engine
            if template is PREDICT or template is PREDICT_DEFAULT:
                reply = await score_instances(engine, ctx, name, headers, receive, self.max_body_bytes)
            else:
                assert name is not None
                reply = await score_tensors(engine, ctx, name, version, headers, receive, self.max_body_bytes)
        except ServingError as e:
            reply = Reply.error(e)
        except Exception:
            log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
            reply = Reply.error(ServingError(f"internal server error (request id {request_id})"))
        try:
            await reply.send(send, (b"x-request-id", request_id.encode("ascii")))
        finally:
            self.recorder.finish("POST", template, ctx, reply.status, time.perf_counter() - start)
