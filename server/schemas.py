"""Shapes shared by the OpenAPI document of every route: the error body, the admin bodies, and the helpers
that reference them.

The bodies of each protocol live with the protocol (:mod:`server.protocols.native.schemas`,
:mod:`server.protocols.v2.schemas`); :func:`component_schemas` puts them all in ``components.schemas``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from server.protocols.native import schemas as native
from server.protocols.v2 import schemas as v2


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


DOC_MODELS: tuple[type[BaseModel], ...] = (
    *native.DOC_MODELS, *v2.DOC_MODELS, ReloadRequest, ReloadResponse, ErrorResponse,
)  # fmt: skip


def component_schemas() -> dict[str, Any]:
    """JSON schemas of :data:`DOC_MODELS` (and what they use), referenced as ``#/components/schemas/NAME``."""
    _, schema = models_json_schema([(m, "validation") for m in DOC_MODELS], ref_template="#/components/schemas/{model}")
    return schema["$defs"]  # type: ignore[no-any-return]


def body(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` of a route whose JSON body has the shape of ``model``."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": ref}}}}


def responses(
    ok: type[BaseModel] | None, *errors: int, error: type[BaseModel] = ErrorResponse
) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    if ok is not None:
        out[200] = {"model": ok}
    for status in errors:
        out[status] = {"model": error}
    return out
