"""What ``lma bench`` measured: one :class:`RunRecord` per load run, gathered in a :class:`BenchReport`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FLOOR = "floor: canned 503"  # the floor server's name starts with this (loadtest/bench/reference.py:floor_app)


@dataclass
class RunRecord:
    """One load run and what the server used during it."""

    server: str  # "lma serve (2 workers)", "lma serve (1 worker)", "reference (2 workers)", FLOOR + " (2 workers)"
    workers: int
    kind: str  # "single" or "batch"
    samples_per_request: int
    load: dict[str, Any]  # loadgen.LoadResult.summary(), plus goodput for open-loop runs
    server_cpu_percent: float  # of one core, summed over the server's processes
    server_cpu_us_per_request: float  # server CPU time / answered requests
    rss_start_mb: float
    rss_max_mb: float
    rss_end_mb: float
    round: int = 0
    deadline_ms: float | None = None  # open loop: the server's LMA_REQUEST_TIMEOUT_MS
    error_sample: str = ""  # the body of the first non-200 answer, if any

    @property
    def mode(self) -> str:
        return str(self.load["mode"])

    @property
    def floor(self) -> bool:
        return self.server.startswith(FLOOR)

    @property
    def server_cpu_us_per_sample(self) -> float:
        return self.server_cpu_us_per_request / self.samples_per_request


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
    raw: list[dict[str, Any]]  # in-process graph throughput per batch size and thread count
    runs: list[RunRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # open-loop capacity of each project configuration at each deadline: the highest Poisson rate it sustains
    # (runs._open_capacity), in the order sought: {"server", "deadline_ms", "closed_per_s", "bisected_per_s",
    # "capacity_per_s", "confirmed", "probes"}
    open_capacity: list[dict[str, Any]] = field(default_factory=list)
    raw_end: list[dict[str, Any]] = field(default_factory=list)  # the graph timed again after the last load run

    def drift(self) -> list[tuple[int, float]]:
        """(batch size, samples/s at the end / at the start) of the graph alone, 1 thread, for each batch size
        timed at both ends of the run."""
        out = []
        for end in self.raw_end:
            start = self.ceiling(end["batch_size"], end["threads"])
            if start is not None and start["samples_per_s"] > 0:
                out.append((int(end["batch_size"]), end["samples_per_s"] / start["samples_per_s"]))
        return out

    def closed(self, server: str, kind: str, concurrency: int | None = None) -> list[RunRecord]:
        return [
            r for r in self.runs
            if r.server == server and r.kind == kind and r.mode == "closed"
            and (concurrency is None or r.load["concurrency"] == concurrency)
        ]  # fmt: skip

    def capacity(self, server: str) -> float:
        """The best closed-loop single-sample requests/s of ``server`` (the open-loop capacity is sought below it)."""
        return max((r.load["ok_per_s"] for r in self.closed(server, "single")), default=0.0)

    def ceiling(self, batch_size: int, threads: int = 1) -> dict[str, Any] | None:
        return next((r for r in self.raw if r["batch_size"] == batch_size and r["threads"] == threads), None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
