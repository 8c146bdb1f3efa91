"""Native prediction routes and model listing (DESIGN section 7).

The scoring itself is :func:`score_instances`, shared by the FastAPI routes below (which also give the OpenAPI
document its entries) and the lean ASGI path of :mod:`server.routes.scoring` that serves them in practice.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

from server import schemas
from server.engine import Engine
from server.http import Reply, RequestContext, await_unless_disconnected, json_response, receive_body, request_context
from server.routes.deps import engine_of, parse_json_object, settings_of

router = APIRouter(tags=["predict"])
_PREDICT_KEYS = frozenset(("instances",))
_PREDICT_DOC: dict[str, Any] = {
    "openapi_extra": schemas.body(schemas.PredictRequest),
    "responses": schemas.responses(schemas.PredictResponse, 404, 413, 422, 503, 504),
}


async def score_instances(
    engine: Engine,
    ctx: RequestContext,
    name: str | None,
    headers: list[tuple[bytes, bytes]],
    receive: Receive,
    max_body_bytes: int,
) -> Reply:
    """Read a predict body from ``receive``, score it with model ``name`` (None: the default model)."""
    if name is not None and engine.has_model(name):
        ctx.model = name  # label metrics with known names only (bounded cardinality)
    engine.admit(name)
    body = parse_json_object(await receive_body(headers, receive, max_body_bytes), _PREDICT_KEYS, "instances")
    prediction = await await_unless_disconnected(receive, engine.predict(name, body["instances"], ctx.timings))
    ctx.model, ctx.version = prediction.model, prediction.version
    content = {"predictions": prediction.scores.probability, "model": prediction.model, "version": prediction.version}
    return Reply(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY))


async def _predict(request: Request, name: str | None) -> Response:
    max_body = settings_of(request).max_body_bytes
    reply = await score_instances(
        engine_of(request), request_context(request), name, request.scope["headers"], request.receive, max_body
    )
    return reply.response()


@router.post("/v1/models/{name}:predict", summary="Score instances with a model", **_PREDICT_DOC)
async def predict(name: str, request: Request) -> Response:
    return await _predict(request, name)


@router.post("/v1/predict", summary="Score instances with the default model", **_PREDICT_DOC)
async def predict_default(request: Request) -> Response:
    return await _predict(request, None)


@router.get("/v1/models", summary="Loaded models: versions, runtime, schema, memory accounting")
async def list_models(request: Request) -> Response:
    return json_response({"models": engine_of(request).models()})


@router.get("/v1/models/{name}", summary="One loaded model", responses=schemas.responses(None, 404))
async def get_model(name: str, request: Request) -> Response:
    return json_response(engine_of(request).model_info(name))
