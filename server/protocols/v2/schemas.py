"""Open Inference Protocol v2 bodies, for the OpenAPI document (the codec, :mod:`server.protocols.v2.codec`,
parses them by hand to keep the binary tensor extension and exact error messages)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class InferTensor(BaseModel):
    name: str = Field(..., description="dense (FP32) or categorical (BYTES raw values, INT64 keys)")
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size with the binary extension")
    data: list[Any] | None = None


class InferParameters(BaseModel):
    timeout: int | None = Field(
        None, gt=0, description="deadline in microseconds (as Triton's), at most LMA_REQUEST_TIMEOUT_MS"
    )
    binary_data_output: bool | None = Field(None, description="answer every output as binary data")


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferTensor]
    outputs: list[dict[str, Any]] | None = None
    parameters: InferParameters | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferTensor]


class V2ErrorResponse(BaseModel):
    error: str = Field(..., description="what is wrong; for bad input, names the tensor and the position")


DOC_MODELS: tuple[type[BaseModel], ...] = (InferRequest, InferResponse, V2ErrorResponse)
