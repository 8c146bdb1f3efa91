"""End to end: the real `lma serve` process on a free port, under load.

- hot swaps (admin reload, then a new version published into the watched repository) while
  requests keep coming: not one request fails, and each answer names the version that scored it;
- SIGTERM while requests wait in the queue: every accepted request is answered, exit status 0;
- two worker processes: /metrics of either one counts the requests of both, and the log has the access
  lines of both.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from export.exporter import export_run
from loadtest.bench.process import ServerProcess
from tests.helpers.serving import (
    ADMIN_TOKEN,
    TOKENS,
    Bundles,
    export_bundles,
    flip_a_byte,
    instance,
    make_repo,
    serve,
)
from tests.helpers.traffic import PREDICT, Traffic


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    return export_bundles(tmp_path_factory.mktemp("e2e-bundles"))


def one_instance(i: int) -> list[dict[str, object]]:
    return [instance(i)]


def test_hot_swaps_under_load_fail_no_request(bundles: Bundles, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", bundles.criteo_v1)
    server = serve(repo, tmp_path / "server.log", LMA_WATCH_INTERVAL_S="0.2", LMA_MAX_WAIT_MS="2")
    try:
        server.wait_ready()
        with Traffic([(f"client {k}", server.url, one_instance) for k in range(3)]) as load:
            load.wait("10 answers for every client", lambda: all(len(o) >= 10 for o in load.per_thread()))
            r = httpx.post(
                f"{server.url}/v1/models/criteo:reload",
                headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                json={"path": str(bundles.criteo_v2.path)},
                timeout=60,
            )
            assert r.status_code == 200 and r.json()["version"] == "2"
            mark = load.count()
            load.wait("30 more answers", lambda: load.count() >= mark + 30)
            # publish version 3 the way `lma export` does (hidden folder, then an atomic rename)
            export_run(bundles.repo.parent / "runs" / "criteo1", repo / "criteo", version="3")
            load.wait("version 3 serving", lambda: any(o.version == "3" for o in load.outcomes[-3:]))
            mark = load.count()
            load.wait("30 more answers", lambda: load.count() >= mark + 30)
        for outcomes in load.per_thread():
            assert all(o.status == 200 for o in outcomes), [o for o in outcomes if o.status != 200][:5]
            versions = [str(o.version) for o in outcomes]
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
    repo = make_repo(tmp_path / "repo", bundles.criteo_v1, bundles.avazu)
    # criteo's requests wait up to 3 s in the queue for company (their deadline is 30 s): all 6 are surely
    # accepted and waiting when SIGTERM comes; the background load goes to avazu, whose queue is its own
    waits = {"LMA_MAX_WAIT_MS": "3000", "LMA_REQUEST_TIMEOUT_MS": "30000", "LMA_MAX_QUEUE_DELAY_MS": "0"}
    server = serve(repo, tmp_path / "server.log", LMA_MAX_BATCH_SIZE="1000", **waits)
    with server:  # stopped whatever happens
        _sigterm_with_requests_queued(server, bundles)


def _sigterm_with_requests_queued(server: ServerProcess, bundles: Bundles) -> None:
    server.wait_ready()
    queued: list[httpx.Response | Exception] = []

    def one(i: int) -> None:
        try:
            queued.append(httpx.post(f"{server.url}{PREDICT}", json={"instances": [instance(i)]}, timeout=30))
        except Exception as e:  # a lost accepted request shows up here
            queued.append(e)

    avazu = [{"categorical": TOKENS[: bundles.avazu.schema.num_fields]}]
    background = [(f"background {k}", server.url, lambda i: avazu) for k in range(2)]
    with Traffic(background, path="/v1/models/avazu:predict", fresh_connections=True) as load:
        waiting = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for w in waiting:
            w.start()
        load.wait("6 requests queued", lambda: server.metric("lma_queue_depth", model="criteo") >= 6)
        server.proc.send_signal(signal.SIGTERM)
        for w in waiting:
            w.join(timeout=60)
        assert server.stop(terminate=False) == 0  # the one SIGTERM above stops it
    assert len(queued) == 6
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in queued), queued
    # the background load: answered 200, or never let in
    assert all(o.status == 200 or o.body == {"error": "ConnectError"} for o in load.outcomes), load.outcomes
    log = server.logs()
    assert [e["msg"] for e in log if e["msg"] in ("shutting down: finishing queued requests", "stopped")] == [
        "shutting down: finishing queued requests",
        "stopped",
    ]
    assert all("instances" not in json.dumps(e) for e in log)  # never a payload in the logs


def test_two_workers_share_their_metrics(bundles: Bundles, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", bundles.criteo_v1)
    server = serve(repo, tmp_path / "server.log", workers=2)
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
        # both workers' access lines, written in batches into the one log, every one whole (the last batch at
        # shutdown: tests/server/test_access_log.py)
        access = [e for e in server.logs() if e["logger"] == "lma.server.access" and e["route"] == route["route"]]
        assert sorted(e["status"] for e in access) == [200] * 20
        assert len({e["request_id"] for e in access}) == 20
    finally:
        server.stop()


def _lma_serve(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "models.main", "serve", *args, "--host", "127.0.0.1"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_what_start_up_would_refuse_is_one_line_before_any_worker(bundles: Bundles, tmp_path: Path) -> None:
    # a bad bundle (or key, or device) was a worker's traceback after uvicorn started (exit 3, or 1 with
    # workers); now the command checks them first and says what is wrong in one line (exit 2)
    bad = make_repo(tmp_path / "repo", bundles.criteo_v1) / "criteo" / "1"
    flip_a_byte(bad / "model.onnx")
    done = _lma_serve(str(bad), "--port", "0", "--workers", "2")
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"lma serve: error: LMA_MODEL_DIR: model 'criteo' cannot be loaded: {bad / 'model.onnx'}")


def test_a_port_another_server_listens_on_is_refused(bundles: Bundles) -> None:
    # the workers bind with SO_REUSEPORT, which any process of the same user may share: a second `lma serve`
    # on a port in use once started, and the kernel split the connections between the two servers
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        done = _lma_serve(str(bundles.criteo_v1.path), "--port", str(port), "--workers", "2")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().endswith(
        f"lma serve: error: cannot listen on 127.0.0.1:{port}: Address already in use (another server listens there?)"
    )
