"""Background traffic for end-to-end tests: client threads posting requests until the block ends.

Every outcome is kept with its times, so a test can assert on what each client saw before and after an
event (a hot swap, Redis going down, SIGTERM). The one load thread of the test suite.

Example::

    with Traffic([("plain", server.url, lambda i: [instance(i)])]) as load:
        load.wait("30 answers", lambda: len(load.of("plain")) >= 30)
    assert all(o.status == 200 for o in load.outcomes)
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

PREDICT = "/v1/models/criteo:predict"
WAIT_S = 60.0  # hang guard of every wait for a state of the load; never reached when things work


@dataclass(frozen=True)
class Outcome:
    client: str  # the label of the client thread
    thread: int  # which thread
    i: int  # the thread's request number, from 0
    sent: float  # time.monotonic() before the request
    done: float  # time.monotonic() once its answer was read
    status: int  # -1: transport error
    body: dict[str, Any]  # the JSON answer, or {"error": the transport error's class name}
    retry_after: str | None

    @property
    def version(self) -> str | None:
        return self.body.get("version")


Instances = Callable[[int], list[dict[str, Any]]]  # request number -> its instances


@dataclass
class Traffic:
    """Client threads, one per ``(label, server url, instances)`` of ``clients``, each posting one request after
    another to ``path`` (``pause_s`` apart) until the block ends; ``fresh_connections``: a new connection each."""

    clients: Sequence[tuple[str, str, Instances]]
    path: str = PREDICT
    pause_s: float = 0.0
    fresh_connections: bool = False
    outcomes: list[Outcome] = field(default_factory=list)  # appended by the threads (list.append is atomic)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Traffic:
        for n, (label, url, instances) in enumerate(self.clients):
            t = threading.Thread(target=self._run, args=(n, label, url, instances), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _run(self, n: int, label: str, url: str, instances: Instances) -> None:
        limits = httpx.Limits(max_keepalive_connections=0 if self.fresh_connections else 1)
        with httpx.Client(base_url=url, timeout=30, limits=limits) as client:
            i = 0
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    r = client.post(self.path, json={"instances": instances(i)})
                    status, body, retry_after = r.status_code, r.json(), r.headers.get("retry-after")
                except httpx.TransportError as e:
                    status, body, retry_after = -1, {"error": type(e).__name__}, None
                self.outcomes.append(Outcome(label, n, i, sent, time.monotonic(), status, body, retry_after))
                i += 1
                if self.pause_s:
                    self._stop.wait(self.pause_s)

    def of(self, client: str | None = None, sent_after: float = -math.inf, thread: int | None = None) -> list[Outcome]:
        """The outcomes of one client label (None: all), of requests sent after ``sent_after``, of one thread."""
        return [
            o for o in list(self.outcomes)
            if (client is None or o.client == client) and o.sent > sent_after and (thread is None or o.thread == thread)
        ]  # fmt: skip

    def per_thread(self) -> list[list[Outcome]]:
        return [self.of(thread=n) for n in range(len(self.clients))]

    def count(self) -> int:
        return len(self.outcomes)

    def wait(self, what: str, condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"the load did not reach this state in {timeout_s:g} s: {what}"
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
