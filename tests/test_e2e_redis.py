"""End to end with Redis: real `lma serve` processes, a private redis-server, the `lma` Redis commands.

1. `lma features load` of a Criteo TSV keyed by row number, with a TTL: a request naming only the
   entity gets exactly the probability of the same request carrying the full raw row.
2. Redis killed while plain and entity requests flow, then restarted on the same port: entity
   requests get 503 feature_store_unavailable (naming Redis) while it is down, 404 entity_not_found
   while it is back but empty, 200 again once the features are reloaded, with the server never
   restarted; plain requests never fail.
3. Two servers subscribed to one Redis, under load; `lma publish` of version 2: both serve it within
   seconds, not one request fails, each client sees version 1 then 2 and never 1 again; a server
   started afterwards serves 2 from its first answer although its model folder holds only 1.
4. A server with LMA_TRUSTED_KEYS, under load; a version whose signature was forged is published
   (by a publisher that checks no signature): it is rejected (metric, log line naming the bundle and
   the reason), not one request fails, version 1 keeps serving; a properly signed version published
   next is served.

Tests 1 and 2 share one server and one Redis (each loads entities of its own). Each process
(servers, redis-server, the CLI) is a child of the test, ended in a finally block. No assertion is
about speed except the generous bound on how fast a publish reaches the replicas; the measured
times are printed (``-s``) and recorded in docs/REDIS.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest.bench.process import ServerProcess
from models.schema import criteo_schema
from server.model_channel import CHANNEL, read_current
from server.redis_store import format_dense, load_features
from tests.helpers.redis_server import RedisServer
from tests.helpers.serving import TOKENS, Bundles, export_bundles, instance, make_repo, serve
from tests.helpers.traffic import PREDICT, WAIT_S, Outcome, Traffic

pytestmark = pytest.mark.redis

STORE_TIMEOUT_MS = "100"  # LMA_FEATURE_STORE_TIMEOUT_MS of the servers below
SWAP_BOUND_S = 5.0  # publish -> first answer of version 2 on each replica (measured 0.15-0.45 s; docs/REDIS.md)
MIN_PER_STATE = 15  # requests of each kind observed in each state of Redis
PAUSE_S = 0.01  # between two requests of one client: steady load that leaves CPU for the processes started under it


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    return export_bundles(tmp_path_factory.mktemp("e2e-redis-bundles"))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture(scope="module")
def feature_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("feature-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def feature_server(
    bundles: Bundles, feature_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One `lma serve` on the feature store, shared by the feature tests (each loads entities of its own).

    Handed over while it boots: each test calls ``wait_ready()`` when its own set-up is done.
    """
    root = tmp_path_factory.mktemp("feature-server")
    repo = make_repo(root / "repo", bundles.criteo_v1)
    url = feature_redis.url
    server = serve(repo, root / "server.log", LMA_REDIS_URL=url, LMA_FEATURE_STORE_TIMEOUT_MS=STORE_TIMEOUT_MS)
    try:
        yield server
        assert server.stop() == 0
    finally:
        server.stop()


def lma(*args: str) -> subprocess.CompletedProcess[str]:
    """`lma ARGS...` as a child process (what the console script runs); fails the test on a non-zero exit."""
    done = subprocess.run(
        [sys.executable, "-m", "models.main", *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"lma {' '.join(args)} exited with {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def predict(url: str, instances: list[dict[str, Any]]) -> httpx.Response:
    return httpx.post(f"{url}{PREDICT}", json={"instances": instances}, timeout=30)


def stop_all(*processes: ServerProcess | None) -> None:
    for p in processes:
        if p is not None:
            p.stop()


# ----------------------------------------------------------------------------------------------
# 1. `lma features load` end to end


# Criteo TSV rows: label, I1..I13, C1..C26; "" is a missing value. Tokens t0..t49 have stored
# embeddings in the test models, the hex ones do not (fallback).
CRITEO_ROWS = [
    ["1", "5", "-1", "", "0", "1382", "4", "15", "2", "181", "1", "2", "", "2", *TOKENS[0:24], "68fd1e64", ""],
    ["0", "2", "0", "44", "1", "102", "8", "2", "2", "4", "1", "1", "", "4", *TOKENS[10:36]],
    ["0", "", "893", "", "", "4392", "", "0", "0", "0", "", "0", "", "", "05db9164", "", *TOKENS[20:44]],
    ["1", "0", "1", "7", "", "", "3", "", "1", "", "", "9", "12", "1", *TOKENS[49:], *TOKENS[:25]],
]


def raw_instance(row: list[str]) -> dict[str, Any]:
    """The request a client would send for a TSV row: numbers for I1..I13, strings for C1..C26, null if missing."""
    return {
        "dense": [int(v) if v else None for v in row[1:14]],
        "categorical": [v or None for v in row[14:]],
    }


def test_features_loaded_by_the_cli_score_exactly_like_the_raw_row(
    feature_redis: RedisServer, feature_server: ServerProcess, tmp_path: Path
) -> None:
    assert all(len(row) == 40 for row in CRITEO_ROWS)
    tsv = tmp_path / "day.tsv"
    tsv.write_text("".join("\t".join(row) + "\n" for row in CRITEO_ROWS))
    url, server = feature_redis.url, feature_server
    out = lma("features", "load", str(tsv), "--redis", url, "--entity-column", "row", "--ttl", "600").stdout
    assert out.startswith("loaded 4 rows into hashes lma:features:<row>, expiring in 600 s in ")
    assert out.endswith("; skipped 0 lines\n")
    r = feature_redis.client()
    assert sorted(r.keys("lma:features:*")) == [f"lma:features:{n}" for n in range(4)]
    assert all(0 < r.ttl(f"lma:features:{n}") <= 600 for n in range(4))
    server.wait_ready()  # it booted while the CLI ran

    raw = [raw_instance(row) for row in CRITEO_ROWS]
    by_raw = predict(server.url, raw).json()["predictions"]
    assert len(set(by_raw)) == 4  # four different rows, four different scores
    by_entity = predict(server.url, [{"entity": str(n)} for n in range(4)]).json()["predictions"]
    assert by_entity == by_raw  # exact float equality
    for n in range(4):  # alone, in a batch of one
        assert predict(server.url, [{"entity": str(n)}]).json()["predictions"] == [by_raw[n]]

    # request values win over stored ones
    edited = raw_instance(CRITEO_ROWS[1])
    edited["dense"][0], edited["categorical"][1] = 77, TOKENS[3]
    partial = {"entity": "1", "dense": {"I1": 77}, "categorical": {"C2": TOKENS[3]}}
    assert predict(server.url, [partial]).json()["predictions"] == predict(server.url, [edited]).json()["predictions"]
    # an entity with nothing stored: 404, unless the instance asks to be scored with what it sent
    missing = predict(server.url, [{"entity": "4"}])
    assert (missing.status_code, missing.json()["kind"]) == (404, "entity_not_found")
    defaults = predict(server.url, [{"entity": "4", "missing_entity": "defaults", **raw[0]}])
    assert defaults.json()["predictions"] == [by_raw[0]]


# ----------------------------------------------------------------------------------------------
# 2. Redis stopped and restarted while requests flow


@dataclass
class Timeline:
    """The states Redis went through and the (start, end) of each change, in time.monotonic()."""

    states: list[str]
    changes: list[tuple[float, float]] = field(default_factory=list)

    def change(self, to: str, action: Callable[[], object]) -> float:
        """Run ``action`` (what moves Redis to state ``to``); returns when the new state surely holds."""
        start = time.monotonic()
        action()
        self.changes.append((start, time.monotonic()))
        self.states.append(to)
        return self.changes[-1][1]

    def seen(self, o: Outcome) -> list[str]:
        """The states that may have held at some moment between the request's send and its answer."""
        seen = []
        for k, state in enumerate(self.states):
            begins = self.changes[k - 1][0] if k > 0 else -math.inf
            ends = self.changes[k][1] if k < len(self.changes) else math.inf
            if o.sent <= ends and o.done >= begins:
                seen.append(state)
        return seen


ENTITIES = [f"user-{k}" for k in range(8)]
EXPECTED = {"up": 200, "down": 503, "restarted empty": 404, "reloaded": 200}  # entity requests, per state


def entity_features(k: int) -> dict[str, str]:
    """What ENTITIES[k] has stored: a full Criteo row, as `lma features load` writes it."""
    schema = criteo_schema()
    inst = instance(k)
    dense = {name: format_dense(v) for name, v in zip(schema.dense_names, inst["dense"], strict=True)}
    return dense | dict(zip(schema.categorical_names, inst["categorical"], strict=True))


def load_entities(url: str) -> None:
    report = load_features(url, [(e, entity_features(k)) for k, e in enumerate(ENTITIES)], progress=False)
    assert report.rows == len(ENTITIES)


def test_redis_down_fails_only_entity_requests_and_the_server_recovers_by_itself(
    feature_redis: RedisServer, feature_server: ServerProcess
) -> None:
    redis_server, server = feature_redis, feature_server
    load_entities(redis_server.url)
    server.wait_ready()
    counters = ("lma_feature_store_errors_total", "lma_feature_store_hits_total", "lma_feature_store_misses_total")
    before = [server.metric(c, model="criteo") for c in counters]
    plain = lambda i: [instance(i)]  # noqa: E731
    entity = lambda i: [{"entity": ENTITIES[i % len(ENTITIES)]}]  # noqa: E731
    clients = [("plain", server.url, plain)] * 2 + [("entity", server.url, entity)] * 2
    timeline = Timeline(["up"])
    with Traffic(clients, pause_s=PAUSE_S) as load:

        def settled(since: float) -> bool:  # enough requests of each kind sent after `since`
            return min(len(load.of("plain", since)), len(load.of("entity", since))) >= MIN_PER_STATE

        load.wait("serving with Redis up", lambda: settled(-math.inf))
        since = timeline.change("down", redis_server.stop)
        load.wait("Redis down", lambda: settled(since))
        since = timeline.change("restarted empty", redis_server.start)  # same port, nothing stored
        load.wait("Redis restarted empty", lambda: settled(since))
        since = timeline.change("reloaded", lambda: load_entities(redis_server.url))
        load.wait("features reloaded", lambda: settled(since))

    plain_outcomes, entity_outcomes = load.of("plain"), load.of("entity")
    assert Counter(o.status for o in plain_outcomes) == {200: len(plain_outcomes)}, [
        o for o in plain_outcomes if o.status != 200
    ][:3]
    # Each entity request that saw one state only got that state's status; the few in flight
    # while Redis changed got the status of one of the states they overlapped.
    definite = [(timeline.seen(o)[0], o) for o in entity_outcomes if len(timeline.seen(o)) == 1]
    per_state = Counter(state for state, _ in definite)
    assert Counter((state, o.status) for state, o in definite) == {
        (state, EXPECTED[state]): n for state, n in per_state.items()
    }
    assert set(per_state) == set(EXPECTED) and min(per_state.values()) >= MIN_PER_STATE
    for o in entity_outcomes:
        assert o.status in {EXPECTED[s] for s in timeline.seen(o)}, (o, timeline)

    # What each status says.
    entity_of = lambda o: ENTITIES[o.i % len(ENTITIES)]  # noqa: E731
    for o in entity_outcomes:
        if o.status == 503:  # names the feature store, and says when to retry
            assert o.body["kind"] == "feature_store_unavailable" and "feature store" in o.body["error"], o.body
            assert o.retry_after == "1"
        elif o.status == 404:
            assert o.body == {
                "kind": "entity_not_found",
                "error": f"instances[0].entity: nothing stored for entity {entity_of(o)!r}; send"
                ' "missing_entity": "defaults" to score it with the values it carries',
            }
    for state, o in definite:  # while Redis is down: which Redis, and why
        if state == "down":
            assert o.body["error"].startswith(f"feature store unavailable: Redis at {redis_server.url}: "), o.body
            assert o.body["error"].endswith("Connection refused."), o.body
    # Before and after the restart, each entity scores the same (same features, reloaded).
    scores: dict[str, set[float]] = {}
    for o in entity_outcomes:
        if o.status == 200:
            assert o.body["version"] == "1"
            scores.setdefault(entity_of(o), set()).update(o.body["predictions"])
    assert sorted(scores) == sorted(ENTITIES) and all(len(s) == 1 for s in scores.values()), scores

    statuses = Counter(o.status for o in entity_outcomes)
    after = [server.metric(c, model="criteo") for c in counters]
    assert [x - y for x, y in zip(after, before, strict=True)] == [statuses[503], statuses[200], statuses[404]]
    print(f"\nRedis stop/restart: plain {len(plain_outcomes)} x 200; entity {dict(sorted(statuses.items()))}")


# ----------------------------------------------------------------------------------------------
# 3. `lma publish` to subscribed replicas under load


def test_publish_swaps_every_replica_under_load_without_a_failed_request(
    bundles: Bundles, redis_server: RedisServer, tmp_path: Path
) -> None:
    # Each replica's own model folder (its image) holds version 1 only; the shared volume
    # `artifacts` gets version 2, and replicas learn of it from Redis alone (no folder watch).
    # (Version 2 was exported by the fixture: the test copies it in, which takes no CPU from the load.)
    image = make_repo(tmp_path / "image", bundles.criteo_v1)
    artifacts = make_repo(tmp_path / "artifacts", bundles.criteo_v1)
    replicas = [serve(image, tmp_path / f"replica-{k}.log", LMA_REDIS_URL=redis_server.url) for k in range(2)]
    late: ServerProcess | None = None
    try:
        for server in replicas:
            server.wait_ready()
        r = redis_server.client()
        deadline = time.monotonic() + WAIT_S
        while r.pubsub_numsub(CHANNEL) != [(CHANNEL, 2)]:  # both subscribed (at start-up, right after ready)
            assert time.monotonic() < deadline, r.pubsub_numsub(CHANNEL)
            time.sleep(0.05)

        one = lambda i: [instance(i)]  # noqa: E731
        clients = [(f"replica-{k}", s.url, one) for k, s in enumerate(replicas) for _ in range(2)]
        with Traffic(clients, pause_s=PAUSE_S) as load:
            names = [f"replica-{k}" for k in range(2)]

            def answered_by_all(version: str, n: int) -> bool:
                return all(sum(o.body.get("version") == version for o in load.of(c)) >= n for c in names)

            load.wait("version 1 served", lambda: answered_by_all("1", MIN_PER_STATE))
            make_repo(artifacts, bundles.criteo_v2)
            out = lma("publish", str(artifacts / "criteo"), "--redis", redis_server.url).stdout
            published = read_current(redis_server.url)["criteo"]
            # published_at is the publisher's time.time(); make it comparable with the outcomes' clock
            published_mono = published.published_at - (time.time() - time.monotonic())
            load.wait("version 2 served", lambda: answered_by_all("2", 1))
            late = serve(image, tmp_path / "replica-late.log", LMA_REDIS_URL=redis_server.url)  # boots meanwhile
            load.wait("version 2 served a while", lambda: answered_by_all("2", MIN_PER_STATE))

        path = artifacts / "criteo" / "2"
        assert (published.version, published.path) == ("2", str(path.resolve()))
        assert out == f"published criteo version 2 ({path.resolve()}) on {CHANNEL}: 2 subscribers listening\n"
        propagation = {}
        for name in names:
            outcomes = load.of(name)
            assert Counter(o.status for o in outcomes) == {200: len(outcomes)}, [o for o in outcomes if o.status != 200]
            first_v2 = min(o.done for o in outcomes if o.body["version"] == "2")
            propagation[name] = first_v2 - published_mono
        for thread in range(len(clients)):  # each client: 1 ... 1 2 ... 2, never back
            versions = [o.body["version"] for o in load.outcomes if o.thread == thread]
            assert versions == sorted(versions) and versions[0] == "1" and versions[-1] == "2"
        print(f"\npublish -> first answer of version 2: {', '.join(f'{n} {s:.2f} s' for n, s in propagation.items())}")
        assert all(0 < s < SWAP_BOUND_S for s in propagation.values()), propagation
        for server in replicas:
            assert server.metric("lma_model_reloads_total", model="criteo", result="ok") == 1
            assert server.metric("lma_model_reloads_total", model="criteo", result="failed") == 0
            assert server.stop() == 0
            assert loaded_versions(server) == [("1", "startup"), ("2", "publish")]
        swap_s = [e["seconds"] for s in replicas for e in s.logs() if e.get("reason") == "publish"]
        print(f"swap (load, verify, warm up version 2) took {', '.join(f'{x:.2f} s' for x in swap_s)}")

        # The replica started after the publish serves the recorded current version from its first
        # answer: it applies it before it accepts requests, although its own folder holds only 1.
        late.wait_ready()
        first = predict(late.url, [instance(0)])
        assert first.status_code == 200 and first.json()["version"] == "2", first.text
        assert late.stop() == 0
        assert loaded_versions(late) == [("1", "startup"), ("2", "publish")]
        events = [e["msg"] for e in late.logs()]
        applied = events.index("model loaded: serving version 2 (was 1)")
        assert applied < events.index("Application startup complete."), (
            "the replica started after `lma publish` accepted requests while still serving version 1: "
            "its start-up must wait for the model-update channel's first catch-up"
        )
    finally:
        stop_all(*replicas, late)


def loaded_versions(server: ServerProcess) -> list[tuple[str, str]]:
    """(version, reason) of each model load in the server's log, in order."""
    return [(e["version"], e["reason"]) for e in server.logs() if e["msg"].startswith("model loaded")]


# ----------------------------------------------------------------------------------------------
# 4. A forged signature published to a server that trusts one key, under load


def forge_signed(src: Path, dst: Path) -> Path:
    """What an attacker who can write the shared volume makes of a signed bundle: model.onnx changed, the
    manifest's sha256 and the signed payload's digests rewritten to match, the old signature bytes kept."""
    shutil.copytree(src, dst)
    onnx = bytearray((dst / "model.onnx").read_bytes())
    onnx[len(onnx) // 2] ^= 0x01
    (dst / "model.onnx").write_bytes(bytes(onnx))
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"]["model.onnx"]["sha256"] = hashlib.sha256(onnx).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in dst.iterdir() if p.name != "model.sig"}
    sig = json.loads((dst / "model.sig").read_text())
    statement = json.loads(base64.b64decode(sig["dsseEnvelope"]["payload"]))
    for resource in statement["predicate"]["resources"]:
        resource["digest"] = digests[resource["name"]]
    sig["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (dst / "model.sig").write_text(json.dumps(sig))
    return dst


def test_a_forged_signature_published_under_load_is_rejected_without_a_failed_request(
    bundles: Bundles, redis_server: RedisServer, tmp_path: Path
) -> None:
    from export.signing import BundleSigner, generate_key_pair

    public = generate_key_pair(tmp_path / "signing.pem")
    signer = BundleSigner(tmp_path / "signing.pem")
    image = make_repo(tmp_path / "image", bundles.criteo_v1)
    signer.sign(image / "criteo" / "1")
    artifacts = tmp_path / "artifacts" / "criteo"
    good = make_repo(tmp_path / "signed", bundles.criteo_v2) / "criteo" / "2"
    signer.sign(good)
    forged = forge_signed(good, artifacts / "2")
    server = serve(image, tmp_path / "server.log", LMA_REDIS_URL=redis_server.url, LMA_TRUSTED_KEYS=str(public))
    try:
        server.wait_ready()
        r = redis_server.client()
        deadline = time.monotonic() + WAIT_S
        while r.pubsub_numsub(CHANNEL) != [(CHANNEL, 1)]:
            assert time.monotonic() < deadline, r.pubsub_numsub(CHANNEL)
            time.sleep(0.05)
        one = lambda i: [instance(i)]  # noqa: E731
        with Traffic([("load", server.url, one)] * 2, pause_s=PAUSE_S) as load:
            load.wait("version 1 served", lambda: len(load.of("load")) >= MIN_PER_STATE)
            lma("publish", str(forged), "--redis", redis_server.url)  # a publisher that checks no signature
            load.wait(
                "the forged version rejected",
                lambda: server.metric("lma_model_reloads_total", model="criteo", result="rejected") == 1,
            )
            rejected_at = time.monotonic()
            load.wait("serving after the rejection", lambda: len(load.of("load", rejected_at)) >= MIN_PER_STATE)
            shutil.copytree(good, artifacts / "3")  # the same graph, properly signed, as version 3
            (artifacts / "3" / "model.sig").unlink()
            manifest = json.loads((artifacts / "3" / "manifest.json").read_text())
            (artifacts / "3" / "manifest.json").write_text(json.dumps({**manifest, "version": "3"}, indent=2))
            signer.sign(artifacts / "3")
            lma("publish", str(artifacts), "--redis", redis_server.url, "--key", str(public))
            load.wait("version 3 served", lambda: any(o.body.get("version") == "3" for o in load.of("load")))

        outcomes = load.of("load")
        assert Counter(o.status for o in outcomes) == {200: len(outcomes)}, [o for o in outcomes if o.status != 200][:3]
        for thread in range(2):  # each client: 1 ... 1 3 ... 3; never the forged 2
            versions = [o.body["version"] for o in load.outcomes if o.thread == thread]
            assert versions == sorted(versions) and versions[0] == "1" and versions[-1] == "3", Counter(versions)
            assert "2" not in versions
        assert server.metric("lma_model_reloads_total", model="criteo", result="rejected") == 1
        assert server.metric("lma_model_reloads_total", model="criteo", result="ok") == 1
        assert server.stop() == 0
        (rejection,) = [e for e in server.logs() if e["msg"].startswith("model bundle rejected")]
        assert (rejection["rejected"], rejection["path"], rejection["reason"]) == (
            "bad_signature", str(forged.resolve()), "publish"
        )  # fmt: skip
        assert rejection["msg"].startswith(
            f"model bundle rejected: bundle rejected (bad_signature): {forged.resolve()}"
        )
        assert loaded_versions(server) == [("1", "startup"), ("3", "publish")]
        print(f"\nforged signature under load: {len(outcomes)} x 200, rejected once, version 3 served after")
    finally:
        server.stop()
