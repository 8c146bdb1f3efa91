"""`lma serve`: the HTTP server (registered through the lma.commands entry point).

    lma serve artifacts/ --port 8000                  # every model of a repository, 127.0.0.1:8000
    lma serve artifacts/criteo/3 --runtime torchscript
    LMA_MAX_BATCH_SIZE=512 lma serve artifacts/ --workers 2

Settings not given as options come from ``LMA_*`` environment variables (server/settings.py);
they are validated before anything starts. With ``--workers N`` each worker process loads its own
copy of the models and metrics are aggregated across workers through a Prometheus multiprocess
directory (a fresh temporary one unless PROMETHEUS_MULTIPROC_DIR is set). SIGTERM (or Ctrl-C)
stops accepting connections, answers every accepted request, then exits 0.
"""

import argparse
import os
import signal
from pathlib import Path


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("serve", help="serve exported bundles over HTTP (native and Open Inference Protocol v2)")
    p.add_argument(
        "model_dir", type=Path, metavar="PATH", help="a bundle, or a repository of <name>/<version>/ bundles"
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="worker processes, each with its own copy of the models")
    p.add_argument("--runtime", choices=("onnx", "torchscript"), help="overrides LMA_RUNTIME (default onnx)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="overrides LMA_DEVICE (default auto)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import tempfile

    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    os.environ["LMA_MODEL_DIR"] = str(args.model_dir)
    if args.runtime:
        os.environ["LMA_RUNTIME"] = args.runtime
    if args.device:
        os.environ["LMA_DEVICE"] = args.device
    from server.settings import load_settings

    settings = load_settings()  # bad settings: one clear line, exit 2, before any worker starts
    from server.runtimes import runtime_class

    runtime_class(settings.runtime)  # a runtime whose extra is not installed: one line, exit 2
    metrics_dir = None
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.TemporaryDirectory(prefix="lma-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir.name
    import uvicorn

    from server.logs import configure_logging

    configure_logging(settings.log_level)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to whatever handler was there
    # before it: make that a no-op so a graceful stop exits with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    try:
        uvicorn.run(
            "server.app:app_from_env",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_config=None,  # keep our JSON logging
            access_log=False,  # the app writes its own access lines
            log_level=settings.log_level,
            timeout_graceful_shutdown=int(settings.drain_timeout_s) + 1,
        )
    finally:
        if metrics_dir is not None:
            metrics_dir.cleanup()
    return 0
