"""Hot swap: admin reload, folder watch, bad bundles, and requests in flight during a swap."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from export.bundle import BundleError
from server.app import build_app
from server.engine import Engine, Prediction
from server.features import InMemoryFeatureStore
from server.metrics import Metrics
from server.registry import ModelRegistry, preflight
from tests.helpers.serving import (
    ADMIN_TOKEN,
    Bundles,
    as_float32,
    direct_scores,
    flip_a_byte,
    instance,
    make_repo,
    settings_for,
)

AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}
RELOAD = "/v1/models/criteo:reload"

ROOT = Path(__file__).resolve().parents[2]


def samples(client: TestClient, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def corrupt_copy(bundle_path: Path, dst: Path) -> Path:
    shutil.copytree(bundle_path, dst)
    flip_a_byte(dst / "model.onnx", 0xFF)
    return dst


def test_admin_reload_swaps_to_a_path_then_back_by_version(bundles: Bundles, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", bundles.criteo_v1, bundles.criteo_v2)
    inst = [instance(4)]
    with TestClient(build_app(settings_for(repo / "criteo" / "1"))) as client:  # one bundle folder
        assert client.post("/v1/predict", json={"instances": inst}).json()["version"] == "1"
        r = client.post(RELOAD, headers=AUTH, json={"path": str(bundles.criteo_v2.path)})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["model"], body["result"], body["version"], body["previous_version"]) == ("criteo", "ok", "2", "1")
        after = client.post("/v1/predict", json={"instances": inst}).json()
        assert after["version"] == "2"
        np.testing.assert_array_equal(
            as_float32(after["predictions"]), direct_scores(bundles.criteo_v2, inst).probability
        )
        r = client.post(RELOAD, headers=AUTH, json={"version": "1"})  # a sibling of the served bundle folder
        assert r.status_code == 200 and r.json()["version"] == "1"
        assert samples(client, "lma_model_reloads_total") == {(("model", "criteo"), ("result", "ok")): 2.0}
        info = samples(client, "lma_model_info")
        assert list(info) == [
            (("device", "cpu"), ("embedding", "lma"), ("model", "criteo"), ("runtime", "onnx"), ("version", "1"))
        ]


def test_admin_reload_without_body_takes_the_latest(bundles: Bundles, tmp_path: Path) -> None:
    repo = make_repo(tmp_path, bundles.criteo_v1)
    with TestClient(build_app(settings_for(repo))) as client:
        shutil.copytree(bundles.criteo_v2.path, repo / "criteo" / "2")
        r = client.post(RELOAD, headers=AUTH)
        assert r.status_code == 200 and r.json()["version"] == "2"


def test_bad_bundle_leaves_the_old_version_serving(bundles: Bundles, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", bundles.criteo_v1)
    broken = corrupt_copy(bundles.criteo_v2.path, tmp_path / "broken" / "criteo" / "2")
    with TestClient(build_app(settings_for(repo))) as client:
        r = client.post(RELOAD, headers=AUTH, json={"path": str(broken)})
        assert r.status_code == 422 and r.json()["kind"] == "reload_failed"
        assert "sha256" in r.json()["error"] and r.json()["error"].endswith("; version 1 keeps serving")
        assert client.post("/v1/predict", json={"instances": [instance()]}).json()["version"] == "1"
        wrong = client.post(RELOAD, headers=AUTH, json={"path": str(bundles.avazu.path)})
        assert wrong.status_code == 422 and "holds model 'avazu', not 'criteo'" in wrong.json()["error"]
        missing = client.post(RELOAD, headers=AUTH, json={"path": str(tmp_path / "nothing")})
        assert missing.status_code == 422 and "not a directory" in missing.json()["error"]
        assert samples(client, "lma_model_reloads_total") == {(("model", "criteo"), ("result", "failed")): 3.0}


@pytest.mark.parametrize(
    ("url", "body", "status", "message"),
    [
        (RELOAD, {"path": "a", "version": "2"}, 422, "body: give either 'path' or 'version', not both"),
        (RELOAD, {"version": "02"}, 422, "body.version: expected a positive integer as text, got '02'"),
        (RELOAD, {"version": 2}, 422, "body.version: expected a string"),
        (RELOAD, {"tag": "x"}, 422, "body: unknown key 'tag'"),
        ("/v1/models/nope:reload", {}, 404, "model 'nope' is not loaded"),
    ],
)
def test_admin_reload_input_errors(bundles: Bundles, url: str, body: object, status: int, message: str) -> None:
    with TestClient(build_app(settings_for(bundles.repo))) as client:
        r = client.post(url, headers=AUTH, json=body)
        assert r.status_code == status and r.json()["error"].startswith(message)


@pytest.fixture
async def served(bundles: Bundles, tmp_path: Path) -> AsyncIterator[tuple[Engine, Path, Metrics]]:
    repo = make_repo(tmp_path / "repo", bundles.criteo_v1)
    settings = settings_for(repo, max_batch_size=8, max_wait_ms=2)
    metrics = Metrics()
    registry = ModelRegistry(settings, metrics)
    engine = Engine(registry, InMemoryFeatureStore(), settings, metrics)
    await registry.load_repository()
    yield engine, repo, metrics
    await engine.close()


async def test_watcher_swaps_in_new_versions_once(served: tuple[Engine, Path, Metrics], bundles: Bundles) -> None:
    engine, repo, metrics = served
    assert await engine.registry.poll_once() == []  # nothing new
    corrupt_copy(bundles.criteo_v2.path, repo / "criteo" / "2")
    (failed,) = await engine.registry.poll_once()
    assert (failed.result, failed.version) == ("failed", "1")
    assert await engine.registry.poll_once() == []  # a failed bundle is not retried until it changes
    shutil.rmtree(repo / "criteo" / "2")
    shutil.copytree(bundles.criteo_v2.path, repo / "criteo" / "2")
    (ok,) = await engine.registry.poll_once()
    assert (ok.result, ok.version, ok.previous_version) == ("ok", "2", "1")
    assert engine.model("criteo").version == "2"
    reloads = metrics.registry.get_sample_value
    assert reloads("lma_model_reloads_total", {"model": "criteo", "result": "failed"}) == 1
    assert reloads("lma_model_reloads_total", {"model": "criteo", "result": "ok"}) == 1
    shutil.copytree(bundles.avazu.path, repo / "avazu" / "1")  # a new model name appears too
    (added,) = await engine.registry.poll_once()
    assert (added.model, added.result) == ("avazu", "ok") and engine.has_model("avazu")


async def test_a_bad_new_version_in_a_folder_of_versions_is_refused_and_counted(
    bundles: Bundles, tmp_path: Path
) -> None:
    # `lma serve artifacts/NAME`: the name once came from the newest manifest, so a version whose manifest did
    # not parse made every poll fail uncounted ("cannot read the model repository"), and one whose manifest
    # named another model was served beside it under that name
    versions = make_repo(tmp_path / "repo", bundles.criteo_v1) / "criteo"
    metrics = Metrics()
    registry = ModelRegistry(settings_for(versions), metrics)
    await registry.load_repository()
    try:
        (versions / "3").mkdir()
        (versions / "3" / "manifest.json").write_text("{not json")
        (failed,) = await registry.poll_once()
        assert (failed.model, failed.result, failed.version) == ("criteo", "failed", "1")
        assert await registry.poll_once() == []  # not retried, nor counted again, until it changes
        shutil.copytree(bundles.avazu.path, versions / "4")  # the next version, of another model
        manifest = json.loads((versions / "4" / "manifest.json").read_text())
        (versions / "4" / "manifest.json").write_text(json.dumps({**manifest, "version": "4"}))
        (failed,) = await registry.poll_once()
        assert (failed.model, failed.result, failed.version) == ("criteo", "failed", "1")
        assert "holds model 'avazu', not 'criteo'" in failed.message
        assert [mv.name for mv in registry.versions()] == ["criteo"] and registry.get("criteo").version == "1"
        reloads = metrics.registry.get_sample_value
        assert reloads("lma_model_reloads_total", {"model": "criteo", "result": "failed"}) == 2
    finally:
        await registry.close()


async def test_requests_in_flight_during_a_swap_all_succeed(
    served: tuple[Engine, Path, Metrics], bundles: Bundles
) -> None:
    engine, _, _ = served
    old = engine.model("criteo")
    inst = [instance(i) for i in range(3)]
    v1 = direct_scores(bundles.criteo_v1, inst).probability
    v2 = direct_scores(bundles.criteo_v2, inst).probability

    async def predict() -> Prediction:
        ticket = engine.admit("criteo", None, time.monotonic(), 30.0)  # holds the version serving now
        try:
            await asyncio.sleep(0.001)  # the body being read: a swap may happen meanwhile
            return await engine.predict(ticket, orjson.dumps({"instances": inst}))
        finally:
            engine.release(ticket)

    before = [asyncio.ensure_future(predict()) for _ in range(40)]
    await asyncio.sleep(0)  # they hold version 1 now
    swap = asyncio.ensure_future(engine.registry.swap("criteo", bundles.criteo_v2.path))
    during = [asyncio.ensure_future(predict()) for _ in range(40)]
    result = await swap
    after = [await predict() for _ in range(5)]
    assert result.ok
    for p in await asyncio.gather(*before):
        assert p.version == "1"
        np.testing.assert_array_equal(p.scores.probability, v1)
    for p in [*await asyncio.gather(*during), *after]:  # whichever version a request got, it got all of it
        np.testing.assert_array_equal(p.scores.probability, v1 if p.version == "1" else v2)
    assert {p.version for p in after} == {"2"}
    await asyncio.gather(*engine.registry._retiring)
    assert old.retired and old.active == 0 and old.batcher.queued == 0


def test_serving_a_run_folder_says_to_export_it(tmp_path: Path) -> None:
    # `lma serve runs/demo` once started and waited forever for a bundle, saying only "no bundle yet"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "model.safetensors").write_bytes(b"")
    with pytest.raises(BundleError, match=rf"^LMA_MODEL_DIR: {run} is a run folder of lma train, not a bundle; export"):
        preflight(settings_for(run))
    preflight(settings_for(tmp_path / "run" / ".."))  # an empty repository is fine: bundles may come later


def test_a_feature_file_the_store_cannot_read_is_refused_before_start(tmp_path: Path) -> None:
    # a CSV without the entity column was a lifespan traceback in every worker
    no_entity = tmp_path / "features.csv"
    no_entity.write_text("user,I1\nu1,3\n")
    with pytest.raises(ValueError, match=rf"^LMA_FEATURE_STORE_PATH: {no_entity}: a feature CSV needs a header row"):
        preflight(settings_for(tmp_path, feature_store_path=no_entity))
    text = tmp_path / "text.csv"
    text.write_bytes(b"entity,C1\n")
    preflight(settings_for(tmp_path, feature_store_path=text))  # rows are not read: each worker reads them once
    text.write_bytes(b"\xe9ntity,C1\n")
    with pytest.raises(ValueError, match=rf"^LMA_FEATURE_STORE_PATH: {text}: not UTF-8 text"):
        preflight(settings_for(tmp_path, feature_store_path=text))
    broken = tmp_path / "features.json"
    broken.write_text('{"u1": {"I1": 3}')
    with pytest.raises(ValueError, match=rf"^LMA_FEATURE_STORE_PATH: {broken}: not valid JSON"):
        preflight(settings_for(tmp_path, feature_store_path=broken))
    broken.write_text('[{"I1": 3}]')
    with pytest.raises(ValueError, match=rf"^LMA_FEATURE_STORE_PATH: {broken}: expected"):
        preflight(settings_for(tmp_path, feature_store_path=broken))
    broken.write_text('{"u1": {"I1": 3}}')
    preflight(settings_for(tmp_path, feature_store_path=broken))


async def _startup_failure(app: object) -> dict[str, object]:
    """Run an ASGI app's lifespan start-up; the message it sends."""
    inbox: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    await inbox.put({"type": "lifespan.shutdown"})  # reached only if start-up succeeded: then no hang, a failure
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return await inbox.get()

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    with pytest.raises(ValueError):
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)  # type: ignore[operator]
    return sent[-1]


async def test_a_start_up_refused_for_a_known_cause_reports_one_line_not_a_traceback(
    bundles: Bundles, tmp_path: Path
) -> None:
    # a model the runtime refuses at load (here: a manifest edited after export) was a traceback per worker
    repo = tmp_path / "repo"
    shutil.copytree(bundles.criteo_v1.path, repo / "criteo" / "1")
    manifest = repo / "criteo" / "1" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["schema"]["hash_seed"] += 1000
    manifest.write_text(json.dumps(data))
    message = await _startup_failure(build_app(settings_for(repo)))
    assert message["type"] == "lifespan.startup.failed"
    text = str(message["message"])
    assert text.startswith("LMA_MODEL_DIR: model 'criteo' could not be loaded: ") and "\n" not in text
    assert text.endswith("the manifest was changed after export; export the run again")
    store = tmp_path / "features.csv"
    store.write_text("user,I1\n")
    message = await _startup_failure(build_app(settings_for(repo, feature_store_path=store)))
    assert (
        message["message"]
        == f"LMA_FEATURE_STORE_PATH: {store}: a feature CSV needs a header row with an 'entity' column"
    )
    bad_redis = settings_for(repo, redis_url="redis://127.0.0.1:6379/0?socket_timeout=abc")
    message = await _startup_failure(build_app(bad_redis))  # named by the variable that holds the mistake
    assert str(message["message"]).startswith("LMA_REDIS_URL: Invalid value for 'socket_timeout'")


def test_a_feature_csv_row_the_csv_module_refuses_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    big = tmp_path / "features.csv"
    big.write_text("entity,C1\nu1,a\nu2," + "x" * 200_000 + "\n")  # over csv's field size limit (131,072)
    with pytest.raises(ValueError, match=rf"^{big}, line 3: field larger than field limit"):
        InMemoryFeatureStore.from_file(big)


def test_a_model_load_compiles_the_kernels_of_the_request_path(bundles: Bundles, tmp_path: Path) -> None:
    """In a fresh process: before any request, the native body scan, the binary v2 walk and the key lookup are
    compiled (or loaded from Numba's cache), so that no first request waits seconds for a compiler."""
    repo = make_repo(tmp_path / "repo", bundles.criteo_v1)
    code = f"""
import asyncio, sys
from pathlib import Path
from models import schema
from server.metrics import Metrics
from server.protocols.native import codec as native
from server.protocols.v2 import codec as v2
from server.registry import ModelRegistry
from tests.helpers.serving import settings_for
kernels = (native._scan, v2._walk, schema._lookup)
before = [k._compiled is not None for k in kernels]
async def main():
    registry = ModelRegistry(settings_for(Path({str(repo)!r})), Metrics())
    await registry.load_repository()
    await registry.close()
asyncio.run(main())
print(before, [bool(k._compiled is not None and k._compiled.signatures) for k in kernels])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[False, False, False] [True, True, True]"
