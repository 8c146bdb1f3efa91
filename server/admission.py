"""What a new request would wait in this process, for admission (:meth:`server.engine.Engine.admit`).

Two estimates the batcher's own (the model's queue, :meth:`server.batcher.Batcher.predicted_wait`) cannot
see:

- :class:`LoopLag`: how late the event loop runs; requests still unread in socket buffers wait that long
  before any handler sees them, and so does the answer of the request being admitted;
- :class:`Occupancy`: the requests admitted to this process and not finished, their measured latency, and
  an adaptive limit on how many may be in the process at once. Parsing, featurizing and answering cost the
  event loop too; when they, not the model, are the bottleneck, the model's queue stays short while the
  requests pile up before it, and only this sees them.
"""

from __future__ import annotations

import asyncio


class LoopLag:
    """How late the event loop runs a timer: how long a new request already waits before any handler sees it.

    A task sleeps ``interval_s`` at a time and records by how much each wake-up came late. When the loop
    is saturated (more ready callbacks per turn than it gets through), that lateness is the wait of the
    requests sitting unread in socket buffers, which no queue of ours can see. A late wake-up is remembered
    for a few intervals (each on-time one halves it): one stalled turn is rarely the last.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.lag_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start measuring (idempotent; needs a running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="lma-loop-lag")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval_s)
            self.lag_s = max(loop.time() - before - self.interval_s, 0.5 * self.lag_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class Occupancy:
    """Requests in this process (admitted, not finished), their recent latency, and an adaptive limit on them.

    Every ``window_s`` the mean latency (arrival to finish) of the requests that finished in the window
    moves :attr:`latency_s` (an average, ``weight`` for the newest) and the limit on requests in the
    process: up by a tenth (at least one) while the window's latency stays within ``target_s``, down by a
    fifth when it does not (additive-increase, multiplicative-decrease, as TCP and Netflix's
    concurrency-limits do). Beyond the limit a request would only queue: the runtime and the event loop are
    already busy, and more in flight adds latency, not throughput. The limit finds that point by itself
    whatever slows the process down (the model, parsing, the refusals of an overload, other processes on
    the machine), and it never locks out: an empty process admits, and each finished request measures again.

    :meth:`wait_s` is what a new request should expect to wait for those ahead of it: the recent latency,
    while any are here.

    Example::

        occ = Occupancy(target_s=0.05)
        if occ.admits():
            occ.enter(now)
            ...
            occ.leave(later, latency_s=later - arrival)
    """

    def __init__(
        self, target_s: float = 0.05, window_s: float = 0.05, weight: float = 0.3, limit: float = 256.0,
        min_limit: float = 4.0, max_limit: float = 100_000.0,
    ) -> None:  # fmt: skip
        self.target_s = target_s
        self.window_s = window_s
        self.weight = weight
        self.limit = limit
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.in_system = 0
        self.latency_s = 0.0
        self._sum = 0.0
        self._done = 0
        self._window_start: float | None = None

    def admits(self) -> bool:
        return self.in_system < self.limit

    def enter(self, now: float) -> None:
        if self._window_start is None:
            self._window_start = now
        self.in_system += 1

    def leave(self, now: float, latency_s: float) -> None:
        self.in_system -= 1
        self._sum += latency_s
        self._done += 1
        assert self._window_start is not None
        if now - self._window_start >= self.window_s:
            mean = self._sum / self._done
            self.latency_s = mean if self.latency_s == 0.0 else self.latency_s + self.weight * (mean - self.latency_s)
            if mean <= self.target_s:
                self.limit = min(self.max_limit, self.limit + max(1.0, 0.1 * self.limit))
            else:
                self.limit = max(self.min_limit, 0.8 * self.limit)
            self._sum, self._done, self._window_start = 0.0, 0, now

    def wait_s(self) -> float:
        """How long a new request should expect to wait for the requests already here."""
        return self.latency_s if self.in_system else 0.0
