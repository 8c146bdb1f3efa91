"""`lma serve`: the HTTP server (registered through the lma.commands entry point).

    lma serve artifacts/ --port 8000                  # every model of a repository, 127.0.0.1:8000
    lma serve artifacts/criteo/3 --runtime torchscript
    LMA_MAX_BATCH_SIZE=512 lma serve artifacts/ --workers 2

Settings not given as options come from ``LMA_*`` environment variables (server/settings.py);
they are validated before anything starts. By default the server runs one worker process per core it
may use (``--workers`` / ``LMA_WORKERS``; see :mod:`server.workers`); each loads its own copy of the
models, and metrics are aggregated across workers through a Prometheus multiprocess directory (a fresh
temporary one unless PROMETHEUS_MULTIPROC_DIR is set; emptied at start, as prometheus_client requires).
SIGTERM (or Ctrl-C) stops accepting connections, answers every accepted request, then exits 0.
"""

import argparse
import os
import shutil
import signal
from pathlib import Path

from export.contract import RUNTIMES


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("serve", help="serve exported bundles over HTTP (native and Open Inference Protocol v2)")
    p.add_argument(
        "model_dir", type=Path, metavar="PATH", help="a bundle, or a repository of <name>/<version>/ bundles"
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--workers", type=int, help="worker processes on the port, each with its own models (default: one per core)"
    )
    p.add_argument("--runtime", choices=RUNTIMES, help="overrides LMA_RUNTIME (default onnx)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="overrides LMA_DEVICE (default auto)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import tempfile

    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    os.environ["LMA_MODEL_DIR"] = str(args.model_dir)
    if args.runtime:
        os.environ["LMA_RUNTIME"] = args.runtime
    if args.device:
        os.environ["LMA_DEVICE"] = args.device
    if args.workers:
        os.environ["LMA_WORKERS"] = str(args.workers)
    from server.settings import load_settings, worker_count

    settings = load_settings()  # bad settings: one clear line, exit 2, before any worker starts
    workers = worker_count(settings)
    os.environ["LMA_WORKERS"] = str(workers)  # each worker sizes its runtime threads by it
    from server.runtimes import runtime_class

    runtime_class(settings.runtime)  # a runtime whose extra is not installed: one line, exit 2
    from server.registry import preflight

    preflight(settings)  # a bad bundle, key or device: one line, exit 2, before any worker starts
    from server.logs import configure_logging
    from server.workers import ServeOptions, serve, uvicorn_kwargs

    configure_logging(settings.log_level)
    options = ServeOptions(
        host=args.host,
        port=args.port,
        log_level=settings.log_level,
        drain_timeout_s=settings.drain_timeout_s,
        backlog=settings.backlog,
        workers=workers,
    )
    if workers == 1:
        import uvicorn

        # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to whatever handler was there
        # before it: make that a no-op so a graceful stop exits with status 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: None)
        uvicorn.run("server.app:app_from_env", host=args.host, port=args.port, **uvicorn_kwargs(options))
        return 0
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    temporary = None
    if not metrics_dir:
        temporary = tempfile.TemporaryDirectory(prefix="lma-metrics-")
        metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = temporary.name
    else:  # files of an earlier run would be summed into this one's: the client requires an empty folder
        shutil.rmtree(metrics_dir, ignore_errors=True)
        Path(metrics_dir).mkdir(parents=True, exist_ok=True)
    from prometheus_client import multiprocess

    try:
        return serve(options, on_dead=lambda pid: multiprocess.mark_process_dead(pid, metrics_dir))
    finally:
        if temporary is not None:
            temporary.cleanup()
