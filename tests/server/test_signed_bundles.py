"""LMA_TRUSTED_KEYS: the server loads and swaps only bundles a trusted key signed, on every path.

Start-up, admin reload and the folder watch are tested here through the real app and registry;
the Redis announcement path under load is tests/test_e2e_redis.py. Each refusal must leave the old
version serving, count ``lma_model_reloads_total{result="rejected"}``, log the bundle and the reason,
and (admin) answer why.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from export.bundle import SIGNATURE_FILE
from export.signing import BundleSigner, check_public_key_file, generate_key_pair, key_id
from server.app import build_app
from server.engine import Engine
from server.features import InMemoryFeatureStore
from server.metrics import Metrics
from server.registry import ModelRegistry
from server.settings import load_settings
from tests.helpers.serving import ADMIN_TOKEN, Bundles, forge, instance, make_repo, settings_for

AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}
RELOAD = "/v1/models/criteo:reload"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("server-keys")
    return {
        "trusted.pub": generate_key_pair(root / "trusted.pem"),
        "trusted.pem": root / "trusted.pem",
        "other.pub": generate_key_pair(root / "other.pem"),
        "other.pem": root / "other.pem",
    }


def signed_repo(root: Path, bundles: Bundles, keys: dict[str, Path]) -> Path:
    repo = make_repo(root, bundles.criteo_v1)
    BundleSigner(keys["trusted.pem"]).sign(repo / "criteo" / "1")
    return repo


def reloads(client: TestClient, result: str) -> float:
    value = client.app.state.metrics.registry.get_sample_value(  # type: ignore[attr-defined]
        "lma_model_reloads_total", {"model": "criteo", "result": result}
    )
    return value or 0.0


def version_served(client: TestClient) -> str:
    r = client.post("/v1/predict", json={"instances": [instance()]})
    assert r.status_code == 200, r.text
    return str(r.json()["version"])


def forged_copy(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose model.onnx changed and whose manifest carries the new sha256: checksums pass."""
    shutil.copytree(src, dst)
    return forge(dst)


def test_admin_reload_refuses_what_no_trusted_key_signed(
    bundles: Bundles, keys: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = signed_repo(tmp_path / "repo", bundles, keys)
    trusted_id = key_id(check_public_key_file(keys["trusted.pub"]))
    unsigned = make_repo(tmp_path / "unsigned", bundles.criteo_v2) / "criteo" / "2"
    other = make_repo(tmp_path / "other", bundles.criteo_v2) / "criteo" / "2"
    BundleSigner(keys["other.pem"]).sign(other)
    good = make_repo(tmp_path / "good", bundles.criteo_v2) / "criteo" / "2"
    BundleSigner(keys["trusted.pem"]).sign(good)
    forged = forged_copy(good, tmp_path / "forged" / "criteo" / "2")  # signed, then changed: the signature still there
    settings = settings_for(repo, trusted_keys=(keys["other.pub"], keys["trusted.pub"]))
    with TestClient(build_app(settings)) as client:
        assert version_served(client) == "1"
        assert client.get("/v1/models").json()["models"][0]["signed_by"] == trusted_id
        cases = [
            (unsigned, "unsigned", f"{unsigned}: unsigned (no model.sig)"),
            (forged, "file_changed", f"{forged / 'manifest.json'}: sha256 "),
        ]
        for path, reason, start in cases:
            caplog.clear()
            r = client.post(RELOAD, headers=AUTH, json={"path": str(path)})
            assert r.status_code == 422 and r.json()["kind"] == "reload_failed"
            error = r.json()["error"]
            assert error.startswith(f"model 'criteo': bundle rejected ({reason}): {start}"), error
            assert error.endswith("; version 1 keeps serving")
            (record,) = [r for r in caplog.records if r.getMessage().startswith("model bundle rejected")]
            assert record.levelno == logging.ERROR
            fields = record.fields  # type: ignore[attr-defined]
            assert (fields["rejected"], fields["path"], fields["result"]) == (reason, str(path), "rejected")
            assert version_served(client) == "1"
        assert reloads(client, "rejected") == 2 and reloads(client, "failed") == 0
        # Another trusted key (rotation: both listed) is accepted, and so is the trusted signer's own bundle.
        r = client.post(RELOAD, headers=AUTH, json={"path": str(other)})
        assert r.status_code == 200 and r.json()["version"] == "2"
        r = client.post(RELOAD, headers=AUTH, json={"version": "1"})
        assert r.status_code == 200 and version_served(client) == "1"
        r = client.post(RELOAD, headers=AUTH, json={"path": str(good)})
        assert (
            r.status_code == 200
            and r.json()["message"] == f"serving version 2 (was 1), signed by key {trusted_id[:16]}"
        )
        assert version_served(client) == "2" and reloads(client, "ok") == 3


def test_start_up_refuses_an_unsigned_bundle_and_says_so(
    bundles: Bundles, keys: dict[str, Path], tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo", bundles.criteo_v1)
    app = build_app(settings_for(repo, trusted_keys=(keys["trusted.pub"],)))
    with (
        pytest.raises(ValueError, match=r"model 'criteo' could not be loaded: bundle rejected \(unsigned\): "),
        TestClient(app),
    ):
        pass


def test_without_trusted_keys_the_server_says_once_that_signatures_are_not_checked(
    bundles: Bundles, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = make_repo(tmp_path / "repo", bundles.criteo_v1)
    unsigned_v2 = make_repo(tmp_path / "v2", bundles.criteo_v2) / "criteo" / "2"
    with caplog.at_level(logging.INFO), TestClient(build_app(settings_for(repo))) as client:
        assert client.post(RELOAD, headers=AUTH, json={"path": str(unsigned_v2)}).status_code == 200  # as before
    notes = [r.getMessage() for r in caplog.records if "signatures are not checked" in r.getMessage()]
    assert notes == ["LMA_TRUSTED_KEYS is not set: bundle signatures are not checked (sha256 checksums only)"]


async def test_the_folder_watch_rejects_once_then_swaps_in_the_signed_version(
    bundles: Bundles, keys: dict[str, Path], tmp_path: Path
) -> None:
    repo = signed_repo(tmp_path / "repo", bundles, keys)
    settings = settings_for(repo, trusted_keys=(keys["trusted.pub"],))
    metrics = Metrics()
    registry = ModelRegistry(settings, metrics)
    engine = Engine(registry, InMemoryFeatureStore(), settings, metrics)
    await registry.load_repository()
    try:
        v2 = make_repo(repo, bundles.criteo_v2) / "criteo" / "2"  # appears unsigned
        (rejected,) = await registry.poll_once()
        assert (rejected.result, rejected.rejected_because, rejected.version) == ("rejected", "unsigned", "1")
        assert await registry.poll_once() == []  # not retried (nor counted again) until the folder changes
        BundleSigner(keys["trusted.pem"]).sign(v2)
        (ok,) = await registry.poll_once()
        assert (ok.result, ok.version) == ("ok", "2") and engine.model("criteo").version == "2"
        count = metrics.registry.get_sample_value
        assert count("lma_model_reloads_total", {"model": "criteo", "result": "rejected"}) == 1
        assert count("lma_model_reloads_total", {"model": "criteo", "result": "ok"}) == 1
    finally:
        await engine.close()


async def test_torchscript_is_never_loaded_before_its_signature_passed(
    bundles: Bundles, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = signed_repo(tmp_path / "repo", bundles, keys)
    settings = settings_for(repo, runtime="torchscript", trusted_keys=(keys["trusted.pub"],))
    metrics = Metrics()
    registry = ModelRegistry(settings, metrics)
    engine = Engine(registry, InMemoryFeatureStore(), settings, metrics)
    loaded: list[object] = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda f, **kw: loaded.append(f) or real_load(f, **kw))
    await registry.load_repository()
    try:
        assert len(loaded) == 1  # the signed version 1
        other = make_repo(tmp_path / "other", bundles.criteo_v2) / "criteo" / "2"
        BundleSigner(keys["other.pem"]).sign(other)
        good = make_repo(tmp_path / "good", bundles.criteo_v2) / "criteo" / "2"
        BundleSigner(keys["trusted.pem"]).sign(good)
        ts = bytearray((good / "model.ts").read_bytes())
        ts[-30] ^= 0x01  # the zip's tail: a changed program, same size
        tampered = make_repo(tmp_path / "tampered", bundles.criteo_v2) / "criteo" / "2"
        shutil.copyfile(good / SIGNATURE_FILE, tampered / SIGNATURE_FILE)
        (tampered / "model.ts").write_bytes(bytes(ts))
        for path, reason in ((other, "untrusted_key"), (tampered, "file_changed")):
            result = await registry.swap("criteo", path, reason="admin")
            assert (result.result, result.rejected_because) == ("rejected", reason)
        assert len(loaded) == 1 and engine.model("criteo").version == "1"
        assert (await registry.swap("criteo", good, reason="admin")).ok and len(loaded) == 2
    finally:
        await engine.close()


# --- LMA_TRUSTED_KEYS at start-up ---


def test_trusted_keys_setting_reads_a_comma_separated_list(
    tmp_path: Path, keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMA_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("LMA_TRUSTED_KEYS", f" {keys['trusted.pub']} ,{keys['other.pub']},")
    assert load_settings().trusted_keys == (keys["trusted.pub"], keys["other.pub"])
    monkeypatch.setenv("LMA_TRUSTED_KEYS", "")
    assert load_settings().trusted_keys == ()


def test_bad_trusted_key_files_refuse_to_start_naming_the_variable_and_the_file(
    tmp_path: Path, keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    loose = tmp_path / "loose.pub"
    shutil.copyfile(keys["trusted.pub"], loose)
    loose.chmod(0o646)
    broken = tmp_path / "broken.pub"
    broken.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    broken.chmod(0o644)
    monkeypatch.setenv("LMA_MODEL_DIR", str(tmp_path))
    cases = {
        loose: f"LMA_TRUSTED_KEYS: {loose}: writable by group or others (mode 0646); whoever can replace a trusted key",
        broken: f"LMA_TRUSTED_KEYS: {broken}: not a PEM public key (",
        keys["trusted.pem"]: f"LMA_TRUSTED_KEYS: {keys['trusted.pem']}: is a private key; the server needs only the",
        tmp_path / "missing.pub": f"LMA_TRUSTED_KEYS: {tmp_path / 'missing.pub'}: no such file (a trusted public key)",
    }
    for path, message in cases.items():
        monkeypatch.setenv("LMA_TRUSTED_KEYS", f"{keys['other.pub']},{path}")
        with pytest.raises(ValueError) as e:
            load_settings()
        assert str(e.value).startswith(f"invalid server settings: {message}"), str(e.value)
