"""Native routes (DESIGN section 7): scoring instances of raw values, and the model listing.

``POST /v1/models/{name}:predict`` and ``POST /v1/predict`` (the default model) are rows of the scoring
route table (:data:`SCORING`, served by the app's request wrapper); ``GET /v1/models`` and
``GET /v1/models/{name}`` are plain FastAPI routes (:data:`router`).
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from server import schemas
from server.engine import Engine
from server.http import Reply, json_response
from server.protocols.native.schemas import PredictRequest, PredictResponse
from server.protocols.routing import ScoringRequest, ScoringRoute
from server.routes.deps import engine_of

router = APIRouter(tags=["predict"])


async def predict(engine: Engine, request: ScoringRequest) -> Reply:
    """Read a predict body, score its instances with the ticket's model, answer the probabilities."""
    prediction = await request.wait(engine.predict(request.ticket, await request.body(), request.ctx.timings))
    request.ctx.model, request.ctx.version = prediction.model, prediction.version
    content = {"predictions": prediction.scores.probability, "model": prediction.model, "version": prediction.version}
    return Reply(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY))


_ERRORS = (404, 408, 413, 415, 422, 503, 504)
SCORING = (
    ScoringRoute(
        "/v1/models/{name}:predict", predict, "native", "Score instances with a model", ("predict",),
        PredictRequest, PredictResponse, _ERRORS,
    ),
    ScoringRoute(
        "/v1/predict", predict, "native", "Score instances with the default model", ("predict",),
        PredictRequest, PredictResponse, _ERRORS,
    ),
)  # fmt: skip


@router.get("/v1/models", summary="Loaded models: versions, runtime, schema, memory accounting")
async def list_models(request: Request) -> Response:
    return json_response({"models": engine_of(request).models()})


@router.get("/v1/models/{name}", summary="One loaded model", responses=schemas.responses(None, 404))
async def get_model(name: str, request: Request) -> Response:
    return json_response(engine_of(request).model_info(name))
