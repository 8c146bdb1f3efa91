"""What a new request would wait in this process, for admission (:meth:`server.engine.Engine.admit`).

Two estimates the batcher's own (the model's queue, :meth:`server.batcher.Batcher.predicted_wait`) cannot
see:

- :class:`LoopLag`: how late the event loop runs; requests still unread in socket buffers wait that long
  before any handler sees them, and so does the answer of the request being admitted;
- :class:`Occupancy`: the requests admitted to this process and not finished, times the wall time one
  takes here (Little's law, measured over short windows). Parsing, featurizing and answering cost the
  event loop too; when they, not the model, are the bottleneck, the model's queue stays short while the
  requests pile up before it, and only this estimate sees them.
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
    """Requests in this process (admitted, not finished) and the wall time each takes, by Little's law.

    ``service_s`` is the busy wall time (some request in the process) per finished request, measured over
    windows of ``window_s`` and averaged with ``weight`` for the newest: under saturation it is 1 /
    throughput, so ``in_system * service_s`` is how long the requests already here take to get out of the
    way of a new one; lightly loaded, it is about one request's latency.

    Example::

        occ = Occupancy()
        occ.enter(t0); occ.leave(t0 + 0.004)     # one request, 4 ms
        occ.wait_s()                              # 0.0: nothing in the process now
    """

    def __init__(self, window_s: float = 0.05, weight: float = 0.3) -> None:
        self.window_s = window_s
        self.weight = weight
        self.in_system = 0
        self.service_s = 0.0
        self._busy_since: float | None = None
        self._busy = 0.0
        self._done = 0
        self._window_start: float | None = None

    def enter(self, now: float) -> None:
        if self.in_system == 0:
            self._busy_since = now
        if self._window_start is None:
            self._window_start = now
        self.in_system += 1

    def step_out(self, now: float) -> None:
        """A request here waits on its client (its body is still on the way): not counted until it enters
        again (:meth:`enter`). A stalled upload would otherwise keep the process "busy" while nothing finishes,
        and every new request would look as if it waited behind it."""
        self.in_system -= 1
        if self.in_system == 0 and self._busy_since is not None:
            self._busy += now - self._busy_since
            self._busy_since = None

    def leave(self, now: float) -> None:
        self.step_out(now)
        self._done += 1
        assert self._window_start is not None
        if now - self._window_start >= self.window_s:
            busy = self._busy
            if self._busy_since is not None:
                busy += now - self._busy_since
                self._busy_since = now
            sample = busy / self._done
            self.service_s = (
                sample if self.service_s == 0.0 else self.service_s + self.weight * (sample - self.service_s)
            )
            self._busy, self._done, self._window_start = 0.0, 0, now

    def wait_s(self) -> float:
        """How long the requests already here should take to finish."""
        return self.in_system * self.service_s
