"""Open Inference Protocol v2 routes (KServe / Triton REST): health, metadata, readiness, infer.

Scoring is :func:`score_tensors`, shared by the FastAPI routes below (docs) and the lean ASGI path of
:mod:`server.routes.scoring` that serves them in practice.

A stock ``tritonclient.http.InferenceServerClient`` works against these (see tests/server/test_v2.py).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

from server import schemas, v2
from server.engine import Engine
from server.errors import NotReady
from server.http import (
    Reply,
    RequestContext,
    await_unless_disconnected,
    header,
    json_response,
    receive_body,
    request_context,
)
from server.routes.deps import engine_of, settings_of

router = APIRouter(tags=["v2"])
_INFER_DOC: dict[str, Any] = {
    "openapi_extra": schemas.body(schemas.InferRequest),
    "responses": schemas.responses(schemas.InferResponse, 404, 413, 422, 503, 504),
}


def _server_version() -> str:
    try:
        return version("lma-ctr")
    except PackageNotFoundError:
        return "0"


@router.get("/v2", summary="Server metadata")
async def server_metadata() -> Response:
    return json_response({"name": "lma-ctr", "version": _server_version(), "extensions": ["binary_tensor_data"]})


@router.get("/v2/health/live", summary="Liveness: the process answers")
async def live() -> Response:
    return json_response({"live": True})


@router.get("/v2/health/ready", summary="Readiness: a model is loaded and warm", responses=schemas.responses(None, 503))
async def ready(request: Request) -> Response:
    if not engine_of(request).ready:
        raise NotReady("not ready: no model loaded yet, or shutting down")
    return json_response({"ready": True})


@router.get("/v2/models/{name}", summary="Model metadata", responses=schemas.responses(None, 404))
async def model_metadata(name: str, request: Request) -> Response:
    return json_response(v2.model_metadata(engine_of(request).model_info(name)))


@router.get("/v2/models/{name}/versions/{version}", summary="Model metadata of a version")
async def model_version_metadata(name: str, version: str, request: Request) -> Response:
    return json_response(v2.model_metadata(engine_of(request).model_info(name, version)))


@router.get("/v2/models/{name}/ready", summary="Model readiness", responses=schemas.responses(None, 404, 503))
async def model_ready(name: str, request: Request) -> Response:
    info = engine_of(request).model_info(name)
    return json_response({"name": name, "version": info["version"], "ready": True})


@router.get("/v2/models/{name}/versions/{version}/ready", summary="Model version readiness")
async def model_version_ready(name: str, version: str, request: Request) -> Response:
    engine_of(request).model_info(name, version)
    return json_response({"name": name, "version": version, "ready": True})


@router.post("/v2/models/{name}/infer", summary="Score input tensors", **_INFER_DOC)
async def infer(name: str, request: Request) -> Response:
    return await _infer(request, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer", summary="Score input tensors with a version", **_INFER_DOC)
async def infer_version(name: str, version: str, request: Request) -> Response:
    return await _infer(request, name, version)


async def score_tensors(
    engine: Engine,
    ctx: RequestContext,
    name: str,
    version: str | None,
    headers: list[tuple[bytes, bytes]],
    receive: Receive,
    max_body_bytes: int,
) -> Reply:
    """Read an infer body from ``receive`` and score its tensors with model ``name`` (``version`` if given)."""
    if engine.has_model(name):
        ctx.model = name
    engine.admit(name, version)
    body = await receive_body(headers, receive, max_body_bytes)
    length = header(headers, v2.HEADER_LENGTH.encode())
    parsed = v2.decode_infer_request(body, None if length is None else length.decode("latin-1"))
    prediction = await await_unless_disconnected(receive, engine.infer(name, parsed.inputs, version, ctx.timings))
    ctx.version = prediction.version
    content, extra, media_type = v2.encode_infer_response(
        prediction.model, prediction.version, parsed.id, prediction.scores.probability, parsed.binary_output
    )
    return Reply(
        content,
        media_type=media_type.encode("latin-1"),
        headers=[(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()],
    )


async def _infer(request: Request, name: str, version: str | None) -> Response:
    max_body = settings_of(request).max_body_bytes
    reply = await score_tensors(
        engine_of(request), request_context(request), name, version, request.scope["headers"], request.receive, max_body
    )
    return reply.response()
