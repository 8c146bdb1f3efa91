"""Open Inference Protocol v2 routes (KServe / Triton REST): health, metadata, readiness, infer.

A stock ``tritonclient.http.InferenceServerClient`` works against these (see tests/server/test_v2.py).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from server import schemas, v2
from server.errors import NotReady
from server.http import await_unless_disconnected, json_response, read_body, request_context
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


async def _infer(request: Request, name: str, version: str | None) -> Response:
    engine = engine_of(request)
    ctx = request_context(request)
    if engine.has_model(name):
        ctx.model = name
    body = await read_body(request, settings_of(request).max_body_bytes)
    parsed = v2.decode_infer_request(body, request.headers.get(v2.HEADER_LENGTH))
    prediction = await await_unless_disconnected(
        request.receive, engine.infer(name, parsed.inputs, version, ctx.timings)
    )
    ctx.version = prediction.version
    content, headers, media_type = v2.encode_infer_response(
        prediction.model, prediction.version, parsed.id, prediction.scores.probability, parsed.binary_output
    )
    return Response(content, headers=headers, media_type=media_type)
