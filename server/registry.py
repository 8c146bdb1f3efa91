"""Loaded models by name, and the ONE way a model version changes: :meth:`ModelRegistry.swap`.

Every update source goes through ``swap``: the start-up load, the admin route
(``POST /v1/models/{name}:reload``), the folder watcher (:meth:`ModelRegistry.watch`, polls the
repository for higher versions) and, with Redis, the model-update channel subscriber.

A swap loads the new version beside the old one (bundle checksums, graph inputs/outputs, runtime
session), warms it up, starts its batcher, then replaces the old version in one assignment on the
event loop. Requests that already hold the old version finish on it: each request pins the version
it started with (:meth:`ModelVersion.acquire`), and the old version's batcher and runtime are
closed only once no request holds it. A bundle that fails any step leaves the old version serving;
the failure is logged, counted in ``lma_model_reloads_total{result="failed"}`` and returned.

Signatures: with ``LMA_TRUSTED_KEYS`` every load, whatever its source, verifies the bundle's
signature before anything of it is parsed (:func:`export.bundle.load_bundle` with the trusted keys);
a bundle that is unsigned, signed by another key or changed after signing is *rejected*:
``lma_model_reloads_total{result="rejected"}``, an error log line naming the bundle and the reason
(``fields.rejected``), and the admin response says why. Without trusted keys the server says once,
at start, that signatures are not checked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.bundle import (
    Bundle,
    BundleError,
    SignatureError,
    is_version,
    latest_bundles,
    load_bundle,
    read_manifest,
    resolve_bundle,
)
from export.signing import TrustedKeys
from models.schema import warm_kernels
from server import heap
from server.batcher import Batcher
from server.errors import InvalidInput, ModelNotFound
from server.features import InMemoryFeatureStore
from server.featurize import Featurizer
from server.metrics import Metrics
from server.protocols.native import codec as native_codec
from server.protocols.v2 import codec as v2_codec
from server.runtimes import Runtime, create_runtime, resolve_device
from server.settings import Settings, runtime_threads

log = logging.getLogger("lma.server.registry")


class ModelVersion:
    """One loaded version: bundle, runtime, batcher, featurizer, and the requests holding it."""

    def __init__(self, bundle: Bundle, runtime: Runtime, batcher: Batcher) -> None:
        self.bundle = bundle
        self.runtime = runtime
        self.batcher = batcher
        self.featurizer = Featurizer(bundle.schema)
        self.name = bundle.name
        self.version = bundle.version
        self.embedding = str(bundle.manifest.get("embedding", {}).get("kind", "unknown"))
        self.loaded_at = time.time()
        self.active = 0  # requests between acquire() and release()
        self.retired = False
        self._idle = asyncio.Event()

    @property
    def info_labels(self) -> tuple[str, str, str, str]:
        """The labels of its ``lma_model_info`` series after the model name: version, runtime, device, embedding."""
        return self.version, self.runtime.name, self.runtime.device, self.embedding

    def acquire(self) -> None:
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        if self.active == 0 and self.retired:
            self._idle.set()

    async def wait_idle(self) -> None:
        if self.active:
            await self._idle.wait()

    def info(self) -> dict[str, Any]:
        schema = self.bundle.schema
        return {
            "name": self.name,
            "version": self.version,
            "path": str(self.bundle.path),
            "runtime": self.runtime.name,
            "device": self.runtime.device,
            "embedding": self.embedding,
            "created": self.bundle.manifest.get("created"),
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "dense_names": list(schema.dense_names),
            "categorical_names": list(schema.categorical_names),
            "memory": self.bundle.memory,
            "signed_by": self.bundle.signed_by,
            "queued": self.batcher.queued,
        }


@dataclass(frozen=True)
class SwapResult:
    """What a swap did. ``result`` is ``ok``, ``failed`` or ``rejected`` (signature refused: ``rejected_because``
    says why, one of :data:`export.bundle.SIGNATURE_REASONS`); ``version`` is the version serving afterwards."""

    model: str
    result: str
    version: str | None
    previous_version: str | None
    path: str
    message: str
    seconds: float
    rejected_because: str | None = None

    @property
    def ok(self) -> bool:
        return self.result == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "result": self.result,
            "version": self.version,
            "previous_version": self.previous_version,
            "path": self.path,
            "message": self.message,
            "seconds": round(self.seconds, 3),
        }


def preflight(settings: Settings) -> None:
    """What start-up would refuse, checked by ``lma serve`` before any worker starts, so that it ends with one
    line naming the cause (exit 2) instead of a worker's traceback: the device, the feature file, the trusted keys,
    and every bundle of LMA_MODEL_DIR verified as its load will verify it (manifest, checksums, signature)."""
    resolve_device(settings.runtime, settings.device)
    if settings.feature_store_path is not None and not settings.redis_url:
        try:
            InMemoryFeatureStore.check_file(settings.feature_store_path)
        except (OSError, ValueError) as e:
            raise ValueError(f"LMA_FEATURE_STORE_PATH: {e}") from None
    trust = TrustedKeys.from_files(settings.trusted_keys) if settings.trusted_keys else None
    found = latest_bundles(settings.model_dir)
    if (
        not found
        and (settings.model_dir / "config.json").is_file()
        and (settings.model_dir / "model.safetensors").exists()
    ):
        raise BundleError(
            f"LMA_MODEL_DIR: {settings.model_dir} is a run folder of lma train, not a bundle; export it first"
            f" (lma export {settings.model_dir} --out artifacts/NAME) and serve that"
        )
    for name, path in found.items():
        try:
            bundle = load_bundle(path, trust)
        except BundleError as e:
            raise BundleError(f"LMA_MODEL_DIR: model {name!r} cannot be loaded: {e}") from None
        if bundle.name != name:
            raise BundleError(f"LMA_MODEL_DIR: {path} holds model {bundle.name!r}, not {name!r}")


class ModelRegistry:
    """Models by name; see the module docstring for the swap protocol.

    Args:
        settings: server settings (model repository, runtime, device, batching).
        metrics: the app's metrics (model facts, reload counts, batcher children).
    """

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.runtime = settings.runtime
        self.device = resolve_device(settings.runtime, settings.device)
        self._models: dict[str, ModelVersion] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._failed: dict[Path, tuple[object, ...]] = {}  # watcher: bundles that failed -> their folder stamp
        self._closed = False
        # Loaded once: rotating keys is a restart with the new list (old and new trusted side by side meanwhile).
        self.trust = TrustedKeys.from_files(settings.trusted_keys) if settings.trusted_keys else None

    # --- lookup ---

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def get(self, name: str) -> ModelVersion:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFound(f"model {name!r} is not loaded; loaded models: {sorted(self._models)}") from None

    def versions(self) -> list[ModelVersion]:
        return [self._models[n] for n in sorted(self._models)]

    @property
    def default_name(self) -> str | None:
        """The model of ``POST /v1/predict``: LMA_DEFAULT_MODEL, else the first loaded name."""
        if self.settings.default_model:
            return self.settings.default_model
        return min(self._models) if self._models else None

    # --- loading and swapping ---

    async def load_repository(self) -> None:
        """Load the latest version of every model of LMA_MODEL_DIR; any failure stops the start-up."""
        if self.trust is None:
            log.warning("LMA_TRUSTED_KEYS is not set: bundle signatures are not checked (sha256 checksums only)")
        else:
            log.info("bundle signatures required: trusted keys %s", self.trust.describe())
        found = await asyncio.to_thread(latest_bundles, self.settings.model_dir)
        if not found:
            log.warning("no bundle in %s yet; not ready until one appears", self.settings.model_dir)
        for name, path in found.items():
            result = await self.swap(name, path, reason="startup")
            if not result.ok:
                raise ValueError(f"LMA_MODEL_DIR: model {name!r} could not be loaded: {result.message}")
        default = self.settings.default_model
        if default and default not in self._models:
            log.warning(
                "LMA_DEFAULT_MODEL=%s is none of the models loaded (%s): POST /v1/predict answers 503 until a"
                " model of that name is loaded (published, or put in LMA_MODEL_DIR)",
                default, ", ".join(sorted(self._models)) or "none",
            )  # fmt: skip

    async def swap(self, name: str, path: Path, reason: str = "admin") -> SwapResult:
        """Load ``path`` as the new version of ``name`` and serve it; on any failure keep the old one."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            start = time.perf_counter()
            old = self._models.get(name)
            previous = old.version if old else None
            try:
                if self._closed:
                    raise RuntimeError("the server is shutting down")
                new = await asyncio.to_thread(self._load, name, Path(path))
            except Exception as e:  # a bad bundle must never take the serving version down
                refused = e.reason if isinstance(e, SignatureError) else None
                result = SwapResult(
                    name, "rejected" if refused else "failed", previous, previous, str(path),
                    f"bundle rejected ({refused}): {e}" if refused else str(e), time.perf_counter() - start, refused,
                )  # fmt: skip
                self._record(result, reason, logging.ERROR)
                return result
            # the gauges of the new version (its memory entries were checked with its manifest), then the swap,
            # with no await in between
            self.metrics.set_model(name, *new.info_labels, new.bundle.memory)
            new.batcher.start()
            self._models[name] = new  # the swap: requests arriving from now on get the new version
            if old is not None:
                if old.info_labels != new.info_labels:  # the same labels are the new version's series now
                    self.metrics.clear_model(name, *old.info_labels)
                task = asyncio.get_running_loop().create_task(
                    self._retire(old), name=f"lma-retire-{name}-{old.version}"
                )
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
                # once the task is done its frame no longer holds the old version: collect what of it sits in
                # reference cycles (frozen at start-up, server/heap.py), whether it closed cleanly or not
                task.add_done_callback(lambda _: heap.settle())
            message = f"serving version {new.version}" + (f" (was {previous})" if previous else "")
            if new.bundle.signed_by is not None:
                message += f", signed by key {new.bundle.signed_by[:16]}"
            result = SwapResult(name, "ok", new.version, previous, str(path), message, time.perf_counter() - start)
            self._record(result, reason, logging.INFO)
            return result

    def _load(self, name: str, path: Path) -> ModelVersion:
        """Runs in a worker thread: verify, load, warm up. Raises on anything wrong."""
        bundle = load_bundle(path, self.trust)  # the signature first, when keys are trusted; nothing parsed before
        if bundle.name != name:
            raise BundleError(f"{path} holds model {bundle.name!r}, not {name!r}")
        s = self.settings
        # the compiled kernels of the request path (native body scan, binary v2 elements, packed-token keys):
        # compiled, or loaded from Numba's cache, here and not at a first request
        for warm in (native_codec.warm, v2_codec.warm, warm_kernels):
            warm()
        runtime = create_runtime(bundle, self.runtime, self.device, runtime_threads(s))
        try:
            runtime.warmup(sorted({1, min(8, s.max_batch_size), s.max_batch_size}))
        except Exception:
            runtime.close()
            raise
        batcher = Batcher(
            runtime,
            name=name,
            max_batch_size=s.max_batch_size,
            max_wait_ms=s.max_wait_ms,
            max_queue=s.max_queue,
            metrics=self.metrics.for_model(name, runtime.name, runtime.device),
        )
        return ModelVersion(bundle, runtime, batcher)

    async def _retire(self, old: ModelVersion) -> None:
        """Let the requests holding ``old`` finish, then close its batcher and runtime."""
        old.retired = True
        timeout = self.settings.drain_timeout_s
        try:
            await asyncio.wait_for(old.wait_idle(), timeout)
        except TimeoutError:
            log.error("model %s version %s still busy after %.0fs; closing it", old.name, old.version, timeout)
        await old.batcher.close(timeout)
        await asyncio.to_thread(old.runtime.close)
        log.info("released model %s version %s", old.name, old.version)

    def _record(self, result: SwapResult, reason: str, level: int) -> None:
        if reason != "startup":
            self.metrics.reloads.labels(result.model, result.result).inc()
        fields = {**result.to_dict(), "reason": reason}
        if result.rejected_because is not None:
            fields["rejected"] = result.rejected_because
        what = {"ok": "loaded", "failed": "load failed", "rejected": "bundle rejected"}[result.result]
        log.log(level, "model %s: %s", what, fields["message"], extra={"fields": fields})

    # --- update sources ---

    def resolve(self, name: str, path: str | None = None, version: str | None = None) -> Path:
        """The bundle an admin reload means: an explicit path, a version of the repository, or its latest."""
        self.get(name)  # 404 for models that are not loaded
        if path is not None and version is not None:
            raise InvalidInput("body: give either 'path' or 'version', not both")
        if path is not None:
            return Path(path)
        if version is not None and not is_version(version):
            raise InvalidInput(f"body.version: expected a positive integer as text, got {version!r}")
        try:  # LMA_MODEL_DIR is a bundle (versions: its siblings), a model's folder of versions, or a repository
            return resolve_bundle(self.settings.model_dir, name=name, version=version)
        except BundleError as e:
            raise InvalidInput(str(e)) from None

    async def reload(self, name: str, path: str | None = None, version: str | None = None) -> SwapResult:
        return await self.swap(name, self.resolve(name, path, version), reason="admin")

    async def poll_once(self) -> list[SwapResult]:
        """One look at the repository: swap in every version higher than the one serving."""
        try:
            found = await asyncio.to_thread(latest_bundles, self.settings.model_dir)
        except (OSError, BundleError) as e:
            log.warning("cannot read the model repository: %s", e)
            return []
        results = []
        for name, path in found.items():
            current = self._models.get(name)
            try:
                version = path.name if is_version(path.name) else str(read_manifest(path)["version"])
                stamp = _folder_stamp(path)
            except (OSError, BundleError):
                continue  # half-written or vanished: look again next time
            if current is not None and is_version(version) and int(version) <= int(current.version):
                continue
            if self._failed.get(path) == stamp:
                continue  # failed before and unchanged since: do not retry (and re-count) every poll
            result = await self.swap(name, path, reason="watch")
            if result.ok:
                self._failed.pop(path, None)
            else:
                self._failed[path] = stamp
            results.append(result)
        return results

    async def watch(self, interval_s: float) -> None:
        """Poll the repository forever (cancel the task to stop)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.poll_once()
            except Exception:
                log.exception("model repository poll failed")

    async def close(self) -> None:
        """Finish queued work of every model, then release batchers and runtimes."""
        self._closed = True
        if self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)
        models = list(self._models.values())
        self._models.clear()
        for mv in models:
            await mv.batcher.close(self.settings.drain_timeout_s)
            await asyncio.to_thread(mv.runtime.close)


def _folder_stamp(path: Path) -> tuple[object, ...]:
    """Changes whenever a file of the folder is replaced, rewritten, added or removed."""
    return tuple(sorted((p.name, st.st_ino, st.st_size, st.st_mtime_ns) for p in path.iterdir() for st in [p.stat()]))
