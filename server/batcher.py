"""Dynamic batching: one :class:`Batcher` per loaded model version.

Requests wait in a bounded FIFO; one background task forms batches and hands each to the model's
runtime in a dedicated thread (the event loop never blocks on long inference; batches expected to take
under ``INLINE_MAX_S`` run on the loop itself), then resolves every request's future with its own rows
of the scores.

- A batch is flushed when ``max_batch_size`` samples are queued, or when the oldest queued request
  has waited ``max_wait_ms`` (0: at once), or at shutdown.
- Admission (:meth:`Batcher.admit`, asked once per request before its body is read) refuses at once
  with :class:`~server.errors.Overloaded` (503) a request that finds ``max_queue`` requests queued, or
  whose deadline the batcher predicts it cannot meet: the runtime's measured cost of the batches queued
  ahead of it, plus its own, plus how far the event loop runs behind (:meth:`Batcher.predicted_wait`).
- A request whose deadline passed before its first row was dispatched gets
  :class:`~server.errors.DeadlineExceeded` (504) and costs the model nothing.
- A request whose caller went away (its future cancelled) leaves the queue at once; a request
  already partly dispatched has its remaining parts dropped.
- A request larger than the room left in a batch is split across batches; its parts are glued back
  in order, so callers never see the split.
- If the runtime fails on a batch, exactly the requests in that batch fail
  (:class:`~server.errors.InferenceFailed`); the batcher carries on.

Requests bring :class:`~server.types.Rows`; the rows of one runtime call are glued and featurized together
(:func:`server.types.to_batch`), in the runtime thread for long batches. Results do not depend on batching:
rows are scored independently (see :mod:`server.runtimes` for how exactly each runtime honours that).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from server.errors import DeadlineExceeded, InferenceFailed, NotReady, Overloaded
from server.metrics import ModelMetrics
from server.runtimes import Runtime
from server.types import Rows, Scores, to_batch

log = logging.getLogger(__name__)
# A batch the runtime is expected to score within this time (its warm-up timings) runs on the event loop
# itself: handing it to the runtime thread costs more than it saves (a thread wake-up, a future, and the
# two threads trading the GIL, which on 2 cores took ~20% more CPU per request and, with 2 workers,
# 1.5x the throughput: docs/BENCHMARKS.md). Longer batches go to the runtime thread, so that the event
# loop keeps reading requests meanwhile and never stalls for long.
INLINE_MAX_S = 0.002
# How the batcher learns its own speed: each batch's measured time (featurization + graph) over what the
# runtime's warm-up timings predict for its size, averaged with this weight for the newest batch. Under CPU
# contention (other workers, the machine's other jobs) the factor rises and admission becomes stricter.
SLOWDOWN_WEIGHT = 0.1
SLOWDOWN_RANGE = (0.5, 50.0)


class _Pending:
    """One request in the queue: its rows, its future, and how far it has been dispatched."""

    __slots__ = ("batch", "deadline", "enqueued", "future", "next_row", "parts")

    def __init__(self, batch: Rows, future: asyncio.Future[Scores], deadline: float, enqueued: float) -> None:
        self.batch = batch
        self.future = future
        self.deadline = deadline
        self.enqueued = enqueued
        self.next_row = 0  # rows before this one are dispatched
        self.parts: list[Scores] = []  # scores of earlier parts of a split request


class Batcher:
    """Queue + batch former + runtime thread of one model version.

    Args:
        runtime: the loaded graph; only the batcher calls it, one batch at a time.
        name: model name (thread name, messages).
        max_batch_size: samples per runtime call.
        max_wait_ms: longest the oldest queued request waits for a fuller batch.
        max_queue: requests waiting before new ones are rejected.
        metrics: the model's bound metric children.

    Example::

        batcher = Batcher(runtime, name="criteo", max_batch_size=256, max_wait_ms=2, max_queue=1024, metrics=m)
        batcher.start()
        scores = await batcher.submit(batch, deadline=time.monotonic() + 1.0)   # Scores of len(batch)
        await batcher.close()
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        name: str,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        metrics: ModelMetrics,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError(
                "need max_batch_size >= 1, max_queue >= 1, max_wait_ms >= 0,"
                f" got {max_batch_size}, {max_queue}, {max_wait_ms}"
            )
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._runtime = runtime
        self._m = metrics
        self._pending = metrics.pending
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0  # rows not yet dispatched
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lma-runtime-{name}")
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._busy_until = 0.0  # time.monotonic() by which the batch in the runtime should be done
        # Requests admitted and not yet queued (their bodies are being read and parsed): admission counts them
        # as queued already, or a burst read in one turn of the event loop would all be admitted at once.
        self.incoming = 0
        self._rows_per_request = 1.0  # running mean, for the rows of requests not parsed yet
        self.slowdown = 1.0  # measured batch time / the runtime's predicted time (see SLOWDOWN_WEIGHT)

    @property
    def queued(self) -> int:
        """Requests waiting (a partly dispatched request counts until its last part leaves)."""
        return len(self._queue)

    def start(self) -> None:
        self._pending.gauges[self._m.queue_depth] = self._depth
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"lma-batcher-{self.name}")
        self._task.add_done_callback(self._on_loop_done)

    def admit(
        self, now: float, deadline: float, *, ahead_s: float = 0, waited_s: float = 0, max_wait_s: float = math.inf
    ) -> None:
        """Raise :class:`NotReady` or :class:`Overloaded` (counted) when a request must be refused now.

        The engine asks once per request, before its body is read, so that an overloaded server spends next
        to nothing on the requests it turns away. A request is refused when ``max_queue`` requests are
        queued, or when its deadline cannot be met (:meth:`check_deadline`). ``waited_s`` (arrival to
        admission) goes to ``lma_admission_wait_seconds``. An admitted request counts as :attr:`incoming`
        until it is queued or leaves.
        """
        m, pending = self._m, self._pending
        pending.observe(m.admission_wait, waited_s)
        if self._closing or self._task is None:
            pending.inc(m.rejected["not_ready"])
            raise NotReady(f"model {self.name!r} is not accepting requests (starting or shutting down)")
        if len(self._queue) + self.incoming >= self.max_queue:
            pending.inc(m.rejected["queue_full"])
            raise Overloaded(f"model {self.name!r} is overloaded: {self.max_queue} requests are queued; retry later")
        self.check_deadline(now, deadline, ahead_s=ahead_s, max_wait_s=max_wait_s)
        self.incoming += 1

    def check_deadline(self, now: float, deadline: float, *, ahead_s: float = 0, max_wait_s: float = math.inf) -> None:
        """Refuse (:class:`Overloaded`, counted) when ``now`` plus the predicted wait passes ``deadline``, or the
        predicted wait is longer than ``max_wait_s`` (LMA_MAX_QUEUE_DELAY_MS) whatever the deadline.

        Such a request would end in a 504 (or a late 200) anyway, after taking the place of requests that can
        still be answered in time. The wait is the longer of the model's queue (:meth:`predicted_wait`) and
        ``ahead_s``, what the requests already admitted to this process will take
        (:class:`server.admission.Occupancy`: parsing and answering cost too, and their measured times hold
        the event loop's delays). How long the request waited unread (the loop's lag) is already in
        ``now - arrival``: the deadline counts from the arrival.

        ``max_wait_s`` keeps the queue short when deadlines are long: once the runtime is busy, a longer
        queue adds no throughput, only latency, and a caller's connections held that long pile its other
        requests up in front of the server (measured: at 0.8x the capacity with 2 s deadlines and no such
        limit, clients saw p50 2.5 s, docs/BENCHMARKS.md).
        """
        wait = max(self.predicted_wait(now), ahead_s)
        if now + wait > deadline or wait > max_wait_s:
            self._pending.inc(self._m.rejected["predicted_wait"])
            left = max(0.0, deadline - now) * 1000
            raise Overloaded(
                f"model {self.name!r} is overloaded: a request now would wait about {wait * 1000:.0f} ms, and its"
                f" deadline is {left:.1f} ms away; retry later"
            )

    def leave(self) -> None:
        """An admitted request ends without reaching the queue (bad body, client gone): no longer incoming."""
        self.incoming = max(0, self.incoming - 1)

    def rejoin(self) -> None:
        """An admitted request that :meth:`leave` took out while it waited on its client is incoming again."""
        self.incoming += 1

    def predicted_wait(self, now: float, rows: int = 1) -> float:
        """Seconds until a request of ``rows`` samples arriving ``now`` would be answered (admission's estimate).

        The rest of the batch in the runtime, then the batches the queued rows and this request form, each at
        the runtime's cost for its size (warm-up timings, scaled by the measured :attr:`slowdown`), plus
        ``max_wait_ms`` when this request would have to wait for company.
        """
        queued = self._queued_rows + round(self.incoming * self._rows_per_request) + rows
        full, rest = divmod(queued, self.max_batch_size)
        wait = max(0.0, self._busy_until - now) + full * self._cost(self.max_batch_size) + self._cost(rest)
        if rest and not self._queue and self._busy_until <= now:
            wait += self.max_wait_s
        return wait

    def _cost(self, size: int) -> float:
        if size <= 0:
            return 0.0
        expected = self._runtime.expected_seconds(size)
        return 0.0 if expected is None else expected * self.slowdown

    async def submit(self, batch: Rows, deadline: float) -> Scores:
        """Queue ``batch`` and wait for its scores; ``deadline`` is a :func:`time.monotonic` time.

        Admission (:meth:`admit`) happened before; only a closing batcher refuses here.
        """
        if self._closing or self._task is None:
            self._pending.inc(self._m.rejected["not_ready"])
            raise NotReady(f"model {self.name!r} is not accepting requests (starting or shutting down)")
        if len(batch) == 0:
            return Scores(np.zeros(0, np.float32), np.zeros(0, np.int64))
        self._rows_per_request += 0.05 * (len(batch) - self._rows_per_request)
        now = time.monotonic()
        future: asyncio.Future[Scores] = asyncio.get_running_loop().create_future()
        pending = _Pending(batch, future, deadline, now)
        self._queue.append(pending)
        self._queued_rows += len(batch)
        if len(self._queue) == 1 or self._queued_rows >= self.max_batch_size:
            self._wakeup.set()  # start the wait timer, or flush a full batch now
        try:
            return await future
        except asyncio.CancelledError:  # the caller went away
            self._forget(pending)
            raise

    def _forget(self, p: _Pending) -> None:
        """Drop a cancelled request that is still wholly queued (a partly dispatched one is dropped by _take)."""
        if p.next_row:
            return
        try:
            self._queue.remove(p)
        except ValueError:
            return  # already gone
        self._queued_rows -= len(p.batch)
        self._pending.inc(self._m.rejected["cancelled"])

    def _depth(self) -> float:
        return float(len(self._queue))

    async def close(self, timeout_s: float = 30.0) -> None:
        """Stop accepting, finish the queued work (at most ``timeout_s``), stop the runtime thread."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                log.error("batcher %s: queued work not finished after %.1fs; failing it", self.name, timeout_s)
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        self._fail_queued(lambda: NotReady(f"model {self.name!r} shut down before this request was scored"))
        gauges = self._pending.gauges
        if gauges.get(self._m.queue_depth) == self._depth:  # not taken over by the model's next version
            del gauges[self._m.queue_depth]
            self._m.queue_depth.set(0)
        self._executor.shutdown(wait=True)

    # --- the batch-forming task ---

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._queued_rows < self.max_batch_size and not self._closing:
                delay = self._queue[0].enqueued + self.max_wait_s - time.monotonic()
                if delay > 0:
                    self._wakeup.clear()
                    timer = loop.call_later(delay, self._wakeup.set)
                    try:
                        await self._wakeup.wait()
                    finally:
                        timer.cancel()
                    continue
            parts = self._take(time.monotonic())
            if parts:
                await self._dispatch(loop, parts)

    def _take(self, now: float) -> list[tuple[_Pending, int, int]]:
        """Pop up to ``max_batch_size`` rows off the queue: (request, first row, end row) parts."""
        parts: list[tuple[_Pending, int, int]] = []
        room = self.max_batch_size
        queue = self._queue
        while queue and room > 0:
            p = queue[0]
            size = len(p.batch)
            if p.future.done():  # caller gone (cancelled), or an earlier part failed
                queue.popleft()
                self._queued_rows -= size - p.next_row
                if p.future.cancelled():
                    self._pending.inc(self._m.rejected["cancelled"])
                continue
            if p.next_row == 0:
                if now > p.deadline:
                    queue.popleft()
                    self._queued_rows -= size
                    self._pending.inc(self._m.rejected["deadline"])
                    waited_ms = (now - p.enqueued) * 1000
                    p.future.set_exception(
                        DeadlineExceeded(
                            f"model {self.name!r}: request deadline passed after {waited_ms:.0f} ms in the queue"
                        )
                    )
                    continue
                self._pending.observe(self._m.queue_duration, now - p.enqueued)
            take = min(size - p.next_row, room)
            parts.append((p, p.next_row, p.next_row + take))
            p.next_row += take
            room -= take
            self._queued_rows -= take
            if p.next_row == size:
                queue.popleft()
        return parts

    async def _dispatch(self, loop: asyncio.AbstractEventLoop, parts: list[tuple[_Pending, int, int]]) -> None:
        pieces = [p.batch if a == 0 and b == len(p.batch) else p.batch.slice(a, b) for p, a, b in parts]
        size = sum(b - a for _, a, b in parts)
        cost = self._runtime.expected_seconds(size)
        self._busy_until = time.monotonic() + (cost or 0.0) * self.slowdown
        try:
            if cost is not None and cost <= INLINE_MAX_S:
                scores, elapsed = self._run(pieces, size)  # short: cheaper than a thread hand-off (see INLINE_MAX_S)
            else:
                scores, elapsed = await loop.run_in_executor(self._executor, self._run, pieces, size)
        except asyncio.CancelledError:
            self._fail([p for p, _, _ in parts], lambda: NotReady(f"model {self.name!r} shut down while scoring"))
            raise
        except Exception as e:
            log.exception("batcher %s: runtime failed on a batch of %d samples", self.name, size)
            message = f"model {self.name!r}: inference failed: {e}"
            self._fail([p for p, _, _ in parts], lambda: InferenceFailed(message))
            return
        finally:
            self._busy_until = 0.0
        m, pending = self._m, self._pending
        pending.observe(m.inference_duration, elapsed)
        pending.observe(m.batch_size, size)
        pending.inc(m.inference_samples, size)
        pending.inc(m.inference_batches)
        pending.inc(m.fallback_tokens, int(scores.fallback_tokens.sum()))
        pending.observe_many(m.probability, scores.probability)
        offset = 0
        for p, start, stop in parts:
            piece = scores.slice(offset, offset + stop - start)
            offset += stop - start
            if p.future.done():
                continue
            if start == 0 and stop == len(p.batch):
                p.future.set_result(piece)
                continue
            p.parts.append(piece)
            if stop == len(p.batch):
                p.future.set_result(Scores.concatenate(p.parts))

    def _run(self, pieces: list[Rows], size: int) -> tuple[Scores, float]:
        """Featurize and score one batch: in the runtime thread, or on the event loop (under ``INLINE_MAX_S``).

        Returns the scores and the runtime's time; the caller records the metrics, on the event loop.
        """
        start = time.perf_counter()
        batch = to_batch(pieces)
        featurized = time.perf_counter()
        scores = self._runtime.run(batch)
        end = time.perf_counter()
        elapsed = end - featurized
        if len(scores) != size:
            raise RuntimeError(f"runtime returned {len(scores)} scores for {size} samples")
        expected = self._runtime.expected_seconds(size)
        if expected:
            ratio = min(max((end - start) / expected, SLOWDOWN_RANGE[0]), SLOWDOWN_RANGE[1])
            self.slowdown += SLOWDOWN_WEIGHT * (ratio - self.slowdown)
        return scores, elapsed

    # --- failure paths ---

    @staticmethod
    def _fail(pending: list[_Pending], error: Callable[[], Exception]) -> None:
        for p in pending:  # one exception object per request: tracebacks must not pile up on a shared one
            if not p.future.done():
                p.future.set_exception(error())

    def _fail_queued(self, error: Callable[[], Exception]) -> None:
        self._fail(list(self._queue), error)
        self._queue.clear()
        self._queued_rows = 0

    def _on_loop_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            log.error("batcher %s stopped unexpectedly", self.name, exc_info=error)
            self._closing = True
            self._fail_queued(lambda: InferenceFailed(f"model {self.name!r}: batcher stopped: {error}"))
