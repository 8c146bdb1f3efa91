"""Serving on every core: N uvicorn worker processes, each with its own listening socket on one port.

Each worker binds ``host:port`` with ``SO_REUSEPORT`` and starts listening only once its models are loaded
and warm (uvicorn's lifespan runs first), so the kernel hands new connections to workers that can answer,
spread evenly by connection (a shared listening socket instead lets whichever worker wakes first take
them all: measured in docs/BENCHMARKS.md). Every worker has its own batcher per model and ONNX Runtime
threads sized so workers do not fight over cores (:func:`server.settings.runtime_threads`).

The supervisor (:func:`serve`) reserves the port (a bound, never listening socket: it also resolves port
0), starts the workers, restarts one that dies (at most ``MAX_RESTARTS`` in ``RESTART_WINDOW_S``, then it
stops them all and fails), and on SIGTERM / SIGINT forwards SIGTERM to every worker, which stops accepting,
answers what it has accepted and exits; the supervisor then exits 0. Workers die with it (``PR_SET_PDEATHSIG``).
With one worker everything runs in this process, without a supervisor.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

log = logging.getLogger("lma.server.workers")

STARTUP_FAILURE = 3  # uvicorn's exit status when the app's start-up fails (bad bundle, bad settings)
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ServeOptions:
    """What every worker needs to run uvicorn (picklable: workers are spawned, not forked)."""

    host: str
    port: int
    log_level: str
    drain_timeout_s: float
    backlog: int
    workers: int


def uvicorn_kwargs(options: ServeOptions) -> dict[str, Any]:
    """The uvicorn settings of ``lma serve``, one process or many (see :mod:`server.http_protocol`)."""
    return {
        "factory": True,
        "log_config": None,  # keep our JSON logging
        "access_log": False,  # the app writes its own access lines, off the event loop
        "log_level": options.log_level,
        "timeout_graceful_shutdown": int(options.drain_timeout_s) + 1,
        "http": "server.http_protocol:LmaHttpProtocol",
        "loop": "uvloop",
        "proxy_headers": False,
        "backlog": options.backlog,
    }


def bind_socket(host: str, port: int, exclusive: bool = False) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT (not listening yet).

    ``exclusive``: first make sure no other server listens there. SO_REUSEPORT lets any process of the same
    user join a port, so a second ``lma serve`` on a port in use would otherwise start, and the kernel would
    split the connections between the two servers (and their models).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if exclusive and port != 0:
        with socket.socket(family, socket.SOCK_STREAM) as probe:  # no SO_REUSEPORT: refused where one listens
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections in TIME_WAIT do not count
            try:
                probe.bind((host, port))
            except OSError as e:
                raise ValueError(
                    f"cannot listen on {host}:{port}: {e.strerror} (another server listens there?)"
                ) from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _worker(options: ServeOptions, index: int) -> None:
    """One worker process: its own SO_REUSEPORT socket, the app from ``LMA_*``, uvicorn until SIGTERM."""
    _die_with_parent()
    import uvicorn

    from server.logs import configure_logging

    configure_logging(options.log_level)
    os.environ["LMA_WORKER_INDEX"] = str(index)
    sock = bind_socket(options.host, options.port)
    config = uvicorn.Config("server.app:app_from_env", **uvicorn_kwargs(options))
    uvicorn.Server(config).run(sockets=[sock])


class Supervisor:
    """Starts, watches and stops the worker processes (see the module docstring)."""

    def __init__(self, options: ServeOptions, on_dead: Callable[[int], None] | None = None) -> None:
        self.options = options
        self.on_dead = on_dead
        self._ctx = multiprocessing.get_context("spawn")
        self.procs: list[BaseProcess | None] = [None] * options.workers
        self._restarts: list[float] = []
        self._stopping = False

    def _start(self, index: int) -> None:
        proc = self._ctx.Process(target=_worker, args=(self.options, index), name=f"lma-worker-{index}")
        proc.start()
        self.procs[index] = proc
        log.info("started worker %d (pid %d)", index, proc.pid)

    def stop(self, *_: object) -> None:
        self._stopping = True

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        for i in range(self.options.workers):
            self._start(i)
        failed = False
        while not self._stopping:
            time.sleep(0.2)
            for i, proc in enumerate(self.procs):
                if proc is None or proc.is_alive() or self._stopping:
                    continue
                code = proc.exitcode
                assert proc.pid is not None
                if self.on_dead is not None:
                    self.on_dead(proc.pid)
                now = time.monotonic()
                self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S]
                if code == STARTUP_FAILURE or len(self._restarts) >= MAX_RESTARTS:
                    why = "could not start" if code == STARTUP_FAILURE else f"died {MAX_RESTARTS} times in a minute"
                    log.error("worker %d (pid %d) %s (exit %s): stopping", i, proc.pid, why, code)
                    failed = True
                    self._stopping = True
                    break
                log.error("worker %d (pid %d) died (exit %s): restarting it", i, proc.pid, code)
                self._restarts.append(now)
                self._start(i)
        return self._shutdown(failed)

    def _shutdown(self, failed: bool) -> int:
        alive = [p for p in self.procs if p is not None and p.is_alive()]
        for p in alive:
            assert p.pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.options.drain_timeout_s + 10
        for p in alive:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                log.error("worker pid %d did not stop in time: killing it", p.pid)
                p.kill()
                p.join()
        codes = [p.exitcode for p in self.procs if p is not None]
        return 1 if failed or any(c not in (0, -signal.SIGTERM) for c in codes) else 0


def serve(options: ServeOptions, on_dead: Callable[[int], None] | None = None) -> int:
    """Run ``options.workers`` workers on ``host:port`` until SIGTERM/SIGINT; the exit status."""
    reserved = bind_socket(options.host, options.port, exclusive=True)  # fails here, once, if the port is taken
    port = reserved.getsockname()[1]
    log.info("listening on %s:%d with %d workers", options.host, port, options.workers)
    try:
        return Supervisor(ServeOptions(**{**options.__dict__, "port": port}), on_dead).run()
    finally:
        reserved.close()
