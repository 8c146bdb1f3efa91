"""`lma bench`: start a server, drive it with :mod:`loadtest.loadgen`, write docs/BENCHMARKS.md and a plot.

    lma bench                                          # builds a small demo model first (~1 min)
    lma bench --model-dir artifacts/demo --workers 1,2 --duration 10 --out docs/BENCHMARKS.md

For every worker count the server (``python -m models.main serve``, loopback, a free port) is started,
waited for (``/v2/health/ready``), warmed up, then measured:

1. closed loop, single-sample requests, at each ``--concurrency``;
2. closed loop, ``--batch``-sample requests, at each ``--concurrency``;
3. open loop (Poisson arrivals) at fractions of the best single-sample throughput of step 1 (or at
   ``--rates``), one of them at 2x: the server must shed the excess with immediate 503s while the
   requests it accepts stay within the deadline and its memory stays flat.

Then, with one worker, the same closed-loop single-sample runs with two batching variants (:data:`VARIANTS`):
``LMA_MAX_WAIT_MS=0`` (a batch leaves as soon as the runtime is free) and batching off,
``LMA_MAX_BATCH_SIZE=1`` (every runtime call scores exactly one request's sample).

During each run the server's CPU time and resident memory (its process and every child: the uvicorn
workers) are sampled with psutil. Beside the server, the same ONNX graph is timed in process (ONNX
Runtime session on the bundle, the server's session options, the same batch sizes): the ceiling a
server is judged against; the report gives the server's throughput as a ratio of it.

The report records the command, the machine (cores, CPU, load average at the start and end) and the
server settings; text between ``<!-- keep -->`` and ``<!-- /keep -->`` of an existing report (analysis
written by hand) is carried over into the new one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest import loadgen
from loadtest.payloads import Pools, Rows, build_pools, read_rows, synthetic_rows

KEEP_START, KEEP_END = "<!-- keep -->", "<!-- /keep -->"
DEMO_NAME = "demo"
RAW_BATCH_SIZES = (1, 32, 256)
# One-worker variants measured beside the defaults (single-sample requests, closed loop):
# - "max wait 0": a batch leaves as soon as the runtime is free, with whatever is queued (no waiting for
#   company; batches still form while the runtime is busy);
# - "batching off": every runtime call scores one sample, so no request ever shares a call.
VARIANTS: tuple[tuple[str, dict[str, str]], ...] = (
    ("max wait 0", {"LMA_MAX_WAIT_MS": "0"}),
    ("batching off", {"LMA_MAX_BATCH_SIZE": "1"}),
)
# What every run sets unless --server-env overrides it: no per-request log line (its cost is measured
# separately with --access-log), no repository polling.
BASE_SERVER_ENV = {"LMA_ACCESS_LOG": "false", "LMA_WATCH_INTERVAL_S": "0"}


# ----------------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class BenchConfig:
    """What one ``lma bench`` invocation measures (see the module docstring)."""

    model_dir: Path | None = None  # a bundle, a model folder of versions, or a one-model repository
    data: Path | None = None  # rows to replay (default: the demo data, or synthetic Criteo-shaped rows)
    data_format: str = "criteo"
    workers: tuple[int, ...] = (1, 2)
    runtime: str = "onnx"
    duration_s: float = 5.0
    warmup_s: float = 1.0
    concurrency: tuple[int, ...] = (1, 8, 32, 64)
    batch_size: int = 32
    rate_fractions: tuple[float, ...] = (0.5, 0.8, 2.0)  # of the best closed-loop single-sample req/s
    rates: tuple[float, ...] = ()  # absolute open-loop rates (replace the fractions when given)
    max_connections: int = 1024  # open loop: most requests in flight (the client population)
    variants: bool = True  # also measure VARIANTS
    access_log: bool = False
    server_env: tuple[tuple[str, str], ...] = ()
    out: Path = Path("docs/BENCHMARKS.md")
    plot: Path | None = None  # default: beside out, lower-case stem, .png
    work_dir: Path | None = None  # demo model and server logs (default: a temporary folder)
    demo_rows: int = 20000
    raw_seconds: float = 1.0  # timing of the graph alone, per batch size
    rows: int = 4096
    command: str = ""

    def __post_init__(self) -> None:
        if not self.workers or min(self.workers) < 1:
            raise ValueError(f"--workers: need worker counts >= 1, got {list(self.workers)}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"--concurrency: need values >= 1, got {list(self.concurrency)}")
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError(f"--duration must be > 0 and --warmup >= 0, got {self.duration_s} and {self.warmup_s}")
        if self.batch_size < 1 or self.rows < 1 or self.demo_rows < 100:
            raise ValueError("--batch and --rows must be >= 1, --demo-rows >= 100")
        if any(r <= 0 for r in self.rates) or any(f <= 0 for f in self.rate_fractions):
            raise ValueError("open-loop rates and rate fractions must be > 0")
        if self.max_connections < 1:
            raise ValueError(f"--max-connections must be >= 1, got {self.max_connections}")
        if self.runtime not in ("onnx", "torchscript"):
            raise ValueError(f"--runtime must be onnx or torchscript, got {self.runtime!r}")

    @property
    def plot_path(self) -> Path:
        """--plot, else beside the report: docs/BENCHMARKS.md -> docs/benchmarks.png."""
        return self.plot if self.plot is not None else self.out.with_name(self.out.stem.lower() + ".png")

    def env(self, **extra: str) -> dict[str, str]:
        """Server settings of a run: the base, --access-log, --server-env, then ``extra``."""
        env = dict(BASE_SERVER_ENV)
        env["LMA_ACCESS_LOG"] = "true" if self.access_log else "false"
        env.update(dict(self.server_env))
        env.update(extra)
        return env


# ----------------------------------------------------------------------------------------------------------
# results


@dataclass
class RunRecord:
    """One load run and what the server used during it."""

    config: str  # "1 worker", "2 workers", "batching off"
    workers: int
    kind: str  # "single" or "batch"
    samples_per_request: int
    load: dict[str, Any]  # loadgen.LoadResult.summary()
    server_cpu_percent: float  # of one core, summed over the server's processes
    server_cpu_us_per_request: float  # server CPU time / answered requests
    rss_start_mb: float
    rss_max_mb: float
    rss_end_mb: float
    error_sample: str = ""  # the body of the first non-200 answer, if any

    @property
    def mode(self) -> str:
        return str(self.load["mode"])


@dataclass
class BenchReport:
    command: str
    started: str
    wall_s: float
    machine: dict[str, Any]
    model: dict[str, Any]
    server_env: dict[str, str]
    duration_s: float
    max_connections: int
    raw: list[dict[str, Any]]  # in-process graph throughput per batch size
    runs: list[RunRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def best(self, config: str, kind: str) -> RunRecord | None:
        runs = [r for r in self.runs if r.config == config and r.kind == kind and r.mode == "closed"]
        return max(runs, key=lambda r: r.load["ok_per_s"], default=None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------
# machine, model, data


def machine_facts() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    facts: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu": cpu or platform.processor(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    import psutil

    facts["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    for module in ("onnxruntime", "uvicorn", "fastapi", "numpy"):
        with contextlib.suppress(Exception):
            facts[module] = __import__(module).__version__
    with contextlib.suppress(Exception):
        facts["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    return facts


def resolve_bundle(path: Path) -> Path:
    """The bundle folder meant by ``path``: a bundle, a model folder of versions (latest), or a one-model repo."""
    from export.bundle import MANIFEST_FILE, is_version, latest_bundles

    if not path.is_dir():
        raise FileNotFoundError(f"--model-dir {path} is not a directory")
    if (path / MANIFEST_FILE).is_file():
        return path
    versions = [
        int(v.name) for v in path.iterdir() if v.is_dir() and is_version(v.name) and (v / MANIFEST_FILE).is_file()
    ]
    if versions:
        return path / str(max(versions))
    found = latest_bundles(path)
    if len(found) == 1:
        return next(iter(found.values()))
    if not found:
        raise ValueError(f"--model-dir {path}: no bundle found (expected NAME/VERSION/manifest.json or a bundle)")
    raise ValueError(f"--model-dir {path} holds {len(found)} models {sorted(found)}: name one of them")


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
        "--epochs", "1", "--no-progress", "--cache-dir", str(work_dir / "cache"), "--out", str(run), log=log,
    )  # fmt: skip
    _lma("export", str(run), "--out", str(artifacts), log=log)
    return resolve_bundle(artifacts), data


def model_facts(bundle: Path) -> dict[str, Any]:
    from export.bundle import read_manifest

    m = read_manifest(bundle)
    memory = m.get("memory", {})
    return {
        "name": m["name"],
        "version": str(m["version"]),
        "path": str(bundle),
        "embedding": m.get("embedding", {}).get("kind", "?"),
        "embedding_dim": m.get("embedding", {}).get("embedding_dim"),
        "num_dense": len(m["schema"]["dense_names"]),
        "num_fields": len(m["schema"]["categorical_names"]),
        "total_bytes": memory.get("total_bytes"),
        "embedding_compression": memory.get("embedding_compression"),
        "onnx_bytes": (bundle / "model.onnx").stat().st_size if (bundle / "model.onnx").is_file() else None,
    }


def load_rows(cfg: BenchConfig, demo_data: Path | None) -> Rows:
    if cfg.data is not None:
        return read_rows(cfg.data, cfg.data_format, cfg.rows)
    if demo_data is not None:
        return read_rows(demo_data, "criteo", cfg.rows)
    return synthetic_rows(cfg.rows, seed=0)


# ----------------------------------------------------------------------------------------------------------
# the graph alone


def raw_throughput(
    bundle: Path, rows: Rows, threads: int, batch_sizes: Sequence[int] = RAW_BATCH_SIZES, seconds: float = 1.0
) -> list[dict[str, Any]]:
    """Samples/s of the bundle's ONNX graph in this process, with the server's session options.

    The inputs are ``rows`` featurized once (keys hashed with the bundle's schema, dense values
    transformed): this is the graph's ceiling, without HTTP, JSON, featurization or batching.
    """
    import onnxruntime as ort

    from export.bundle import load_bundle
    from models.schema import transform_dense

    b = load_bundle(bundle)
    n = max(batch_sizes)
    picked = [rows.rows[i % len(rows)] for i in range(n)]
    dense = transform_dense(np.array([[np.nan if v is None else v for v in r.dense] for r in picked], np.float64))
    keys = b.schema.keys_for([r.categorical for r in picked])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(b.file("onnx")), opts, providers=["CPUExecutionProvider"])
    out = []
    for size in batch_sizes:
        feeds = {"dense": dense[:size], "keys": keys[:size]}
        for _ in range(5):
            session.run(None, feeds)
        calls = 0
        cpu0, start = time.process_time(), time.perf_counter()
        while time.perf_counter() - start < seconds:
            session.run(None, feeds)
            calls += 1
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
        out.append(
            {
                "batch_size": size,
                "samples_per_s": calls * size / elapsed,
                "us_per_call": elapsed / calls * 1e6,
                "cpu_us_per_sample": cpu / (calls * size) * 1e6,
            }
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# the server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``lma serve BUNDLE`` on a free loopback port, with ``env`` on top of this process's environment."""

    def __init__(self, bundle: Path, workers: int, runtime: str, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        environ = {**os.environ, **env}
        environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        cmd = [sys.executable, "-m", "models.main", "serve", str(bundle), "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--workers", str(workers), "--runtime", runtime]
        self._log_file = log.open("ab")
        self.proc = subprocess.Popen(cmd, env=environ, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; end of {self.log}:\n{self._tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"the server was not ready after {timeout_s:.0f} s; end of {self.log}:\n{self._tail()}")

    def _tail(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ResourceSampler:
    """CPU time and resident memory of a process tree, sampled in a background thread."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self._rss: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpu0 = 0.0
        self._t0 = 0.0

    def _procs(self) -> list[Any]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except self._psutil.NoSuchProcess:
            return []

    def snapshot(self) -> tuple[float, float]:
        """(CPU seconds, RSS bytes) summed over the tree."""
        cpu = rss = 0.0
        for p in self._procs():
            with contextlib.suppress(self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                t = p.cpu_times()
                cpu += t.user + t.system
                rss += p.memory_info().rss
        return cpu, rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._rss.append(self.snapshot()[1])

    def start(self) -> None:
        self._cpu0, rss = self.snapshot()
        self._rss = [rss]
        self._t0 = time.perf_counter()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="lma-bench-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> tuple[float, float, list[float]]:
        """(CPU seconds used, wall seconds, RSS samples in bytes) since :meth:`start`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        cpu, rss = self.snapshot()
        self._rss.append(rss)
        return cpu - self._cpu0, time.perf_counter() - self._t0, self._rss


# ----------------------------------------------------------------------------------------------------------
# the runs


@dataclass(frozen=True)
class Workload:
    kind: str  # "single" or "batch"
    requests: tuple[bytes, ...]
    samples: int
    pools: Pools


def workloads(rows: Rows, url_path: str, port: int, batch_size: int) -> dict[str, Workload]:
    pools = build_pools(rows, batch_size=batch_size, entities=1)
    return {
        "single": Workload(
            "single", loadgen.http_requests("127.0.0.1", port, url_path, pools.native_single.bodies), 1, pools
        ),
        "batch": Workload(
            "batch",
            loadgen.http_requests("127.0.0.1", port, url_path, pools.native_batch.bodies),
            batch_size,
            pools,
        ),
    }


def _measure(
    sampler: ResourceSampler, config: str, workers: int, work: Workload, coro: Any
) -> tuple[RunRecord, loadgen.LoadResult]:
    sampler.start()
    result: loadgen.LoadResult = loadgen.run(coro)
    cpu_s, wall_s, rss = sampler.stop()
    error = next((b for s, b in sorted(result.sample_bodies.items()) if s != 200), b"")
    record = RunRecord(
        config=config,
        workers=workers,
        kind=work.kind,
        samples_per_request=work.samples,
        load=result.summary(),
        server_cpu_percent=cpu_s / wall_s * 100 if wall_s > 0 else 0.0,
        server_cpu_us_per_request=cpu_s / result.completed * 1e6 if result.completed else 0.0,
        rss_start_mb=rss[0] / 2**20,
        rss_max_mb=max(rss) / 2**20,
        rss_end_mb=rss[-1] / 2**20,
        error_sample=error[:300].decode("utf-8", "replace"),
    )
    return record, result


def check_answers(result: loadgen.LoadResult, samples: int) -> None:
    """The server must answer 200s with one probability per sample (one sampled body is decoded)."""
    import orjson

    from loadtest.payloads import native_response_problem

    body = result.sample_bodies.get(200)
    if body is None:
        return
    problem = native_response_problem(orjson.loads(body), samples)
    if problem:
        raise RuntimeError(f"the server's answers are wrong: {problem}")


def closed_runs(
    cfg: BenchConfig, server: ServerProcess, config: str, workers: int, works: Sequence[Workload], say: Any
) -> list[RunRecord]:
    sampler = ResourceSampler(server.proc.pid)
    records = []
    for work in works:
        for c in cfg.concurrency:
            coro = loadgen.closed_loop(
                "127.0.0.1", server.port, work.requests, concurrency=c, duration_s=cfg.duration_s,
                samples_per_request=work.samples,
            )  # fmt: skip
            record, result = _measure(sampler, config, workers, work, coro)
            check_answers(result, work.samples)
            records.append(record)
            say(_line(record))
    return records


def open_runs(
    cfg: BenchConfig,
    server: ServerProcess,
    config: str,
    workers: int,
    work: Workload,
    rates: Sequence[float],
    say: Any,
) -> list[RunRecord]:
    sampler = ResourceSampler(server.proc.pid)
    records = []
    for k, rate in enumerate(rates):
        # about a second of arrivals may be in flight, at most --max-connections: a bounded client population,
        # as in production, where clients time out and connection pools are finite
        connections = int(min(cfg.max_connections, max(64, math.ceil(rate))))
        coro = loadgen.open_loop(
            "127.0.0.1", server.port, work.requests, rate=rate, duration_s=cfg.duration_s,
            max_connections=connections, samples_per_request=work.samples, seed=k,
        )  # fmt: skip
        record, result = _measure(sampler, config, workers, work, coro)
        check_answers(result, work.samples)
        records.append(record)
        say(_line(record))
    return records


def warm_up(cfg: BenchConfig, server: ServerProcess, works: Sequence[Workload]) -> None:
    if cfg.warmup_s <= 0:
        return
    for work in works:
        loadgen.run(
            loadgen.closed_loop("127.0.0.1", server.port, work.requests, concurrency=8, duration_s=cfg.warmup_s)
        )


def _line(r: RunRecord) -> str:
    load = r.load
    where = f"c={load['concurrency']}" if r.mode == "closed" else f"rate={load['rate']:.0f}/s"
    lat = load["latency_ms"]
    return (
        f"  {r.config:13s} {r.kind:6s} {r.mode:6s} {where:12s} {load['ok_per_s']:8.0f} ok/s"
        f" {load['samples_per_s']:9.0f} samples/s  p50 {lat['p50']:7.2f}  p99 {lat['p99']:7.2f} ms"
        f"  status {load['status']} dropped {load['dropped']} errors {load['errors']}"
        f"  cpu {r.server_cpu_percent:.0f}%  rss {r.rss_max_mb:.0f} MB"
    )


def _workers_label(w: int) -> str:
    return f"{w} worker" + ("s" if w > 1 else "")


def run_bench(cfg: BenchConfig, say: Any = print) -> BenchReport:
    """Everything of the module docstring; returns the report (written by :func:`write_report`)."""
    started = time.time()
    machine = machine_facts()
    with contextlib.ExitStack() as stack:
        work_dir = cfg.work_dir
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lma-bench-")))
        work_dir.mkdir(parents=True, exist_ok=True)
        demo_data = None
        if cfg.model_dir is None:
            say(f"building a demo model ({cfg.demo_rows} synthetic rows, small preset, LMA 16x) in {work_dir}")
            bundle, demo_data = build_demo_model(work_dir, cfg.demo_rows)
        else:
            bundle = resolve_bundle(cfg.model_dir)
        model = model_facts(bundle)
        rows = load_rows(cfg, demo_data)
        threads = int(dict(cfg.server_env).get("LMA_INTRA_OP_THREADS", "0") or 0)
        say(f"model {model['name']} v{model['version']} ({bundle}); timing the graph in process")
        raw = raw_throughput(bundle, rows, threads, seconds=cfg.raw_seconds)
        report = BenchReport(
            command=cfg.command,
            started=time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
            wall_s=0.0,
            machine=machine,
            model=model,
            server_env=cfg.env(),
            duration_s=cfg.duration_s,
            max_connections=cfg.max_connections,
            raw=raw,
        )
        path = f"/v1/models/{model['name']}:predict"
        for workers in cfg.workers:
            config = _workers_label(workers)
            say(f"server: {config}")
            log = work_dir / f"server-{workers}w.log"
            with ServerProcess(bundle, workers, cfg.runtime, cfg.env(), log) as server:
                server.wait_ready()
                works = workloads(rows, path, server.port, cfg.batch_size)
                warm_up(cfg, server, list(works.values()))
                closed = closed_runs(cfg, server, config, workers, [works["single"], works["batch"]], say)
                report.runs += closed
                best = max(r.load["ok_per_s"] for r in closed if r.kind == "single")
                rates = cfg.rates or tuple(round(f * best) for f in cfg.rate_fractions)
                rates = tuple(r for r in rates if r > 0)
                report.runs += open_runs(cfg, server, config, workers, works["single"], rates, say)
        for config, extra in VARIANTS if cfg.variants else ():
            say(f"server: 1 worker, {config} ({', '.join(f'{k}={v}' for k, v in extra.items())})")
            log = work_dir / f"server-{config.replace(' ', '-')}.log"
            with ServerProcess(bundle, 1, cfg.runtime, cfg.env(**extra), log) as server:
                server.wait_ready()
                works = workloads(rows, path, server.port, cfg.batch_size)
                warm_up(cfg, server, [works["single"]])
                report.runs += closed_runs(cfg, server, config, 1, [works["single"]], say)
    report.machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report.wall_s = time.time() - started
    return report


# ----------------------------------------------------------------------------------------------------------
# the report


def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}"


def _status(load: dict[str, Any]) -> str:
    parts = [f"{code}: {n:,}" for code, n in sorted(load["status"].items(), key=lambda kv: int(kv[0]))]
    return ", ".join(parts) or "–"


def _failures(load: dict[str, Any]) -> str:
    parts = [f"{kind} {n:,}" for kind, n in sorted(load["errors"].items())]
    if load.get("dropped"):
        parts.append(f"dropped {load['dropped']:,}")
    return ", ".join(parts) or "0"


def _closed_table(runs: Sequence[RunRecord], raw: dict[int, float]) -> list[str]:
    lines = [
        "| server | concurrency | requests/s | samples/s | of graph | p50 ms | p95 ms | p99 ms | max ms "
        "| status | failures | server CPU | CPU µs/request | RSS MB |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|--:|--:|--:|",
    ]
    for r in runs:
        load, lat = r.load, r.load["latency_ms"]
        ceiling = raw.get(r.samples_per_request)
        ratio = f"{load['samples_per_s'] / ceiling:.2f}" if ceiling else "–"
        lines.append(
            f"| {r.config} | {load['concurrency']} | {_fmt(load['ok_per_s'])} | {_fmt(load['samples_per_s'])} "
            f"| {ratio} | {_fmt(lat['p50'], 2)} | {_fmt(lat['p95'], 2)} | {_fmt(lat['p99'], 2)} "
            f"| {_fmt(lat['max'], 1)} | {_status(load)} | {_failures(load)} | {r.server_cpu_percent:.0f}% "
            f"| {_fmt(r.server_cpu_us_per_request)} | {r.rss_max_mb:.0f} |"
        )
    return lines


def _open_table(runs: Sequence[RunRecord]) -> list[str]:
    lines = [
        "| server | target/s | sent | answered/s | 200/s | p50 ms (200) | p99 ms (200) | max ms (200) "
        "| p99 ms (503) | status | failures | send lag p99 ms | server CPU | RSS start → max → end MB |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|--:|--:|---|",
    ]
    for r in runs:
        load, lat = r.load, r.load["latency_ms"]
        rejected = load["latency_503_ms"]["p99"]
        lines.append(
            f"| {r.config} | {_fmt(load['rate'])} | {load['sent']:,} | {_fmt(load['requests_per_s'])} "
            f"| {_fmt(load['ok_per_s'])} | {_fmt(lat['p50'], 2)} | {_fmt(lat['p99'], 2)} | {_fmt(lat['max'], 1)} "
            f"| {_fmt(rejected, 2)} | {_status(load)} | {_failures(load)} | {load['send_lag_ms_p99']:.2f} "
            f"| {r.server_cpu_percent:.0f}% | {r.rss_start_mb:.0f} → {r.rss_max_mb:.0f} → {r.rss_end_mb:.0f} |"
        )
    return lines


def _keep_block(previous: str | None) -> str:
    if previous and KEEP_START in previous and KEEP_END in previous:
        start = previous.index(KEEP_START)
        end = previous.index(KEEP_END, start) + len(KEEP_END)
        return previous[start:end]
    placeholder = "_(analysis written by hand goes here; `lma bench` keeps it when it rewrites this file)_"
    return f"{KEEP_START}\n{placeholder}\n{KEEP_END}"


def render_markdown(report: BenchReport, previous: str | None = None, plot_name: str | None = None) -> str:
    """The Markdown report; ``previous`` is the file it replaces (its hand-written block is kept)."""
    m, model = report.machine, report.model
    raw = {r["batch_size"]: r["samples_per_s"] for r in report.raw}
    configs = list(dict.fromkeys(r.config for r in report.runs))
    out = [
        "# Benchmarks",
        "",
        f"Generated by `lma bench` on {report.started} in {report.wall_s:.0f} s. Every number below comes from that",
        "run; the load generator (loadtest/loadgen.py: raw HTTP/1.1 keep-alive, uvloop) ran on the same machine",
        "as the server, so both share its cores.",
        "",
        "## Setup",
        "",
        "```",
        report.command or "lma bench",
        "```",
        "",
        f"- machine: {m.get('nproc')} cores ({m.get('cpu', '?')}), {m.get('memory_gb', '?')} GB; "
        f"load average at start {m.get('load_average_start')}, at end {m.get('load_average_end', '?')} "
        "(it counts every runnable process: this bench alone adds about 2, the rest is other jobs)",
        f"- software: Python {m.get('python')}, ONNX Runtime {m.get('onnxruntime', '?')}, "
        f"uvicorn {m.get('uvicorn', '?')}, FastAPI {m.get('fastapi', '?')}, NumPy {m.get('numpy', '?')}; "
        f"commit {m.get('git_commit', '?')}",
        f"- model: `{model['name']}` version {model['version']} ({model['embedding']}, d = {model['embedding_dim']}, "
        f"{model['num_dense']} dense + {model['num_fields']} categorical features, "
        f"{_fmt(model.get('total_bytes'))} bytes of parameters, embedding compression "
        f"{_fmt(model.get('embedding_compression'), 1)}x), runtime ONNX Runtime on CPU",
        "- server settings: "
        + ", ".join(f"`{k}={v}`" for k, v in sorted(report.server_env.items()))
        + "; everything else at its default (DESIGN section 7)",
        f"- each run lasts {report.duration_s:g} s after a warm-up; latency is measured by the client, from the send "
        "(closed loop) or the scheduled send (open loop) to the last byte of the answer",
        "- server CPU is summed over the server's processes (100% = one core); CPU µs/request = server CPU time / "
        "answered requests, the number least disturbed by other jobs on the machine",
        "",
        "## The graph alone (in process)",
        "",
        "ONNX Runtime session on the bundle's `model.onnx` with the server's session options, inputs featurized",
        'once: the ceiling the server is judged against ("of graph" in the tables below).',
        "",
        "| batch size | samples/s | µs per call | CPU µs per sample |",
        "|--:|--:|--:|--:|",
    ]
    for r in report.raw:
        out.append(
            f"| {r['batch_size']} | {_fmt(r['samples_per_s'])} | {_fmt(r['us_per_call'])} "
            f"| {_fmt(r['cpu_us_per_sample'], 1)} |"
        )
    for kind, title in (("single", "single-sample requests"), ("batch", "batched requests")):
        runs = [r for r in report.runs if r.kind == kind and r.mode == "closed"]
        if not runs:
            continue
        samples = runs[0].samples_per_request
        out += [
            "",
            f"## Closed loop: {title} ({samples} per request)",
            "",
            "N connections, each sending its next request as soon as the answer to the last one is in.",
            "",
            *_closed_table(runs, raw),
        ]
    opened = [r for r in report.runs if r.mode == "open"]
    if opened:
        out += [
            "",
            "## Open loop: Poisson arrivals at fixed rates (single-sample requests)",
            "",
            "Rates are fractions of the best closed-loop single-sample throughput of the same server (or `--rates`).",
            "Latency counts from each request's scheduled send time, so a stalled server or generator shows (no",
            "coordinated omission); 'send lag' is how late the generator itself sent. At 2x the sustainable rate",
            "the server must answer the excess at once with 503 while what it accepts stays within",
            f"`LMA_REQUEST_TIMEOUT_MS`, with flat memory. {_connections_note(report)}",
            "",
            *_open_table(opened),
        ]
    out += ["", "## Summary", "", *_summary(report, configs, raw)]
    failed = [run for run in report.runs if run.error_sample]
    if failed:
        out += ["", "First non-200 answer of each run that had one:", ""]
        for run in failed:
            where = f"c={run.load['concurrency']}" if run.mode == "closed" else f"{run.load['rate']:.0f}/s"
            out.append(f"- {run.config}, {run.kind}, {run.mode} {where}: `{run.error_sample}`")
    if plot_name:
        out += ["", f"![latency vs throughput]({plot_name})"]
    out += ["", "## Analysis", "", _keep_block(previous), ""]
    return "\n".join(out)


def _connections_note(report: BenchReport) -> str:
    return (
        "The generator keeps up to about one second of arrivals in flight, at most `--max-connections` "
        f"({report.max_connections}): a bounded client population. An arrival that finds all of them busy is "
        "counted as dropped, never sent."
    )


def _knee(runs: Sequence[RunRecord]) -> RunRecord | None:
    """The lowest-concurrency closed run within 10% of the best throughput."""
    if not runs:
        return None
    best = max(r.load["ok_per_s"] for r in runs)
    return min((r for r in runs if r.load["ok_per_s"] >= 0.9 * best), key=lambda r: r.load["concurrency"])


def _summary(report: BenchReport, configs: Sequence[str], raw: dict[int, float]) -> list[str]:
    lines = []
    for config in configs:
        single = [r for r in report.runs if r.config == config and r.kind == "single" and r.mode == "closed"]
        batch = [r for r in report.runs if r.config == config and r.kind == "batch" and r.mode == "closed"]
        knee = _knee(single)
        if knee is not None:
            lat = knee.load["latency_ms"]
            lines.append(
                f"- {config}: single-sample knee at concurrency {knee.load['concurrency']}: "
                f"{_fmt(knee.load['ok_per_s'])} requests/s, p99 {_fmt(lat['p99'], 2)} ms"
                f" ({_fmt(knee.server_cpu_us_per_request)} server CPU µs per request)"
            )
        best_batch = max(batch, key=lambda r: r.load["samples_per_s"], default=None)
        if best_batch is not None:
            ceiling = raw.get(best_batch.samples_per_request)
            load = best_batch.load
            of = f", {load['samples_per_s'] / ceiling:.2f} of the graph alone at that batch size" if ceiling else ""
            lines.append(
                f"- {config}: {best_batch.samples_per_request}-sample requests: best "
                f"{_fmt(load['samples_per_s'])} samples/s at concurrency {load['concurrency']}{of}"
            )
        for r in report.runs:
            if r.config == config and r.mode == "open":
                lat = r.load["latency_ms"]
                lines.append(
                    f"- {config}: open loop {_fmt(r.load['rate'])}/s: {_fmt(r.load['ok_per_s'])} answered 200/s, "
                    f"p50 {_fmt(lat['p50'], 2)} ms, p99 {_fmt(lat['p99'], 2)} ms; status {_status(r.load)}; "
                    f"failures {_failures(r.load)}; RSS {r.rss_start_mb:.0f} → {r.rss_end_mb:.0f} MB"
                )
    return lines


def plot(report: BenchReport, path: Path) -> None:
    """Latency (p50 and p99) against throughput: one line per server configuration and request kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    configs = list(dict.fromkeys(r.config for r in report.runs))
    colors = {c: f"C{i}" for i, c in enumerate(configs)}
    for ax, kind, unit in ((axes[0], "single", "requests/s"), (axes[1], "batch", "samples/s")):
        for config in configs:
            runs = [r for r in report.runs if r.config == config and r.kind == kind and r.mode == "closed"]
            if not runs:
                continue
            x = [r.load["ok_per_s"] if kind == "single" else r.load["samples_per_s"] for r in runs]
            for q, style in (("p50", "o-"), ("p99", "s--")):
                y = [r.load["latency_ms"][q] for r in runs]
                ax.plot(x, y, style, color=colors[config], label=f"{config} closed {q}")
            for r, xi in zip(runs, x, strict=True):
                ax.annotate(f"c={r.load['concurrency']}", (xi, r.load["latency_ms"]["p99"]), fontsize=7)
            opened = [r for r in report.runs if r.config == config and r.kind == kind and r.mode == "open"]
            if opened:
                ax.plot(
                    [r.load["ok_per_s"] for r in opened],
                    [r.load["latency_ms"]["p99"] for r in opened],
                    "^",
                    color=colors[config],
                    markersize=9,
                    label=f"{config} open loop p99",
                )
        ax.set_xlabel(f"throughput ({unit}, 200 answers)")
        ax.set_ylabel("latency (ms)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title("single-sample requests" if kind == "single" else "batched requests")
        ax.legend(fontsize=7)
    m = report.machine
    fig.suptitle(f"lma bench, {m.get('nproc')} cores, load average at start {m.get('load_average_start')}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: BenchReport, out: Path, plot_path: Path | None) -> None:
    """Write the Markdown report (keeping the hand-written block of the file it replaces) and the plot."""
    previous = out.read_text() if out.is_file() else None
    plot_name = None
    if plot_path is not None:
        plot(report, plot_path)
        plot_name = os.path.relpath(plot_path, out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(report, previous, plot_name))


def parse_list(text: str, kind: type, what: str) -> tuple[Any, ...]:
    try:
        values = tuple(kind(x) for x in re.split(r"[,\s]+", text.strip()) if x)
    except ValueError:
        raise ValueError(f"{what}: expected a comma-separated list of numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{what}: empty list")
    return values


def dump_json(report: BenchReport, path: Path) -> None:
    path.write_text(json.dumps(report.to_json(), indent=1, default=str))
