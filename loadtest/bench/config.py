"""What one ``lma bench`` invocation measures, and the server settings of its runs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.contract import RUNTIMES

DEMO_NAME = "demo"
RAW_BATCH_SIZES = (1, 32, 256)
RAW_THREADS = (1, 2)
# The graph is timed again at the end of a run (1 thread, these batch sizes): a run in which it moved by more than
# DRIFT_LIMIT (a VM's speed changing under the run) is flagged in the report
DRIFT_BATCH_SIZES = (1, 256)
DRIFT_LIMIT = 0.2
# What every run sets unless --server-env overrides it: no per-request log line (its cost is measured
# separately with --access-log), no repository polling.
BASE_SERVER_ENV = {"LMA_ACCESS_LOG": "false", "LMA_WATCH_INTERVAL_S": "0"}
# The open-loop capacity (runs._open_capacity): bisection probes, their length, the share of arrivals answered in
# time; then runs as long as the open-loop runs confirm it, each CONFIRM_STEP below the last one that failed
OPEN_PROBES = 5
OPEN_PROBE_S = 2.0
SUSTAINED = 0.99
CONFIRM_TRIES = 3
CONFIRM_STEP = 0.9
OVERLOAD_DEADLINE_MS = 100.0  # the ad-server caller's budget the overload runs are also measured at


@dataclass(frozen=True)
class BenchConfig:
    """What one ``lma bench`` invocation measures (see :mod:`loadtest.bench`).

    Args:
        model_dir: a bundle, a model folder of versions, or a one-model repository (None: build the demo).
        workers: the worker counts of the project's server configurations (0: its default, one per core).
        reference: also measure the reference server (:mod:`loadtest.bench.reference`) side by side.
        rounds: closed-loop rounds; every cell is measured once per round, configurations alternating. Four by
            default: on this 2-core VM one round's project/reference ratio ranged 1.35x-2.41x within a run
            (docs/BENCHMARKS.md, the run of 3bb6f8e), and a median of four keeps one bad round out of the ratio.
        rate_fractions: open-loop rates as fractions of each configuration's open-loop capacity (the highest
            Poisson rate it sustains, found before its open-loop runs).
        deadlines_ms: the LMA_REQUEST_TIMEOUT_MS of the open-loop runs (None: the server's default).
    """

    model_dir: Path | None = None
    data: Path | None = None  # rows to replay (default: the demo data, or synthetic Criteo-shaped rows)
    data_format: str = "criteo"
    workers: tuple[int, ...] = (0, 1)
    reference: bool = False
    # closed loop only: the default configuration with other settings, side by side ((label, ((LMA_X, value),)))
    variants: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    v2_binary: bool = False  # closed loop: also the default configuration on its v2 route, binary BYTES tensors
    runtime: str = "onnx"
    rounds: int = 4
    duration_s: float = 5.0
    warmup_s: float = 1.0
    concurrency: tuple[int, ...] = (16, 64)
    batch_size: int = 32
    rate_fractions: tuple[float, ...] = (0.8, 2.0, 5.0)
    rates: tuple[float, ...] = ()  # absolute open-loop rates (replace the fractions when given)
    deadlines_ms: tuple[float | None, ...] = (None, OVERLOAD_DEADLINE_MS)
    max_connections: int = 1024  # open loop: most requests in flight (the client population)
    access_log: bool = False
    server_env: tuple[tuple[str, str], ...] = ()
    out: Path = Path("docs/BENCHMARKS.md")
    plot: Path | None = None  # default: beside out, lower-case stem, .png
    work_dir: Path | None = None  # demo model and server logs (default: a temporary folder)
    demo_rows: int = 20000
    raw_seconds: float = 1.0  # timing of the graph alone, per batch size and thread count
    rows: int = 4096
    command: str = ""

    def __post_init__(self) -> None:
        if not self.workers or min(self.workers) < 0:
            raise ValueError(f"--workers: need worker counts >= 0 (0: one per core), got {list(self.workers)}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"--concurrency: need values >= 1, got {list(self.concurrency)}")
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError(f"--duration must be > 0 and --warmup >= 0, got {self.duration_s} and {self.warmup_s}")
        if self.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {self.rounds}")
        if self.batch_size < 1 or self.rows < 1 or self.demo_rows < 100:
            raise ValueError("--batch and --rows must be >= 1, --demo-rows >= 100")
        if any(r <= 0 for r in self.rates) or any(f <= 0 for f in self.rate_fractions):
            raise ValueError("open-loop rates and rate fractions must be > 0")
        if any(d is not None and d <= 0 for d in self.deadlines_ms):
            raise ValueError("--deadlines: need values > 0 (ms)")
        if self.max_connections < 1:
            raise ValueError(f"--max-connections must be >= 1, got {self.max_connections}")
        if self.runtime not in RUNTIMES:
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


def parse_list(text: str, kind: type, what: str) -> tuple[Any, ...]:
    try:
        values = tuple(kind(x) for x in re.split(r"[,\s]+", text.strip()) if x)
    except ValueError:
        raise ValueError(f"{what}: expected a comma-separated list of numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{what}: empty list")
    return values


def parse_deadlines(text: str) -> tuple[float | None, ...]:
    """``default,100`` -> (None, 100.0): ``default`` is the server's LMA_REQUEST_TIMEOUT_MS."""
    out: list[float | None] = []
    for item in (x for x in re.split(r"[,\s]+", text.strip()) if x):
        if item == "default":
            out.append(None)
            continue
        try:
            out.append(float(item))
        except ValueError:
            raise ValueError(f"--deadlines: expected 'default' or milliseconds, got {item!r}") from None
    if not out:
        raise ValueError("--deadlines: empty list")
    return tuple(out)
