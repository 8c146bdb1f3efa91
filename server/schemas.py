"""Request and response shapes, for the OpenAPI document only.

Bodies are parsed by hand on the hot path (orjson + :mod:`server.featurize`, which also gives the
error messages that name instance and field); these models describe the same shapes so ``/docs``
and ``/openapi.json`` document them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

Scalar = str | int | None


class Instance(BaseModel):
    dense: list[float | None] | dict[str, float | None] | None = Field(
        None, description="raw dense values in schema order, or by name; null or absent = missing"
    )
    categorical: list[Scalar] | dict[str, Scalar] | None = Field(
        None, description="raw categorical values in schema order, or by name; null or absent = missing"
    )
    entity: str | None = Field(None, description="feature-store key; stored features fill what is missing")


class PredictRequest(BaseModel):
    instances: list[Instance] = Field(..., description="1 to LMA_MAX_INSTANCES_PER_REQUEST instances")


class PredictResponse(BaseModel):
    predictions: list[float] = Field(..., description="click probability per instance, in order")
    model: str
    version: str


class ReloadRequest(BaseModel):
    path: str | None = Field(None, description="bundle folder to load")
    version: str | None = Field(None, description="version folder of the model repository")


class ReloadResponse(BaseModel):
    model: str
    result: str = Field(..., description="ok")
    version: str | None
    previous_version: str | None
    path: str
    message: str
    seconds: float


class ErrorResponse(BaseModel):
    error: str = Field(..., description="what is wrong; for bad input, names the instance and field")
    kind: str = Field(..., description="invalid_input, model_not_found, too_large, overloaded, not_ready, ...")


class InferTensor(BaseModel):
    name: str = Field(..., description="dense (FP32) or categorical (BYTES raw values, INT64 keys)")
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size with the binary extension")
    data: list[Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferTensor]
    outputs: list[dict[str, Any]] | None = None
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferTensor]


DOC_MODELS: tuple[type[BaseModel], ...] = (
    PredictRequest, PredictResponse, ReloadRequest, ReloadResponse, ErrorResponse, InferRequest, InferResponse,
)  # fmt: skip


def component_schemas() -> dict[str, Any]:
    """JSON schemas of :data:`DOC_MODELS` (and what they use), referenced as ``#/components/schemas/NAME``."""
    _, schema = models_json_schema([(m, "validation") for m in DOC_MODELS], ref_template="#/components/schemas/{model}")
    return schema["$defs"]  # type: ignore[no-any-return]


def body(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` of a route whose JSON body has the shape of ``model``."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": ref}}}}


def responses(ok: type[BaseModel] | None, *errors: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    if ok is not None:
        out[200] = {"model": ok}
    for status in errors:
        out[status] = {"model": ErrorResponse}
    return out
