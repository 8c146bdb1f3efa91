"""The load test: the locustfile and its user classes load in locust, payloads have the schema's widths and
exact values, responses are checked (DESIGN section 9).

Locust monkey-patches the process with gevent when imported, so the locustfile itself only ever runs in a
subprocess (`locust --list`, a headless run); this process imports `loadtest.payloads` alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from loadtest.payloads import (
    BodyPool,
    LoadTestConfig,
    build_pools,
    entity_features,
    native_response_problem,
    read_rows,
    synthetic_rows,
    v2_response_problem,
    write_feature_csv,
)
from models.schema import AVAZU_CATEGORICAL, CRITEO_CATEGORICAL, CRITEO_DENSE

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
USERS = ("SingleSampleUser", "BatchUser", "V2InferUser", "FeatureStoreUser")
HEX = [f"{0x68FD1E64 + 7919 * i:08x}" for i in range(26)]


def criteo_line(label: int, dense: list[str], categorical: list[str]) -> str:
    return "\t".join([str(label), *dense, *categorical]) + "\n"


@pytest.fixture
def criteo_tsv(tmp_path: Path) -> Path:
    """Three hand-written Kaggle-format rows: label, I1..I13, C1..C26; empty = missing."""
    dense0 = ["1", "", "5", "0", "1382", "4", "15", "2", "181", "1", "2", "", "2"]
    dense1 = ["", "0", "44", "1", "102", "8", "2", "2", "4", "", "1", "", "4"]
    dense2 = [str(i) for i in range(13)]
    cats0 = HEX[:]
    cats1 = [*HEX[:5], "", *HEX[6:25], ""]
    cats2 = HEX[::-1]
    path = tmp_path / "small.tsv"
    path.write_text(criteo_line(0, dense0, cats0) + criteo_line(1, dense1, cats1) + criteo_line(0, dense2, cats2))
    return path


def locust_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMA_LOADTEST_")}
    return env | extra


def test_locust_loads_the_user_classes() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--list"],
        capture_output=True, text=True, timeout=60, cwd=ROOT / "loadtest", env=locust_env(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    listed = [line.strip() for line in out.stdout.splitlines() if line.startswith("    ")]
    assert listed == list(USERS)


def test_locustfile_refuses_bad_settings() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--list"],
        capture_output=True, text=True, timeout=60, env=locust_env(LMA_LOADTEST_BATCH="0"),
    )  # fmt: skip
    assert out.returncode != 0
    assert "LMA_LOADTEST_BATCH must be >= 1, got 0" in out.stderr


def test_payloads_from_a_criteo_tsv(criteo_tsv: Path) -> None:
    rows = read_rows(criteo_tsv, "criteo")
    assert (rows.dense_names, rows.categorical_names) == (CRITEO_DENSE, CRITEO_CATEGORICAL)
    assert len(rows) == 3
    assert all(len(r.dense) == 13 and len(r.categorical) == 26 for r in rows.rows)
    first, second = rows.rows[0], rows.rows[1]
    assert first.dense == (1.0, None, 5.0, 0.0, 1382.0, 4.0, 15.0, 2.0, 181.0, 1.0, 2.0, None, 2.0)
    assert first.categorical == tuple(HEX)
    assert second.categorical[5] is None and second.categorical[25] is None and second.categorical[4] == HEX[4]
    assert len(read_rows(criteo_tsv, "criteo", limit=2)) == 2

    pools = build_pools(rows, batch_size=32, v2_batch_size=2, entities=2)
    (instance,) = orjson.loads(pools.native_single.bodies[1])["instances"]
    assert instance == {"dense": list(second.dense), "categorical": list(second.categorical)}
    # fewer rows than a batch: one body, rows repeated in order
    assert len(pools.native_batch) == 1
    batch = orjson.loads(pools.native_batch.bodies[0])["instances"]
    assert len(batch) == 32 and [i["dense"][0] for i in batch[:4]] == [1.0, None, 0.0, 1.0]

    # v2: row-major FP32 and BYTES tensors; missing dense -> 0 (same model input), missing token -> ""
    assert len(pools.v2) == 1
    dense, categorical = orjson.loads(pools.v2.bodies[0])["inputs"]
    assert dense == {"name": "dense", "shape": [2, 13], "datatype": "FP32", "data": [
        1.0, 0.0, 5.0, 0.0, 1382.0, 4.0, 15.0, 2.0, 181.0, 1.0, 2.0, 0.0, 2.0,
        0.0, 0.0, 44.0, 1.0, 102.0, 8.0, 2.0, 2.0, 4.0, 0.0, 1.0, 0.0, 4.0,
    ]}  # fmt: skip
    assert categorical["shape"] == [2, 26] and categorical["datatype"] == "BYTES"
    assert categorical["data"] == [*HEX, *HEX[:5], "", *HEX[6:25], ""]


def test_feature_store_payloads_split_each_row_between_store_and_request(criteo_tsv: Path) -> None:
    rows = read_rows(criteo_tsv, "criteo")
    pools = build_pools(rows, entities=5)
    assert len(pools.feature_store) == 3  # one body per entity, at most one entity per row
    (instance,) = orjson.loads(pools.feature_store.bodies[1])["instances"]
    assert instance["entity"] == "user:1"
    assert list(instance["dense"]) == list(CRITEO_DENSE[6:])
    assert list(instance["categorical"]) == list(CRITEO_CATEGORICAL[13:])
    assert instance["categorical"]["C26"] is None  # request-side missing values are sent as null

    stored = dict(entity_features(rows, 5))
    assert list(stored) == ["user:0", "user:1", "user:2"]
    profile = stored["user:1"]
    assert set(profile) == (set(CRITEO_DENSE[:6]) - {"I1"}) | (set(CRITEO_CATEGORICAL[:13]) - {"C6"})  # no missing
    # store + request = the whole row
    merged = profile | instance["dense"] | instance["categorical"]
    second = rows.rows[1]
    assert [merged.get(n) for n in CRITEO_DENSE] == list(second.dense)
    assert [merged.get(n) for n in CRITEO_CATEGORICAL] == list(second.categorical)


async def test_feature_csv_loads_into_the_servers_store(criteo_tsv: Path, tmp_path: Path) -> None:
    from server.features import InMemoryFeatureStore

    rows = read_rows(criteo_tsv, "criteo")
    store = InMemoryFeatureStore.from_file(write_feature_csv(rows, 2, tmp_path / "features.csv"))
    first, second, third = await store.fetch(["user:0", "user:1", "user:2"])
    assert third is None  # two entities written
    assert first == {"I1": "1.0", "I3": "5.0", "I4": "0.0", "I5": "1382.0", "I6": "4.0"} | {
        f"C{i + 1}": HEX[i] for i in range(13)
    }
    assert second is not None and "I1" not in second and "C6" not in second and second["I2"] == "0.0"


def test_payloads_from_an_avazu_csv(tmp_path: Path) -> None:
    header = "id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,device_id,"
    header += "device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21\n"
    line = "10000174058809263569,1,14102100,1005,0,235ba823,f6ebf28e,f028772b,ecad2386,7801e8d9,07d7df22,a99f214a,"
    line += "69f45779,0eb711ec,1,0,8330,320,50,761,3,175,100075,23\n"
    path = tmp_path / "avazu.csv"
    path.write_text(header + line + line)
    rows = read_rows(path, "avazu")
    assert rows.dense_names == () and rows.categorical_names == AVAZU_CATEGORICAL
    assert len(rows) == 2 and all(len(r.categorical) == len(AVAZU_CATEGORICAL) for r in rows.rows)
    pools = build_pools(rows, batch_size=4, entities=1)
    assert "dense" not in orjson.loads(pools.native_single.bodies[0])["instances"][0]
    (categorical,) = orjson.loads(pools.v2.bodies[0])["inputs"]
    assert categorical["name"] == "categorical" and categorical["shape"] == [1, len(AVAZU_CATEGORICAL)]
    assert "dense" not in orjson.loads(pools.feature_store.bodies[0])["instances"][0]


def test_synthetic_rows_are_criteo_shaped_and_seeded() -> None:
    rows = synthetic_rows(200, seed=3)
    assert rows == synthetic_rows(200, seed=3) and rows != synthetic_rows(200, seed=4)
    assert all(len(r.dense) == 13 and len(r.categorical) == 26 for r in rows.rows)
    tokens = [v for r in rows.rows for v in r.categorical if v is not None]
    assert all(len(v) == 8 and int(v, 16) >= 0 for v in tokens)
    assert 0 < sum(v is None for r in rows.rows for v in r.dense) < 200 * 13
    # heavy-tailed: the most frequent token of the widest field repeats, most others do not
    c3 = [r.categorical[2] for r in rows.rows]
    assert max(c3.count(v) for v in set(c3)) > 10
    assert len(set(c3)) > 50


def test_pools_cycle_from_each_users_offset() -> None:
    pool = BodyPool([b"a", b"b", b"c"], samples=1)
    cursor = pool.cursor(start=4)
    assert [next(cursor) for _ in range(5)] == [b"b", b"c", b"a", b"b", b"c"]
    pools = build_pools(synthetic_rows(100), batch_size=32, v2_batch_size=4, entities=1000)
    assert (len(pools.native_single), len(pools.native_batch), len(pools.v2), len(pools.feature_store)) == (
        100, 3, 25, 100
    )  # fmt: skip
    assert pools.native_batch.samples == 32 and pools.v2.samples == 4
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        build_pools(synthetic_rows(4), batch_size=0)


def test_config_from_environment(tmp_path: Path) -> None:
    assert LoadTestConfig.from_env({}) == LoadTestConfig()
    cfg = LoadTestConfig.from_env({
        "LMA_LOADTEST_DATA": str(tmp_path / "missing.tsv"), "LMA_LOADTEST_FORMAT": "avazu",
        "LMA_LOADTEST_MODEL": "ctr", "LMA_LOADTEST_ROWS": "10", "LMA_LOADTEST_BATCH": "8",
        "LMA_LOADTEST_RATE": "2.5", "LMA_LOADTEST_SEED": "7",
    })  # fmt: skip
    assert (cfg.format, cfg.model, cfg.rows, cfg.batch_size, cfg.rate, cfg.seed) == ("avazu", "ctr", 10, 8, 2.5, 7)
    with pytest.raises(FileNotFoundError, match=r"missing\.tsv does not exist"):
        cfg.load_rows()
    for env, message in [
        ({"LMA_LOADTEST_FORMAT": "kdd"}, "LMA_LOADTEST_FORMAT must be one of"),
        ({"LMA_LOADTEST_ROWS": "many"}, "LMA_LOADTEST_ROWS must be an integer, got 'many'"),
        ({"LMA_LOADTEST_ENTITIES": "-1"}, "LMA_LOADTEST_ENTITIES must be >= 1, got -1"),
        ({"LMA_LOADTEST_RATE": "0"}, "LMA_LOADTEST_RATE must be > 0"),
        ({"LMA_LOADTEST_RATE": "nan"}, "LMA_LOADTEST_RATE must be > 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            LoadTestConfig.from_env(env)
    with pytest.raises(ValueError, match="synthetic load-test rows are Criteo-shaped"):
        LoadTestConfig(format="avazu").load_rows()


def test_response_checks() -> None:
    assert native_response_problem({"predictions": [0.25, 1.0], "model": "m", "version": "1"}, 2) is None
    assert native_response_problem({"predictions": [0.25]}, 2) == "expected 2 probabilities, got 1"
    assert native_response_problem({"predictions": [0.25, 1.5]}, 2) == "a probability is not a number in [0, 1]"
    assert native_response_problem({"predictions": [True]}, 1) == "a probability is not a number in [0, 1]"
    assert native_response_problem([0.5], 1) == "expected 1 probabilities, got NoneType"

    def v2(shape: list[int], data: list[object]) -> dict[str, object]:
        return {
            "model_name": "m",
            "outputs": [{"name": "probability", "datatype": "FP32", "shape": shape, "data": data}],
        }

    assert v2_response_problem(v2([2, 1], [0.1, 0.9]), 2) is None
    assert v2_response_problem(v2([2, 1], [[0.1], [0.9]]), 2) is None
    assert v2_response_problem(v2([2], [0.1, 0.9]), 2) == "'probability' has shape [2], expected [2, 1]"
    assert v2_response_problem(v2([2, 1], [0.1, -0.9]), 2) == "a probability is not a number in [0, 1]"
    assert v2_response_problem({"outputs": []}, 1) == "no 'probability' output"


# ----------------------------------------------------------------------------------------------------------
# against a real server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`lma serve` (a real process) over a tiny exported LMA model on the Criteo schema, with the in-memory
    feature store loaded from the load test's feature CSV; yields (base URL, replayed data file)."""
    from export.exporter import export_run
    from models.schema import criteo_schema
    from tests.helpers.serving import make_run, serve

    root = tmp_path_factory.mktemp("loadtest")
    data = root / "data.tsv"
    subprocess.run([sys.executable, "-m", "models.main", "synth", "--rows", "300", "--out", str(data)], check=True)
    export_run(make_run(root / "run", "lma", criteo_schema(0), 0), root / "repo" / "criteo")
    features = write_feature_csv(read_rows(data, "criteo"), 100, root / "features.csv")
    settings = {"LMA_FEATURE_STORE_PATH": str(features), "LMA_REDIS_URL": "", "LMA_WATCH_INTERVAL_S": "0"}
    with serve(root / "repo", root / "server.log", LMA_ACCESS_LOG="false", **settings) as server:
        server.wait_ready(timeout_s=120)
        yield server.url, data
        assert server.stop() == 0, server.tail()


@pytest.mark.slow
def test_feature_store_requests_score_like_the_whole_row(served: tuple[str, Path]) -> None:
    url, data = served
    rows = read_rows(data, "criteo", limit=100)
    pools = build_pools(rows, entities=100)
    for e in (0, 1, 57):
        native = httpx.post(f"{url}/v1/predict", content=pools.native_single.bodies[e], timeout=10)
        via_store = httpx.post(f"{url}/v1/predict", content=pools.feature_store.bodies[e], timeout=10)
        assert native.status_code == via_store.status_code == 200, via_store.text
        assert via_store.json()["predictions"] == native.json()["predictions"]


@pytest.mark.slow
def test_locust_headless_run_against_the_server(served: tuple[str, Path]) -> None:
    url, data = served
    out = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "8", "-r", "8", "-t", "5s",
         "--host", url, "--json", "--only-summary", *USERS],
        capture_output=True, text=True, timeout=120,
        env=locust_env(LMA_LOADTEST_DATA=str(data), LMA_LOADTEST_ROWS="300", LMA_LOADTEST_ENTITIES="100"),
    )  # fmt: skip
    stats = {s["name"]: s for s in orjson.loads(out.stdout)}
    assert set(stats) == {"native single", "native batch", "v2 infer", "feature store", "GET /v1/models"}, out.stderr
    for name, s in stats.items():
        assert s["num_requests"] > 0 and s["num_failures"] == 0, (name, s, out.stderr[-2000:])
    assert out.returncode == 0, out.stderr[-2000:]
