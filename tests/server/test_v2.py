"""Open Inference Protocol v2 against a real uvicorn server, driven by a stock tritonclient.http client."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from server.app import build_app
from tests.helpers.serving import Bundles, LiveServer, as_float32, direct_scores, instance, settings_for


@pytest.fixture(scope="module")
def live(bundles: Bundles) -> Iterator[LiveServer]:
    with LiveServer(build_app(settings_for(bundles.repo, max_wait_ms=5))) as server:
        yield server


@pytest.fixture(scope="module")
def client(live: LiveServer) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=f"127.0.0.1:{live.port}")
    yield c
    c.close()


def tensors(instances: list[dict], categorical: str = "BYTES", binary: bool = True) -> list[triton.InferInput]:
    dense = np.array([[np.nan if v is None else v for v in i["dense"]] for i in instances], dtype=np.float32)
    d = triton.InferInput("dense", list(dense.shape), "FP32")
    d.set_data_from_numpy(dense, binary_data=binary)
    rows = [i["categorical"] for i in instances]
    if categorical == "BYTES":
        values = np.array([[str(v).encode() for v in row] for row in rows], dtype=np.object_)
    else:
        from models.schema import criteo_schema

        values = criteo_schema(5).keys_for(rows)
    c = triton.InferInput("categorical", list(values.shape), categorical)
    c.set_data_from_numpy(values, binary_data=binary)
    return [d, c]


def test_health_and_metadata(client: triton.InferenceServerClient, bundles: Bundles) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("criteo") and client.is_model_ready("criteo", "2")
    assert not client.is_model_ready("criteo", "1") and not client.is_model_ready("nope")
    meta = client.get_model_metadata("criteo")
    assert (meta["name"], meta["versions"], meta["platform"]) == ("criteo", ["2"], "onnx_onnxv1")
    assert meta["inputs"] == [
        {"name": "dense", "datatype": "FP32", "shape": [-1, 13]},
        {"name": "categorical", "datatype": "BYTES", "shape": [-1, 26]},
    ]
    assert meta["outputs"] == [{"name": "probability", "datatype": "FP32", "shape": [-1, 1]}]
    assert [i["name"] for i in client.get_model_metadata("avazu")["inputs"]] == ["categorical"]
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]


@pytest.mark.parametrize(
    ("categorical", "binary"), [("BYTES", True), ("BYTES", False), ("INT64", True), ("INT64", False)]
)
def test_infer_matches_the_model(
    client: triton.InferenceServerClient, bundles: Bundles, categorical: str, binary: bool
) -> None:
    instances = [instance(i) for i in range(6)]
    outputs = [triton.InferRequestedOutput("probability", binary_data=binary)]
    result = client.infer("criteo", tensors(instances, categorical, binary), outputs=outputs, request_id="r-1")
    probability = result.as_numpy("probability")
    assert probability.shape == (6, 1) and probability.dtype == np.float32
    np.testing.assert_array_equal(probability[:, 0], direct_scores(bundles.criteo_v2, instances).probability)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("criteo", "2", "r-1")


def test_default_outputs_come_back_binary(client: triton.InferenceServerClient, bundles: Bundles) -> None:
    instances = [instance(9)]
    result = client.infer("criteo", tensors(instances), model_version="2")  # no outputs: all, binary
    assert result.get_output("probability")["parameters"] == {"binary_data_size": 4}
    np.testing.assert_array_equal(
        result.as_numpy("probability")[:, 0], direct_scores(bundles.criteo_v2, instances).probability
    )


def test_infer_errors_reach_the_client(client: triton.InferenceServerClient) -> None:
    bad = tensors([instance(0)])
    bad[1] = triton.InferInput("categorical", [1, 25], "BYTES")
    bad[1].set_data_from_numpy(np.array([[b"x"] * 25], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        client.infer("criteo", bad)
    assert e.value.status() == "400" and "input 'categorical': shape [1, 25] is not [batch, 26]" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer("nope", tensors([instance(0)]))
    assert e.value.status() == "404"
    with pytest.raises(InferenceServerException) as e:
        client.infer("criteo", tensors([instance(0)]), model_version="1")
    assert e.value.status() == "404" and "serving version 2" in e.value.message()


def test_json_protocol_by_hand(live: LiveServer, bundles: Bundles) -> None:
    inst = instance(2)
    body = {
        "inputs": [
            {"name": "dense", "shape": [1, 13], "datatype": "FP32", "data": [inst["dense"]]},  # nested rows are fine
            {"name": "categorical", "shape": [1, 26], "datatype": "BYTES", "data": inst["categorical"]},
        ]
    }
    r = httpx.post(f"{live.url}/v2/models/criteo/infer", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    out = r.json()["outputs"][0]
    assert (out["name"], out["datatype"], out["shape"]) == ("probability", "FP32", [1, 1])
    assert as_float32(out["data"]) == direct_scores(bundles.criteo_v2, [inst]).probability
    body["inputs"][1]["datatype"] = "FP32"
    r = httpx.post(f"{live.url}/v2/models/criteo/infer", json=body)
    assert r.status_code == 400 and r.json()["error"].startswith("input 'categorical': FP32 data must be numbers")


# --- the Open Inference Protocol to the letter (KServe "Predict Protocol - Version 2", required_api.md) ---


def test_spec_parameters_hold_scalars(live: LiveServer) -> None:
    """'$parameter = $string : $string | $number | $boolean' (Parameters)."""
    meta = httpx.get(f"{live.url}/v2/models/criteo").json()
    assert meta["parameters"] and all(type(v) in (str, int, float, bool) for v in meta["parameters"].values())
    assert meta["parameters"]["dense_features"] == 13 and meta["parameters"]["categorical_features"] == 26


def test_spec_platform_names(live: LiveServer) -> None:
    """'platform: The framework/backend for the model' -- named as the spec's Platforms list: onnx_onnxv1,
    pytorch_torchscript."""
    assert httpx.get(f"{live.url}/v2/models/criteo").json()["platform"] == "onnx_onnxv1"
    from server.protocols.v2.codec import PLATFORMS

    assert PLATFORMS == {"onnx": "onnx_onnxv1", "torchscript": "pytorch_torchscript"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v2/models/criteo/infer", {"inputs": []}),
        ("/v2/models/criteo/infer", {"inputs": [{"name": "categorical", "shape": [1, 2], "datatype": "BYTES",
                                                  "data": ["a", "b"]}]}),
        ("/v2/models/criteo/infer", {"inputs": [{"name": "dense", "shape": [1, 13], "datatype": "FP32",
                                                  "data": [0.0] * 13}], "parameters": {"timeout": -1}}),
    ],
)  # fmt: skip
def test_spec_a_failed_inference_is_400_with_an_error_string(live: LiveServer, path: str, body: object) -> None:
    """'A failed inference request must be indicated by an HTTP error status (typically 400). The HTTP body must
    contain the $inference_error_response object': {"error": <error message string>}."""
    r = httpx.post(f"{live.url}{path}", json=body)
    assert r.status_code == 400
    assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)


def test_spec_failed_metadata_is_an_error_object(live: LiveServer) -> None:
    """'A failed model metadata request must be indicated by an HTTP error status ... The HTTP body must contain the
    $metadata_model_error_response object' ({"error": $string})."""
    r = httpx.get(f"{live.url}/v2/models/nope")
    assert r.status_code == 404 and set(r.json()) == {"error"}


def test_spec_health_is_200_for_true_and_4xx_for_false(live: LiveServer, tmp_path: Path) -> None:
    """'A 200 status code indicates true and a 4xx status code indicates false' (Health)."""
    assert httpx.get(f"{live.url}/v2/health/ready").status_code == 200
    assert httpx.get(f"{live.url}/v2/models/criteo/ready").json() == {"name": "criteo", "version": "2", "ready": True}
    assert 400 <= httpx.get(f"{live.url}/v2/models/criteo/versions/1/ready").status_code < 500
    assert 400 <= httpx.get(f"{live.url}/v2/models/nope/ready").status_code < 500
    with LiveServer(build_app(settings_for(tmp_path))) as empty:  # no model loaded: not ready
        r = httpx.get(f"{empty.url}/v2/health/ready")
        assert (r.status_code, r.json()) == (400, {"ready": False})
        assert httpx.get(f"{empty.url}/v2/health/live").status_code == 200
        c = triton.InferenceServerClient(url=f"127.0.0.1:{empty.port}")
        assert c.is_server_live() and not c.is_server_ready()
        c.close()


def test_the_timeout_parameter_is_microseconds_as_tritons(client: triton.InferenceServerClient) -> None:
    # tritonclient's infer(timeout=...) sends parameters.timeout in microseconds; a generous one is served
    result = client.infer("criteo", tensors([instance(0)]), timeout=5_000_000)
    assert result.as_numpy("probability").shape == (1, 1)


def test_disconnected_client_is_dropped(bundles: Bundles) -> None:
    # a minute's wait for company, well inside the deadline: the request sits in the queue until its client goes
    settings = settings_for(bundles.repo, max_wait_ms=60_000, max_batch_size=64, request_timeout_ms=600_000)
    app = build_app(settings)
    with LiveServer(app) as server:
        body = json.dumps({"instances": [instance()]}).encode()
        request = (
            f"POST /v1/models/criteo:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(request)
            _wait_for(lambda: app.state.engine.model("criteo").batcher.queued == 1)
        # the client is gone: the request is dropped, before it costs the model anything
        _wait_for(lambda: app.state.engine.model("criteo").batcher.queued == 0)
        metrics = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
            for s in family.samples
        }
        assert metrics[("lma_rejected_total", (("model", "criteo"), ("reason", "cancelled")))] == 1
        route = (("code", "499"), ("model", "criteo"), ("route", "/v1/models/{name}:predict"))
        assert metrics[("lma_requests_total", route)] == 1
        assert metrics[("lma_queue_depth", (("model", "criteo"),))] == 0
        assert metrics[("lma_inference_samples_total", (("model", "criteo"),))] == 0  # never scored


def _wait_for(condition: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)
