"""Open Inference Protocol v2 (the KServe / Triton REST protocol): request decoding, response encoding.

Both wire forms a stock ``tritonclient.http`` client sends are understood:

- JSON tensors: ``{"inputs": [{"name", "shape", "datatype", "data": [...]}], "outputs": [...]}``;
- the binary tensor data extension: the header ``Inference-Header-Content-Length: N`` says the
  first N body bytes are the JSON; each input with ``parameters.binary_data_size`` takes its bytes
  from what follows, in input order (BYTES elements as 4-byte little-endian length + bytes).

The output ``probability`` (FP32 [B, 1]) comes back as JSON ``data``, or as binary when the request
asks for it (``outputs[i].parameters.binary_data`` or ``parameters.binary_data_output``), which is
what tritonclient does by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from models.jit import kernel
from server.errors import InvalidInput
from server.featurize import json_type
from server.types import BytesElements, Tensor

HEADER_LENGTH = "inference-header-content-length"
OUTPUT_NAME = "probability"
_BAD = -1
_MAX_PACKED = 8  # bytes a packed value holds
_NUMERIC: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "INT64": np.dtype("<i8"),
}  # datatype -> dtype on the wire (little-endian)


@dataclass(frozen=True, slots=True)
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    binary_output: bool
    timeout_s: float | None = None  # parameters.timeout (microseconds on the wire, as Triton's), in seconds


def decode_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """Parse an infer request body (``header_length``: the Inference-Header-Content-Length header)."""
    split = len(body)
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise InvalidInput(f"Inference-Header-Content-Length: {header_length!r} is not a length within the body")
        split = int(header_length)
    try:
        request = orjson.loads(body[:split])
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"body: not valid JSON ({e})") from None
    if type(request) is not dict:
        raise InvalidInput(f"body: expected an object, got {json_type(request)}")
    raw_inputs = request.get("inputs")
    if type(raw_inputs) is not list or not raw_inputs:
        raise InvalidInput(f"inputs: expected a non-empty array of tensors, got {json_type(raw_inputs)}")
    binary = memoryview(body)[split:]
    offset = 0
    inputs = []
    for k, spec in enumerate(raw_inputs):
        name, datatype, shape, params = _tensor_header(k, spec)
        size = params.get("binary_data_size")
        data: np.ndarray | list[str] | BytesElements
        if size is None:
            data = _json_data(name, datatype, spec.get("data"))
        else:
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {size!r} does not fit the binary part of the body"
                )
            data = _binary_data(name, datatype, binary[offset : offset + size], math.prod(shape))
            offset += size
        inputs.append(Tensor(name, datatype, shape, data))
    if offset != len(binary):
        raise InvalidInput(f"body: {len(binary) - offset} bytes of binary data belong to no input")
    request_id = request.get("id")
    if request_id is not None and type(request_id) is not str:
        raise InvalidInput(f"id: expected a string, got {json_type(request_id)}")
    return InferRequest(request_id, inputs, _binary_output(request), _timeout(request))


def _timeout(request: dict[str, Any]) -> float | None:
    """``parameters.timeout``: the request's deadline in microseconds, as Triton's protocol extension has it
    (tritonclient's ``infer(..., timeout=...)`` sends it)."""
    params = request.get("parameters")
    if params is None:
        return None
    if type(params) is not dict:
        raise InvalidInput(f"parameters: expected an object, got {json_type(params)}")
    timeout = params.get("timeout")
    if timeout is None:
        return None
    if type(timeout) is not int or timeout <= 0:
        raise InvalidInput(f"parameters.timeout: expected a positive integer of microseconds, got {timeout!r}")
    return timeout / 1e6


def _tensor_header(k: int, spec: object) -> tuple[str, str, tuple[int, ...], dict[str, Any]]:
    if type(spec) is not dict:
        raise InvalidInput(f"inputs[{k}]: expected an object, got {json_type(spec)}")
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if type(name) is not str:
        raise InvalidInput(f"inputs[{k}].name: expected a string, got {json_type(name)}")
    if type(datatype) is not str:
        raise InvalidInput(f"input {name!r}: datatype: expected a string, got {json_type(datatype)}")
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidInput(f"input {name!r}: shape: expected an array of non-negative integers, got {shape!r}")
    params = spec.get("parameters") or {}
    if type(params) is not dict:
        raise InvalidInput(f"input {name!r}: parameters: expected an object, got {json_type(params)}")
    return name, datatype, tuple(shape), params


def _json_data(name: str, datatype: str, data: object) -> np.ndarray | list[str]:
    if type(data) is not list:
        raise InvalidInput(f"input {name!r}: data: expected an array, got {json_type(data)}")
    if datatype == "BYTES":
        flat: list[str] = []
        _flatten_strings(name, data, flat)
        return flat
    if datatype not in _NUMERIC:
        raise InvalidInput(f"input {name!r}: datatype {datatype} is not supported; use FP32, INT64 or BYTES")
    try:
        arr = np.asarray(data)
    except (ValueError, OverflowError) as e:
        raise InvalidInput(f"input {name!r}: data is not a regular array of numbers ({e})") from None
    kinds = "iu" if datatype == "INT64" else "iuf"
    if arr.size and arr.dtype.kind not in kinds:
        raise InvalidInput(
            f"input {name!r}: {datatype} data must be {'integers' if datatype == 'INT64' else 'numbers'}"
        )
    try:
        with np.errstate(over="raise", invalid="raise"):
            return arr.reshape(-1).astype(np.float32 if datatype == "FP32" else np.int64)
    except (FloatingPointError, OverflowError):
        raise InvalidInput(f"input {name!r}: a value is out of the {datatype} range") from None


def _flatten_strings(name: str, data: list[object], out: list[str]) -> None:
    """The strings of ``data``, nested lists in order, into ``out``: with a stack of its own, not recursion,
    so that a body nested a thousand deep is bad input (422/400), not a ``RecursionError`` (500)."""
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if type(v) is str:
                out.append(v)
            elif type(v) is list:
                stack.append(iter(v))
                break
            else:
                raise InvalidInput(f"input {name!r}: BYTES data must be strings, got {json_type(v)}")
        else:
            stack.pop()


@kernel
def _walk(buf, starts, lengths, packed):  # type: ignore[no-untyped-def]
    """Where the ``len(starts)`` BYTES elements of ``buf`` (4-byte little-endian length, then the bytes) lie, and
    each one packed into ``packed`` as :class:`~models.schema.PackedKeys` packs values. 1 when every element
    packs, 0 when one does not (longer than 8 bytes, or a NUL byte: its packing would not be one-to-one),
    _BAD unless ``buf`` holds exactly that many whole elements."""
    n = buf.shape[0]
    pos = 0
    all_pack = True
    for i in range(starts.shape[0]):
        if pos + 4 > n:
            return _BAD
        length = np.int64(buf[pos]) | np.int64(buf[pos + 1]) << 8 | np.int64(buf[pos + 2]) << 16
        length |= np.int64(buf[pos + 3]) << 24
        s = pos + 4
        if length > n - s:
            return _BAD
        starts[i] = s
        lengths[i] = length
        if all_pack:
            if length > _MAX_PACKED:
                all_pack = False
            else:
                w = np.uint64(0)
                for k in range(length):
                    b = buf[s + k]
                    if b == 0:
                        all_pack = False
                    w |= np.uint64(b) << np.uint64(8 * k)
                packed[i] = w
        pos = s + length
    if pos != n:
        return _BAD
    return 1 if all_pack else 0


def _elements(raw: memoryview, count: int) -> BytesElements | None:
    """``count`` BYTES elements of ``raw`` in one compiled pass (:func:`_walk`), or None unless ``raw`` holds
    exactly ``count`` whole elements: the caller then walks it element by element, which names what is wrong."""
    if count == 0 or count > len(raw) // 4:  # every element takes 4 bytes at least; the count is the client's
        return None
    starts, lengths = np.empty(count, np.int64), np.empty(count, np.int64)
    packed = np.empty(count, np.uint64)
    found = _walk(np.frombuffer(raw, np.uint8), starts, lengths, packed)
    if found == _BAD:
        return None
    return BytesElements(raw, starts, lengths, packed if found == 1 else None)


def warm() -> None:
    """Compile (or load from the cache) the element walk now: a model load pays it, not a first request."""
    _elements(memoryview(b"\x01\x00\x00\x00a"), 1)


def _binary_data(name: str, datatype: str, raw: memoryview, count: int) -> np.ndarray | list[str] | BytesElements:
    if datatype == "BYTES":
        located = _elements(raw, count)
        if located is not None:
            return located
        values: list[str] = []
        pos, end = 0, len(raw)
        while pos < end:
            if pos + 4 > end:
                raise InvalidInput(f"input {name!r}: truncated BYTES element length at byte {pos}")
            n = int.from_bytes(raw[pos : pos + 4], "little")
            if pos + 4 + n > end:
                raise InvalidInput(f"input {name!r}: BYTES element at byte {pos} claims {n} bytes past the end")
            values.append(bytes(raw[pos + 4 : pos + 4 + n]).decode("utf-8", "surrogateescape"))
            pos += 4 + n
        return values
    if datatype not in _NUMERIC:
        raise InvalidInput(f"input {name!r}: datatype {datatype} is not supported; use FP32, INT64 or BYTES")
    wire = _NUMERIC[datatype]
    if len(raw) % wire.itemsize:
        raise InvalidInput(f"input {name!r}: {len(raw)} binary bytes are not a whole number of {datatype} values")
    return np.frombuffer(raw, dtype=wire).astype(wire.newbyteorder("="))


def _binary_output(request: dict[str, Any]) -> bool:
    params = request.get("parameters") or {}
    binary = (
        _flag(params.get("binary_data_output", False), "parameters.binary_data_output")
        if type(params) is dict
        else False
    )
    outputs = request.get("outputs")
    if outputs is None:
        return binary
    if type(outputs) is not list:
        raise InvalidInput(f"outputs: expected an array, got {json_type(outputs)}")
    for k, out in enumerate(outputs):
        if type(out) is not dict or out.get("name") != OUTPUT_NAME:
            got = out.get("name") if type(out) is dict else json_type(out)
            raise InvalidInput(f"outputs[{k}]: unknown output {got!r}; this model has {OUTPUT_NAME!r}")
        params = out.get("parameters") or {}
        if type(params) is dict and "binary_data" in params:
            binary = _flag(params["binary_data"], f"outputs[{k}].parameters.binary_data")
    return binary


def _flag(value: object, where: str) -> bool:
    if type(value) is not bool:  # bool("false") is True: a string here would ask for the opposite
        raise InvalidInput(f"{where}: expected true or false, got {json_type(value)}")
    return value


def encode_infer_response(
    model: str, version: str, request_id: str | None, probability: np.ndarray, binary: bool
) -> tuple[bytes, dict[str, str], str]:
    """(body, extra headers, media type) of an infer response."""
    out: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": [len(probability), 1]}
    response: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = [out]
    if not binary:
        out["data"] = probability.tolist()
        return orjson.dumps(response), {}, "application/json"
    raw = np.ascontiguousarray(probability, dtype="<f4").tobytes()
    out["parameters"] = {"binary_data_size": len(raw)}
    header = orjson.dumps(response)
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}, "application/octet-stream"


# runtime -> the platform name the Open Inference Protocol lists for it ("onnx_onnxv1", "pytorch_torchscript")
PLATFORMS = {"onnx": "onnx_onnxv1", "torchscript": "pytorch_torchscript"}


def model_metadata(info: dict[str, Any]) -> dict[str, Any]:
    """``GET /v2/models/{name}`` from the engine's model info.

    ``categorical`` is declared BYTES (raw values); INT64 keys hashed with the model's schema are
    accepted too. The spec's ``parameters`` hold scalar values only: the feature names in schema order
    are in ``GET /v1/models/{name}`` (``dense_names``, ``categorical_names``).
    """
    n_dense, n_fields = len(info["dense_names"]), len(info["categorical_names"])
    inputs = [{"name": "categorical", "datatype": "BYTES", "shape": [-1, n_fields]}]
    if n_dense:
        inputs.insert(0, {"name": "dense", "datatype": "FP32", "shape": [-1, n_dense]})
    return {
        "name": info["name"],
        "versions": [info["version"]],
        "platform": PLATFORMS.get(info["runtime"], info["runtime"]),
        "inputs": inputs,
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, 1]}],
        "parameters": {
            "dense_features": n_dense,
            "categorical_features": n_fields,
            "categorical_datatypes": "BYTES,INT64",
            "dense_input": "raw values; the server applies log(1 + max(x, 0))",
            "feature_names": f"GET /v1/models/{info['name']}",
            "embedding": str(info.get("embedding", "")),
        },
    }
