"""A load generator that can drive thousands of requests/s from one core: raw HTTP/1.1 over asyncio protocols.

Locust spends most of a core on its own bookkeeping long before a fast server is busy; this generator does
as little as it can per request: every request is one pre-encoded ``bytes`` object (request line, headers
and body, built once from :mod:`loadtest.payloads`), sent on a keep-alive connection; a response is parsed
only as far as its status line and ``Content-Length``. Each completion appends one latency and one status to
compact arrays, handed back as NumPy arrays. Loopback only: this is a benchmark tool, not a client.

Two ways to drive a server:

- closed loop (:func:`closed_loop`): ``concurrency`` connections, each sends its next request as soon as the
  previous answer is in. Measures the throughput the server sustains at that concurrency.
- open loop (:func:`open_loop`): Poisson arrivals at ``rate`` requests/s, whatever the server does. Latency
  is measured from each request's *scheduled* send time, so a late generator or a stalled server shows up
  in the numbers instead of being hidden (no coordinated omission). At most ``max_connections`` requests
  are in flight; an arrival that finds every connection busy waits on the client for one (as a caller's
  request waits for a pooled connection), still timed from its scheduled send, and one that gets no answer
  within ``timeout_s`` of its schedule counts as a ``timeout``. Every scheduled arrival is accounted for:
  answered (by status) or failed (by kind), and :meth:`LoadResult.arrival_percentiles_ms` puts the failed
  ones into the latency distribution at the time the client gave up on them.

Example::

    requests = http_requests("127.0.0.1", 8000, "/v1/predict", pools.native_single.bodies)
    result = asyncio.run(closed_loop("127.0.0.1", 8000, requests, concurrency=32, duration_s=5))
    result.requests_per_s, result.percentiles_ms()      # (5123.4, {"p50": 5.9, "p95": ..., ...})
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import ipaddress
import itertools
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 95, 99)
_HEAD_END = b"\r\n\r\n"
_CONTENT_LENGTH = b"\r\ncontent-length:"
_CONNECTION_CLOSE = b"\r\nconnection: close"


def check_loopback(host: str) -> None:
    """Refuse anything but a loopback address: the generator must never load a machine it does not own."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError(f"the load generator only drives loopback servers (127.0.0.1, ::1, localhost), got {host!r}")


def http_request(host: str, port: int, path: str, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """One complete HTTP/1.1 POST (keep-alive) carrying the JSON ``body``, as bytes ready to write."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        "Accept: application/json",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def http_requests(host: str, port: int, path: str, bodies: Sequence[bytes]) -> tuple[bytes, ...]:
    """:func:`http_request` of every body (a pool of requests replayed round robin)."""
    if not bodies:
        raise ValueError("need at least one request body")
    return tuple(http_request(host, port, path, b) for b in bodies)


@dataclass
class LoadResult:
    """What one run measured.

    ``latency_ns`` and ``status`` have one entry per completed response (status 0 never appears there:
    transport failures are in ``errors``). Latency runs from the send time (closed loop) or the scheduled
    send time (open loop) to the last byte of the response.
    """

    mode: str  # "closed" or "open"
    duration_s: float  # from the first send to the last completion
    samples_per_request: int
    concurrency: int  # closed loop: connections; open loop: the in-flight bound
    rate: float | None  # open loop: target arrivals/s
    scheduled: int  # requests the run meant to send (closed loop: those it sent)
    sent: int
    latency_ns: np.ndarray  # int64 (completed,)
    status: np.ndarray  # int16 (completed,)
    errors: Counter[str] = field(default_factory=Counter)  # arrivals that got no answer, by kind
    waited_for_connection: int = 0  # open loop: arrivals that found every connection busy and waited on the client
    timeout_s: float = 10.0  # the client's time limit: failed arrivals count at it in arrival_percentiles_ms
    connect_errors: int = 0  # failed attempts to replace a lost connection (no request was sent on them)
    send_lag_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # open loop: send - schedule
    sample_bodies: dict[int, bytes] = field(default_factory=dict)  # the first body seen of each status
    client_cpu_s: float = 0.0  # CPU time the generator used during the run

    @property
    def completed(self) -> int:
        return int(self.status.size)

    @property
    def ok(self) -> int:
        return int(np.count_nonzero(self.status == 200))

    @property
    def requests_per_s(self) -> float:
        """Answered requests (any status) per second."""
        return self.completed / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def ok_per_s(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def samples_per_s(self) -> float:
        """Scored samples (of 200 responses) per second."""
        return self.ok_per_s * self.samples_per_request

    def status_counts(self) -> dict[int, int]:
        codes, counts = np.unique(self.status, return_counts=True)
        return {int(c): int(n) for c, n in zip(codes, counts, strict=True)}

    def percentiles_ms(self, status: int | None = 200) -> dict[str, float]:
        """p50/p95/p99/max latency in ms of the responses with ``status`` (None: all); NaN when there are none."""
        return _percentiles_ms(self.latency_ns if status is None else self.latency_ns[self.status == status])

    @property
    def failed(self) -> int:
        """Arrivals that got no answer: transport errors and timeouts."""
        return sum(self.errors.values())

    def arrival_percentiles_ms(self) -> dict[str, float]:
        """p50/p95/p99/max over every arrival: answers at their latency (any status), failures at the timeout."""
        lat = self.latency_ns
        if self.failed:
            lat = np.concatenate([lat, np.full(self.failed, int(self.timeout_s * 1e9), np.int64)])
        return _percentiles_ms(lat)

    def goodput_per_s(self, deadline_s: float) -> float:
        """200 answers that arrived within ``deadline_s`` of their (scheduled) send, per second."""
        good = np.count_nonzero((self.status == 200) & (self.latency_ns <= int(deadline_s * 1e9)))
        return good / self.duration_s if self.duration_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """Plain numbers (JSON-friendly) for reports."""
        lag = self.send_lag_ns
        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "duration_s": round(self.duration_s, 3),
            "scheduled": self.scheduled,
            "sent": self.sent,
            "completed": self.completed,
            "ok": self.ok,
            "requests_per_s": self.requests_per_s,
            "ok_per_s": self.ok_per_s,
            "samples_per_s": self.samples_per_s,
            "latency_ms": self.percentiles_ms(200),
            "latency_all_ms": self.percentiles_ms(None),
            "latency_503_ms": self.percentiles_ms(503),
            "latency_arrivals_ms": self.arrival_percentiles_ms(),
            "status": self.status_counts(),
            "errors": dict(self.errors),
            "waited_for_connection": self.waited_for_connection,
            "connect_errors": self.connect_errors,
            "send_lag_ms_p99": float(np.percentile(lag, 99)) / 1e6 if lag.size else 0.0,
            "client_cpu_s": round(self.client_cpu_s, 3),
        }


def _percentiles_ms(latency_ns: np.ndarray) -> dict[str, float]:
    if latency_ns.size == 0:
        return {f"p{q}": float("nan") for q in PERCENTILES} | {"max": float("nan")}
    values = np.percentile(latency_ns, PERCENTILES) / 1e6
    out = {f"p{q}": float(v) for q, v in zip(PERCENTILES, values, strict=True)}
    out["max"] = float(latency_ns.max()) / 1e6
    return out


class _Recorder:
    """Shared state of one run: where completions are written and what happens after each one."""

    def __init__(self, requests: Sequence[bytes]) -> None:
        self.requests: Iterator[bytes] = itertools.cycle(requests)
        self.latency = array.array("q")
        self.status = array.array("h")
        self.errors: Counter[str] = Counter()
        self.sample_bodies: dict[int, bytes] = {}
        self.sent = 0
        self.connect_errors = 0
        self.last_done = 0

    def record(self, conn: _Connection, status: int, body: bytes | bytearray, now: int) -> None:
        self.latency.append(now - conn.t0)
        self.status.append(status)
        self.last_done = now
        if status not in self.sample_bodies:
            self.sample_bodies[status] = bytes(body)

    def fail(self, kind: str) -> None:
        self.errors[kind] += 1
        self.last_done = time.perf_counter_ns()

    # called by connections
    def on_response(self, conn: _Connection, status: int, body: bytes | bytearray) -> None:
        self.record(conn, status, body, time.perf_counter_ns())
        if conn.closed:
            self.on_lost(conn, in_flight=False)
        else:
            self.on_free(conn)

    def on_free(self, conn: _Connection) -> None:
        """``conn`` answered and can take the next request."""
        raise NotImplementedError

    def on_lost(self, conn: _Connection, in_flight: bool) -> None:
        raise NotImplementedError


class _Connection(asyncio.Protocol):
    """One keep-alive connection: write a request, parse the status line and Content-Length of its answer."""

    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.t0 = 0  # send (or scheduled) time of the request in flight, perf_counter_ns
        self.busy = False
        self.closed = False
        self._need = -1  # bytes of the whole response once its head is parsed
        self._head = 0
        self._status = 0
        self._close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's

    def send(self, request: bytes, t0: int) -> None:
        assert self.transport is not None
        self.t0 = t0
        self.busy = True
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while buf:
            if self._need < 0:
                end = buf.find(_HEAD_END)
                if end < 0:
                    return
                head = bytes(buf[:end]).lower()
                try:
                    self._status = int(head[9:12])
                    start = head.index(_CONTENT_LENGTH) + len(_CONTENT_LENGTH)
                    stop = head.find(b"\r\n", start)
                    length = int(head[start : stop if stop >= 0 else len(head)])
                except ValueError:
                    self._protocol_error()
                    return
                self._head = end + 4
                self._need = self._head + length
                self._close_after = _CONNECTION_CLOSE in head
            if len(buf) < self._need:
                return
            body = buf[self._head : self._need]
            del buf[: self._need]
            self._need = -1
            if not self.busy:  # an answer nobody asked for
                self._protocol_error()
                return
            self.busy = False
            if self._close_after:
                self.closed = True
                assert self.transport is not None
                self.transport.close()
            self.recorder.on_response(self, self._status, body)

    def _protocol_error(self) -> None:
        busy, self.busy = self.busy, False
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        if busy:
            self.recorder.fail("bad_response")
        self.recorder.on_lost(self, in_flight=False)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed and not self.busy:
            return  # we closed it after a complete answer (or a protocol error already counted)
        busy, self.busy = self.busy, False
        self.closed = True
        if busy:
            self.recorder.fail("connection_lost")
        self.recorder.on_lost(self, in_flight=busy)

    def abort(self, kind: str) -> None:
        """Give up on the request in flight (timeout): count it and drop the connection."""
        if not self.busy:
            return
        self.busy = False
        self.closed = True
        self.recorder.fail(kind)
        if self.transport is not None:
            self.transport.abort()
        self.recorder.on_lost(self, in_flight=False)


async def _connect(host: str, port: int, recorder: _Recorder) -> _Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: _Connection(recorder), host, port)
    return conn


async def _connect_many(host: str, port: int, recorder: _Recorder, n: int, chunk: int = 256) -> list[_Connection]:
    """``n`` connections, opened ``chunk`` at a time so that the server's listen backlog never overflows."""
    conns: list[_Connection] = []
    for start in range(0, n, chunk):
        conns += await asyncio.gather(*(_connect(host, port, recorder) for _ in range(min(chunk, n - start))))
    return conns


class _Closed(_Recorder):
    def __init__(self, requests: Sequence[bytes], host: str, port: int, end_ns: int) -> None:
        super().__init__(requests)
        self.host, self.port = host, port
        self.end_ns = end_ns
        self.conns: list[_Connection] = []
        self.reconnects: set[asyncio.Task[None]] = set()
        self.idle = asyncio.Event()

    def _check_done(self) -> None:
        if not self.reconnects and not any(c.busy for c in self.conns):
            self.idle.set()

    def send_next(self, conn: _Connection) -> None:
        now = time.perf_counter_ns()
        if now >= self.end_ns:
            self._check_done()
            return
        self.sent += 1
        conn.send(next(self.requests), now)

    def on_free(self, conn: _Connection) -> None:
        self.send_next(conn)

    def on_lost(self, conn: _Connection, in_flight: bool) -> None:
        with contextlib.suppress(ValueError):
            self.conns.remove(conn)
        task = asyncio.get_running_loop().create_task(self._reconnect())
        self.reconnects.add(task)
        task.add_done_callback(self._reconnected)

    def _reconnected(self, task: asyncio.Task[None]) -> None:
        self.reconnects.discard(task)
        if time.perf_counter_ns() >= self.end_ns:
            self._check_done()

    async def _reconnect(self) -> None:
        """A new connection in place of a lost one, retried until the run ends; it sends at once."""
        while time.perf_counter_ns() < self.end_ns:
            try:
                conn = await _connect(self.host, self.port, self)
            except OSError:
                self.connect_errors += 1
                await asyncio.sleep(0.05)
                continue
            self.conns.append(conn)
            self.send_next(conn)
            return


class _Open(_Recorder):
    def __init__(self, requests: Sequence[bytes], host: str, port: int) -> None:
        super().__init__(requests)
        self.host, self.port = host, port
        self.idle_conns: list[_Connection] = []
        self.conns: list[_Connection] = []
        self.lag = array.array("q")
        self.waiting: deque[int] = deque()  # scheduled times of arrivals waiting on the client for a connection
        self.waited = 0
        self.reconnects: set[asyncio.Task[None]] = set()
        self.idle = asyncio.Event()

    def _check_done(self) -> None:
        if len(self.idle_conns) == len(self.conns) and not self.waiting:
            self.idle.set()

    def on_free(self, conn: _Connection) -> None:
        """``conn`` can take a request: the oldest waiting arrival, else it idles."""
        if self.waiting:
            self._send(conn, self.waiting.popleft(), time.perf_counter_ns())
        else:
            self.idle_conns.append(conn)
            self._check_done()

    def on_lost(self, conn: _Connection, in_flight: bool) -> None:
        with contextlib.suppress(ValueError):
            self.conns.remove(conn)
        with contextlib.suppress(ValueError):
            self.idle_conns.remove(conn)
        self._check_done()
        task = asyncio.get_running_loop().create_task(self._reconnect())
        self.reconnects.add(task)
        task.add_done_callback(self.reconnects.discard)

    async def _reconnect(self) -> None:
        """A new idle connection in place of a lost one (one try: the pool shrinks if it fails)."""
        try:
            conn = await _connect(self.host, self.port, self)
        except OSError:
            self.connect_errors += 1
            return
        self.conns.append(conn)
        self.on_free(conn)

    def dispatch(self, scheduled_ns: int, now: int) -> None:
        self.idle.clear()
        if not self.idle_conns:
            self.waited += 1
            self.waiting.append(scheduled_ns)
            return
        self._send(self.idle_conns.pop(), scheduled_ns, now)

    def _send(self, conn: _Connection, scheduled_ns: int, now: int) -> None:
        self.sent += 1
        self.lag.append(now - scheduled_ns)
        conn.send(next(self.requests), scheduled_ns)

    def expire(self, now: int, timeout_ns: int) -> None:
        """Arrivals that waited for a connection longer than the timeout: the client gives up on them."""
        while self.waiting and now - self.waiting[0] > timeout_ns:
            self.waiting.popleft()
            self.fail("timeout")
        self._check_done()


async def _sweep_timeouts(conns: Any, timeout_ns: int, rec: _Open | None = None) -> None:
    """Abort requests in flight for longer than ``timeout_ns``, and expire arrivals that waited that long for a
    connection (checked every 50 ms)."""
    while True:
        await asyncio.sleep(0.05)
        now = time.perf_counter_ns()
        for conn in list(conns()):
            if conn.busy and now - conn.t0 > timeout_ns:
                conn.abort("timeout")
        if rec is not None:
            rec.expire(now, timeout_ns)


async def closed_loop(
    host: str, port: int, requests: Sequence[bytes], *, concurrency: int, duration_s: float,
    samples_per_request: int = 1, timeout_s: float = 10.0,
) -> LoadResult:  # fmt: skip
    """``concurrency`` connections sending back to back for ``duration_s``; requests in flight at the end finish."""
    check_loopback(host)
    if concurrency < 1 or duration_s <= 0:
        raise ValueError(f"need concurrency >= 1 and duration_s > 0, got {concurrency} and {duration_s}")
    rec = _Closed(requests, host, port, end_ns=0)
    rec.conns = await _connect_many(host, port, rec, concurrency)
    sweeper = asyncio.get_running_loop().create_task(_sweep_timeouts(lambda: rec.conns, int(timeout_s * 1e9)))
    with _no_gc():
        cpu0 = time.process_time()
        start = time.perf_counter_ns()
        rec.end_ns = start + int(duration_s * 1e9)
        for conn in list(rec.conns):
            rec.send_next(conn)
        try:
            await asyncio.wait_for(rec.idle.wait(), duration_s + timeout_s + 5.0)
        except TimeoutError:
            rec.fail("generator_stalled")
        cpu = time.process_time() - cpu0
    sweeper.cancel()
    await _close_all(rec.conns, rec.reconnects)
    return _result(
        rec, "closed", max(rec.last_done - start, 1) / 1e9, cpu, samples_per_request, concurrency, timeout_s,
        rate=None, scheduled=rec.sent,
    )  # fmt: skip


def poisson_schedule(rate: float, duration_s: float, seed: int = 0) -> np.ndarray:
    """Arrival offsets in ns (int64, increasing, all < duration) of a Poisson process of ``rate`` per second."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"need rate > 0 and duration_s > 0, got {rate} and {duration_s}")
    rng = np.random.default_rng(seed)
    expected = rate * duration_s
    n = int(expected + 6 * np.sqrt(expected) + 16)  # enough gaps to pass the end with near certainty
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=n))
    while arrivals[-1] < duration_s:  # vanishingly rare: extend
        arrivals = np.concatenate([arrivals, arrivals[-1] + np.cumsum(rng.exponential(1.0 / rate, size=n))])
    return (arrivals[arrivals < duration_s] * 1e9).astype(np.int64)


async def open_loop(
    host: str, port: int, requests: Sequence[bytes], *, rate: float, duration_s: float, max_connections: int = 256,
    samples_per_request: int = 1, timeout_s: float = 10.0, seed: int = 0,
) -> LoadResult:  # fmt: skip
    """Poisson arrivals at ``rate``/s for ``duration_s`` over at most ``max_connections`` connections.

    Each latency counts from the arrival's scheduled time. The generator sleeps between arrivals (timer
    resolution ~1 ms on Linux event loops) and sends every arrival that is due when it wakes, on an idle
    connection or, when all are busy, on the next one to free up; how late it sent them is ``send_lag_ns``
    (already inside the latencies).
    """
    check_loopback(host)
    if max_connections < 1:
        raise ValueError(f"need max_connections >= 1, got {max_connections}")
    arrivals = poisson_schedule(rate, duration_s, seed)
    rec = _Open(requests, host, port)
    rec.conns = await _connect_many(host, port, rec, max_connections)
    rec.idle_conns = list(rec.conns)
    sweeper = asyncio.get_running_loop().create_task(_sweep_timeouts(lambda: rec.conns, int(timeout_s * 1e9), rec))
    n = len(arrivals)
    with _no_gc():
        cpu0 = time.process_time()
        start = time.perf_counter_ns()
        scheduled = (arrivals + start).tolist()  # absolute perf_counter_ns of each arrival
        i = 0
        while i < n:
            now = time.perf_counter_ns()
            while i < n and scheduled[i] <= now:
                rec.dispatch(scheduled[i], now)
                i += 1
            if i < n:
                wait = scheduled[i] - time.perf_counter_ns()
                await asyncio.sleep(wait / 1e9 if wait > 0 else 0)
        rec.idle.clear()
        rec._check_done()
        try:
            await asyncio.wait_for(rec.idle.wait(), timeout_s + 5.0)
        except TimeoutError:
            for _ in range(len(rec.waiting) + sum(c.busy for c in rec.conns)):
                rec.fail("generator_stalled")
        cpu = time.process_time() - cpu0
    sweeper.cancel()
    await _close_all(rec.conns, rec.reconnects)
    duration = max(max(rec.last_done, start + int(duration_s * 1e9)) - start, 1) / 1e9
    return _result(
        rec, "open", duration, cpu, samples_per_request, max_connections, timeout_s, rate=rate, scheduled=n,
        waited_for_connection=rec.waited, send_lag_ns=np.frombuffer(rec.lag, dtype=np.int64).copy(),
    )  # fmt: skip


def _result(
    rec: _Recorder, mode: str, duration_s: float, cpu_s: float, samples: int, concurrency: int, timeout_s: float,
    **more: Any,
) -> LoadResult:  # fmt: skip
    """What a run's recorder saw, as a :class:`LoadResult`."""
    return LoadResult(
        mode=mode, duration_s=duration_s, samples_per_request=samples, concurrency=concurrency, sent=rec.sent,
        latency_ns=np.frombuffer(rec.latency, dtype=np.int64).copy(),
        status=np.frombuffer(rec.status, dtype=np.int16).copy(),
        errors=rec.errors, connect_errors=rec.connect_errors, sample_bodies=rec.sample_bodies, client_cpu_s=cpu_s,
        timeout_s=timeout_s, **more,
    )  # fmt: skip


async def _close_all(conns: list[_Connection], reconnects: set[asyncio.Task[None]]) -> None:
    for task in list(reconnects):
        task.cancel()
    await asyncio.gather(*reconnects, return_exceptions=True)
    for conn in conns:
        conn.closed = True
        if conn.transport is not None:
            conn.transport.close()
    await asyncio.sleep(0)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """No collector pauses inside a measurement (the generator allocates little that cycles)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed (it is, with uvicorn[standard]), else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(coro: Any) -> Any:
    """Run one generator coroutine on a fresh (uv)loop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)
