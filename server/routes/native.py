"""Native prediction routes and model listing (DESIGN section 7)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from server import schemas
from server.http import await_unless_disconnected, json_response, request_context
from server.routes.deps import engine_of, json_object

router = APIRouter(tags=["predict"])
_PREDICT_KEYS = frozenset(("instances",))
_PREDICT_DOC: dict[str, Any] = {
    "openapi_extra": schemas.body(schemas.PredictRequest),
    "responses": schemas.responses(schemas.PredictResponse, 404, 413, 422, 503, 504),
}


@router.post("/v1/models/{name}:predict", summary="Score instances with a model", **_PREDICT_DOC)
async def predict(name: str, request: Request) -> Response:
    return await _predict(request, name)


@router.post("/v1/predict", summary="Score instances with the default model", **_PREDICT_DOC)
async def predict_default(request: Request) -> Response:
    return await _predict(request, None)


async def _predict(request: Request, name: str | None) -> Response:
    engine = engine_of(request)
    ctx = request_context(request)
    if name is not None and engine.has_model(name):
        ctx.model = name  # label metrics with known names only (bounded cardinality)
    body = await json_object(request, _PREDICT_KEYS, required="instances")
    prediction = await await_unless_disconnected(request.receive, engine.predict(name, body["instances"], ctx.timings))
    ctx.model, ctx.version = prediction.model, prediction.version
    return json_response(
        {"predictions": prediction.scores.probability, "model": prediction.model, "version": prediction.version}
    )


@router.get("/v1/models", summary="Loaded models: versions, runtime, schema, memory accounting")
async def list_models(request: Request) -> Response:
    return json_response({"models": engine_of(request).models()})


@router.get("/v1/models/{name}", summary="One loaded model", responses=schemas.responses(None, 404))
async def get_model(name: str, request: Request) -> Response:
    return json_response(engine_of(request).model_info(name))
