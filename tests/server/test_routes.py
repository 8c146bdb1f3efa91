"""Native routes through TestClient (lifespan runs): values, every status of the error contract, request ids."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.app import build_app
from tests.helpers.serving import TOKENS, Bundles, as_float32, direct_scores, instance, make_repo, settings_for

PREDICT = "/v1/models/criteo:predict"


def error(r: Any) -> tuple[int, str, str]:
    body = r.json()
    if r.url.path.startswith("/v2/"):  # the Open Inference Protocol's error shape: {"error": ...} alone
        assert set(body) == {"error"}, body
        return r.status_code, "", body["error"]
    assert set(body) == {"error", "kind"}, body
    return r.status_code, body["kind"], body["error"]


# --- values ---


def test_predictions_are_the_models_scores(app_client: TestClient, bundles: Bundles) -> None:
    instances = [instance(i) for i in range(5)]
    r = app_client.post(PREDICT, json={"instances": instances})
    assert r.status_code == 200
    body = r.json()
    assert (body["model"], body["version"]) == ("criteo", "2")  # the repository's latest
    np.testing.assert_array_equal(
        as_float32(body["predictions"]), direct_scores(bundles.criteo_v2, instances).probability
    )


def test_object_form_and_missing_values_mean_the_same(app_client: TestClient) -> None:
    listed = {"dense": [1.0, None] + [0] * 11, "categorical": ["t1", None] + [""] * 24}
    named = {"dense": {"I1": 1.0, "I3": 0}, "categorical": {"C1": "t1", "C5": None}}
    r = app_client.post(PREDICT, json={"instances": [listed, named, {}]})
    assert r.status_code == 200
    p = r.json()["predictions"]
    assert p[0] == p[1]  # absent names, null, "" and 0 (dense) are all "missing"
    assert p[2] != p[0]  # {} is all-missing: another sample


def test_integer_and_string_tokens_are_the_same_token(app_client: TestClient) -> None:
    a = {"categorical": {"C2": 1005}}
    b = {"categorical": {"C2": "1005"}}
    assert app_client.post(PREDICT, json={"instances": [a, b]}).json()["predictions"][0] == pytest.approx(
        app_client.post(PREDICT, json={"instances": [b]}).json()["predictions"][0], abs=0
    )


def test_default_model_route(app_client: TestClient, bundles: Bundles) -> None:
    inst = {"dense": [], "categorical": TOKENS[: bundles.avazu.schema.num_fields]}
    r = app_client.post("/v1/predict", json={"instances": [inst]})
    assert r.status_code == 200 and r.json()["model"] == "avazu"  # first name in sorted order
    np.testing.assert_array_equal(as_float32(r.json()["predictions"]), direct_scores(bundles.avazu, [inst]).probability)


def test_a_default_model_that_is_not_loaded_is_said_at_start_and_per_request(
    bundles: Bundles, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level("WARNING", logger="lma.server.registry"),
        TestClient(build_app(settings_for(bundles.repo, default_model="nope"))) as client,
    ):
        r = client.post("/v1/predict", json={"instances": [instance()]})
        assert (r.status_code, r.json()["kind"]) == (503, "not_ready")
        assert r.json()["error"] == (
            "the default model 'nope' (LMA_DEFAULT_MODEL) is not loaded; loaded models: ['avazu', 'criteo']"
        )
        assert client.post("/v1/models/criteo:predict", json={"instances": [instance()]}).status_code == 200
    assert any(m.getMessage().startswith("LMA_DEFAULT_MODEL=nope is none of the models loaded (avazu, criteo)")
               for m in caplog.records)  # fmt: skip


def test_model_listing(app_client: TestClient, bundles: Bundles) -> None:
    models = {m["name"]: m for m in app_client.get("/v1/models").json()["models"]}
    assert set(models) == {"avazu", "criteo"}
    c = models["criteo"]
    assert (c["version"], c["runtime"], c["device"], c["embedding"], c["default"]) == ("2", "onnx", "cpu", "lma", False)
    assert c["memory"] == bundles.criteo_v2.memory
    assert c["categorical_names"] == list(bundles.criteo_v2.schema.categorical_names)
    assert app_client.get("/v1/models/avazu").json()["default"] is True


# --- the error contract ---


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"instances": [instance(0), {"dense": [1.0] * 12}]},
         "instances[1].dense: expected 13 values (I1..I13), got 12"),
        ({"instances": [{"dense": [1, "2"] + [0] * 11}]},
         "instances[0].dense[1] (I2): expected a number or null, got string"),
        ({"instances": [{"dense": {"I99": 1}}]}, "instances[0].dense: unknown feature 'I99'"),
        ({"instances": [{"dense": {"I4": True}}]}, "instances[0].dense.I4: expected a number or null, got boolean"),
        ({"instances": [instance(0), instance(1), {"categorical": {"C7": 1.5}}]},
         "instances[2].categorical.C7: expected a string, an integer or null, got number"),
        ({"instances": [{"categorical": ["a"] * 25 + [[1]]}]},
         "instances[0].categorical[25] (C26): expected a string, an integer or null, got array"),
        ({"instances": [{"categorical": {"C0": "a"}}]}, "instances[0].categorical: unknown field 'C0'"),
        ({"instances": [{"categorical": "a"}]}, "instances[0].categorical: expected an array or an object, got string"),
        ({"instances": [{"entity": 7}]}, "instances[0].entity: expected a non-empty string, got integer"),
        ({"instances": [{"bogus": 1}]}, "instances[0]: unknown key 'bogus'; expected dense, categorical, entity"),
        ({"instances": [3]}, "instances[0]: expected an object, got integer"),
        ({"instances": []}, "instances: expected at least one instance"),
        ({"instances": {"a": 1}}, "instances: expected an array of objects, got object"),
        ({"rows": []}, "body: unknown key 'rows'"),
        ({}, "body: 'instances' is missing"),
        ([], "body: expected an object, got array"),
    ],
)  # fmt: skip
def test_invalid_input_is_422_naming_instance_and_field(app_client: TestClient, body: Any, message: str) -> None:
    status, kind, text = error(app_client.post(PREDICT, json=body))
    assert (status, kind) == (422, "invalid_input")
    assert text.startswith(message), text


def test_malformed_json_is_422(app_client: TestClient) -> None:
    status, kind, text = error(
        app_client.post(PREDICT, content=b'{"instances": [', headers={"content-type": "application/json"})
    )
    assert (status, kind) == (422, "invalid_input") and text.startswith("body: not valid JSON")


def test_unknown_model_is_404(app_client: TestClient) -> None:
    status, kind, text = error(app_client.post("/v1/models/nope:predict", json={"instances": [instance()]}))
    assert (status, kind) == (404, "model_not_found")
    assert text == "model 'nope' is not loaded; loaded models: ['avazu', 'criteo']"
    assert error(app_client.get("/v1/models/nope"))[:2] == (404, "model_not_found")
    assert error(app_client.get("/no/such/route"))[:2] == (404, "not_found")


def test_method_not_allowed_is_json(app_client: TestClient) -> None:
    status, kind, _ = error(app_client.get("/v1/predict"))
    assert (status, kind) == (405, "http_error")


def test_too_many_instances_is_413(bundles: Bundles) -> None:
    with TestClient(build_app(settings_for(bundles.repo, max_instances_per_request=3))) as client:
        status, kind, text = error(client.post(PREDICT, json={"instances": [instance(i) for i in range(4)]}))
        assert (status, kind) == (413, "too_large")
        assert text == "instances: 4 instances, more than the limit of 3 (LMA_MAX_INSTANCES_PER_REQUEST)"
        assert client.post(PREDICT, json={"instances": [instance(i) for i in range(3)]}).status_code == 200


def test_too_large_body_is_413(bundles: Bundles) -> None:
    with TestClient(build_app(settings_for(bundles.repo, max_body_bytes=2048))) as client:
        big = {"instances": [instance(i) for i in range(20)]}
        status, kind, text = error(client.post(PREDICT, json=big))
        assert (status, kind) == (413, "too_large") and "LMA_MAX_BODY_BYTES" in text


def test_gzip_body_is_accepted(app_client: TestClient) -> None:
    import gzip

    raw = json.dumps({"instances": [instance(3)]}).encode()
    plain = app_client.post(PREDICT, content=raw).json()["predictions"]
    zipped = app_client.post(PREDICT, content=gzip.compress(raw), headers={"content-encoding": "gzip"})
    assert zipped.status_code == 200 and zipped.json()["predictions"] == plain
    status, kind, text = error(app_client.post(PREDICT, content=raw, headers={"content-encoding": "br"}))
    assert (status, kind) == (415, "unsupported_media_type") and text.startswith("Content-Encoding 'br'")
    # a gzip stream cut short is refused, never scored as far as it goes
    status, kind, text = error(
        app_client.post(PREDICT, content=gzip.compress(raw)[:-8], headers={"content-encoding": "gzip"})
    )
    assert (status, kind) == (422, "invalid_input") and "truncated" in text
    status, kind, text = error(
        app_client.post(PREDICT, content=gzip.compress(raw) + b"junk", headers={"content-encoding": "gzip"})
    )
    assert (status, kind) == (422, "invalid_input") and "4 bytes follow the end of the gzip data" in text


def test_overloaded_is_503_with_retry_after(bundles: Bundles, tmp_path: Path) -> None:
    repo = make_repo(tmp_path, bundles.criteo_v1)
    # The first request waits (up to max_wait_ms) for a fuller batch; a long deadline keeps the
    # lag-based admission rules out of the way on a slow machine, so only the queue limit speaks.
    app = build_app(settings_for(repo, max_queue=1, max_batch_size=64, max_wait_ms=5_000, request_timeout_ms=60_000))
    with TestClient(app) as client:
        first: dict[str, Any] = {}
        waiting = threading.Thread(
            target=lambda: first.update(r=client.post(PREDICT, json={"instances": [instance()]}))
        )
        waiting.start()
        _wait_for(lambda: app.state.engine.model("criteo").batcher.queued == 1)
        r = client.post(PREDICT, json={"instances": [instance(1)]})
        status, kind, text = error(r)
        assert (status, kind, r.headers["retry-after"]) == (503, "overloaded", "1")
        assert text == "model 'criteo' is overloaded: 1 requests are queued; retry later"
        waiting.join(30)  # flushed when max_wait_ms passes, inside the app's lifetime
    assert first["r"].status_code == 200


def test_deadline_is_504(bundles: Bundles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path, bundles.criteo_v1)
    app = build_app(settings_for(repo, max_wait_ms=300))
    with TestClient(app) as client:
        batcher = app.state.engine.model("criteo").batcher
        # an admission that predicts wrong (as a sudden stall of the machine would make it): the request is
        # admitted with 50 ms to live, waits 300 ms for company in the queue, and is never scored
        monkeypatch.setattr(batcher, "predicted_wait", lambda now, rows=1: 0.0)
        r = client.post(PREDICT, json={"instances": [instance()]}, headers={"x-request-timeout-ms": "50"})
        status, kind, text = error(r)
        assert (status, kind) == (504, "deadline_exceeded") and "deadline passed" in text
        app.state.metrics.pending.flush()
        samples = app.state.metrics.registry.get_sample_value("lma_inference_samples_total", {"model": "criteo"})
        assert samples in (None, 0.0)


def test_a_deadline_that_cannot_be_met_is_refused_before_the_body_is_read(bundles: Bundles, tmp_path: Path) -> None:
    repo = make_repo(tmp_path, bundles.criteo_v1)
    with TestClient(build_app(settings_for(repo, max_wait_ms=500))) as client:
        # a lone request waits up to 500 ms for company: a 100 ms deadline cannot be met; the body (not
        # even JSON) is never read
        r = client.post(PREDICT, content=b"not json", headers={"x-request-timeout-ms": "100"})
        status, kind, text = error(r)
        assert (status, kind, r.headers["retry-after"]) == (503, "overloaded", "1")
        assert "would wait about 500 ms" in text
        assert client.post(PREDICT, json={"instances": [instance()]}).status_code == 200  # 2 s: room to wait


def test_a_long_deadline_does_not_admit_a_long_queue(bundles: Bundles, tmp_path: Path) -> None:
    repo = make_repo(tmp_path, bundles.criteo_v1)
    # a lone request would wait 300 ms for company: within its 2 s deadline, but past the 100 ms queue-delay cap
    with TestClient(build_app(settings_for(repo, max_wait_ms=300, max_queue_delay_ms=100))) as client:
        status, kind, text = error(client.post(PREDICT, json={"instances": [instance()]}))
        assert (status, kind) == (503, "overloaded") and "would wait about 300 ms" in text
    with TestClient(build_app(settings_for(repo, max_wait_ms=300, max_queue_delay_ms=500))) as client:
        assert client.post(PREDICT, json={"instances": [instance()]}).status_code == 200


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf", ""])
def test_a_bad_timeout_header_is_422_naming_it(app_client: TestClient, value: str) -> None:
    r = app_client.post(PREDICT, json={"instances": [instance()]}, headers={"x-request-timeout-ms": value})
    status, kind, text = error(r)
    assert (status, kind) == (422, "invalid_input")
    assert text == f"X-Request-Timeout-Ms: expected a positive number of milliseconds, got {value!r}"


def test_not_ready_is_503(tmp_path: Path) -> None:
    with TestClient(build_app(settings_for(tmp_path))) as client:  # an empty repository
        assert client.get("/v2/health/live").status_code == 200
        r = client.post("/v1/predict", json={"instances": [{}]})
        assert error(r)[:2] == (503, "not_ready") and r.headers["retry-after"] == "1"
        # Open Inference Protocol health: "a 4xx status code indicates false"
        r = client.get("/v2/health/ready")
        assert (r.status_code, r.json()) == (400, {"ready": False})
        assert client.get("/v1/models").json() == {"models": []}


def test_admin_auth(bundles: Bundles) -> None:
    url = "/v1/models/criteo:reload"
    with TestClient(build_app(settings_for(bundles.repo, admin_token=None))) as client:
        assert error(client.post(url))[:3] == (
            403,
            "forbidden",
            "the admin API is disabled: set LMA_ADMIN_TOKEN to enable it",
        )
    with TestClient(build_app(settings_for(bundles.repo))) as client:
        r = client.post(url)
        assert error(r)[:2] == (401, "unauthorized") and r.headers["www-authenticate"] == "Bearer"
        assert error(client.post(url, headers={"authorization": "Basic abc"}))[:2] == (401, "unauthorized")
        assert error(client.post(url, headers={"authorization": "Bearer wrong"}))[:3] == (
            403, "forbidden", "admin route: invalid token",
        )  # fmt: skip


def test_unexpected_errors_are_500_with_request_id(app_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = app_client.app.state.engine  # type: ignore[attr-defined]

    def broken(*a: object, **k: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(engine, "models", broken)
    r = app_client.get("/v1/models", headers={"x-request-id": "req-500"})
    assert error(r) == (500, "internal", "internal server error (request id req-500)")
    assert r.headers["x-request-id"] == "req-500"
    monkeypatch.undo()
    assert app_client.get("/v1/models").status_code == 200  # and the server carries on


# --- request ids, docs ---


def test_every_response_carries_a_request_id(app_client: TestClient) -> None:
    ok = app_client.post(PREDICT, json={"instances": [instance()]}, headers={"x-request-id": "abc-123"})
    assert ok.headers["x-request-id"] == "abc-123"
    bad = app_client.post(PREDICT, json={"instances": 1})
    generated = bad.headers["x-request-id"]
    assert len(generated) == 24 and generated != app_client.post(PREDICT, json={"instances": 1}).headers["x-request-id"]
    weird = app_client.get("/v2/health/live", headers={"x-request-id": "has space"})
    assert weird.headers["x-request-id"] != "has space"  # not echoed: not a safe token
    assert app_client.get("/nothing").headers["x-request-id"]


def test_openapi_documents_the_bodies(app_client: TestClient) -> None:
    doc = app_client.get("/openapi.json").json()
    predict = doc["paths"]["/v1/models/{name}:predict"]["post"]
    (timeout,) = [p for p in predict["parameters"] if p["name"] == "X-Request-Timeout-Ms"]
    assert (timeout["in"], timeout["schema"]["default"], timeout["schema"]["maximum"]) == ("header", 2000.0, 2000.0)
    assert (
        predict["requestBody"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/PredictRequest"
    )
    assert {"PredictRequest", "Instance", "PredictResponse", "ErrorResponse", "InferRequest"} <= set(
        doc["components"]["schemas"]
    )
    assert set(doc["paths"]) >= {
        "/v1/predict",
        "/v1/models",
        "/v1/models/{name}:reload",
        "/v2/models/{name}/infer",
        "/metrics",
    }


def _wait_for(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)
