"""Open Inference Protocol v2 routes (KServe / Triton REST): health, metadata, readiness, infer.

``POST /v2/models/{name}/infer`` and ``POST /v2/models/{name}/versions/{version}/infer`` are rows of the
scoring route table (:data:`SCORING`); the rest are FastAPI routes (:data:`router`). Errors answer with
the spec's ``{"error": "..."}`` and bad input with 400 (:func:`server.errors.status_of`).

A stock ``tritonclient.http.InferenceServerClient`` works against these (see tests/server/test_v2.py).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from server import schemas
from server.engine import Engine
from server.errors import NotReady
from server.http import Reply, header, json_response
from server.protocols.routing import ScoringRequest, ScoringRoute
from server.protocols.v2 import codec
from server.protocols.v2.schemas import InferRequest, InferResponse, V2ErrorResponse
from server.routes.deps import engine_of

router = APIRouter(tags=["v2"])
_HEADER_LENGTH = codec.HEADER_LENGTH.encode()


def _errors(*statuses: int) -> dict[int | str, dict[str, object]]:
    return schemas.responses(None, *statuses, error=V2ErrorResponse)


def _server_version() -> str:
    try:
        return version("lma-ctr")
    except PackageNotFoundError:
        return "0"


async def infer(engine: Engine, request: ScoringRequest) -> Reply:
    """Read an infer body and score its tensors with the ticket's model (the version the path names, if any)."""
    body = await request.body()
    length = header(request.headers, _HEADER_LENGTH)
    parsed = codec.decode_infer_request(body, None if length is None else length.decode("latin-1"))
    if parsed.timeout_s is not None:
        engine.tighten(request.ticket, parsed.timeout_s)
    prediction = await request.wait(engine.infer(request.ticket, parsed.inputs, request.ctx.timings))
    request.ctx.version = prediction.version
    content, extra, media_type = codec.encode_infer_response(
        prediction.model, prediction.version, parsed.id, prediction.scores.probability, parsed.binary_output
    )
    return Reply(
        content,
        media_type=media_type.encode("latin-1"),
        headers=[(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()],
    )


_ERRORS = (400, 404, 408, 413, 415, 503, 504)
SCORING = (
    ScoringRoute(
        "/v2/models/{name}/infer", infer, "v2", "Score input tensors", ("v2",), InferRequest, InferResponse, _ERRORS
    ),
    ScoringRoute(
        "/v2/models/{name}/versions/{version}/infer", infer, "v2", "Score input tensors with a version", ("v2",),
        InferRequest, InferResponse, _ERRORS,
    ),
)  # fmt: skip


@router.get("/v2", summary="Server metadata")
async def server_metadata() -> Response:
    return json_response({"name": "lma-ctr", "version": _server_version(), "extensions": ["binary_tensor_data"]})


@router.get("/v2/health/live", summary="Liveness: the process answers")
async def live() -> Response:
    return json_response({"live": True})


# Health answers: "A 200 status code indicates true and a 4xx status code indicates false" (KServe Predict Protocol
# v2, Health); the bodies are the Open Inference Protocol's $ready_server_response / $ready_model_response.
NOT_READY = 400


@router.get("/v2/health/ready", summary="Readiness: a model is loaded and warm; 400 when not", responses=_errors(400))
async def ready(request: Request) -> Response:
    ready = engine_of(request).ready
    return json_response({"ready": ready}, 200 if ready else NOT_READY)


@router.get("/v2/models/{name}", summary="Model metadata", responses=_errors(404))
async def model_metadata(name: str, request: Request) -> Response:
    return json_response(codec.model_metadata(engine_of(request).model_info(name)))


@router.get("/v2/models/{name}/versions/{version}", summary="Model metadata of a version", responses=_errors(404))
async def model_version_metadata(name: str, version: str, request: Request) -> Response:
    return json_response(codec.model_metadata(engine_of(request).model_info(name, version)))


@router.get("/v2/models/{name}/ready", summary="Model readiness; 400 or 404 when not", responses=_errors(400, 404))
async def model_ready(name: str, request: Request) -> Response:
    return _model_ready(engine_of(request), name, None)


@router.get(
    "/v2/models/{name}/versions/{version}/ready", summary="Model version readiness; 400 or 404 when not",
    responses=_errors(400, 404),
)  # fmt: skip
async def model_version_ready(name: str, version: str, request: Request) -> Response:
    return _model_ready(engine_of(request), name, version)


def _model_ready(engine: Engine, name: str, version: str | None) -> Response:
    try:
        info = engine.model_info(name, version)
    except NotReady:  # known, but the server is starting or shutting down
        return json_response({"name": name, "ready": False}, NOT_READY)
    return json_response({"name": name, "version": info["version"], "ready": True})
