"""The native request and response bodies, described once.

These pydantic models are the description of the native bodies: ``/openapi.json`` documents them, and the
hand-written validation of the hot path (:mod:`server.featurize`, which gives the error messages that
name instance and field) takes its keys and allowed values from them (:data:`INSTANCE_FIELDS`,
:data:`MISSING_ENTITY_POLICIES`, :data:`PREDICT_KEYS`), so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

Scalar = str | int | None
MissingEntityPolicy = Literal["error", "defaults"]


class Instance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dense: list[float | None] | dict[str, float | None] | None = Field(
        None, description="raw dense values in schema order, or by name; null or absent = missing"
    )
    categorical: list[Scalar] | dict[str, Scalar] | None = Field(
        None, description="raw categorical values in schema order, or by name; null or absent = missing"
    )
    entity: str | None = Field(
        None, min_length=1, description="feature-store key; stored features fill what the instance leaves missing"
    )
    missing_entity: MissingEntityPolicy | None = Field(
        None,
        description='what an entity with nothing stored means: "error" (404 entity_not_found, the default) or'
        ' "defaults" (score the instance with the values it carries)',
    )


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instances: list[Instance] = Field(..., min_length=1, description="1 to LMA_MAX_INSTANCES_PER_REQUEST instances")


class PredictResponse(BaseModel):
    predictions: list[float] = Field(..., description="click probability per instance, in order")
    model: str
    version: str


INSTANCE_FIELDS: tuple[str, ...] = tuple(Instance.model_fields)
INSTANCE_KEYS = frozenset(INSTANCE_FIELDS)
MISSING_ENTITY_POLICIES: tuple[str, ...] = get_args(MissingEntityPolicy)
PREDICT_KEYS = frozenset(PredictRequest.model_fields)
DOC_MODELS: tuple[type[BaseModel], ...] = (PredictRequest, PredictResponse)
