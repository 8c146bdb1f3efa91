"""RedisFeatureStore and `lma features load` against a real, private redis-server (tests/redis_util.py)."""

from __future__ import annotations

import argparse
import asyncio
import gzip
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from models.schema import criteo_schema
from server.errors import FeatureStoreUnavailable, InvalidInput
from server.featurize import Featurizer
from server.redis_store import (
    DEFAULT_PREFIX,
    LoadReport,
    RedisFeatureStore,
    bench_fetch,
    feature_rows,
    format_dense,
    load_features,
    redact_url,
)
from tests.helpers.redis_server import RedisServer

pytestmark = pytest.mark.redis

HANG_GUARD_S = 10.0  # only catches a call that never returns; no test asserts how fast anything is


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisFeatureStore]:
    s = RedisFeatureStore(redis_server.url, timeout_ms=200)
    yield s
    await s.close()


def put(server: RedisServer, entity: str, features: dict[str, str], prefix: str = DEFAULT_PREFIX) -> None:
    server.client().hset(prefix + entity, mapping=features)


async def guarded_fetch(store: RedisFeatureStore, entities: list[str]) -> list[dict[str, object] | None]:
    async with asyncio.timeout(HANG_GUARD_S):
        return await store.fetch(entities)


# --------------------------------------------------------------------------------------------
# fetch


async def test_fetch_returns_each_entitys_hash_in_request_order(redis_server: RedisServer, store: RedisFeatureStore):
    put(redis_server, "u1", {"I1": "3", "C1": "68fd1e64"})
    put(redis_server, "u2", {"C2": "80e26c9b"})
    put(redis_server, "other-prefix", {"C1": "x"}, prefix="elsewhere:")

    got = await store.fetch(["u2", "nobody", "u1", "u2", "other-prefix"])

    assert got == [{"C2": "80e26c9b"}, None, {"I1": "3", "C1": "68fd1e64"}, {"C2": "80e26c9b"}, None]
    assert got[0] is not got[3]  # a repeated entity gets a dict of its own
    assert await store.fetch([]) == []
    assert store.available


async def test_a_key_that_holds_no_hash_is_named_and_the_store_stays_available(
    redis_server: RedisServer, store: RedisFeatureStore
):
    # it once read as "feature store unavailable" (503, retry): a retry can never succeed, and it failed the
    # other entities of the request as well as marking the store down
    put(redis_server, "good", {"C1": "68fd1e64"})
    redis_server.client().set(store.key("wrongtype"), "hello")
    with pytest.raises(InvalidInput) as e:
        await store.fetch(["good", "wrongtype"])
    assert e.value.message.startswith(
        f"entity 'wrongtype': what is stored at {store.key('wrongtype')} is no feature hash (WRONGTYPE"
    )
    assert store.available
    assert await store.fetch(["good"]) == [{"C1": "68fd1e64"}]


async def test_fetch_of_n_entities_is_one_round_trip(redis_server: RedisServer, store: RedisFeatureStore):
    """One HGETALL per distinct entity, all sent in one write and answered in one write.

    Method: Redis counts, in ``INFO stats``, the read events it processes on client sockets
    (``total_reads_processed``) and the replies it flushes (``total_writes_processed``), and in
    ``INFO commandstats`` the calls per command. A client that waited for a reply before sending
    its next command would cost the server one read event per command. We snapshot the counters
    around a fetch on a warm connection and subtract the counters' change around no fetch at all
    (the snapshots' own INFO commands are counted too): the fetch must add exactly 1 read event,
    1 write and N HGETALL calls. The private server has no other clients.
    """
    entities = [f"user-{i}" for i in range(200)]
    r = redis_server.client()
    for i, e in enumerate(entities):
        r.hset(DEFAULT_PREFIX + e, mapping={"I1": str(i), "C1": f"tok{i}"})
    await store.fetch(entities[:1])  # open the pooled connection (its handshake is not the fetch)

    def counters() -> tuple[int, int, int]:
        stats, commands = r.info("stats"), r.info("commandstats")
        hgetall = commands.get("cmdstat_hgetall", {}).get("calls", 0)
        return stats["total_reads_processed"], stats["total_writes_processed"], hgetall

    before = counters()
    after_nothing = counters()
    baseline = [b - a for a, b in zip(before, after_nothing, strict=True)]
    assert baseline[2] == 0

    for batch in (entities[:1], entities[:32], entities + entities[:50]):  # the last one repeats 50 entities
        before = counters()
        got = await store.fetch(batch)
        after = counters()
        reads, writes, hgetall = (b - a - base for a, b, base in zip(before, after, baseline, strict=True))
        distinct = len(set(batch))
        assert (reads, writes, hgetall) == (1, 1, distinct), f"batch of {len(batch)} ({distinct} distinct)"
        assert got == [{"I1": e.split("-")[1], "C1": "tok" + e.split("-")[1]} for e in batch]


async def test_concurrent_fetches_share_a_small_pool_without_mixing_replies(redis_server: RedisServer):
    for i in range(40):
        put(redis_server, f"e{i}", {"I1": str(i)})
    store = RedisFeatureStore(redis_server.url, timeout_ms=5000, max_connections=3)
    try:
        batches = [[f"e{(i + j) % 40}" for j in range(i % 7 + 1)] for i in range(60)]
        async with asyncio.timeout(HANG_GUARD_S):
            results = await asyncio.gather(*(store.fetch(b) for b in batches))
        for batch, got in zip(batches, results, strict=True):
            assert got == [{"I1": e[1:]} for e in batch]
        clients = [c for c in redis_server.client().client_list() if c["name"] == "lma-feature-store"]
        assert 1 <= len(clients) <= 3
    finally:
        await store.close()


async def test_hung_redis_times_out_and_late_replies_never_reach_later_calls(
    redis_server: RedisServer, store: RedisFeatureStore
):
    """A frozen server (SIGSTOP) accepts requests and answers none: fetches fail with the deadline.

    When it wakes up it answers the requests of the timed-out fetches; those replies must never be
    taken as the answers of later fetches (the connection they went to is closed, not reused).
    """
    put(redis_server, "a", {"C1": "value-of-a"})
    put(redis_server, "b", {"C1": "value-of-b"})
    assert await store.fetch(["a"]) == [{"C1": "value-of-a"}]

    redis_server.pause()
    try:
        for entities in (["a"], ["b", "a"]):
            with pytest.raises(FeatureStoreUnavailable, match=r"did not answer a fetch within 200 ms") as info:
                await guarded_fetch(store, entities)
            assert info.value.status == 503
            assert f"127.0.0.1:{redis_server.port}" in info.value.message
            assert not store.available
    finally:
        redis_server.resume()

    assert await guarded_fetch(store, ["b"]) == [{"C1": "value-of-b"}]
    assert await guarded_fetch(store, ["b", "a", "b"]) == [
        {"C1": "value-of-b"},
        {"C1": "value-of-a"},
        {"C1": "value-of-b"},
    ]
    assert store.available


async def test_store_fails_fast_while_redis_is_down_and_recovers_by_itself(
    redis_server: RedisServer, store: RedisFeatureStore
):
    put(redis_server, "u1", {"I1": "1"})
    # Several pooled connections, all of which die with the server.
    assert await asyncio.gather(*(store.fetch(["u1"]) for _ in range(4))) == [[{"I1": "1"}]] * 4

    redis_server.stop()
    for _ in range(3):
        with pytest.raises(FeatureStoreUnavailable, match=rf"Redis at redis://127.0.0.1:{redis_server.port}/0"):
            await guarded_fetch(store, ["u1"])
    assert not store.available
    with pytest.raises(FeatureStoreUnavailable):
        await store.ping()

    redis_server.start()  # same port, no data (no persistence)
    put(redis_server, "u1", {"I1": "2"})
    assert await guarded_fetch(store, ["u1"]) == [{"I1": "2"}]  # the same store object, not recreated
    assert store.available
    await store.ping()


async def test_restart_between_calls_does_not_fail_the_next_fetch(redis_server: RedisServer, store: RedisFeatureStore):
    """Idle pooled connections to a Redis that restarted are dead; the next fetch must not fail on them."""
    put(redis_server, "u1", {"I1": "1"})
    assert await asyncio.gather(*(store.fetch(["u1"]) for _ in range(4))) == [[{"I1": "1"}]] * 4
    redis_server.restart()
    put(redis_server, "u1", {"I1": "9"})
    for _ in range(6):
        assert await guarded_fetch(store, ["u1"]) == [{"I1": "9"}]


async def test_password_urls_work_and_errors_never_show_the_password(tmp_path: Path):
    with RedisServer(tmp_path / "auth", password="s3cret-pw") as server:
        put(server, "u1", {"C1": "a"})
        good = RedisFeatureStore(server.url, timeout_ms=1000)
        bad = RedisFeatureStore(server.url.replace("s3cret-pw", "wrong-pw"), timeout_ms=1000)
        try:
            assert await good.fetch(["u1"]) == [{"C1": "a"}]
            with pytest.raises(FeatureStoreUnavailable) as info:
                await bad.fetch(["u1"])
            assert "wrong-pw" not in info.value.message
            assert f"redis://default:***@127.0.0.1:{server.port}/0" in info.value.message
            assert "wrong-pw" not in repr(bad)
        finally:
            await good.close()
            await bad.close()


async def test_redact_url_and_tls_urls():
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("redis://user:pw@redis.internal:6380/2") == "redis://user:***@redis.internal:6380/2"
    assert redact_url("rediss://:pw@h/0?ssl_cert_reqs=required") == "rediss://:***@h/0?ssl_cert_reqs=required"
    store = RedisFeatureStore("rediss://user:pw@redis.internal:6380/1?ssl_cert_reqs=required")
    pool = store._client.connection_pool
    assert pool.connection_class.__name__ == "SSLConnection"
    assert (pool.connection_kwargs["host"], pool.connection_kwargs["port"], pool.connection_kwargs["db"]) == (
        "redis.internal", 6380, 1,
    )  # fmt: skip
    await store.close()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="timeout must be > 0 ms"):
        RedisFeatureStore("redis://127.0.0.1:1/0", timeout_ms=0)
    with pytest.raises(ValueError, match="prefix must be a non-empty string"):
        RedisFeatureStore("redis://127.0.0.1:1/0", prefix="")


async def test_stored_values_merge_under_request_values(redis_server: RedisServer, store: RedisFeatureStore):
    """What the server does with a fetch: stored text fills only what the request left missing."""
    schema = criteo_schema()
    featurizer = Featurizer(schema)
    put(redis_server, "u1", {"I1": "7", "I2": "5", "C1": "stored-c1", "C2": "stored-c2", "not-a-feature": "x"})
    parsed = featurizer.parse_instances(
        [
            {"dense": {"I1": 1.5}, "categorical": {"C1": "req-c1", "C3": None}, "entity": "u1"},
            {"categorical": {"C1": "req-c1"}, "entity": "nobody", "missing_entity": "defaults"},
        ],
        max_instances=10,
    )
    assert parsed.entities is not None
    stored = await store.fetch([e for e in parsed.entities if e is not None])
    featurizer.merge_stored(parsed, stored)

    rows = parsed.rows  # flat, row-major: 13 dense and 26 categorical values per instance
    assert rows.dense[:3] == [1.5, 5.0, None]  # missing stays None until the batch is made
    assert rows.categorical[:4] == ["req-c1", "stored-c2", None, None]
    assert rows.categorical[26:28] == ["req-c1", None]
    expected = [["req-c1", "stored-c2", *[None] * 24], ["req-c1", *[None] * 25]]
    assert (rows.merge([rows]).keys == schema.keys_for(expected)).all()


# --------------------------------------------------------------------------------------------
# lma features load

# Three hand-written Criteo lines: label, I1..I13, C1..C26 ("" = missing).
CRITEO_TSV = [
    ["1", "5", "-1", "", "0", "1382", "4", "15", "2", "181", "1", "2", "", "2",
     "68fd1e64", "80e26c9b", "fb936136", "7b4723c4", "25c83c98", "7e0ccccf", "de7995b8", "1f89b562", "a73ee510",
     "a8cd5504", "b2cb9c98", "37c9c164", "2824a5f6", "1adce6ef", "8ba8b39a", "891b62e7", "e5ba7672", "f54016b9",
     "21ddcdc9", "b1252a9d", "07b5194c", "", "3a171ecb", "c5c50484", "e8b83407", "9727dd16"],
    ["0", "2", "0", "44", "1", "102", "8", "2", "2", "4", "1", "1", "", "4",
     "68fd1e64", "f0cf0024", "6f67f7e5", "41274cd7", "25c83c98", "fe6b92e5", "922afcc0", "0b153874", "a73ee510",
     "2b53e5fb", "4f1b46f3", "623049e6", "d7020589", "b28479f6", "e6c5b5cd", "c92f3b61", "07c540c4", "b04e4670",
     "21ddcdc9", "5840adea", "60f6221e", "", "3a171ecb", "43f13e8b", "e8b83407", "731c3655"],
    ["0", "", "893", "", "", "4392", "", "0", "0", "0", "", "0", "", "",
     "05db9164", "6c9c9cf3", "2730ec9c", "5400db8b", "43b19349", "6f6d9be8", "53b5f978", "0b153874", "a73ee510",
     "3b08e48b", "91e8fc27", "be45b877", "9ff13f22", "07d13a8f", "06969a20", "9bc7fff5", "776ce399", "92555263",
     "", "", "242bb710", "8ec974f4", "be7c41b4", "72c78f11", "", ""],
]  # fmt: skip


def write_criteo(path: Path, gz: bool = False) -> Path:
    lines = ["\t".join(row) for row in CRITEO_TSV]
    lines.insert(2, "not\ta\tcriteo\tline")  # malformed: skipped and counted, never a crash
    text = "\n".join(lines) + "\n"
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def expected_hash(row: list[str]) -> dict[str, str]:
    schema = criteo_schema()
    names = (*schema.dense_names, *schema.categorical_names)
    return {name: value for name, value in zip(names, row[1:], strict=True) if value != ""}


def run_cli(argv: list[str]) -> int:
    """`lma ...` with only this package's commands registered (the entry point is added in pyproject.toml)."""
    from server.redis_cli import register

    parser = argparse.ArgumentParser(prog="lma")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_loads_a_criteo_file_by_row_number_with_ttl(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    path = write_criteo(tmp_path / "day.tsv.gz", gz=True)
    argv = ["features", "load", str(path), "--redis", redis_server.url, "--entity-column", "row", "--ttl", "3600"]
    assert run_cli([*argv, "--batch", "2"]) == 0

    r = redis_server.client()
    assert sorted(r.keys("*")) == ["lma:features:0", "lma:features:1", "lma:features:2"]
    for i, row in enumerate(CRITEO_TSV):
        assert r.hgetall(f"lma:features:{i}") == expected_hash(row)
        assert 3500 < r.ttl(f"lma:features:{i}") <= 3600
    assert r.hget("lma:features:0", "I2") == "-1"  # raw values: negatives kept, no transform
    assert r.hexists("lma:features:0", "I3") is False  # missing values are absent fields
    out = capsys.readouterr().out
    assert "loaded 3 rows into hashes lma:features:<row>, expiring in 3600 s" in out
    assert out.endswith("; skipped 1 lines (field_count 1)\n")


async def test_loaded_features_are_what_the_store_fetches(redis_server: RedisServer, tmp_path: Path):
    path = write_criteo(tmp_path / "day.tsv")
    report = LoadReport()
    load_features(redis_server.url, feature_rows(path, "criteo", "C3", report), prefix="p:", report=report)
    assert (report.rows, report.skipped) == (3, 1)
    store = RedisFeatureStore(redis_server.url, prefix="p:", timeout_ms=1000)
    try:
        got = await store.fetch(["2730ec9c", "fb936136", "6f67f7e5", "absent"])
    finally:
        await store.close()
    assert got == [expected_hash(CRITEO_TSV[2]), expected_hash(CRITEO_TSV[0]), expected_hash(CRITEO_TSV[1]), None]
    assert redis_server.client().ttl("p:2730ec9c") == -1  # no --ttl: kept


def test_load_by_a_shared_field_keeps_the_last_row_and_replaces_old_hashes(redis_server: RedisServer, tmp_path: Path):
    r = redis_server.client()
    r.hset("lma:features:68fd1e64", mapping={"stale": "old", "I1": "999"})
    path = write_criteo(tmp_path / "day.tsv")
    report = LoadReport()
    load_features(redis_server.url, feature_rows(path, "criteo", "C1", report), report=report)
    assert report.rows == 3
    assert r.dbsize() == 2  # rows 0 and 1 share C1 = 68fd1e64
    assert r.hgetall("lma:features:68fd1e64") == expected_hash(CRITEO_TSV[1])  # last row wins, "stale" gone
    assert r.hgetall("lma:features:05db9164") == expected_hash(CRITEO_TSV[2])


def test_rows_without_a_key_are_skipped_and_counted(redis_server: RedisServer, tmp_path: Path):
    path = write_criteo(tmp_path / "day.tsv")
    report = LoadReport()
    load_features(redis_server.url, feature_rows(path, "criteo", "C19", report), report=report)
    assert report.rows == 2  # row 2 has no C19
    assert redis_server.client().dbsize() == 1  # rows 0 and 1 share theirs
    assert redis_server.client().hgetall("lma:features:21ddcdc9") == expected_hash(CRITEO_TSV[1])
    assert report.skip_reasons == {"field_count": 1, "missing_key": 1}
    assert report.skipped == 2


def test_load_csv_with_header(redis_server: RedisServer, tmp_path: Path):
    path = tmp_path / "users.csv"
    path.write_text('user_id,I1,C1,C2\nu1,3,abc,\nu2,,"x,y",z\nbroken,1\n,4,q,q\n')
    report = LoadReport()
    load_features(redis_server.url, feature_rows(path, "csv", "user_id", report), ttl_s=60, report=report)
    r = redis_server.client()
    assert r.hgetall("lma:features:u1") == {"I1": "3", "C1": "abc"}
    assert r.hgetall("lma:features:u2") == {"C1": "x,y", "C2": "z"}
    assert sorted(r.keys("*")) == ["lma:features:u1", "lma:features:u2"]
    assert 0 < r.ttl("lma:features:u2") <= 60
    assert report.skip_reasons == {"field_count": 1, "missing_key": 1}


def test_cli_load_of_nothing_or_into_a_bad_database_is_an_error(redis_server: RedisServer, tmp_path: Path):
    # both once ended well: exit 0 with "loaded 0 rows", and "unexpected error: ResponseError"
    empty, garbage = tmp_path / "empty.tsv", tmp_path / "garbage.tsv"
    empty.write_text("")
    garbage.write_text("a,b,c\n1,2,3\n")
    argv = ["features", "load", "--redis", redis_server.url, "--entity-column", "row"]
    with pytest.raises(ValueError, match=rf"^{empty}: no criteo row to load$"):
        run_cli([*argv, str(empty)])
    with pytest.raises(
        ValueError, match=rf"^{garbage}: no criteo row to load; all 2 lines were skipped \(field_count 2\)$"
    ):
        run_cli([*argv, str(garbage)])
    bad_db = redis_server.url.rsplit("/", 1)[0] + "/99"
    with pytest.raises(ValueError, match=r"^Redis at redis://127\.0\.0\.1:\d+/99: DB index is out of range$"):
        run_cli(
            ["features", "load", "--redis", bad_db, "--entity-column", "row", str(write_criteo(tmp_path / "d.tsv"))]
        )
    assert redis_server.client().keys("*") == []


def test_load_refuses_bad_arguments_before_touching_redis(tmp_path: Path):
    path = write_criteo(tmp_path / "day.tsv")
    report = LoadReport()
    with pytest.raises(ValueError, match=r"--entity-column 'user' is not a key column of format criteo: use 'row'"):
        feature_rows(path, "criteo", "user", report)
    with pytest.raises(ValueError, match=r"--entity-column 'id' is not a key column of format criteo"):
        feature_rows(path, "criteo", "id", report)
    with pytest.raises(ValueError, match="unknown format 'parquet'"):
        feature_rows(path, "parquet", "row", report)
    with pytest.raises(FileNotFoundError, match="no such file"):
        feature_rows(tmp_path / "missing.tsv", "criteo", "row", report)
    csv_path = tmp_path / "f.csv"
    csv_path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"--entity-column 'user_id' is not in the header \['a', 'b'\]"):
        feature_rows(csv_path, "csv", "user_id", report)
    with pytest.raises(ValueError, match="--ttl must be >= 1 second"):
        load_features("redis://127.0.0.1:1/0", [], ttl_s=0)
    with pytest.raises(ValueError, match=r"Redis at redis://127.0.0.1:1/0"):
        load_features("redis://127.0.0.1:1/0", [("e", {"a": "1"})], progress=False)


def test_format_dense_reads_back_exactly():
    assert [format_dense(x) for x in (5.0, -1.0, 0.0, 0.1, 1e20, 2.0**60)] == [
        "5", "-1", "0", "0.1", "1e+20", "1.152921504606847e+18",
    ]  # fmt: skip
    for x in (0.1, 1e-7, 123456.789, 1e20, 2.0**60, 2.0**53 - 1):
        assert float(format_dense(x)) == x
    with pytest.raises(ValueError, match="not a finite number"):
        format_dense(float("nan"))


async def test_bench_runs_and_cleans_up(redis_server: RedisServer):
    rows = await bench_fetch(redis_server.url, [1, 4], iterations=5, warmup=1)
    assert [r["batch"] for r in rows] == [1, 4]
    assert all(0 < r["p50_ms"] <= r["p99_ms"] for r in rows)
    assert redis_server.client().dbsize() == 0
