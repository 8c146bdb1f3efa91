"""The server's HTTP protocol (server/http_protocol.py) through real uvicorn: admission as the headers arrive,
refusals that never read the body, one write per response, 100-continue, keep-alive after a refusal, scoring
replies written whole (the same bytes as under stock uvicorn), pipelining; and the access log, written by its
own thread."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from server.app import build_app
from server.http import Reply
from tests.helpers.serving import Bundles, LiveServer, instance, make_repo, settings_for

PREDICT = "/v1/models/criteo:predict"
PREDICT_ROUTE = "/v1/models/{name}:predict"


@pytest.fixture(scope="module")
def repo(bundles: Bundles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tmp_path_factory.mktemp("protocol-repo"), bundles.criteo_v1)


@pytest.fixture(scope="module")
def live(repo: Path) -> Iterator[LiveServer]:
    # a lone request waits up to 300 ms for company: a deadline under that cannot be met
    with LiveServer(build_app(settings_for(repo, max_wait_ms=300, access_log=True))) as server:
        yield server


def _read_response(
    s: socket.socket, timeout: float = 10.0, buffer: bytearray | None = None
) -> tuple[int, dict[str, str], bytes]:
    """The next response on ``s``; bytes read past its end stay in ``buffer`` for the next call (pipelining)."""
    s.settimeout(timeout)
    data = bytearray() if buffer is None else buffer
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed after {bytes(data)!r}")
        data += chunk
    end = data.index(b"\r\n\r\n")
    lines = data[:end].decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(data) < end + 4 + length:
        data += s.recv(65536)
    body = bytes(data[end + 4 : end + 4 + length])
    del data[: end + 4 + length]
    return int(lines[0].split()[1]), headers, body


def _request_head(length: int, timeout_ms: float | None = None, extra: str = "") -> bytes:
    timeout = f"X-Request-Timeout-Ms: {timeout_ms}\r\n" if timeout_ms is not None else ""
    return (
        f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
        f"{timeout}{extra}\r\n"
    ).encode()


def test_a_refusal_is_answered_before_the_body_is_sent(live: LiveServer) -> None:
    body = json.dumps({"instances": [instance()]}).encode()
    with socket.create_connection(("127.0.0.1", live.port)) as s:
        s.sendall(_request_head(len(body), timeout_ms=50))  # the headers only: the body is never sent before...
        status, headers, answer = _read_response(s)  # ...the 503 arrives
        assert (status, headers["retry-after"]) == (503, "1") and headers["x-request-id"]
        assert json.loads(answer)["kind"] == "overloaded"
        # the connection carries on: the body the client sends anyway is skipped, the next request is served
        s.sendall(body)
        s.sendall(_request_head(len(body)) + body)
        status, headers, answer = _read_response(s)
        assert status == 200 and len(json.loads(answer)["predictions"]) == 1
    metrics = httpx.get(f"{live.url}/metrics").text
    assert 'lma_rejected_total{model="criteo",reason="predicted_wait"} 1.0' in metrics
    assert 'lma_requests_total{code="503",model="criteo",route="/v1/models/{name}:predict"} 1.0' in metrics


def test_connection_close_after_a_refusal(live: LiveServer) -> None:
    with socket.create_connection(("127.0.0.1", live.port)) as s:
        s.sendall(_request_head(10, timeout_ms=50, extra="Connection: close\r\n"))
        status, headers, _ = _read_response(s)
        assert status == 503 and headers["connection"] == "close"
        assert s.recv(10) == b""  # and the server closed it


@pytest.mark.parametrize("http", ["server.http_protocol:LmaHttpProtocol", "httptools"])
def test_a_stalled_upload_neither_shuts_out_other_requests_nor_lasts(
    bundles: Bundles, tmp_path: Path, http: str
) -> None:
    # The headers of a request whose body never comes. Waiting on a client is no work of the server's: with
    # the request counted as in the process for the whole stall, every other request looked as if it waited
    # behind it and was refused (503, "would wait about 126 ms"), for as long as the client held on.
    repo = make_repo(tmp_path / "repo", bundles.criteo_v1)
    body = json.dumps({"instances": [instance()]}).encode()
    with (
        LiveServer(build_app(settings_for(repo, max_queue_delay_ms=100)), http=http) as server,
        socket.create_connection(("127.0.0.1", server.port)) as stalled,
        httpx.Client(base_url=server.url) as client,
    ):
        assert client.post(PREDICT, content=body).status_code == 200
        stalled.sendall(_request_head(500, timeout_ms=1600))
        start = time.monotonic()
        codes = []
        while time.monotonic() - start < 1.2:  # each request alone in one of the occupancy estimate's windows
            codes.append(client.post(PREDICT, content=body).status_code)
            time.sleep(0.2)
        assert codes and set(codes) == {200}, codes
        # the stalled request ends at its deadline, with 408, and its connection is closed
        status, headers, answer = _read_response(stalled)
        assert time.monotonic() - start >= 1.5
        assert (status, headers["connection"]) == (408, "close")
        assert json.loads(answer) == {
            "error": json.loads(answer)["error"],
            "kind": "request_timeout",
        } and json.loads(answer)["error"].startswith("the request body did not arrive by the request's deadline (")
        assert stalled.recv(10) == b""
        metrics = client.get("/metrics").text
        assert (
            f'lma_requests_total{{code="200",model="criteo",route="/v1/models/{{name}}:predict"}} {len(codes) + 1}.0'
            in metrics
        )
        assert 'lma_requests_total{code="408",model="criteo",route="/v1/models/{name}:predict"} 1.0' in metrics
        assert client.post(PREDICT, content=body).status_code == 200


def test_expect_100_continue_is_answered_at_once(live: LiveServer) -> None:
    body = json.dumps({"instances": [instance()]}).encode()
    with socket.create_connection(("127.0.0.1", live.port)) as s:
        s.sendall(_request_head(len(body), extra="Expect: 100-continue\r\n"))
        s.settimeout(10)
        assert s.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")  # not held back with the answer
        s.sendall(body)
        status, _, answer = _read_response(s)
        assert status == 200 and json.loads(answer)["model"] == "criteo"


def test_every_answer_is_whole(live: LiveServer) -> None:
    with httpx.Client(base_url=live.url) as client:
        head = client.head("/v2/health/live")  # an answer without a body: the held-back headers still go out
        assert head.status_code == 405 and head.content == b"" and head.headers["x-request-id"]
        for _ in range(3):  # keep-alive: each answer complete, none glued to the next
            r = client.post(PREDICT, json={"instances": [instance(), instance(1)]})
            assert r.status_code == 200 and len(r.json()["predictions"]) == 2
        assert client.get("/v2/health/ready").json() == {"ready": True}


def test_a_percent_encoded_path_names_the_same_model(live: LiveServer) -> None:
    # the early admission matched the raw path, so under `lma serve` (not under stock uvicorn) this was a 404
    with socket.create_connection(("127.0.0.1", live.port)) as s:
        body = json.dumps({"instances": [instance()]}).encode()
        for path in ("/v1/models/crit%65o:predict", "/v2/models/%63riteo/infer"):
            v2 = path.startswith("/v2")
            payload = (
                json.dumps({"inputs": [
                    {"name": "dense", "shape": [1, 13], "datatype": "FP32", "data": instance()["dense"]},
                    {"name": "categorical", "shape": [1, 26], "datatype": "BYTES", "data": instance()["categorical"]},
                ]}).encode() if v2 else body
            )  # fmt: skip
            s.sendall(_request_head(len(payload)).replace(PREDICT.encode(), path.encode()) + payload)
            status, _, answer = _read_response(s)
            assert status == 200, answer
            assert json.loads(answer)["model_name" if v2 else "model"] == "criteo"


def test_the_access_log_is_written_off_the_event_loop(live: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lma.server.access"):
        r = httpx.post(f"{live.url}{PREDICT}", json={"instances": [instance()]}, headers={"x-request-id": "log-1"})
        assert r.status_code == 200
        deadline = time.monotonic() + 10
        while not any(getattr(x, "fields", {}).get("request_id") == "log-1" for x in caplog.records):
            assert time.monotonic() < deadline, "no access line"
            time.sleep(0.01)
    (record,) = [x for x in caplog.records if getattr(x, "fields", {}).get("request_id") == "log-1"]
    assert record.threadName == "lma-access-log"
    fields = record.fields  # type: ignore[attr-defined]
    assert (fields["route"], fields["status"], fields["model"], fields["version"]) == (
        "/v1/models/{name}:predict", 200, "criteo", "1",
    )  # fmt: skip
    assert fields["duration_ms"] > 0 and "parse_ms" in fields and "model_ms" in fields
    assert "t0" not in json.dumps(fields)  # never the payload (instance tokens are t0..t49)


def _scoring_requests() -> list[bytes]:
    ok = json.dumps({"instances": [instance(), instance(1)]}).encode()
    bad = json.dumps({"instances": [{"dense": [1.0]}]}).encode()
    return [
        _request_head(len(ok), extra="X-Request-ID: same-1\r\n") + ok,  # 200
        _request_head(len(bad), extra="X-Request-ID: same-2\r\n") + bad,  # 422, the error contract's message
        _request_head(2, extra="X-Request-ID: same-3\r\n").replace(b"criteo:", b"nope:") + b"{}",  # 404
        f"GET {PREDICT} HTTP/1.1\r\nHost: x\r\nX-Request-ID: same-4\r\n\r\n".encode(),  # 405
    ]


def _whole_answer(port: int, request: bytes) -> bytes:
    """The whole answer to ``request`` (alone on a connection that it closes), its Date header taken out."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(request.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n"))
        s.settimeout(10)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return b"\r\n".join(line for line in head.split(b"\r\n") if not line.lower().startswith(b"date:")) + b"|" + body


def test_scoring_replies_are_the_bytes_stock_uvicorn_sends(live: LiveServer, repo: Path) -> None:
    """The protocol writes a scoring reply itself (not as ASGI messages): status line, headers in their order,
    connection: close and body are what uvicorn's own HTTP protocol makes of the app's messages."""
    with LiveServer(build_app(settings_for(repo, max_wait_ms=300)), http="httptools") as stock:
        for request in _scoring_requests():
            ours, theirs = _whole_answer(live.port, request), _whole_answer(stock.port, request)
            assert ours == theirs
            assert ours.split(b" ", 2)[1] in (b"200", b"422", b"404", b"405")


def test_scoring_replies_are_not_asgi_messages(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []
    send = RequestResponseCycle.send

    async def counted(self: RequestResponseCycle, message: object) -> None:
        sent.append(self.scope["path"])
        await send(self, message)  # type: ignore[arg-type]

    monkeypatch.setattr(RequestResponseCycle, "send", counted)
    with httpx.Client(base_url=live.url) as client:
        assert client.post(PREDICT, json={"instances": [instance()]}).status_code == 200
        assert client.post(PREDICT, json={"instances": []}).status_code == 422
        assert client.get("/v2/health/ready").status_code == 200
    assert sent == ["/v2/health/ready", "/v2/health/ready"]  # FastAPI's routes: start and body, as ASGI


def test_pipelined_requests_are_answered_in_order(live: LiveServer) -> None:
    body = json.dumps({"instances": [instance(2)]}).encode()
    requests = [
        _request_head(len(body), extra="X-Request-ID: p-1\r\n") + body,
        b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Request-ID: p-2\r\n\r\n",
        _request_head(len(body), extra="X-Request-ID: p-3\r\n") + body,
        _request_head(len(body), timeout_ms=50, extra="X-Request-ID: p-4\r\n") + body,  # unmeetable: 503
    ]
    with socket.create_connection(("127.0.0.1", live.port)) as s:
        s.sendall(b"".join(requests))  # one write: the server reads them all before it answers the first
        buffer = bytearray()
        answers = [_read_response(s, buffer=buffer) for _ in requests]
    assert [(status, headers["x-request-id"]) for status, headers, _ in answers] == [
        (200, "p-1"), (200, "p-2"), (200, "p-3"), (503, "p-4"),
    ]  # fmt: skip
    assert json.loads(answers[0][2]) == json.loads(answers[2][2])  # the same row, the same score
    assert json.loads(answers[1][2]) == {"ready": True}


def test_a_reply_that_cannot_be_written_is_a_500_and_the_server_serves_on(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    http11 = Reply.http11

    def failing(self: Reply, *args: object) -> bytes:
        if b"predictions" in self.body:
            raise RuntimeError("cannot render")
        return http11(self, *args)  # type: ignore[arg-type]

    before = _requests_total(live, "500")
    with monkeypatch.context() as patch:
        patch.setattr(Reply, "http11", failing)
        r = httpx.post(f"{live.url}{PREDICT}", json={"instances": [instance()]})
        assert (r.status_code, r.text) == (500, "Internal Server Error")  # uvicorn's, as for any app that fails
    assert _requests_total(live, "500") == before + 1  # counted as what the client got
    r = httpx.post(f"{live.url}{PREDICT}", json={"instances": [instance()]})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1


def _requests_total(live: LiveServer, code: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{live.url}/metrics").text):
        for s in family.samples:
            if s.name == "lma_requests_total" and s.labels == {"code": code, "model": "criteo", "route": PREDICT_ROUTE}:
                return s.value
    return 0.0
