"""Server processes on free loopback ports, and what they use: the one way benchmarks and tests start a server.

:class:`ServerProcess` runs a command (``lma serve ...`` through :func:`lma_serve_command`, or the reference
server), waits until its readiness route answers 200, and stops it with SIGTERM (the exit status is
returned: a graceful stop is 0). :class:`ResourceSampler` samples the CPU time and resident memory of its
whole process tree (the supervisor and every worker).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lma_serve_command(model_dir: Path, port: int, workers: int = 0, runtime: str | None = None) -> list[str]:
    """``lma serve`` (as ``python -m models.main``, what the ``lma`` script runs) on 127.0.0.1:``port``.

    ``workers`` 0 leaves the server's default (one per core).
    """
    cmd = [sys.executable, "-m", "models.main", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
    if workers:
        cmd += ["--workers", str(workers)]
    if runtime:
        cmd += ["--runtime", runtime]
    return cmd


class ServerProcess:
    """A server process on a free loopback port, its output in ``log``.

    Args:
        command: the command, given the port it must listen on (e.g. ``lambda p: lma_serve_command(dir, p)``).
        env: variables on top of this process's environment (PROMETHEUS_MULTIPROC_DIR is never inherited).
        log: where stdout and stderr go.
        ready_path: the route that answers 200 once the server can serve.

    Example::

        with ServerProcess(lambda port: lma_serve_command(bundle, port), {"LMA_WORKERS": "1"}, log) as server:
            server.wait_ready()
            httpx.post(f"{server.url}/v1/predict", json=...)
        # stopped with SIGTERM; server.returncode is its exit status
    """

    def __init__(self, command: Any, env: dict[str, str], log: Path, ready_path: str = "/v2/health/ready") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.ready_path = ready_path
        environ = {**os.environ, **env}
        environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.command: Sequence[str] = command(self.port)
        self._log_file = log.open("ab")
        self.proc = subprocess.Popen(self.command, env=environ, stdout=self._log_file, stderr=subprocess.STDOUT)
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; end of {self.log}:\n{self.tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}{self.ready_path}", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"the server was not ready after {timeout_s:.0f} s; end of {self.log}:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")[-chars:]

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        if not self._log_file.closed:
            self._log_file.flush()
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def metric(self, name: str, **labels: str) -> float:
        """One sample of the server's /metrics (0 when absent)."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics", timeout=10).text):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
        return 0.0

    def stop(self, terminate: bool = True, timeout_s: float = 60.0) -> int:
        """Stop with SIGTERM (``terminate=False``: only wait) and return the exit status; killed if it hangs.

        Stopping a stopped server returns its exit status again."""
        if self.returncode is not None:
            return self.returncode
        if self.proc.poll() is None and terminate:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = self.proc.wait()
        finally:
            self._log_file.close()
        return self.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.returncode is None:
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
