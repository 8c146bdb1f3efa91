"""End to end: the real `lma serve` process on a free port, under load.

- hot swaps (admin reload, then a new version published into the watched repository) while
  requests keep coming: not one request fails, and each answer names the version that scored it;
- SIGTERM while requests wait in the queue: every accepted request is answered, exit status 0;
- two worker processes: /metrics of either one counts the requests of both.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).with_name("server")))  # the server tests' helpers
from serving_helpers import ADMIN_TOKEN, Bundles, export_bundles, free_port, instance, make_repo

from export.exporter import export_run

PREDICT = "/v1/models/criteo:predict"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    return export_bundles(tmp_path_factory.mktemp("e2e-bundles"))


class Server:
    """`python -m models.main serve ...` (what the `lma` script runs), JSON logs to a file."""

    def __init__(self, model_dir: Path, log: Path, workers: int = 1, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        environ = {**os.environ, "LMA_ADMIN_TOKEN": ADMIN_TOKEN, "LMA_INTRA_OP_THREADS": "1", **env}
        environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        cmd = [sys.executable, "-m", "models.main", "serve", str(model_dir), "--port", str(self.port)]
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen([*cmd, "--workers", str(workers)], env=environ, stderr=self._log_file)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("server not ready in time")

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
        return 0.0

    def stop(self, terminate: bool = True) -> int:
        """Exit status; ``terminate=False`` only waits (a second SIGTERM during the interpreter's own
        shutdown, when Python has restored the default handler, would kill it with -15)."""
        if terminate and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self._log_file.close()

    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


@dataclass
class Load:
    """Threads that post one-instance requests until stopped; every outcome is kept in order."""

    url: str
    threads: int = 3
    fresh_connections: bool = False
    outcomes: list[list[tuple[int, str]]] = field(default_factory=list)  # per thread: (status, version) or (-1, error)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for t in range(self.threads):
            self.outcomes.append([])
            w = threading.Thread(target=self._run, args=(t,), daemon=True)
            w.start()
            self._workers.append(w)
        return self

    def _run(self, t: int) -> None:
        limits = httpx.Limits(max_keepalive_connections=0 if self.fresh_connections else 1)
        with httpx.Client(base_url=self.url, timeout=30, limits=limits) as client:
            i = 0
            while not self._stop.is_set():
                i += 1
                try:
                    r = client.post(PREDICT, json={"instances": [instance(i)]})
                    self.outcomes[t].append((r.status_code, r.json().get("version", r.text)))
                except httpx.TransportError as e:
                    self.outcomes[t].append((-1, type(e).__name__))

    def count(self) -> int:
        return sum(len(o) for o in self.outcomes)

    def wait(self, condition: Any, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "load did not reach the expected state"
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(timeout=60)


def test_hot_swaps_under_load_fail_no_request(bundles: Bundles, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", bundles.criteo_v1)
    server = Server(repo, tmp_path / "server.log", LMA_WATCH_INTERVAL_S="0.2", LMA_MAX_WAIT_MS="2")
    try:
        server.wait_ready()
        with Load(server.url) as load:
            load.wait(lambda: load.count() >= 30)
            r = httpx.post(
                f"{server.url}/v1/models/criteo:reload",
                headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                json={"path": str(bundles.criteo_v2.path)},
                timeout=60,
            )
            assert r.status_code == 200 and r.json()["version"] == "2"
            mark = load.count()
            load.wait(lambda: load.count() >= mark + 30)
            # publish version 3 the way `lma export` does (hidden folder, then an atomic rename)
            export_run(bundles.repo.parent / "runs" / "criteo1", repo / "criteo", version="3")
            load.wait(lambda: any(v == "3" for o in load.outcomes for _, v in o[-3:]))
            mark = load.count()
            load.wait(lambda: load.count() >= mark + 30)
        for outcomes in load.outcomes:
            assert all(status == 200 for status, _ in outcomes), [o for o in outcomes if o[0] != 200][:5]
            versions = [v for _, v in outcomes]
            assert versions == sorted(versions, key=int)  # each client sees 1, then 2, then 3, never back
            assert versions[0] == "1" and versions[-1] == "3"
        assert server.metric("lma_model_reloads_total", model="criteo", result="ok") == 2
        assert server.metric("lma_model_reloads_total", model="criteo", result="failed") == 0
        assert server.stop() == 0
        reasons = [e.get("reason") for e in server.logs() if e.get("msg", "").startswith("model loaded")]
        assert reasons == ["startup", "admin", "watch"]
    finally:
        server.stop()


def test_sigterm_answers_every_accepted_request(bundles: Bundles, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", bundles.criteo_v1)
    # requests wait 300 ms in the queue, so some are surely accepted and waiting when SIGTERM comes
    server = Server(repo, tmp_path / "server.log", LMA_MAX_WAIT_MS="300", LMA_MAX_BATCH_SIZE="1000")
    server.wait_ready()
    queued: list[httpx.Response | Exception] = []

    def one(i: int) -> None:
        try:
            queued.append(httpx.post(f"{server.url}{PREDICT}", json={"instances": [instance(i)]}, timeout=30))
        except Exception as e:  # a lost accepted request shows up here
            queued.append(e)

    with Load(server.url, threads=2, fresh_connections=True) as load:
        waiting = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for w in waiting:
            w.start()
        load.wait(lambda: server.metric("lma_queue_depth", model="criteo") >= 6)
        server.proc.send_signal(signal.SIGTERM)
        for w in waiting:
            w.join(timeout=60)
        assert server.stop(terminate=False) == 0  # the one SIGTERM above stops it
    assert len(queued) == 6
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in queued), queued
    for outcomes in load.outcomes:  # the background load: answered 200, or never let in
        assert all(s == 200 or (s == -1 and v == "ConnectError") for s, v in outcomes), outcomes
    log = server.logs()
    assert [e["msg"] for e in log if e["msg"] in ("shutting down: finishing queued requests", "stopped")] == [
        "shutting down: finishing queued requests",
        "stopped",
    ]
    assert all("instances" not in json.dumps(e) for e in log)  # never a payload in the logs


def test_two_workers_share_their_metrics(bundles: Bundles, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", bundles.criteo_v1)
    server = Server(repo, tmp_path / "server.log", workers=2)
    try:
        server.wait_ready()
        for i in range(20):  # a new connection each: the kernel spreads them over both workers
            assert httpx.post(f"{server.url}{PREDICT}", json={"instances": [instance(i)]}).status_code == 200
        route = {"route": "/v1/models/{name}:predict", "code": "200", "model": "criteo"}
        # each worker applies its counts every 0.1 s (server.metrics.FLUSH_S); the one scraped, at once
        deadline = time.monotonic() + 10
        while server.metric("lma_requests_total", **route) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.metric("lma_requests_total", **route) == 20
        assert server.metric("lma_inference_samples_total", model="criteo") == 20
        assert (
            server.metric("lma_model_info", model="criteo", version="1", runtime="onnx", device="cpu", embedding="lma")
            == 1
        )
        assert server.stop() == 0
    finally:
        server.stop()
