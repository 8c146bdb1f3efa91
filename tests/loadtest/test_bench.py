"""The load generator and `lma bench`: exact request accounting against a real server process, the HTTP
parsing against a scripted server, and the report from a small run.

The server runs as `python -m models.main serve` (what `lma serve` runs) on a tiny exported model, with a
queue of 2 requests that each wait 100 ms for company: one connection never finds the queue full, six
connections always do. Every count the generator reports is checked against the server's own metrics.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from export.bundle import load_bundle
from export.exporter import export_run
from loadtest import bench, loadgen
from loadtest.bench import report as report_module
from loadtest.bench import runs as bench_runs
from loadtest.payloads import build_pools, synthetic_rows
from models.schema import criteo_schema
from server import batcher as batcher_module
from server.batcher import Batcher
from server.metrics import Metrics
from server.runtimes import OnnxRuntime
from server.types import Batch, Scores
from tests.helpers.serving import make_run

PREDICT = "/v1/models/criteo:predict"
ROUTE = "/v1/models/{name}:predict"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench-bundle")
    return export_run(make_run(root / "run", "lma", criteo_schema(5), 0), root / "artifacts" / "criteo").path


@pytest.fixture(scope="module")
def server(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[bench.ServerProcess]:
    env = {"LMA_MAX_QUEUE": "2", "LMA_MAX_WAIT_MS": "100", "LMA_INTRA_OP_THREADS": "1", "LMA_MAX_QUEUE_DELAY_MS": "0"}
    env |= bench.BASE_SERVER_ENV
    log = tmp_path_factory.mktemp("bench-server") / "server.log"
    with bench.ServerProcess(lambda port: bench.lma_serve_command(bundle_dir, port, workers=1), env, log) as proc:
        proc.wait_ready()
        yield proc


@pytest.fixture(scope="module")
def requests(server: bench.ServerProcess) -> tuple[bytes, ...]:
    pools = build_pools(synthetic_rows(64, seed=1), batch_size=4, entities=1)
    return loadgen.http_requests("127.0.0.1", server.port, PREDICT, pools.native_single.bodies)


def counts(server: bench.ServerProcess) -> dict[str, float]:
    """Requests by status code and queue-full rejections, from the server's /metrics."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == "lma_requests_total" and s.labels.get("route") == ROUTE:
                out[s.labels["code"]] = s.value
            if s.name == "lma_rejected_total" and s.labels.get("reason") == "queue_full":
                out["queue_full"] = s.value
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    return {k: int(v - before.get(k, 0)) for k, v in after.items() if v - before.get(k, 0)}


# --- against the real server ---


def test_closed_loop_counts_every_request(server: bench.ServerProcess, requests: tuple[bytes, ...]) -> None:
    before = counts(server)
    result = loadgen.run(loadgen.closed_loop("127.0.0.1", server.port, requests, concurrency=1, duration_s=0.6))
    assert result.errors == {} and result.failed == 0
    assert result.sent == result.completed == result.ok > 0  # one at a time: the queue never fills
    assert result.status_counts() == {200: result.sent}
    assert delta(counts(server), before) == {"200": result.sent}
    assert result.latency_ns.shape == (result.sent,) and (result.latency_ns > 0).all()
    assert result.samples_per_s == pytest.approx(result.sent / result.duration_s)
    assert set(result.sample_bodies) == {200}


def test_a_full_queue_is_counted_as_503(server: bench.ServerProcess, requests: tuple[bytes, ...]) -> None:
    before = counts(server)
    result = loadgen.run(loadgen.closed_loop("127.0.0.1", server.port, requests, concurrency=6, duration_s=0.6))
    by_status = result.status_counts()
    assert set(by_status) == {200, 503} and by_status[503] > 0 and result.errors == {}
    assert result.sent == result.completed == by_status[200] + by_status[503]
    assert delta(counts(server), before) == {"200": by_status[200], "503": by_status[503], "queue_full": by_status[503]}
    assert b'"kind":"overloaded"' in result.sample_bodies[503]
    assert result.percentiles_ms(503)["p50"] < result.percentiles_ms(200)["p50"]  # refused at once, not queued
    assert result.ok_per_s * result.duration_s == pytest.approx(by_status[200])


def test_open_loop_accounts_for_every_arrival(server: bench.ServerProcess, requests: tuple[bytes, ...]) -> None:
    before = counts(server)
    coro = loadgen.open_loop(
        "127.0.0.1", server.port, requests, rate=40, duration_s=0.5, max_connections=1, seed=3, timeout_s=30
    )  # one connection, each answer takes ~100 ms: most arrivals find it busy and wait on the client for it
    result = loadgen.run(coro)
    scheduled = len(loadgen.poisson_schedule(40, 0.5, seed=3))
    assert result.scheduled == result.sent == result.completed == result.ok == scheduled
    assert result.errors == {} and result.failed == 0
    assert 0 < result.waited_for_connection < scheduled
    assert delta(counts(server), before) == {"200": scheduled}
    assert result.send_lag_ns.shape == (scheduled,)
    # every latency counts from the schedule: an arrival that waited for the connection carries its wait
    lag = np.sort(result.send_lag_ns)
    assert lag[-1] > 50_000_000 and np.sort(result.latency_ns)[-1] >= lag[-1]
    assert result.summary()["waited_for_connection"] == result.waited_for_connection


def test_open_loop_counts_arrivals_the_client_gives_up_on(
    server: bench.ServerProcess, requests: tuple[bytes, ...]
) -> None:
    # one connection, ~100 ms per answer, 0.35 s to give up: the later arrivals wait too long for the connection
    coro = loadgen.open_loop(
        "127.0.0.1", server.port, requests, rate=60, duration_s=0.5, max_connections=1, seed=5, timeout_s=0.35
    )
    result = loadgen.run(coro)
    scheduled = len(loadgen.poisson_schedule(60, 0.5, seed=5))
    assert result.scheduled == scheduled and result.errors["timeout"] > 0
    assert result.completed + result.failed == scheduled  # answered, or given up on: nothing unaccounted
    arrivals = result.arrival_percentiles_ms()
    assert arrivals["max"] >= 350.0  # the given-up ones sit at the timeout, inside the distribution
    assert arrivals["p99"] >= result.arrival_percentiles_ms()["p50"] and np.isfinite(arrivals["p99"])
    assert result.goodput_per_s(0.35) * result.duration_s == pytest.approx(
        np.count_nonzero((result.status == 200) & (result.latency_ns <= 350_000_000))
    )


# --- HTTP parsing, against a scripted server ---


async def _scripted_server(responses: list[bytes]) -> tuple[asyncio.Server, int]:
    """Answers the k-th request on each connection with ``responses[k]``, written one byte at a time."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for response in responses:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            for i in range(len(response)):
                writer.write(response[i : i + 1])
                await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


def test_responses_split_in_pieces_and_closed_connections() -> None:
    ok = b"HTTP/1.1 200 OK\r\nCONTENT-LENGTH: 2\r\nx-other: 1\r\n\r\n{}"
    busy = b'HTTP/1.1 503 Service Unavailable\r\ncontent-length: 11\r\nretry-after: 1\r\n\r\n{"busy": 1}'
    bye = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    async def scenario() -> loadgen.LoadResult:
        srv, port = await _scripted_server([ok, busy, bye])
        async with srv:
            request = loadgen.http_request("127.0.0.1", port, "/x", b"{}")
            return await loadgen.closed_loop("127.0.0.1", port, [request], concurrency=1, duration_s=0.3)

    result = loadgen.run(scenario())
    # every connection answers 200, 503, 200-and-close; the generator reconnects after each close
    statuses = result.status.tolist()
    assert result.errors == {} and result.sent == result.completed >= 6
    assert statuses[:6] == [200, 503, 200, 200, 503, 200]
    assert result.sample_bodies == {200: b"{}", 503: b'{"busy": 1}'}


def test_a_response_without_length_is_a_protocol_error() -> None:
    async def scenario() -> loadgen.LoadResult:
        srv, port = await _scripted_server([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"])
        async with srv:
            request = loadgen.http_request("127.0.0.1", port, "/x", b"{}")
            return await loadgen.closed_loop("127.0.0.1", port, [request], concurrency=1, duration_s=0.2)

    result = loadgen.run(scenario())
    assert result.completed == 0 and result.errors["bad_response"] == result.sent >= 1


# --- pure parts ---


def test_poisson_schedule() -> None:
    a = loadgen.poisson_schedule(1000.0, 2.0, seed=7)
    assert np.array_equal(a, loadgen.poisson_schedule(1000.0, 2.0, seed=7))
    assert a.dtype == np.int64 and (np.diff(a) > 0).all() and a[0] >= 0 and a[-1] < 2e9
    assert 1800 < len(a) < 2200  # 2000 expected, sd ~45
    gaps = np.diff(a) / 1e9
    assert gaps.mean() == pytest.approx(1e-3, rel=0.1)
    with pytest.raises(ValueError, match="rate > 0"):
        loadgen.poisson_schedule(0, 1.0)


def test_request_bytes_and_loopback_only() -> None:
    raw = loadgen.http_request("127.0.0.1", 8000, "/v1/predict", b'{"instances": []}')
    assert raw == (
        b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\n"
        b'Accept: application/json\r\nContent-Length: 17\r\n\r\n{"instances": []}'
    )
    for host in ("127.0.0.1", "::1", "localhost"):
        loadgen.check_loopback(host)
    with pytest.raises(ValueError, match="only drives loopback"):
        loadgen.check_loopback("10.0.0.1")
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(loadgen.closed_loop("192.168.1.1", 80, [raw], concurrency=1, duration_s=1))


def test_result_statistics() -> None:
    lat = np.array([1, 2, 3, 4, 100], dtype=np.int64) * 1_000_000
    r = loadgen.LoadResult(
        mode="closed", duration_s=2.0, samples_per_request=32, concurrency=4, rate=None, scheduled=6, sent=6,
        latency_ns=lat, status=np.array([200, 200, 200, 503, 200], dtype=np.int16),
    )  # fmt: skip
    r.errors["timeout"] = 1
    assert r.completed == 5 and r.ok == 4 and r.failed == 1
    assert r.requests_per_s == 2.5 and r.ok_per_s == 2.0 and r.samples_per_s == 64.0
    assert r.status_counts() == {200: 4, 503: 1}
    p = r.percentiles_ms(200)
    assert p["p50"] == pytest.approx(2.5) and p["max"] == 100.0
    assert r.percentiles_ms(503) == {"p50": 4.0, "p95": 4.0, "p99": 4.0, "max": 4.0}
    assert np.isnan(r.percentiles_ms(504)["p99"])


# --- the report ---


def test_a_server_on_one_of_its_processes_is_flagged() -> None:
    def run(server: str, workers: int, cpu: float, mode: str = "closed") -> bench.RunRecord:
        load = {"mode": mode, "concurrency": 16, "completed": 100, "ok_per_s": 100.0, "samples_per_s": 3200.0}
        return bench.RunRecord(server, workers, "batch", 32, load, cpu, 500.0, 100.0, 100.0, 100.0, round=1)

    report = bench.BenchReport("lma bench", "now", 1.0, {}, {}, {}, 1.0, 16, [])
    report.runs = [
        run("lma serve (2 workers)", 2, 183.0),
        run("lma serve (1 worker)", 1, 100.0),  # one process: one core is all it can use
        run("reference (2 workers)", 2, 99.4),  # two processes on one core's worth: lopsided
        run("reference (2 workers)", 2, 99.0, mode="open"),  # open loop: not a ratio cell
        run(f"{bench_runs.FLOOR} (2 workers)", 2, 96.0),  # the floor waits on the generator; judged on nothing
    ]
    flagged = [(r.server, r.server_cpu_percent) for r in report_module.lopsided(report)]
    assert flagged == [("reference (2 workers)", 99.4)]
    lines = report_module._ratio_table(report)
    assert lines[-1] == (
        "\nIn round 2, reference (2 workers) ran the batch cell at c=16 on 99% CPU with 2 processes (most likely one"
        " of them accepted its connections), so that round's ratios flatter the other servers."
    )


def test_open_loop_capacity_is_bisected_below_the_closed_loop() -> None:
    probed: list[float] = []

    def up_to(limit: float):  # a server that sustains every rate up to limit
        def sustains(rate: float) -> bool:
            probed.append(rate)
            return rate <= limit

        return sustains

    assert bench_runs.bisect_capacity(up_to(700), 1000, 5) == (687.5, True)
    assert probed == [500, 750, 625, 687.5, 718.75]
    probed.clear()
    # nothing sustained: the lowest rate probed, flagged as not sustained
    assert bench_runs.bisect_capacity(up_to(0), 1000, 3) == (125, False) and probed == [500, 250, 125]
    # no 200s in the closed loop (capacity 0), or too little to probe: no probe, no rate
    probed.clear()
    assert bench_runs.bisect_capacity(up_to(10), 0, 5) == (0.0, False) and probed == []
    assert bench_runs.bisect_capacity(up_to(10), 1.5, 5) == (0.0, False) and probed == []
    # bisection stops below 1/s
    assert bench_runs.bisect_capacity(up_to(0), 4, 9) == (1.0, False) and probed == [2, 1]


def test_open_loop_capacity_is_confirmed_by_longer_runs() -> None:
    run: list[float] = []

    def up_to(limit: float):
        def sustains(rate: float) -> bool:
            run.append(rate)
            return rate <= limit

        return sustains

    # sustained at once: one run, the rate unchanged
    assert bench_runs.confirm_capacity(up_to(1000), 1000, 3) == (1000, True) and run == [1000]
    run.clear()
    # the short probes overestimated: each further run 10% below the last, until one sustains
    assert bench_runs.confirm_capacity(up_to(850), 1000, 3) == (pytest.approx(810), True)
    assert run == [1000, 900, pytest.approx(810)]
    run.clear()
    # none sustained within the tries: the last rate run, flagged
    assert bench_runs.confirm_capacity(up_to(100), 1000, 2) == (900, False) and run == [1000, 900]


def test_report_from_a_small_run(bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "docs" / "BENCH.md"
    out.parent.mkdir()
    out.write_text(f"old\n{bench.KEEP_START}\nhand-written analysis\n{bench.KEEP_END}\nold tail\n")
    cfg = bench.BenchConfig(
        model_dir=bundle_dir.parent,  # artifacts/NAME: its latest version
        workers=(1,),
        reference=True,
        variants=(("wait 5 ms", (("LMA_MAX_WAIT_MS", "5"),)),),
        v2_binary=True,
        rounds=2,
        duration_s=0.3,
        warmup_s=0.0,
        concurrency=(2,),
        batch_size=4,
        rates=(40.0,),
        deadlines_ms=(None, 100.0),
        raw_seconds=0.05,
        rows=64,
        work_dir=tmp_path / "work",
        out=out,
        command="lma bench --test",
    )
    lines: list[str] = []
    report = bench.run_bench(cfg, say=lines.append)
    bench.write_report(report, cfg.out, cfg.plot_path)

    project = "lma serve (1 worker)"
    variant = f"lma serve ({bench_runs.workers_label(report.runs[1].workers)}, wait 5 ms)"
    v2 = f"lma serve ({bench_runs.workers_label(report.runs[2].workers)}, {bench_runs.V2_BINARY})"
    reference = f"reference ({bench_runs.workers_label(report.runs[3].workers)})"
    floor = f"{bench_runs.FLOOR} ({bench_runs.workers_label(report.runs[3].workers)})"
    closed = [(r.server, r.kind, r.round) for r in report.runs if r.mode == "closed"]
    assert closed == [
        (s, kind, round_)
        for round_ in (0, 1)
        for kind in ("single", "batch")
        for s in (project, variant, v2, reference, *((floor,) if kind == "single" else ()))
    ]  # the servers take turns, cell by cell, round after round; the floor gets single-sample requests only
    opened = [r for r in report.runs if r.mode == "open"]
    assert [(r.server, r.deadline_ms) for r in opened] == [(project, 2000.0), (project, 100.0), (floor, None)]
    assert all(r.load["errors"] == {} and r.load["completed"] > 0 for r in report.runs)
    assert all(r.load["goodput_per_s"] <= r.load["ok_per_s"] for r in opened)
    # Open-loop rates are multiples of the rate the project sustains in the open loop at that run's deadline,
    # sought on that deadline's server below its closed-loop capacity; the floor runs at the first deadline's rates.
    found = {(c["server"], c["deadline_ms"]): c for c in report.open_capacity}
    assert list(found) == [(project, 2000.0), (project, 100.0)]
    for c in found.values():
        assert 0 < c["capacity_per_s"] < report.capacity(project) == c["closed_per_s"]
        # the probes (0.3 s) are as long as the runs, so the bisection's rate stands, confirmed, with no extra run
        assert c["capacity_per_s"] == c["bisected_per_s"] and c["confirmed"] and len(c["probes"]) == bench.OPEN_PROBES
    assert [r.load["capacity_per_s"] for r in opened] == [
        found[project, 2000.0]["capacity_per_s"], found[project, 100.0]["capacity_per_s"],
        found[project, 2000.0]["capacity_per_s"],
    ]  # fmt: skip
    probed = [line for line in lines if line.startswith(f"open-loop capacity of {project} at ")]
    assert [line.split(":")[0][-7:] for line in probed] == ["2000 ms", " 100 ms"]
    assert all(line.count("/s ") == 1 + bench.OPEN_PROBES for line in probed)  # the capacity, then each probe
    floor_runs = [r for r in report.runs if r.server == floor]
    assert floor_runs and all(set(r.load["status"]) == {503} for r in floor_runs)  # it refuses every request
    assert [r.samples_per_request for r in report.runs[:9]] == [1, 1, 1, 1, 1, 4, 4, 4, 4]
    assert [(r["batch_size"], r["threads"]) for r in report.raw] == [
        (b, t) for t in bench.RAW_THREADS for b in bench.RAW_BATCH_SIZES
    ]
    assert report.model["name"] == "criteo" and report.machine["nproc"] >= 1
    text = out.read_text()
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings == [
        "# Benchmarks",
        "## Setup",
        "## Targets",
        "## The graph alone (in process)",
        "## Side by side: project / reference (median of the rounds)",
        "## Closed loop: single-sample requests (1 per request)",
        "## Closed loop: batched requests (4 per request)",
        "## Open loop: Poisson arrivals at multiples of the capacity (single-sample requests)",
        "## Analysis",
    ]
    judged = {name for name, *_ in bench.targets(report)}
    assert "single-sample requests/s vs the reference, c=2" in judged
    assert "server CPU per single-sample request (best cell)" in judged
    assert f"for scale: {floor}, CPU per answer (best cell)" in judged
    assert {met for name, _, _, met in bench.targets(report) if name.startswith("for scale")} == {None}
    floor_rows = [line.split(" | ") for line in text.splitlines() if line.startswith(f"| {floor} | ")]
    closed_rows = [row for row in floor_rows if row[1:3] == ["1", "2"]]  # round 1, c=2
    assert len(closed_rows) == 1 and closed_rows[0][4] == "–" and closed_rows[0][5] != "–"  # p50 of its 503s
    (open_row,) = [row for row in floor_rows if row[1] == "–"]  # no deadline of its own
    assert open_row[2].startswith("40 (") and open_row[4] == "–"  # and no goodput: it answers no 200
    failures = [line for line in text.splitlines() if line.startswith(f"- {floor}, single, ")]
    assert failures and len(set(failures)) == len(failures)  # each run once: its round, or its rate and deadline
    assert f"- {floor}, single, closed c=2, round 2: `" in text
    assert "lma bench --test" in text and "load average at start" in text
    assert f"{bench.KEEP_START}\nhand-written analysis\n{bench.KEEP_END}" in text and "old tail" not in text
    assert "![latency vs throughput](bench.png)" in text and cfg.plot_path == out.parent / "bench.png"
    assert cfg.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith(f"| {v2} | ") for line in text.splitlines())  # the v2 route, in the tables
    capacity_rows = [line for line in text.splitlines() if line.startswith(f"| {project} | ") and line.count("|") == 8]
    # deadline, closed, the probes' rate, open, open / closed, confirmed
    assert [row.split(" | ")[1] for row in capacity_rows] == ["2000", "100"]
    assert all(row.endswith(" | yes |") for row in capacity_rows)
    # the graph timed again at the end, and the ratio reported (no flag asserted: this machine's speed is its own)
    assert [(r["batch_size"], r["threads"]) for r in report.raw_end] == [(1, 1), (256, 1)]
    assert [b for b, _ in report.drift()] == [1, 256]
    assert "Timed again after the last load run (1 thread), samples/s at the end / at the start: batch 1: " in text
    # model, closed-loop start, 18 closed runs, 2 deadlines x (the capacity, open start + run), floor start + run,
    # the graph again
    assert len(lines) == 1 + 1 + 18 + 2 * 3 + 2 + 1


def test_a_run_whose_machine_speed_moved_is_flagged() -> None:
    def raw(batch: int, sps: float) -> dict[str, float]:
        return {"batch_size": batch, "threads": 1, "samples_per_s": sps, "us_per_call": 1.0, "cpu_us_per_sample": 1.0}

    report = bench.BenchReport("lma bench", "now", 1.0, {}, {}, {}, 1.0, 16, [raw(1, 10_000.0), raw(256, 80_000.0)])
    report.raw_end = [raw(1, 9_000.0), raw(256, 76_000.0)]
    assert report.drift() == [(1, 0.9), (256, 0.95)]
    assert report_module._drift_lines(report) == [
        "",
        "Timed again after the last load run (1 thread), samples/s at the end / at the start: batch 1: 0.90, batch"
        " 256: 0.95.",
    ]
    report.raw_end = [raw(1, 7_900.0), raw(256, 80_000.0)]  # 21% slower at batch 1
    assert report_module._drift_lines(report)[-1] == (
        "**The machine's speed moved by more than 20% during this run:** compare the ratios of servers measured in"
        " the same rounds, not absolute numbers, with other runs."
    )
    report.raw_end = []  # a report of an older run: nothing said
    assert report_module._drift_lines(report) == []


# --- a server speed-up the benchmark measures: short batches skip the runtime thread ---


class ThreadRecordingRuntime(OnnxRuntime):
    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.threads: list[int] = []

    def run(self, batch: Batch) -> Scores:
        self.threads.append(threading.get_ident())
        return super().run(batch)


def test_runtime_cost_model(bundle_dir: Path) -> None:
    runtime = OnnxRuntime(load_bundle(bundle_dir), "cpu", threads=1)
    assert runtime.expected_seconds(8) is None  # never warmed up: no guess
    runtime.warmup([1, 8])
    assert set(runtime._cost) == {1, 8} and all(t > 0 for t in runtime._cost.values())
    runtime._cost = {1: 1e-4, 8: 8e-4, 64: 3.6e-3}
    assert runtime.expected_seconds(4) == pytest.approx(4e-4)  # between measured sizes: linear
    assert runtime.expected_seconds(36) == pytest.approx(2.2e-3)
    assert runtime.expected_seconds(128) == pytest.approx(6.8e-3)  # beyond: along the last segment


@pytest.mark.parametrize("inline_max_s", [1.0, 0.0])
async def test_short_batches_run_on_the_event_loop(
    bundle_dir: Path, monkeypatch: pytest.MonkeyPatch, inline_max_s: float
) -> None:
    monkeypatch.setattr(batcher_module, "INLINE_MAX_S", inline_max_s)
    runtime = ThreadRecordingRuntime(load_bundle(bundle_dir), "cpu", threads=1)
    runtime.warmup([1, 8])
    runtime.threads.clear()
    b = Batcher(
        runtime, name="m", max_batch_size=8, max_wait_ms=0, max_queue=10,
        metrics=Metrics().for_model("m", "onnx", "cpu"),
    )  # fmt: skip
    b.start()
    rng = np.random.default_rng(0)
    batch = Batch(rng.random((3, 13), dtype=np.float32), rng.integers(0, 2**62, size=(3, 26), dtype=np.int64))
    scores = await b.submit(batch, time.monotonic() + 30)
    await b.close()
    on_loop = runtime.threads == [threading.get_ident()]
    assert on_loop == (inline_max_s > 0) and len(runtime.threads) == 1
    np.testing.assert_array_equal(scores.probability, runtime.run(batch).probability)  # the same answer either way
