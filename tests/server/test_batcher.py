"""The batcher without HTTP: flush rules, admission, deadlines, cancellation, failure isolation, invariance."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest

from server.batcher import Batcher
from server.errors import DeadlineExceeded, InferenceFailed, NotReady, Overloaded
from server.metrics import Metrics
from server.runtimes import OnnxRuntime, Runtime
from server.types import Batch, Scores
from tests.helpers.serving import Bundles

POISON = 424242  # a key that makes PoisonRuntime fail the whole batch it is in
FAR = 60_000.0  # ms: a wait that never ends within a test; flushes must come from elsewhere


class PoisonRuntime(OnnxRuntime):
    """The real ONNX runtime, failing any batch that holds the key POISON (fault injection)."""

    def run(self, batch: Batch) -> Scores:
        if (batch.keys == POISON).any():
            raise RuntimeError("poisoned batch")
        return super().run(batch)


@pytest.fixture(scope="module")
def runtime(bundles: Bundles) -> Runtime:
    return PoisonRuntime(bundles.criteo_v1, "cpu", threads=1)


def rows(n: int, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    dense = rng.random((n, 13), dtype=np.float32) * 3
    keys = rng.integers(0, 2**62, size=(n, 26), dtype=np.int64)
    return Batch(dense, keys)


def deadline(seconds: float = 60.0) -> float:
    return time.monotonic() + seconds


class Harness:
    def __init__(self, runtime: Runtime, **kw: float) -> None:
        self.metrics = Metrics()
        settings = {"max_batch_size": 4, "max_wait_ms": FAR, "max_queue": 100, **kw}
        self.batcher = Batcher(
            runtime,
            name="m",
            max_batch_size=int(settings["max_batch_size"]),
            max_wait_ms=settings["max_wait_ms"],
            max_queue=int(settings["max_queue"]),
            metrics=self.metrics.for_model("m", "onnx", "cpu"),
        )

    def value(self, name: str, **labels: str) -> float:
        self.metrics.pending.flush()
        v = self.metrics.registry.get_sample_value(name, {"model": "m", **labels})
        return 0.0 if v is None else v

    @property
    def batches(self) -> float:
        return self.value("lma_inference_batches_total")

    @property
    def samples(self) -> float:
        return self.value("lma_inference_samples_total")

    def sizes(self) -> list[float]:
        """Cumulative lma_batch_size bucket counts for le = 1, 2, 4, 8."""
        return [self.value("lma_batch_size_bucket", le=le) for le in ("1.0", "2.0", "4.0", "8.0")]


@pytest.fixture
async def make(runtime: Runtime) -> AsyncIterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def factory(**kw: float) -> Harness:
        h = Harness(runtime, **kw)
        h.batcher.start()
        made.append(h)
        return h

    yield factory
    for h in made:
        await h.batcher.close(timeout_s=10)


async def submit_all(b: Batcher, batches: list[Batch]) -> list[Scores]:
    return await asyncio.wait_for(asyncio.gather(*(b.submit(x, deadline()) for x in batches)), 30)


async def test_flush_on_size(make: Callable[..., Harness], runtime: Runtime) -> None:
    h = make(max_batch_size=4, max_wait_ms=FAR)
    batches = [rows(1, seed=i) for i in range(8)]
    scores = await submit_all(h.batcher, batches)  # would hang for a minute if size did not flush
    assert h.batches == 2 and h.samples == 8
    assert h.sizes() == [0, 0, 2, 2]  # two batches of exactly 4
    expected = runtime.run(Batch.concatenate(batches)).probability
    np.testing.assert_array_equal(np.concatenate([s.probability for s in scores]), expected)


async def test_flush_on_wait(make: Callable[..., Harness]) -> None:
    h = make(max_batch_size=100, max_wait_ms=20)
    scores = await submit_all(h.batcher, [rows(1, seed=i) for i in range(3)])
    assert [len(s) for s in scores] == [1, 1, 1]
    assert h.batches == 1 and h.samples == 3  # one partial batch, released by the wait
    assert h.value("lma_queue_duration_seconds_count") == 3


async def test_oversize_request_is_split_and_glued_back(make: Callable[..., Harness], runtime: Runtime) -> None:
    h = make(max_batch_size=4, max_wait_ms=0)
    big = rows(10, seed=3)
    (scores,) = await submit_all(h.batcher, [big])
    assert h.batches == 3 and h.sizes() == [0, 1, 3, 3]  # 4 + 4 + 2
    np.testing.assert_array_equal(scores.probability, runtime.run(big).probability)
    np.testing.assert_array_equal(scores.fallback_tokens, runtime.run(big).fallback_tokens)
    assert h.value("lma_queue_duration_seconds_count") == 1  # queue time counts once per request


async def test_failing_batch_fails_only_its_requests(make: Callable[..., Harness]) -> None:
    h = make(max_batch_size=2, max_wait_ms=FAR)
    poisoned = rows(1, seed=1)
    poisoned.keys[0, 0] = POISON
    batches = [rows(1, seed=0), poisoned, rows(1, seed=2), rows(1, seed=3)]
    results = await asyncio.wait_for(
        asyncio.gather(*(h.batcher.submit(b, deadline()) for b in batches), return_exceptions=True), 30
    )
    assert [type(r).__name__ for r in results] == ["InferenceFailed", "InferenceFailed", "Scores", "Scores"]
    assert "poisoned batch" in str(results[0])
    assert h.batches == 1 and h.samples == 2  # only the good batch was counted as scored
    (after,) = await submit_all(h.batcher, [rows(2, seed=5)])  # and the batcher carries on
    assert len(after) == 2


async def test_cancelled_request_is_dropped(make: Callable[..., Harness]) -> None:
    h = make(max_batch_size=2, max_wait_ms=FAR)
    gone = asyncio.ensure_future(h.batcher.submit(rows(1, seed=0), deadline()))
    await asyncio.sleep(0)  # queued
    assert h.batcher.queued == 1 and h.value("lma_queue_depth") == 1
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    scores = await submit_all(h.batcher, [rows(1, seed=1), rows(1, seed=2)])
    assert [len(s) for s in scores] == [1, 1]
    assert h.samples == 2  # the cancelled row never reached the model
    assert h.value("lma_rejected_total", reason="cancelled") == 1
    assert h.batcher.queued == 0 and h.value("lma_queue_depth") == 0


async def test_full_queue_rejects_at_once(make: Callable[..., Harness]) -> None:
    h = make(max_batch_size=100, max_wait_ms=FAR, max_queue=2)
    waiting = [asyncio.ensure_future(h.batcher.submit(rows(1, seed=i), deadline())) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="2 requests are queued"):
        h.batcher.admit(time.monotonic(), deadline())
    assert h.value("lma_rejected_total", reason="queue_full") == 1
    assert h.value("lma_admission_wait_seconds_count") == 1
    await h.batcher.close(timeout_s=10)  # shutdown flushes what was accepted
    assert [len(w.result()) for w in waiting] == [1, 1]
    with pytest.raises(NotReady):
        await h.batcher.submit(rows(1), deadline())


async def test_expired_deadline_gets_504_and_costs_nothing(make: Callable[..., Harness]) -> None:
    h = make(max_batch_size=2, max_wait_ms=0)
    late = h.batcher.submit(rows(1, seed=0), time.monotonic() - 0.001)
    on_time = h.batcher.submit(rows(1, seed=1), deadline())
    results = await asyncio.wait_for(asyncio.gather(late, on_time, return_exceptions=True), 30)
    assert isinstance(results[0], DeadlineExceeded) and isinstance(results[1], Scores)
    assert h.samples == 1 and h.value("lma_rejected_total", reason="deadline") == 1


async def test_scores_do_not_depend_on_batching(make: Callable[..., Harness], runtime: Runtime) -> None:
    data = rows(40, seed=7)
    alone = [runtime.run(data.slice(i, i + 1)).probability[0] for i in range(40)]
    whole = runtime.run(data).probability
    np.testing.assert_array_equal(whole, alone)
    rng = np.random.default_rng(0)
    for max_batch in (1, 3, 16, 64):
        h = make(max_batch_size=max_batch, max_wait_ms=1)
        cuts = np.sort(rng.choice(np.arange(1, 40), size=6, replace=False))
        pieces = [data.slice(a, b) for a, b in zip([0, *cuts], [*cuts, 40], strict=True)]
        scores = await submit_all(h.batcher, pieces)  # concurrent requests of mixed sizes
        np.testing.assert_array_equal(np.concatenate([s.probability for s in scores]), whole)


async def test_concurrent_identical_requests_get_identical_scores(make: Callable[..., Harness]) -> None:
    h = make(max_batch_size=8, max_wait_ms=1)
    same = rows(3, seed=11)
    scores = await submit_all(h.batcher, [same] * 20)
    for s in scores[1:]:
        np.testing.assert_array_equal(s.probability, scores[0].probability)


async def test_close_finishes_queued_work(make: Callable[..., Harness]) -> None:
    h = make(max_batch_size=100, max_wait_ms=FAR)
    queued = [asyncio.ensure_future(h.batcher.submit(rows(2, seed=i), deadline())) for i in range(5)]
    await asyncio.sleep(0)
    await h.batcher.close(timeout_s=10)
    assert [len(q.result()) for q in queued] == [2] * 5
    assert h.samples == 10 and h.value("lma_queue_depth") == 0


async def test_a_deadline_that_cannot_be_met_is_refused_at_admission(bundles: Bundles) -> None:
    runtime = OnnxRuntime(bundles.criteo_v1, "cpu", threads=1)
    runtime.warmup([1, 4])  # the costs admission predicts from
    h = Harness(runtime, max_batch_size=4, max_wait_ms=FAR)
    b = h.batcher
    b.start()
    try:
        now = time.monotonic()
        # an idle batcher would hold a lone request for company up to max_wait_ms (a minute): refused
        assert b.predicted_wait(now) >= FAR / 1000
        with pytest.raises(Overloaded, match="would wait about 60000 ms"):
            b.admit(now, now + 1.0)
        queued = [asyncio.ensure_future(b.submit(rows(1, seed=i), deadline())) for i in range(3)]
        await asyncio.sleep(0)
        # 3 rows queued: a 4th fills the batch, so it waits for no company, only for the graph
        cost = b.predicted_wait(now)
        expected = runtime.expected_seconds(4)
        assert expected is not None and cost == pytest.approx(b.slowdown * expected, rel=1e-9)
        with pytest.raises(Overloaded, match="would wait about"):
            b.admit(now, now + cost / 2)
        assert h.value("lma_rejected_total", reason="predicted_wait") == 2
        b.admit(now, now + 2 * cost)  # a deadline that leaves room is admitted, and counts as incoming...
        assert b.incoming == 1
        b.leave()  # ...until it is queued (the engine says so as it submits)
        assert h.value("lma_admission_wait_seconds_count") == 3
        await asyncio.wait_for(b.submit(rows(1, seed=9), deadline()), 30)  # the batch of 4 flushes on size
        assert [len(q.result()) for q in queued] == [1, 1, 1]
    finally:
        await b.close(timeout_s=10)
        runtime.close()


def test_bad_limits_are_refused(runtime: Runtime) -> None:
    with pytest.raises(ValueError, match="max_batch_size >= 1"):
        Batcher(
            runtime, name="m", max_batch_size=0, max_wait_ms=1, max_queue=1, metrics=Metrics().for_model("m", "o", "c")
        )


async def test_runtime_failure_message_names_the_model(make: Callable[..., Harness]) -> None:
    h = make(max_batch_size=1, max_wait_ms=0)
    poisoned = rows(1)
    poisoned.keys[0, 3] = POISON
    with pytest.raises(InferenceFailed, match="model 'm': inference failed: poisoned batch"):
        await asyncio.wait_for(h.batcher.submit(poisoned, deadline()), 30)
