"""Runtimes: one interface over ONNX Runtime and TorchScript, chosen by name, not by file extension.

A runtime owns one loaded graph of a bundle (inputs ``dense`` float32 (B, n_dense), ``keys`` int64
(B, F); outputs ``probability`` float32 (B, 1), ``fallback_tokens`` int64 (B,)) and runs it on CPU
or CUDA. The batcher calls :meth:`Runtime.run` one batch at a time (from its runtime thread, or on
the event loop for batches that :meth:`Runtime.expected_seconds` says are short), so a runtime needs
no locking of its own.

``RUNTIMES`` maps the setting ``LMA_RUNTIME`` to a class; the bundle's manifest names the graph
file of each runtime (:meth:`export.bundle.Bundle.file`). Adding a runtime is one class and one
entry there.

Batch invariance: ONNX Runtime's CPU kernels that the exported graphs use compute every row the same
way whatever the batch size, so a sample's score is bit-identical alone or inside any batch (its
float ReduceSum does not, which is why the graphs sum over fields with matrix products: models/linear.py;
tests/models/test_dlrm.py::TestBatchInvariance checks every architecture). TorchScript on CPU uses MKL,
which picks GEMM kernels by batch shape, so its scores agree across batch sizes to float32 rounding
(~1e-7), not bit for bit.
"""

from __future__ import annotations

import bisect
import ctypes
import io
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cache
from typing import Any, ClassVar

import numpy as np

from export.bundle import Bundle
from export.contract import (
    DENSE_INPUT,
    INPUT_NAMES,
    KEYS_INPUT,
    OUTPUT_NAMES,
    SCHEMA_DIGEST_KEY,
    check_schema_digest,
)
from export.onnx_runtime import session_options
from models.extras import MissingExtra, check
from server.types import Batch, Scores

log = logging.getLogger(__name__)

INPUTS = INPUT_NAMES  # the graph contract's owner: export.contract
OUTPUTS = OUTPUT_NAMES
DEVICES = ("auto", "cpu", "cuda")


class RuntimeUnavailable(ValueError):
    """The requested runtime or device cannot be used on this machine."""


class Runtime(ABC):
    """A loaded graph that scores batches.

    Args:
        bundle: a verified bundle (:func:`export.bundle.load_bundle`).
        device: ``cpu`` or ``cuda`` (resolve ``auto`` with :func:`resolve_device` first).
        threads: intra-op threads of one run (0: the runtime's default).
    """

    name: ClassVar[str]
    # (module, extra) of a runtime that is not part of the base install (pyproject.toml's extras).
    requires: ClassVar[tuple[str, str] | None] = None

    def __init__(self, bundle: Bundle, device: str, threads: int = 0) -> None:
        self.bundle = bundle
        self.device = device
        self.threads = threads
        self._cost: dict[int, float] = {}  # batch size -> seconds of one run, measured by warmup()
        self._expected: dict[int, float] = {}  # batch size -> expected_seconds(size), memoized (admission asks often)

    @classmethod
    @abstractmethod
    def cuda_available(cls) -> bool:
        """Whether this runtime can run on a CUDA device here."""

    @abstractmethod
    def run(self, batch: Batch) -> Scores:
        """Score one batch (called by the batcher: in its runtime thread, or inline for short runs)."""

    def warmup(self, sizes: Sequence[int]) -> None:
        """Run all-missing batches of ``sizes`` (three times each) so the first real request pays no set-up.

        The fastest run of each size is kept as that size's cost (:meth:`expected_seconds`).
        """
        schema = self.bundle.schema
        for size in sizes:
            batch = Batch.zeros(size, schema.num_dense, schema.num_fields)
            best = math.inf
            for _ in range(3):
                start = time.perf_counter()
                scores = self.run(batch)
                best = min(best, time.perf_counter() - start)
            if len(scores) != size or not np.all(np.isfinite(scores.probability)):
                raise RuntimeError(f"{self.bundle.path}: warm-up batch of {size} gave {len(scores)} non-finite scores")
            self._cost[size] = best
        self._expected.clear()

    def expected_seconds(self, size: int) -> float | None:
        """How long one run of ``size`` samples takes, from the warm-up timings (None before any warm-up).

        Linear between the measured sizes, and beyond them along the line through the two nearest.
        """
        known = self._expected.get(size)
        if known is not None:
            return known
        if not self._cost:
            return None
        self._expected[size] = value = self._interpolate(size)
        return value

    def _interpolate(self, size: int) -> float:
        points = sorted(self._cost.items())
        if len(points) == 1:
            (n, t) = points[0]
            return t * max(size, 1) / n
        i = bisect.bisect_left([n for n, _ in points], size)
        (n0, t0), (n1, t1) = points[min(max(i - 1, 0), len(points) - 2) :][:2]
        return max(0.0, t0 + (t1 - t0) * (size - n0) / (n1 - n0))

    def device_memory_bytes(self) -> int | None:
        """Device memory in use (None on CPU)."""
        return gpu_memory_used() if self.device == "cuda" else None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the graph (the object is unusable afterwards)."""


class OnnxRuntime(Runtime):
    """ONNX Runtime: CPUExecutionProvider, or CUDAExecutionProvider with pre-allocated output buffers."""

    name = "onnx"

    @classmethod
    def cuda_available(cls) -> bool:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers() and gpu_count() > 0

    def __init__(self, bundle: Bundle, device: str, threads: int = 0) -> None:
        super().__init__(bundle, device, threads)
        import onnxruntime as ort

        opts = session_options(threads)
        cuda = device == "cuda"
        providers: list[Any] = [("CUDAExecutionProvider", {"device_id": 0})] if cuda else []
        providers.append("CPUExecutionProvider")
        # The verified bytes, not the file by name: a file swapped after verification is refused, never parsed.
        self._session = ort.InferenceSession(bundle.read_verified(self.name), opts, providers=providers)
        if cuda and self._session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeUnavailable(f"{bundle.path}: ONNX Runtime could not start its CUDA provider")
        _check_names(
            bundle, [i.name for i in self._session.get_inputs()], [o.name for o in self._session.get_outputs()]
        )
        recorded = self._session.get_modelmeta().custom_metadata_map.get(SCHEMA_DIGEST_KEY)
        check_schema_digest(str(bundle.file(self.name)), recorded, bundle.schema)
        self._binding = self._session.io_binding() if cuda else None
        self._capacity = 0
        self._out: dict[str, Any] = {}

    def run(self, batch: Batch) -> Scores:
        if self._binding is not None:
            return self._run_cuda(batch)
        probability, fallback = self._session.run(OUTPUTS, {DENSE_INPUT: batch.dense, KEYS_INPUT: batch.keys})
        return Scores(probability.reshape(-1), fallback.reshape(-1))

    def _run_cuda(self, batch: Batch) -> Scores:
        import onnxruntime as ort

        size = len(batch)
        if size > self._capacity:  # output buffers live on the device and grow to the largest batch seen
            self._capacity = max(size, 2 * self._capacity)
            self._out = {
                "probability": ort.OrtValue.ortvalue_from_shape_and_type((self._capacity, 1), np.float32, "cuda", 0),
                "fallback_tokens": ort.OrtValue.ortvalue_from_shape_and_type((self._capacity,), np.int64, "cuda", 0),
            }
        io = self._binding
        assert io is not None
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_cpu_input("dense", batch.dense)
        io.bind_cpu_input("keys", batch.keys)
        io.bind_output("probability", "cuda", 0, np.float32, (size, 1), self._out["probability"].data_ptr())
        io.bind_output("fallback_tokens", "cuda", 0, np.int64, (size,), self._out["fallback_tokens"].data_ptr())
        self._session.run_with_iobinding(io)
        probability, fallback = io.copy_outputs_to_cpu()
        return Scores(probability.reshape(-1), fallback.reshape(-1))

    def close(self) -> None:
        self._binding = None
        self._out = {}
        del self._session


class TorchScriptRuntime(Runtime):
    """TorchScript (``torch.jit.load``, no pickle) on CPU or CUDA, under ``torch.inference_mode``."""

    name = "torchscript"
    requires = ("torch", "torchscript")

    @classmethod
    def cuda_available(cls) -> bool:
        import torch

        return bool(torch.cuda.is_available())

    def __init__(self, bundle: Bundle, device: str, threads: int = 0) -> None:
        super().__init__(bundle, device, threads)
        import torch

        if threads:
            torch.set_num_threads(threads)  # process-wide: torch has one intra-op pool
        self._torch = torch
        self._device = torch.device("cuda:0" if device == "cuda" else "cpu")
        # The verified bytes, not the file by name: a TorchScript file is code, and must be exactly the checked one.
        extra = {SCHEMA_DIGEST_KEY: ""}
        self._module = torch.jit.load(
            io.BytesIO(bundle.read_verified(self.name)), map_location=self._device, _extra_files=extra
        ).eval()
        recorded = extra[SCHEMA_DIGEST_KEY]
        check_schema_digest(
            str(bundle.file(self.name)),
            (recorded.decode() if isinstance(recorded, bytes) else recorded) or None,
            bundle.schema,
        )
        graph_inputs = [i.debugName().split(".")[0] for i in list(self._module.graph.inputs())[1:]]
        _check_names(bundle, graph_inputs, list(OUTPUTS))

    def _tensor(self, a: np.ndarray) -> Any:
        if not a.flags.writeable:  # torch.from_numpy warns on read-only views (e.g. of a request body)
            a = a.copy()
        return self._torch.from_numpy(a).to(self._device, non_blocking=True)

    def run(self, batch: Batch) -> Scores:
        with self._torch.inference_mode():
            probability, fallback = self._module(self._tensor(batch.dense), self._tensor(batch.keys))
            return Scores(probability.reshape(-1).cpu().numpy(), fallback.reshape(-1).cpu().numpy())

    def device_memory_bytes(self) -> int | None:
        return int(self._torch.cuda.memory_reserved(self._device)) if self.device == "cuda" else None

    def close(self) -> None:
        del self._module
        if self.device == "cuda":
            self._torch.cuda.empty_cache()


RUNTIMES: dict[str, type[Runtime]] = {cls.name: cls for cls in (OnnxRuntime, TorchScriptRuntime)}


def _check_names(bundle: Bundle, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    if tuple(inputs) != INPUTS or tuple(outputs) != OUTPUTS:
        raise RuntimeUnavailable(
            f"{bundle.path}: graph has inputs {list(inputs)} and outputs {list(outputs)};"
            f" the server needs inputs {list(INPUTS)} and outputs {list(OUTPUTS)}"
        )


def resolve_device(runtime: str, device: str) -> str:
    """``auto`` -> ``cuda`` where this runtime can use a GPU here, else ``cpu``; ``cuda`` must be usable."""
    cls = runtime_class(runtime)
    if device not in DEVICES:
        raise RuntimeUnavailable(f"unknown device {device!r}; choose from {DEVICES}")
    if device == "cpu":
        return "cpu"
    if cls.cuda_available():
        return "cuda"
    if device == "cuda":
        raise RuntimeUnavailable(f"LMA_DEVICE=cuda, but the {runtime} runtime sees no usable CUDA device here")
    return "cpu"


def runtime_class(runtime: str) -> type[Runtime]:
    """The class of ``runtime``; :class:`RuntimeUnavailable` if unknown or its extra is not installed."""
    try:
        cls = RUNTIMES[runtime]
    except KeyError:
        raise RuntimeUnavailable(f"unknown runtime {runtime!r}; choose from {sorted(RUNTIMES)}") from None
    if cls.requires is not None:
        module, extra = cls.requires
        try:
            check(module, extra, f"the {runtime} runtime")
        except MissingExtra as e:
            raise RuntimeUnavailable(str(e)) from e
    return cls


def create_runtime(bundle: Bundle, runtime: str, device: str, threads: int = 0) -> Runtime:
    """Load ``bundle``'s graph for ``runtime`` on ``device`` (``cpu`` or ``cuda``)."""
    return runtime_class(runtime)(bundle, device, threads)


# --- GPU presence and memory through NVML (no CUDA context, no torch needed) ---


@cache
def _nvml() -> Any:
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    return lib if lib.nvmlInit_v2() == 0 else None


def gpu_count() -> int:
    lib = _nvml()
    count = ctypes.c_uint(0)
    if lib is None or lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def gpu_memory_used(index: int = 0) -> int | None:
    """Bytes in use on GPU ``index`` (all processes), or None without NVML."""
    lib = _nvml()
    if lib is None:
        return None
    handle = ctypes.c_void_p()
    mem = _NvmlMemory()
    if lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
        return None
    if lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) != 0:
        return None
    return int(mem.used)
