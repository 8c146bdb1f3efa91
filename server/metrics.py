"""Prometheus metrics of DESIGN section 7: names and labels are part of the product's interface.

Every metric carries a ``model`` label (empty for requests that name no model, such as ``/metrics``).
Durations are histograms in seconds. Each app owns its own :class:`Metrics` (its own registry), so
several apps in one process (tests) never share counters.

Several worker processes (``lma serve --workers N``): the CLI sets ``PROMETHEUS_MULTIPROC_DIR``
before any worker starts, every worker writes its samples there, and ``/metrics`` of any worker
answers with the sum over live workers (gauges: ``livesum`` for the queue depth, ``livemax`` for
model facts). The process collector (resident memory, CPU) reports single-process servers only, as
prometheus_client's multiprocess mode cannot aggregate it.
"""

from __future__ import annotations

import array
import asyncio
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    make_asgi_app,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Predicted click probabilities: fine where CTRs live (0.1%-10%), coarse above. The mean (sum / count) is the
# model's mean predicted CTR, what CTR teams watch for drift and miscalibration against the observed CTR.
PROBABILITY_BUCKETS = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
)  # fmt: skip
LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Why a request was dropped before scoring: refused at admission because its deadline could not be met
# (predicted_wait) or the queue was full (queue_full); its deadline passed while it was queued (deadline);
# its client went away (cancelled); no model accepting requests (not_ready).
REJECT_REASONS = ("predicted_wait", "queue_full", "deadline", "cancelled", "not_ready")

DeviceMemorySource = Callable[[], Iterable[tuple[str, str, int]]]  # -> (model, device, bytes) rows
FLUSH_S = 0.1  # how often the hot path's pending updates reach the metrics (and before every /metrics answer)


class Pending:
    """Metric updates of the hot path, applied in bulk: every ``FLUSH_S`` and before ``/metrics`` answers.

    A prometheus_client update takes a lock and, with several workers (multiprocess mode), writes an mmap'd
    file: 1-2.6 µs each, five or six of them per request (requests, latency, queue wait, admission wait,
    queue depth twice), 10% of a single-sample request's budget. Here an update is a dict or array append;
    :meth:`flush` adds them up, counters by their totals and histograms bucket by bucket
    (:func:`observe_all`). Counts stay exact: one process's /metrics shows everything up to that moment;
    with several workers, another worker's last ``FLUSH_S`` can be missing from a scrape.

    Only the event loop's thread updates it (the batcher records after the runtime thread returns).
    """

    def __init__(self) -> None:
        self.counts: dict[Any, int] = {}
        self.observations: dict[Any, array.array[float]] = {}
        self.gauges: dict[Any, Callable[[], float]] = {}  # child -> its value, read at every flush

    def inc(self, child: Any, n: int = 1) -> None:
        self.counts[child] = self.counts.get(child, 0) + n

    def observe(self, child: Any, value: float) -> None:
        values = self.observations.get(child)
        if values is None:
            values = self.observations[child] = array.array("d")
        values.append(value)

    def observe_many(self, child: Any, values: np.ndarray) -> None:
        pending = self.observations.get(child)
        if pending is None:
            pending = self.observations[child] = array.array("d")
        pending.frombytes(values.astype(np.float64, copy=False).tobytes())  # a copy, no Python float per value

    def flush(self) -> None:
        counts, self.counts = self.counts, {}
        for child, n in counts.items():
            child.inc(n)
        observations, self.observations = self.observations, {}
        for child, values in observations.items():
            observe_all(child, np.frombuffer(values, dtype=np.float64))
        for child, value in list(self.gauges.items()):
            child.set(value())


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _DeviceMemoryCollector(Collector):
    def __init__(self, source: Callable[[], DeviceMemorySource | None]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "lma_device_memory_bytes",
            "Accelerator memory in use where a model runs on a GPU",
            labels=["model", "device"],
        )
        source = self._source()
        for model, device, used in source() if source else ():
            family.add_metric([model, device], used)
        yield family


class ModelMetrics:
    """The children of one model, bound once: the batcher's hot path does no label lookups.

    Its updates go through ``pending`` (:class:`Pending`); ``queue_depth`` is read from the batcher at each flush.
    """

    def __init__(self, m: Metrics, model: str, runtime: str, device: str) -> None:
        self.pending = m.pending
        self.queue_duration = m.queue_duration.labels(model)
        self.batch_size = m.batch_size.labels(model)
        self.inference_duration = m.inference_duration.labels(model, runtime, device)
        self.inference_samples = m.inference_samples.labels(model)
        self.inference_batches = m.inference_batches.labels(model)
        self.fallback_tokens = m.fallback_tokens.labels(model)
        self.probability = m.probability.labels(model)
        self.queue_depth = m.queue_depth.labels(model)
        self.admission_wait = m.admission_wait.labels(model)
        self.rejected = {reason: m.rejected.labels(model, reason) for reason in REJECT_REASONS}


class Metrics:
    """All metrics of one server app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "lma_requests_total",
            "HTTP requests by route template and status code",
            ["model", "route", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "lma_request_duration_seconds", "Request latency, body read to response",
            ["model", "route"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_duration = Histogram(
            "lma_queue_duration_seconds", "Time from enqueue to the start of the request's first batch",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.admission_wait = Histogram(
            "lma_admission_wait_seconds", "Time from a request's arrival (first bytes read, less the event loop's"
            " lag) to its admission decision", ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_duration = Histogram(
            "lma_inference_duration_seconds", "Runtime time of one batch",
            ["model", "runtime", "device"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "lma_batch_size", "Samples per runtime call", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.probability = Histogram(
            "lma_prediction_probability", "Predicted click probabilities, one observation per scored sample",
            ["model"], buckets=PROBABILITY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_samples = Counter("lma_inference_samples_total", "Samples scored", ["model"], registry=r)
        self.inference_batches = Counter("lma_inference_batches_total", "Runtime calls", ["model"], registry=r)
        self.queue_depth = Gauge(
            "lma_queue_depth",
            "Requests waiting in the model's batcher",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rejected = Counter(
            "lma_rejected_total", "Requests dropped before scoring, by reason", ["model", "reason"], registry=r
        )
        self.model_info = Gauge(
            "lma_model_info", "1 for the version being served", ["model", "version", "runtime", "device", "embedding"],
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.model_memory = Gauge(
            "lma_model_memory_bytes", "Model bytes by part (manifest accounting): sum() over parts is the total",
            ["model", "part"], registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.model_memory_total = Gauge(
            "lma_model_memory_total_bytes", "Model bytes in all (manifest accounting)", ["model"],
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.full_embedding = Gauge(
            "lma_model_full_embedding_bytes", "Bytes full embedding tables would take", ["model"],
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.compression = Gauge(
            "lma_model_compression_ratio", "Embedding compression: full embedding bytes / this embedding's bytes",
            ["model"], registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.answered_late = Counter(
            "lma_answered_late_total",
            "200 answers sent after their request's deadline (goodput = 200 answers - these)",
            ["model", "route"],
            registry=r,
        )
        self.fallback_tokens = Counter(
            "lma_fallback_tokens_total",
            "Tokens scored without a stored signature or vocabulary row",
            ["model"],
            registry=r,
        )
        self.feature_store_duration = Histogram(
            "lma_feature_store_duration_seconds", "One feature-store fetch for a request",
            ["model"], buckets=STORE_BUCKETS, registry=r,
        )  # fmt: skip
        self.feature_store_errors = Counter(
            "lma_feature_store_errors_total", "Feature-store fetches that failed or timed out", ["model"], registry=r
        )
        self.feature_store_hits = Counter(
            "lma_feature_store_hits_total", "Entities of a fetch that had stored features", ["model"], registry=r
        )
        self.feature_store_misses = Counter(
            "lma_feature_store_misses_total", "Entities of a fetch with nothing stored", ["model"], registry=r
        )
        self.access_log_dropped = Counter(
            "lma_access_log_dropped_total", "Access-log lines dropped: the queue was full, or the log stream failed",
            registry=r,
        )  # fmt: skip
        self.reloads = Counter(
            "lma_model_reloads_total", "Model swaps by result (ok, failed, rejected)", ["model", "result"], registry=r
        )
        self._device_memory: DeviceMemorySource | None = None
        self.pending = Pending()
        self._exposition = self._exposition_registry()

    def _exposition_registry(self) -> CollectorRegistry:
        path = multiprocess_dir()
        if path is None:
            ProcessCollector(registry=self.registry)
            self.registry.register(_DeviceMemoryCollector(lambda: self._device_memory))
            return self.registry
        from prometheus_client import multiprocess

        exposition = CollectorRegistry()
        multiprocess.MultiProcessCollector(exposition, path=path)
        exposition.register(_DeviceMemoryCollector(lambda: self._device_memory))
        return exposition

    def set_device_memory_source(self, source: DeviceMemorySource) -> None:
        self._device_memory = source

    def asgi_app(self) -> Any:
        """``/metrics`` as prometheus_client serves it: text or OpenMetrics by the scraper's Accept header,
        gzip when it accepts it, ``name[]`` filters."""
        return make_asgi_app(self._exposition)

    def render(self) -> bytes:
        """The Prometheus text exposition (tests, tools)."""
        self.pending.flush()
        return bytes(generate_latest(self._exposition))

    async def flush_forever(self) -> None:
        """Apply the pending updates every ``FLUSH_S`` (the app runs this as a task; cancel it to stop)."""
        while True:
            await asyncio.sleep(FLUSH_S)
            self.pending.flush()

    def for_model(self, model: str, runtime: str, device: str) -> ModelMetrics:
        return ModelMetrics(self, model, runtime, device)

    # --- facts about the version being served ---

    def set_model(
        self, model: str, version: str, runtime: str, device: str, embedding: str, memory: dict[str, Any]
    ) -> None:
        self.model_info.labels(model, version, runtime, device, embedding).set(1)
        for part, value in memory_parts(memory).items():
            self.model_memory.labels(model, part).set(value)
        self.model_memory_total.labels(model).set(memory["total_bytes"])
        self.full_embedding.labels(model).set(memory["full_embedding_bytes"])
        self.compression.labels(model).set(memory["embedding_compression"])

    def clear_model(self, model: str, version: str, runtime: str, device: str, embedding: str) -> None:
        """Retire a replaced version's info series (memory gauges are overwritten by the new version)."""
        info = (model, version, runtime, device, embedding)
        self.model_info.labels(*info).set(0)  # what multiprocess mode keeps; a single process drops it below
        self.model_info.remove(*info)


def memory_parts(memory: dict[str, Any]) -> dict[str, int]:
    """``lma_model_memory_bytes`` parts from a manifest's memory accounting: each embedding part and dense.

    They add up to the total (``lma_model_memory_total_bytes``), so ``sum()`` over them never double-counts.
    """
    parts = {str(k): int(v) for k, v in memory["embedding_parts"].items()}
    parts["dense"] = int(memory["dense_bytes"])
    return parts


def observe_all(histogram: Any, values: np.ndarray) -> None:
    """Observe every value of ``values`` in a histogram child, in one pass (what ``observe`` does, per bucket).

    prometheus_client keeps one count per bucket (the first bound at or above the value) and the sum; adding
    a batch's counts bucket by bucket costs a few increments per batch instead of one call per sample.
    """
    if values.size == 0:
        return
    bounds = histogram._upper_bounds
    index = np.searchsorted(np.asarray(bounds[:-1], dtype=np.float64), values, side="left")
    counts = np.bincount(index, minlength=len(bounds))
    for i in np.flatnonzero(counts):
        histogram._buckets[i].inc(int(counts[i]))
    histogram._sum.inc(float(values.sum(dtype=np.float64)))
