"""The runs of ``lma bench``: the servers it starts, the load it drives at them, what it records."""

from __future__ import annotations

import contextlib
import math
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.bundle import resolve_bundle
from loadtest import loadgen
from loadtest.bench import reference
from loadtest.bench.config import (
    CONFIRM_STEP,
    CONFIRM_TRIES,
    DEMO_NAME,
    DRIFT_BATCH_SIZES,
    OPEN_PROBE_S,
    OPEN_PROBES,
    RAW_BATCH_SIZES,
    RAW_THREADS,
    SUSTAINED,
    BenchConfig,
)
from loadtest.bench.machine import featurize, load_rows, machine_facts, model_facts, raw_throughput
from loadtest.bench.process import ResourceSampler, ServerProcess, lma_serve_command
from loadtest.bench.results import FLOOR, BenchReport, RunRecord
from loadtest.payloads import Rows, build_pools, native_response_problem, v2_binary_body, v2_response_problem

Say = Callable[[str], Any]


def _lma(*args: str, log: Path) -> None:
    """Run an ``lma`` subcommand (as ``python -m models.main``), failing with its output's tail."""
    cmd = [sys.executable, "-m", "models.main", *args]
    with log.open("ab") as f:
        f.write(("$ " + shlex.join(cmd) + "\n").encode())
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"`lma {args[0]}` failed (exit {done.returncode}); end of {log}:\n{tail}")


def build_demo_model(work_dir: Path, rows: int) -> tuple[Path, Path]:
    """Synthesize ``rows`` Criteo-format rows, train a small 16x LMA model one epoch, export it.

    Returns (bundle folder, data file). Reuses what an earlier run left in ``work_dir``.
    """
    data = work_dir / "demo.tsv"
    run = work_dir / "run"
    artifacts = work_dir / "artifacts" / DEMO_NAME
    log = work_dir / "build.log"
    if artifacts.is_dir() and data.is_file():
        with contextlib.suppress(ValueError, FileNotFoundError):
            return resolve_bundle(artifacts), data
    work_dir.mkdir(parents=True, exist_ok=True)
    _lma("synth", "--rows", str(rows), "--out", str(data), "--seed", "0", log=log)
    _lma(
        "train", "--data", str(data), "--embedding", "lma", "--compression", "16", "--preset", "small",
        "--epochs", "1", "--no-progress", "--cache-dir", str(work_dir / "cache"), "--out", str(run), "--overwrite",
        log=log,
    )  # fmt: skip
    _lma("export", str(run), "--out", str(artifacts), log=log)
    return resolve_bundle(artifacts), data


@dataclass(frozen=True)
class Workload:
    kind: str  # "single" or "batch"
    requests: tuple[bytes, ...]
    samples: int
    check: Callable[[Any, int], str | None]  # what is wrong with a decoded 200 body


@dataclass
class Target:
    """A server under test: its name in the report, how it is started, and the load it gets."""

    name: str
    workers: int
    reference: bool
    server: ServerProcess
    works: dict[str, Workload]


V2_BINARY = "v2, binary BYTES"  # the label of the project's v2-route target (--v2-binary)


def workers_label(n: int) -> str:
    return f"{n} worker" + ("s" if n != 1 else "")


def project_name(workers: int) -> str:
    return f"lma serve ({workers_label(workers)})"


def _resolved_workers(requested: int) -> int:
    from models.cores import available_cores  # what `lma serve` runs without --workers: one worker per core

    return requested or available_cores()


def _workloads(port: int, path: str, single: Sequence[bytes], batch: Sequence[bytes], samples: int, check: Any) -> dict:
    return {
        "single": Workload("single", loadgen.http_requests("127.0.0.1", port, path, single), 1, check),
        "batch": Workload("batch", loadgen.http_requests("127.0.0.1", port, path, batch), samples, check),
    }


def _project(
    cfg: BenchConfig, bundle: Path, rows: Rows, workers: int, log: Path, label: str = "", **env: str
) -> Target:
    n = _resolved_workers(workers)
    server = ServerProcess(lambda port: lma_serve_command(bundle, port, n, cfg.runtime), cfg.env(**env), log)
    pools = build_pools(rows, batch_size=cfg.batch_size, entities=1)
    name = model_facts(bundle)["name"]
    works = _workloads(
        server.port, f"/v1/models/{name}:predict", pools.native_single.bodies, pools.native_batch.bodies,
        cfg.batch_size, native_response_problem,
    )  # fmt: skip
    name = project_name(n) if not label else f"lma serve ({workers_label(n)}, {label})"
    return Target(name, n, False, server, works)


def _project_v2_binary(cfg: BenchConfig, bundle: Path, rows: Rows, log: Path) -> Target:
    """The default configuration driven on its v2 route with binary tensors (raw values as BYTES), as a stock
    ``tritonclient`` sends them: the same rows and batch sizes as the native route."""
    target = _project(cfg, bundle, rows, 0, log, V2_BINARY)
    path = f"/v2/models/{model_facts(bundle)['name']}/infer"

    def requests(size: int) -> tuple[bytes, ...]:
        out = []
        for start in range(0, max(1, len(rows.rows) - size + 1), size):
            body, head = v2_binary_body(rows.rows[start : start + size])
            out.append(loadgen.http_request(
                "127.0.0.1", target.server.port, path, body, [("Inference-Header-Content-Length", str(head))]
            ))  # fmt: skip
        return tuple(out)

    target.works = {
        "single": Workload("single", requests(1), 1, v2_response_problem),
        "batch": Workload("batch", requests(cfg.batch_size), min(cfg.batch_size, len(rows.rows)), v2_response_problem),
    }
    return target


def _reference(cfg: BenchConfig, bundle: Path, rows: Rows, log: Path) -> Target:
    n = _resolved_workers(0)
    env = {"LMA_REFERENCE_MODEL": str(bundle / "model.onnx"), "LMA_REFERENCE_THREADS": "1"}
    server = ServerProcess(lambda port: reference.command(port, n), env, log, ready_path=reference.READY_PATH)
    dense, keys = featurize(bundle, rows, len(rows))
    single = reference.reference_bodies(dense, keys, 1)
    batch = reference.reference_bodies(dense, keys, cfg.batch_size) or [reference.reference_body(dense, keys)]
    works = _workloads(server.port, reference.PREDICT_PATH, single, batch, cfg.batch_size, reference.response_problem)
    return Target(f"reference ({workers_label(n)})", n, True, server, works)


def _floor(cfg: BenchConfig, bundle: Path, rows: Rows, log: Path) -> Target:
    """The floor (:func:`loadtest.bench.reference.floor_app`), one process per core, sent the project's single-sample
    requests (it reads none of them)."""
    n = _resolved_workers(0)
    server = ServerProcess(lambda port: reference.command(port, n, "floor_app"), {}, log, reference.READY_PATH)
    single = build_pools(rows, batch_size=cfg.batch_size, entities=1).native_single.bodies
    path = f"/v1/models/{model_facts(bundle)['name']}:predict"
    work = Workload("single", loadgen.http_requests("127.0.0.1", server.port, path, single), 1, lambda *_: None)
    return Target(f"{FLOOR} ({workers_label(n)})", n, True, server, {"single": work})


def _measure(target: Target, work: Workload, coro: Any, round_: int, deadline_ms: float | None = None) -> RunRecord:
    sampler = ResourceSampler(target.server.pid)
    sampler.start()
    result: loadgen.LoadResult = loadgen.run(coro)
    cpu_s, wall_s, rss = sampler.stop()
    check_answers(result, work)
    load = result.summary()
    if deadline_ms is not None:
        load["deadline_ms"] = deadline_ms
        load["goodput_per_s"] = result.goodput_per_s(deadline_ms / 1000)
    error = next((b for s, b in sorted(result.sample_bodies.items()) if s != 200), b"")
    return RunRecord(
        server=target.name,
        workers=target.workers,
        kind=work.kind,
        samples_per_request=work.samples,
        load=load,
        server_cpu_percent=cpu_s / wall_s * 100 if wall_s > 0 else 0.0,
        server_cpu_us_per_request=cpu_s / result.completed * 1e6 if result.completed else 0.0,
        rss_start_mb=rss[0] / 2**20,
        rss_max_mb=max(rss) / 2**20,
        rss_end_mb=rss[-1] / 2**20,
        round=round_,
        deadline_ms=deadline_ms,
        error_sample=error[:300].decode("utf-8", "replace"),
    )


def check_answers(result: loadgen.LoadResult, work: Workload) -> None:
    """The server must answer 200s with one probability per sample (one sampled body is decoded)."""
    import orjson

    body = result.sample_bodies.get(200)
    if body is None:
        return
    problem = work.check(orjson.loads(body), work.samples)
    if problem:
        raise RuntimeError(f"the server's answers are wrong: {problem}")


def _warm_up(cfg: BenchConfig, target: Target) -> None:
    if cfg.warmup_s <= 0:
        return
    for work in target.works.values():
        loadgen.run(
            loadgen.closed_loop("127.0.0.1", target.server.port, work.requests, concurrency=8, duration_s=cfg.warmup_s)
        )


def line(r: RunRecord) -> str:
    load = r.load
    where = f"c={load['concurrency']}" if r.mode == "closed" else f"rate={load['rate']:.0f}/s"
    lat = load["latency_ms"]
    deadline = f" deadline {r.deadline_ms:g} ms goodput {load['goodput_per_s']:.0f}/s" if r.deadline_ms else ""
    return (
        f"  r{r.round} {r.server:24s} {r.kind:6s} {r.mode:6s} {where:12s} {load['ok_per_s']:8.0f} ok/s"
        f" {load['samples_per_s']:9.0f} samples/s  p50 {lat['p50']:7.2f}  p99 {lat['p99']:7.2f} ms{deadline}"
        f"  status {load['status']} errors {load['errors']}"
        f"  cpu {r.server_cpu_percent:.0f}% {r.server_cpu_us_per_request:.0f} us/req  rss {r.rss_max_mb:.0f} MB"
    )


def run_bench(cfg: BenchConfig, say: Say = print) -> BenchReport:
    """Everything :class:`BenchConfig` asks for (see :mod:`loadtest.bench`)."""
    started = time.time()
    with contextlib.ExitStack() as stack:
        work_dir = cfg.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lma-bench-")))
        work_dir.mkdir(parents=True, exist_ok=True)
        demo_data = None
        if cfg.model_dir is None:
            say(f"building the demo model ({cfg.demo_rows} synthetic rows) in {work_dir}")
            bundle, demo_data = build_demo_model(work_dir, cfg.demo_rows)
        else:
            bundle = resolve_bundle(cfg.model_dir)
        rows = load_rows(cfg.data, cfg.data_format, cfg.rows, demo_data)
        model = model_facts(bundle)
        say(f"model {model['name']} v{model['version']} ({bundle}); timing the graph in process")
        report = BenchReport(
            command=cfg.command or "lma bench",
            started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
            wall_s=0.0,
            machine=machine_facts(),
            model=model,
            server_env=cfg.env(),
            duration_s=cfg.duration_s,
            max_connections=cfg.max_connections,
            raw=raw_throughput(bundle, rows, RAW_BATCH_SIZES, RAW_THREADS, cfg.raw_seconds),
        )
        workers = list(dict.fromkeys(_resolved_workers(w) for w in cfg.workers))
        _closed_loop(cfg, report, bundle, rows, workers, work_dir, say)
        _open_loop(cfg, report, bundle, rows, workers, work_dir, say)
        say("timing the graph in process again: did the machine's speed move during the run?")
        report.raw_end = raw_throughput(bundle, rows, DRIFT_BATCH_SIZES, (1,), cfg.raw_seconds)
    report.machine["load_average_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    report.wall_s = time.time() - started
    return report


def _closed_loop(
    cfg: BenchConfig, report: BenchReport, bundle: Path, rows: Rows, workers: list[int], work_dir: Path, say: Say
) -> None:
    """Every server at once (idle ones cost nothing), each cell measured in turn on each: alternating rounds."""
    with contextlib.ExitStack() as stack:
        targets = [
            stack.enter_context(_started(_project(cfg, bundle, rows, w, work_dir / f"server-{w}w.log")))
            for w in workers
        ]
        for k, (label, extra) in enumerate(cfg.variants):  # the default configuration with other settings
            log = work_dir / f"server-variant-{k}.log"
            targets.append(stack.enter_context(_started(_project(cfg, bundle, rows, 0, log, label, **dict(extra)))))
        if cfg.v2_binary:
            targets.append(
                stack.enter_context(_started(_project_v2_binary(cfg, bundle, rows, work_dir / "server-v2.log")))
            )
        if cfg.reference:
            targets.append(stack.enter_context(_started(_reference(cfg, bundle, rows, work_dir / "reference.log"))))
            targets.append(stack.enter_context(_started(_floor(cfg, bundle, rows, work_dir / "floor.log"))))
        for t in targets:
            t.server.wait_ready()
            _warm_up(cfg, t)
        say("closed loop: " + ", ".join(t.name for t in targets))
        for round_ in range(cfg.rounds):
            for kind in ("single", "batch"):
                for c in cfg.concurrency:
                    for t in (t for t in targets if kind in t.works):
                        work = t.works[kind]
                        coro = loadgen.closed_loop(
                            "127.0.0.1", t.server.port, work.requests, concurrency=c, duration_s=cfg.duration_s,
                            samples_per_request=work.samples,
                        )  # fmt: skip
                        record = _measure(t, work, coro, round_)
                        report.runs.append(record)
                        say(line(record))


def _open_loop(
    cfg: BenchConfig, report: BenchReport, bundle: Path, rows: Rows, workers: list[int], work_dir: Path, say: Say
) -> None:
    """Poisson arrivals at fractions of each configuration's capacity, at each deadline, on a fresh server.

    The capacity is sought on each deadline's server: a shorter deadline sustains a lower rate, and "0.8x" must
    mean the same load relative to what the server can do at that deadline."""
    if not cfg.rates and not cfg.rate_fractions:
        return
    floor_basis = 0.0  # the default configuration's capacity at the first deadline: the floor's rates
    for w in workers:
        for deadline in cfg.deadlines_ms:
            env = {} if deadline is None else {"LMA_REQUEST_TIMEOUT_MS": f"{deadline:g}"}
            log = work_dir / f"server-{w}w-open-{'default' if deadline is None else f'{deadline:g}'}ms.log"
            with _started(_project(cfg, bundle, rows, w, log, **env)) as t:
                t.server.wait_ready()
                deadline_ms = deadline if deadline is not None else served_deadline_ms(t.server.url)
                _warm_up(cfg, t)
                found = _open_capacity(cfg, t, report.capacity(t.name), deadline_ms, say)
                report.open_capacity.append(found)
                capacity = found["capacity_per_s"]
                if w == max(workers) and not floor_basis:
                    floor_basis = capacity
                say(f"open loop: {t.name}, deadline {deadline_ms:g} ms, capacity {capacity:.0f}/s")
                _open_runs(cfg, report, t, _open_rates(cfg, capacity), capacity, deadline_ms, say)
    rates = _open_rates(cfg, floor_basis)
    if cfg.reference and rates:  # what the machine can refuse at all, at the default configuration's rates
        with _started(_floor(cfg, bundle, rows, work_dir / "floor-open.log")) as t:
            t.server.wait_ready()
            _warm_up(cfg, t)
            say(f"open loop: {t.name}, the rates of {project_name(max(workers))}")
            _open_runs(cfg, report, t, rates, floor_basis, None, say)


def _open_capacity(cfg: BenchConfig, t: Target, closed: float, deadline_ms: float, say: Say) -> dict[str, Any]:
    """The highest Poisson rate of single-sample requests that ``t`` sustains: at least :data:`SUSTAINED` of the
    arrivals answered 200 within ``deadline_ms``, found by bisection below its closed-loop capacity ``closed``
    with short probes, then confirmed by runs as long as the open-loop runs (:func:`confirm_capacity`).

    Open-loop rates are multiples of this, not of ``closed``: arrivals one at a time form smaller batches than
    16-64 connections back to back, and the generator pays more per arrival on the cores it shares with the
    server, so the same server sustains less (measured: 0.75x of the closed-loop capacity on 1 worker). The
    confirmation is there because 2-second probes passed rates that 5-second runs did not sustain (a queue
    that grows slowly has not reached the deadline after 2 s): measured, 3.7% of the arrivals refused at "0.8x".
    """
    work = t.works["single"]
    timeout_s = max(1.0, 5 * deadline_ms / 1000)
    probes: list[str] = []

    def sustains(rate: float, duration_s: float) -> bool:
        result = loadgen.run(
            loadgen.open_loop(
                "127.0.0.1", t.server.port, work.requests, rate=rate, duration_s=duration_s,
                max_connections=int(min(cfg.max_connections, max(64, math.ceil(rate)))), samples_per_request=1,
                seed=100 + len(probes), timeout_s=timeout_s,
            )
        )  # fmt: skip
        good = result.goodput_per_s(deadline_ms / 1000) * result.duration_s
        probes.append(f"{rate:.0f}/s for {duration_s:g} s {good / max(result.scheduled, 1):.1%}")
        return good >= SUSTAINED * result.scheduled

    bisected, found = bisect_capacity(
        lambda rate: sustains(rate, min(cfg.duration_s, OPEN_PROBE_S)), closed, OPEN_PROBES
    )
    capacity, confirmed = bisected, False
    if found and cfg.duration_s > OPEN_PROBE_S:
        capacity, confirmed = confirm_capacity(lambda rate: sustains(rate, cfg.duration_s), bisected, CONFIRM_TRIES)
    elif found:  # the probes were as long as the runs: the bisection's rate is confirmed as it is
        confirmed = True
    share = f"{capacity / closed:.2f} of" if closed > 0 else "no 200s in"
    verdict = (
        "" if confirmed
        else "; no probe sustained, so this is the lowest rate probed" if not found
        else f"; not confirmed in {CONFIRM_TRIES} runs of {cfg.duration_s:g} s, so this is the lowest rate run"
    )  # fmt: skip
    say(
        f"open-loop capacity of {t.name} at {deadline_ms:g} ms: {capacity:.0f}/s ({share} the closed loop's"
        f" {closed:.0f}/s{verdict}; share answered 200 in time: {', '.join(probes) or 'no probe: nothing to probe'})"
    )
    return {
        "server": t.name, "deadline_ms": deadline_ms, "closed_per_s": closed, "bisected_per_s": bisected,
        "capacity_per_s": capacity, "confirmed": confirmed, "probes": probes,
    }  # fmt: skip


def bisect_capacity(sustains: Callable[[float], bool], closed: float, probes: int) -> tuple[float, bool]:
    """The highest rate in (0, ``closed``) that ``sustains`` (a probe), found with up to ``probes`` probes by
    bisection, and whether any probe sustained. When none did, the lowest rate probed (the bench still needs a
    basis for its rates); 0 when there is nothing to probe (``closed`` under 2/s)."""
    lo, hi = 0.0, closed
    for _ in range(probes):
        rate = (lo + hi) / 2
        if rate < 1:
            break
        lo, hi = (rate, hi) if sustains(rate) else (lo, rate)
    if lo > 0:
        return lo, True
    return (hi if hi < closed else 0.0), False


def confirm_capacity(sustains: Callable[[float], bool], rate: float, tries: int) -> tuple[float, bool]:
    """``rate`` if a longer run ``sustains`` it, else the first of up to ``tries - 1`` rates, each
    :data:`CONFIRM_STEP` times the last, that does; and whether one did. When none did, the last rate run."""
    for k in range(tries):
        if k:
            rate *= CONFIRM_STEP
        if sustains(rate):
            return rate, True
    return rate, False


def _open_rates(cfg: BenchConfig, capacity: float) -> tuple[float, ...]:
    """The open-loop rates: ``--rates``, else ``--rate-fractions`` of ``capacity``; positive ones only."""
    rates = cfg.rates or tuple(round(f * capacity) for f in cfg.rate_fractions)
    return tuple(r for r in rates if r > 0)


def _open_runs(
    cfg: BenchConfig, report: BenchReport, t: Target, rates: Sequence[float], capacity: float,
    deadline_ms: float | None, say: Say,
) -> None:  # fmt: skip
    """One open-loop run of single-sample requests per rate on the started target ``t``. ``deadline_ms`` is the
    server's deadline (None for the floor, which has none: the client waits up to 10 s and counts no goodput)."""
    work = t.works["single"]
    timeout_s = 10.0 if deadline_ms is None else max(1.0, 5 * deadline_ms / 1000)
    for k, rate in enumerate(rates):
        connections = int(min(cfg.max_connections, max(64, math.ceil(rate))))
        coro = loadgen.open_loop(
            "127.0.0.1", t.server.port, work.requests, rate=rate, duration_s=cfg.duration_s,
            max_connections=connections, samples_per_request=1, seed=k, timeout_s=timeout_s,
        )  # fmt: skip
        record = _measure(t, work, coro, 0, deadline_ms)
        record.load["capacity_per_s"] = capacity
        if deadline_ms is None:
            record.load["goodput_per_s"] = 0.0
        report.runs.append(record)
        say(line(record))


def served_deadline_ms(url: str) -> float:
    """The server's own deadline (LMA_REQUEST_TIMEOUT_MS), as its OpenAPI document gives it: the default of the
    ``X-Request-Timeout-Ms`` header of a scoring route (the benchmark talks to the server over HTTP only)."""
    import httpx

    doc = httpx.get(f"{url}/openapi.json", timeout=10).json()
    for operations in doc["paths"].values():
        for p in operations.get("post", {}).get("parameters", ()):
            if p["name"] == "X-Request-Timeout-Ms":
                return float(p["schema"]["default"])
    raise RuntimeError(f"{url}/openapi.json documents no X-Request-Timeout-Ms header: not an lma server?")


@contextlib.contextmanager
def _started(target: Target) -> Any:
    try:
        yield target
    finally:
        target.server.stop()
