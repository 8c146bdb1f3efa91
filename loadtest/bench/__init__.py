"""`lma bench`: start servers, drive them with :mod:`loadtest.loadgen`, write docs/BENCHMARKS.md and a plot.

    lma bench                                              # builds a small demo model first (~1 min)
    lma bench --model-dir artifacts/demo --reference --out docs/BENCHMARKS.md

What one run measures, in this order (each part is a module of this package):

1. the graph alone, in process (:mod:`~loadtest.bench.machine`): the bundle's ONNX graph with the server's
   session options at batch 1, 32 and 256, with 1 and 2 intra-op threads: the ceiling;
2. closed loop (:mod:`~loadtest.bench.runs`): every server configuration (``--workers``: the default, one
   worker per core, and 1 worker) and, with ``--reference``, the reference server (FastAPI + ONNX Runtime,
   one model call per request, hashed keys, one process per core: :mod:`~loadtest.bench.reference`), all
   started at once, then single-sample and ``--batch``-sample requests at each ``--concurrency``, the servers
   taking turns cell by cell for ``--rounds`` rounds;
3. open loop: each configuration's open-loop capacity (the highest Poisson rate at which 99% of the arrivals
   get a 200 in time, by bisection below its closed-loop capacity), then Poisson arrivals at
   ``--rate-fractions`` of it, at each of ``--deadlines`` (LMA_REQUEST_TIMEOUT_MS), on a fresh server:
   goodput, the latency of the accepted and the refused, every arrival accounted for.

Server processes are started and measured through :mod:`~loadtest.bench.process` (CPU time and resident
memory of the whole process tree). The report (:mod:`~loadtest.bench.report`) records the command, the
machine (cores, CPU, load average at the start and end) and the settings, judges the targets of the serving
issues, and carries over the text between ``<!-- keep -->`` and ``<!-- /keep -->`` of the report it replaces.
"""

from loadtest.bench.config import (
    BASE_SERVER_ENV,
    DEMO_NAME,
    OPEN_PROBES,
    RAW_BATCH_SIZES,
    RAW_THREADS,
    BenchConfig,
    parse_deadlines,
    parse_list,
)
from loadtest.bench.process import ResourceSampler, ServerProcess, free_port, lma_serve_command
from loadtest.bench.report import KEEP_END, KEEP_START, dump_json, render_markdown, targets, write_report
from loadtest.bench.results import BenchReport, RunRecord
from loadtest.bench.runs import build_demo_model, run_bench

__all__ = [
    "BASE_SERVER_ENV", "DEMO_NAME", "KEEP_END", "KEEP_START", "OPEN_PROBES", "RAW_BATCH_SIZES", "RAW_THREADS",
    "BenchConfig", "BenchReport", "ResourceSampler", "RunRecord", "ServerProcess", "build_demo_model", "dump_json",
    "free_port", "lma_serve_command", "parse_deadlines", "parse_list", "render_markdown", "run_bench",
    "targets", "write_report",
]  # fmt: skip
