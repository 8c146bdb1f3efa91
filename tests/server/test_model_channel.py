"""`lma publish` and ModelUpdateSubscriber against a real, private redis-server, with real bundles."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from export.bundle import Bundle, BundleError, SignatureError
from export.exporter import export_run
from models.checkpoint import RunConfig, build_model, save_run
from models.dlrm import DLRMConfig
from models.embeddings import EmbeddingConfig
from models.schema import avazu_schema
from server.metrics import Metrics
from server.model_channel import (
    CHANNEL,
    HISTORY_LENGTH,
    NAMES_KEY,
    ModelUpdate,
    ModelUpdateSubscriber,
    current_key,
    history_key,
    publish,
    read_current,
    registry_callback,
)
from server.registry import ModelRegistry
from server.settings import Settings
from tests.helpers.redis_server import RedisServer

pytestmark = pytest.mark.redis

WAIT_S = 10.0  # only catches something that never happens; no test asserts how fast anything is


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bundle]:
    """Versions 1 and 2 of a tiny hashed-embedding model "tiny", exported for real (checksummed)."""
    root = tmp_path_factory.mktemp("channel")
    schema = avazu_schema(3)
    cfg = RunConfig(
        schema=schema,
        model=DLRMConfig.from_preset("tiny", schema.num_dense, schema.num_fields),
        embedding=EmbeddingConfig(kind="hash", embedding_dim=4, compression=2.0, seed=0),
        full_embedding_bytes=400 * 4 * 4,
        distinct_tokens=400,
    )
    model = build_model(cfg)
    model.eval()
    save_run(root / "run", model, cfg)
    return {v: export_run(root / "run", root / "artifacts" / "tiny", version=v) for v in ("1", "2")}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


class Recorder:
    """on_update that records each call; ``fail`` makes the next calls raise."""

    def __init__(self) -> None:
        self.calls: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.fail = False

    async def __call__(self, name: str, path: str) -> None:
        self.calls.put_nowait((name, path))
        if self.fail:
            raise RuntimeError("swap refused")

    async def next(self) -> tuple[str, str]:
        async with asyncio.timeout(WAIT_S):
            return await self.calls.get()


@pytest.fixture
async def subscriber(redis_server: RedisServer) -> AsyncIterator[tuple[ModelUpdateSubscriber, Recorder]]:
    recorder = Recorder()
    sub = ModelUpdateSubscriber(redis_server.url, recorder, backoff_s=0.05, max_backoff_s=0.2, ping_interval_s=1.0)
    await sub.start()
    async with asyncio.timeout(WAIT_S):
        await sub.connected.wait()
    yield sub, recorder
    await sub.stop()


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(WAIT_S):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"still waiting after {WAIT_S} s: {what}") from None


def path_of(bundle: Bundle) -> str:
    return str(bundle.path.resolve())


# --------------------------------------------------------------------------------------------


async def test_publish_records_and_announces_to_a_subscriber(
    redis_server: RedisServer, subscriber: tuple[ModelUpdateSubscriber, Recorder], tiny_bundles: dict[str, Bundle]
):
    sub, recorder = subscriber
    update, receivers = await asyncio.to_thread(publish, redis_server.url, tiny_bundles["1"].path, now=1700000000.5)

    assert update == ModelUpdate("tiny", "1", path_of(tiny_bundles["1"]), 1700000000.5)
    assert receivers == 1
    assert await recorder.next() == ("tiny", path_of(tiny_bundles["1"]))
    r = redis_server.client()
    assert r.smembers(NAMES_KEY) == {"tiny"}
    assert r.hgetall(current_key("tiny")) == {
        "name": "tiny", "version": "1", "path": path_of(tiny_bundles["1"]), "published_at": "1700000000.5",
    }  # fmt: skip
    assert [json.loads(x) for x in r.lrange(history_key("tiny"), 0, -1)] == [
        {"name": "tiny", "version": "1", "path": path_of(tiny_bundles["1"]), "published_at": 1700000000.5}
    ]

    await asyncio.to_thread(
        publish, redis_server.url, tiny_bundles["2"].path.parent, now=1700000100.0
    )  # latest of tiny/
    assert await recorder.next() == ("tiny", path_of(tiny_bundles["2"]))
    assert [json.loads(x)["version"] for x in r.lrange(history_key("tiny"), 0, -1)] == ["2", "1"]  # newest first
    assert read_current(redis_server.url) == {
        "tiny": ModelUpdate("tiny", "2", path_of(tiny_bundles["2"]), 1700000100.0)
    }
    assert sub.applied["tiny"].version == "2"
    assert sub.connects == 1


async def test_history_keeps_the_last_versions_only(redis_server: RedisServer, tiny_bundles: dict[str, Bundle]):
    for i in range(HISTORY_LENGTH + 5):
        publish(redis_server.url, tiny_bundles["1"].path, now=float(i))
    times = [json.loads(x)["published_at"] for x in redis_server.client().lrange(history_key("tiny"), 0, -1)]
    assert times == [float(i) for i in reversed(range(5, HISTORY_LENGTH + 5))]


async def test_a_bad_bundle_is_refused_before_anything_is_announced(
    redis_server: RedisServer,
    subscriber: tuple[ModelUpdateSubscriber, Recorder],
    tiny_bundles: dict[str, Bundle],
    tmp_path: Path,
):
    _, recorder = subscriber
    bad = tmp_path / "tiny" / "7"
    shutil.copytree(tiny_bundles["1"].path, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["version"] = "7"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    onnx = bad / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF  # one changed byte
    onnx.write_bytes(bytes(data))

    with pytest.raises(BundleError, match=r"model.onnx: sha256 .* does not match the manifest"):
        publish(redis_server.url, bad)
    with pytest.raises(BundleError, match="nowhere: not a directory"):
        publish(redis_server.url, tmp_path / "nowhere")
    assert redis_server.client().keys("*") == []

    publish(redis_server.url, tiny_bundles["1"].path)  # messages arrive in order: this one comes first if any did
    assert await recorder.next() == ("tiny", path_of(tiny_bundles["1"]))
    assert recorder.calls.empty()


async def test_a_subscriber_started_later_applies_the_current_version(
    redis_server: RedisServer, tiny_bundles: dict[str, Bundle]
):
    assert publish(redis_server.url, tiny_bundles["1"].path)[1] == 0  # nobody listening yet
    publish(redis_server.url, tiny_bundles["2"].path)
    recorder = Recorder()
    async with ModelUpdateSubscriber(redis_server.url, recorder) as sub:
        assert await recorder.next() == ("tiny", path_of(tiny_bundles["2"]))  # the current one, not the history
        async with asyncio.timeout(WAIT_S):
            await sub.connected.wait()
        assert recorder.calls.empty()
    assert not sub.connected.is_set()


async def test_subscriber_survives_a_redis_restart_and_catches_up_on_what_it_missed(
    redis_server: RedisServer, subscriber: tuple[ModelUpdateSubscriber, Recorder], tiny_bundles: dict[str, Bundle]
):
    """Version 2 is published while the subscriber cannot listen; it must still end up applied.

    The restarted server requires a password the subscriber does not have, so the subscriber
    cannot be subscribed when version 2 is announced (0 receivers, deterministically); once the
    password is dropped, it reconnects, reads the recorded current version and applies it.
    """
    sub, recorder = subscriber
    publish(redis_server.url, tiny_bundles["1"].path)
    assert await recorder.next() == ("tiny", path_of(tiny_bundles["1"]))

    subscriber_url = redis_server.url
    redis_server.stop()
    await wait_until(lambda: not sub.connected.is_set(), "the subscriber noticed")
    redis_server.password = "locked"
    redis_server.start()  # same port, empty, and the subscriber's URL has no password
    _, receivers = publish(redis_server.url, tiny_bundles["2"].path)
    assert receivers == 0
    redis_server.client().config_set("requirepass", "")
    redis_server.password = None

    assert await recorder.next() == ("tiny", path_of(tiny_bundles["2"]))
    await wait_until(sub.connected.is_set, "reconnected")
    assert sub.connects == 2
    assert sub.url == subscriber_url

    # ... and it listens again: a live announcement arrives.
    _, receivers = publish(redis_server.url, tiny_bundles["1"].path)
    assert receivers == 1
    assert await recorder.next() == ("tiny", path_of(tiny_bundles["1"]))


async def test_failing_updates_and_bad_messages_do_not_stop_the_subscriber(
    redis_server: RedisServer, subscriber: tuple[ModelUpdateSubscriber, Recorder], tiny_bundles: dict[str, Bundle]
):
    sub, recorder = subscriber
    recorder.fail = True
    publish(redis_server.url, tiny_bundles["1"].path)
    assert await recorder.next() == ("tiny", path_of(tiny_bundles["1"]))
    recorder.fail = False
    r = redis_server.client()
    assert r.publish(CHANNEL, "not json") == 1
    assert r.publish(CHANNEL, json.dumps({"name": "tiny", "version": "3"})) == 1  # no path
    publish(redis_server.url, tiny_bundles["2"].path)
    assert await recorder.next() == ("tiny", path_of(tiny_bundles["2"]))
    assert sub.connected.is_set() and sub.connects == 1


async def test_bad_records_of_other_models_do_not_stop_the_updates(
    redis_server: RedisServer, tiny_bundles: dict[str, Bundle], caplog: pytest.LogCaptureFixture
):
    # What another client wrote wrong once made every (re)connect fail on WRONGTYPE or a decode error, so no
    # model updated again: a name whose record is not a hash, a name that is not UTF-8.
    r = redis_server.client()
    publish(redis_server.url, tiny_bundles["1"].path)
    r.sadd(NAMES_KEY, "bogus", b"\xff\xfe")
    r.set(current_key("bogus"), "x")
    recorder = Recorder()
    async with ModelUpdateSubscriber(redis_server.url, recorder, ping_interval_s=1.0) as sub:
        assert await recorder.next() == ("tiny", path_of(tiny_bundles["1"]))  # caught up past the bad ones
        await wait_until(sub.connected.is_set, "subscribed")
        publish(redis_server.url, tiny_bundles["2"].path)
        assert await recorder.next() == ("tiny", path_of(tiny_bundles["2"]))
        assert sub.connects == 1
    logged = [rec.getMessage() for rec in caplog.records if rec.levelname == "ERROR"]
    assert any(m.startswith(f"model-update channel: ignored {current_key('bogus')}: WRONGTYPE") for m in logged)
    assert f"model-update channel: ignored a member of {NAMES_KEY} that is not UTF-8: b'\\xff\\xfe'" in logged
    # lma:models itself of the wrong type: nothing to catch up on, and announcements still arrive
    r.delete(NAMES_KEY)
    r.set(NAMES_KEY, "x")
    async with ModelUpdateSubscriber(redis_server.url, recorder, ping_interval_s=1.0) as sub:
        await wait_until(sub.connected.is_set, "subscribed")
        r.publish(CHANNEL, ModelUpdate("tiny", "1", path_of(tiny_bundles["1"]), 1.0).to_json())
        assert await recorder.next() == ("tiny", path_of(tiny_bundles["1"]))


async def test_stop_closes_the_connection(redis_server: RedisServer, tiny_bundles: dict[str, Bundle]):
    sub = ModelUpdateSubscriber(redis_server.url, Recorder())
    await sub.start()
    async with asyncio.timeout(WAIT_S):
        await sub.connected.wait()
    r = redis_server.client()
    subscribed = [c for c in r.client_list() if c["name"] == "lma-model-updates" and c["sub"] == "1"]
    assert len(subscribed) == 1
    await sub.stop()
    await wait_until(lambda: all(c["name"] != "lma-model-updates" for c in r.client_list()), "connections closed")
    assert publish(redis_server.url, tiny_bundles["1"].path)[1] == 0
    await sub.stop()  # stopping twice is harmless


async def test_a_real_registry_swaps_to_the_published_version(
    redis_server: RedisServer, tiny_bundles: dict[str, Bundle], tmp_path: Path
):
    """The server's wiring: registry_callback(registry) as on_update, with a real ModelRegistry."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_bundles["1"].path, repo / "tiny" / "1")
    metrics = Metrics()
    registry = ModelRegistry(Settings(model_dir=repo, watch_interval_s=0, intra_op_threads=1), metrics)
    await registry.load_repository()

    def reloads(result: str) -> float:
        return metrics.registry.get_sample_value("lma_model_reloads_total", {"model": "tiny", "result": result}) or 0

    try:
        publish(redis_server.url, repo / "tiny" / "1")  # the version this replica loaded at start-up
        async with ModelUpdateSubscriber(redis_server.url, registry_callback(registry)) as sub:
            await wait_until(sub.connected.is_set, "subscribed")
            assert sub.applied["tiny"].version == "1"
            assert (registry.get("tiny").version, reloads("ok")) == ("1", 0)  # already served: not reloaded

            publish(redis_server.url, tiny_bundles["2"].path)
            await wait_until(lambda: registry.get("tiny").version == "2", "the registry serves version 2")
            assert registry.get("tiny").bundle.path == tiny_bundles["2"].path
            assert (reloads("ok"), reloads("failed")) == (1, 0)
    finally:
        await registry.close()


def test_model_update_parsing_names_what_is_wrong():
    good = ModelUpdate("m", "3", "/a/m/3", 12.5)
    assert ModelUpdate.from_json(good.to_json(), "msg") == good
    assert ModelUpdate.from_mapping(good.to_hash(), "hash") == good
    with pytest.raises(ValueError, match=r"msg: not valid JSON"):
        ModelUpdate.from_json("{", "msg")
    with pytest.raises(ValueError, match=r"msg: missing \['path', 'published_at'\]"):
        ModelUpdate.from_json('{"name": "m", "version": "3"}', "msg")
    with pytest.raises(ValueError, match=r"msg: published_at must be a number, got 'soon'"):
        ModelUpdate.from_mapping({"name": "m", "version": "3", "path": "/p", "published_at": "soon"}, "msg")
    # a name no bundle can have (it would also become a metric label), a path that is not one
    with pytest.raises(ValueError, match=r"msg: invalid model name '\.\./x' \(a name matches "):
        ModelUpdate.from_mapping({**good.to_hash(), "name": "../x"}, "msg")
    for path in ("/a/m\x00/3", "a/m/3"):
        with pytest.raises(ValueError, match=r"msg: path must be an absolute path without NUL bytes, got "):
            ModelUpdate.from_mapping({**good.to_hash(), "path": path}, "msg")
    with pytest.raises(ValueError, match="need 0 < backoff_s <= max_backoff_s"):
        ModelUpdateSubscriber("redis://127.0.0.1:1/0", Recorder(), backoff_s=0)


def test_cli_publish(redis_server: RedisServer, tiny_bundles: dict[str, Bundle], capsys: pytest.CaptureFixture[str]):
    from server.redis_cli import register

    parser = argparse.ArgumentParser(prog="lma")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["publish", str(tiny_bundles["2"].path), "--redis", redis_server.url])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out == f"published tiny version 2 ({path_of(tiny_bundles['2'])}) on {CHANNEL}: 0 subscribers listening\n"
    assert read_current(redis_server.url)["tiny"].version == "2"


def test_publish_with_trusted_keys_announces_only_a_signed_bundle(
    redis_server: RedisServer,
    tiny_bundles: dict[str, Bundle],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from export.signing import BundleSigner, TrustedKeys, generate_key_pair
    from server.redis_cli import register

    trusted, other = generate_key_pair(tmp_path / "trusted.pem"), generate_key_pair(tmp_path / "other.pem")
    bundle = tmp_path / "tiny" / "2"
    shutil.copytree(tiny_bundles["2"].path, bundle)
    trust = TrustedKeys.from_files([trusted])
    with pytest.raises(SignatureError, match=r"2: unsigned \(no model\.sig\)") as e:
        publish(redis_server.url, bundle, trust=trust)
    assert e.value.reason == "unsigned"
    BundleSigner(tmp_path / "other.pem").sign(bundle)
    with pytest.raises(SignatureError, match=r"model\.sig: signed by key \w{16}, which is not a trusted key"):
        publish(redis_server.url, bundle, trust=trust)
    assert redis_server.client().keys("*") == []  # refused: nothing recorded, nothing announced

    monkeypatch.delenv("LMA_TRUSTED_KEYS", raising=False)
    parser = argparse.ArgumentParser(prog="lma")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["publish", str(bundle), "--redis", redis_server.url, "--key", str(other)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert (
        out
        == f"published tiny version 2 ({bundle.resolve()}, signature verified) on {CHANNEL}: 0 subscribers listening\n"
    )
    args = parser.parse_args(["publish", str(bundle), "--redis", redis_server.url])  # no key: says so
    assert args.func(args) == 0
    assert capsys.readouterr().err == (
        "lma publish: signature not checked (no --key, $LMA_TRUSTED_KEYS unset); checksums only\n"
    )
