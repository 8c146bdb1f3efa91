"""`/metrics` after N requests, parsed with prometheus_client: exact counts, names, labels and gauges."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from server.app import build_app
from server.metrics import Pending, memory_parts
from tests.helpers.serving import Bundles, direct_scores, instance, make_repo, settings_for

ROUTE = "/v1/models/{name}:predict"


def scrape(client: TestClient) -> tuple[dict[str, str], dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    types, values = {}, {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        types[family.name] = family.type
        for s in family.samples:
            values[(s.name, frozenset(s.labels.items()))] = s.value
    return types, values


def test_metrics_count_exactly(bundles: Bundles, tmp_path: Path) -> None:
    repo = make_repo(tmp_path, bundles.criteo_v1)
    sizes = [1, 3, 2, 5, 1, 4, 2]  # N = 7 requests, 18 samples
    sent = [[instance(10 * r + i) for i in range(n)] for r, n in enumerate(sizes)]
    with TestClient(build_app(settings_for(repo, max_batch_size=4, max_wait_ms=0))) as client:
        for instances in sent:
            assert client.post("/v1/models/criteo:predict", json={"instances": instances}).status_code == 200
        assert client.post("/v1/models/criteo:predict", json={"instances": [{"dense": "x"}]}).status_code == 422
        types, v = scrape(client)

    def value(name: str, **labels: str) -> float:
        return v.get((name, frozenset(labels.items())), 0.0)

    m = {"model": "criteo"}
    assert value("lma_requests_total", route=ROUTE, code="200", **m) == 7
    assert value("lma_requests_total", route=ROUTE, code="422", **m) == 1
    assert value("lma_request_duration_seconds_count", route=ROUTE, **m) == 8
    assert value("lma_queue_duration_seconds_count", **m) == 7
    assert value("lma_inference_samples_total", **m) == 18
    batches = value("lma_inference_batches_total", **m)
    assert (
        batches
        == value("lma_batch_size_count", **m)
        == value("lma_inference_duration_seconds_count", runtime="onnx", device="cpu", **m)
    )
    assert value("lma_batch_size_sum", **m) == 18
    assert value("lma_batch_size_bucket", le="4.0", **m) == batches  # never more than max_batch_size
    assert batches >= 5  # 18 samples in batches of at most 4
    fallback = sum(int(direct_scores(bundles.criteo_v1, s).fallback_tokens.sum()) for s in sent)
    assert 0 < fallback < 18 * 26 and value("lma_fallback_tokens_total", **m) == fallback
    # every scored probability, in its bucket: the mean predicted CTR is sum / count
    probabilities = np.concatenate([direct_scores(bundles.criteo_v1, s).probability for s in sent])
    assert value("lma_prediction_probability_count", **m) == 18
    assert value("lma_prediction_probability_sum", **m) == pytest.approx(float(probabilities.astype(np.float64).sum()))
    for le in ("0.1", "0.5", "0.9"):
        assert value("lma_prediction_probability_bucket", le=le, **m) == int((probabilities <= float(le)).sum())
    assert value("lma_answered_late_total", route=ROUTE, **m) == 0
    assert value("lma_queue_depth", **m) == 0
    assert value("lma_rejected_total", reason="queue_full", **m) == 0
    # facts about the served version, straight from the manifest's accounting
    info = {"version": "1", "runtime": "onnx", "device": "cpu", "embedding": "lma", **m}
    assert value("lma_model_info", **info) == 1
    memory = bundles.criteo_v1.memory
    parts = memory_parts(memory)
    assert set(parts) == {"shared_memory", "signature_table", "seeds", "dense"}
    for part, expected in parts.items():
        assert value("lma_model_memory_bytes", part=part, **m) == expected
    # the parts add up to the total, which has a metric of its own: sum() over the parts never double-counts
    assert sum(parts.values()) == memory["total_bytes"] == value("lma_model_memory_total_bytes", **m)
    assert value("lma_model_full_embedding_bytes", **m) == memory["full_embedding_bytes"]
    assert value("lma_model_compression_ratio", **m) == memory["embedding_compression"]
    # histograms everywhere, never summaries; the process collector is there
    for name in ("lma_request_duration_seconds", "lma_queue_duration_seconds", "lma_inference_duration_seconds",
                 "lma_batch_size", "lma_feature_store_duration_seconds", "lma_admission_wait_seconds",
                 "lma_prediction_probability"):  # fmt: skip
        assert types[name] == "histogram"
    assert "summary" not in types.values()
    assert value("process_resident_memory_bytes") > 0
    assert types["lma_rejected"] == types["lma_model_reloads"] == types["lma_feature_store_errors"] == "counter"


def test_feature_store_metrics(bundles: Bundles, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", bundles.criteo_v1)
    store = tmp_path / "features.json"
    store.write_text('{"u1": {"I1": 4, "C3": "t7"}, "u2": {"C1": "t1"}}')
    with TestClient(build_app(settings_for(repo, feature_store_path=store))) as client:
        plain = instance(5)
        r = client.post(
            "/v1/models/criteo:predict",
            json={"instances": [{**plain, "entity": "u1"}, {"categorical": {"C2": "t2"}, "entity": "u1"}]},
        )
        explicit = {"dense": {"I1": 4}, "categorical": {"C2": "t2", "C3": "t7"}}
        r2 = client.post("/v1/models/criteo:predict", json={"instances": [plain, explicit]})
        assert r.status_code == 200 and r.json()["predictions"] == r2.json()["predictions"]  # request values win
        _, v = scrape(client)
    assert (
        v[("lma_feature_store_duration_seconds_count", frozenset({("model", "criteo")}))] == 1
    )  # one fetch per request
    assert v.get(("lma_feature_store_errors_total", frozenset({("model", "criteo")})), 0) == 0


def test_metrics_exposition_as_prometheus_client_serves_it(app_client: TestClient) -> None:
    plain = app_client.get("/metrics", headers={"accept-encoding": "identity"})
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "content-encoding" not in plain.headers
    zipped = app_client.get("/metrics", headers={"accept-encoding": "gzip"})
    assert zipped.headers["content-encoding"] == "gzip"  # httpx decodes it: the same families come out
    assert {f.name for f in text_string_to_metric_families(zipped.text)} >= {"lma_requests", "lma_batch_size"}
    open_metrics = app_client.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    assert open_metrics.text.rstrip().endswith("# EOF")
    only = app_client.get("/metrics", params={"name[]": "lma_model_info"}).text
    assert "lma_model_info" in only and "lma_batch_size" not in only


def test_a_late_answer_is_counted(bundles: Bundles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path, bundles.criteo_v1)
    app = build_app(settings_for(repo, max_wait_ms=0))
    with TestClient(app) as client:
        # a runtime that takes 80 ms, an admission that does not know it: the answer comes after the deadline
        runtime = app.state.engine.model("criteo").runtime
        run = runtime.run

        def slow(batch):  # type: ignore[no-untyped-def]
            import time

            time.sleep(0.08)
            return run(batch)

        monkeypatch.setattr(runtime, "run", slow)
        r = client.post(
            "/v1/models/criteo:predict", json={"instances": [instance()]}, headers={"x-request-timeout-ms": "50"}
        )
        assert r.status_code == 200
        _, v = scrape(client)
    assert v[("lma_answered_late_total", frozenset({("model", "criteo"), ("route", ROUTE)}))] == 1


def test_log_lines_of_a_request_carry_its_id(
    bundles: Bundles, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(tmp_path, bundles.criteo_v1)
    app = build_app(settings_for(repo))
    with TestClient(app) as client:
        engine = app.state.engine

        def broken(*a: object, **k: object) -> None:
            logging.getLogger("lma.server.engine").warning("about to fail")
            raise RuntimeError("bug")

        monkeypatch.setattr(engine, "models", broken)
        with caplog.at_level(logging.WARNING):
            assert client.get("/v1/models", headers={"x-request-id": "trace-me"}).status_code == 500
    ids = {r.getMessage(): getattr(r, "request_id", None) for r in caplog.records}
    assert ids["about to fail"] == "trace-me" and ids["unhandled error"] == "trace-me"


def test_pending_observe_many_keeps_every_value_exactly() -> None:
    """A batch's probabilities reach the histogram as float64, value for value, whatever their dtype and strides."""
    hist = Histogram("p", "p", buckets=(0.25, 0.5, 1.0), registry=CollectorRegistry())
    pending = Pending()
    f32 = np.array([0.1, 0.25, 0.7, 1.0], dtype=np.float32)
    f64 = np.array([0.3, 0.9, 0.2, 0.6, 0.5, 0.05], dtype=np.float64)[::2]  # strided: 0.3, 0.2, 0.5
    pending.observe_many(hist, f32)
    pending.observe_many(hist, f64)
    pending.observe(hist, 0.75)
    pending.flush()
    samples = {(s.name, s.labels.get("le")): s.value for s in hist.collect()[0].samples}
    expected = np.concatenate([f32.astype(np.float64), f64, [0.75]])
    assert samples[("p_count", None)] == 8
    assert samples[("p_sum", None)] == pytest.approx(float(expected.sum()), rel=0, abs=1e-12)
    for le in (0.25, 0.5, 1.0):
        assert samples[("p_bucket", str(le))] == int((expected <= le).sum())
