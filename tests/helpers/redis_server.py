"""A private ``redis-server`` for tests: started on a free loopback port in a temporary folder.

Tests that need Redis behaviour (timeouts, a server that goes away and comes back) must own their
server, so they never touch the shared one on 6379. :class:`RedisServer` starts ``redis-server`` as a
child process with no persistence, waits until it answers PING, and can be stopped and restarted on
the same port (the same URL) to test reconnection. A missing binary fails the test with a message
that says what to install: CI has one, so a silent skip would hide a broken setup.

Example::

    with RedisServer(tmp_path) as server:
        r = server.client()          # a synchronous redis.Redis
        r.set("k", "v")
        server.pause()               # a hung server: requests time out
        server.resume()
        server.stop()                # clients now get connection errors
        server.start()               # same port, empty data set
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest
import redis

from loadtest.bench.process import free_port

START_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    """Path of ``redis-server``; fails the calling test with an install hint when there is none."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(
            "redis-server is not on PATH: the tests marked `redis` start a private Redis server. "
            "Install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis) and rerun.",
            pytrace=False,
        )
    return path


class RedisServer:
    """One ``redis-server`` child process on 127.0.0.1; :attr:`url` stays the same across restarts."""

    def __init__(self, workdir: Path, port: int | None = None, password: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = port if port is not None else free_port()
        self.password = password
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f"default:{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self) -> redis.Redis:
        """A synchronous client with short timeouts (for setting up and checking tests)."""
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5, decode_responses=True)

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        log = open(self.workdir / f"redis-{self.port}.log", "ab")  # noqa: SIM115 (the child owns it)
        self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        probe = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    log = (self.workdir / f"redis-{self.port}.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"redis-server on port {self.port} exited with {self._proc.returncode}:\n{log}")
                try:
                    if probe.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not answer PING in {START_TIMEOUT_S} s")
                time.sleep(0.02)
        finally:
            probe.close()

    def stop(self) -> None:
        """Kill the server at once (no save): like a crash or a lost network, clients see closed sockets."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait(timeout=10)
        self._proc = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it accepts connections but answers nothing, like a hung Redis."""
        assert self._proc is not None, "not running"
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause`: the server answers everything queued meanwhile."""
        assert self._proc is not None, "not running"
        self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
