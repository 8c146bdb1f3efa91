"""Runtimes: one interface, chosen by name; ONNX Runtime and TorchScript agree; devices resolve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from export.bundle import Bundle, load_bundle
from export.contract import RUNTIME_FILES, check_schema_digest, schema_digest
from server.runtimes import (
    RUNTIMES,
    OnnxRuntime,
    RuntimeUnavailable,
    TorchScriptRuntime,
    create_runtime,
    gpu_count,
    resolve_device,
)
from server.types import Batch
from tests.helpers.serving import Bundles


def batch_for(bundle: Bundle, n: int = 33, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    dense = rng.random((n, bundle.schema.num_dense), dtype=np.float32)
    return Batch(dense, rng.integers(0, 2**62, size=(n, bundle.schema.num_fields), dtype=np.int64))


def test_registry_of_runtimes() -> None:
    assert {"onnx": OnnxRuntime, "torchscript": TorchScriptRuntime} == RUNTIMES
    with pytest.raises(RuntimeUnavailable, match="unknown runtime 'tvm'; choose from"):
        resolve_device("tvm", "cpu")


@pytest.mark.parametrize("which", ["criteo_v1", "avazu", "full"])
def test_onnx_and_torchscript_agree(bundles: Bundles, full_bundle: Bundle, which: str) -> None:
    bundle = full_bundle if which == "full" else getattr(bundles, which)
    batch = batch_for(bundle)
    onnx = create_runtime(bundle, "onnx", "cpu", threads=1)
    ts = create_runtime(bundle, "torchscript", "cpu", threads=1)
    a, b = onnx.run(batch), ts.run(batch)
    assert a.probability.shape == (33,) and a.probability.dtype == np.float32
    np.testing.assert_allclose(a.probability, b.probability, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(a.fallback_tokens, b.fallback_tokens)
    onnx.warmup([1, 4])
    ts.warmup([1, 4])
    onnx.close()
    ts.close()


def test_torchscript_accepts_read_only_arrays(bundles: Bundles) -> None:
    batch = batch_for(bundles.criteo_v1, n=3)
    batch.dense.flags.writeable = False
    batch.keys.flags.writeable = False
    ts = create_runtime(bundles.criteo_v1, "torchscript", "cpu")
    assert len(ts.run(batch)) == 3


def test_cpu_is_chosen_without_a_gpu() -> None:
    if gpu_count():
        pytest.skip("this machine has a GPU")
    assert resolve_device("onnx", "auto") == resolve_device("torchscript", "auto") == "cpu"
    with pytest.raises(RuntimeUnavailable, match="LMA_DEVICE=cuda, but the onnx runtime sees no usable CUDA device"):
        resolve_device("onnx", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("runtime", ["onnx", "torchscript"])
def test_cuda_matches_cpu(bundles: Bundles, runtime: str) -> None:
    if not RUNTIMES[runtime].cuda_available():
        pytest.skip(f"no CUDA device for the {runtime} runtime")
    batch = batch_for(bundles.criteo_v1, n=300)
    cpu = create_runtime(bundles.criteo_v1, runtime, "cpu").run(batch)
    gpu_rt = create_runtime(bundles.criteo_v1, runtime, "cuda")
    for size in (300, 7, 300):  # output buffers grow and are reused
        gpu = gpu_rt.run(batch.slice(0, size))
        np.testing.assert_allclose(gpu.probability, cpu.probability[:size], atol=1e-5)
        np.testing.assert_array_equal(gpu.fallback_tokens, cpu.fallback_tokens[:size])
    assert (gpu_rt.device_memory_bytes() or 0) > 0


@pytest.mark.parametrize("runtime", ["onnx", "torchscript"])
def test_a_manifest_schema_changed_after_export_is_refused(bundles: Bundles, tmp_path: Path, runtime: str) -> None:
    # the manifest is the one file its checksums cannot cover: its hash_seed, edited, once scored other keys
    # (0.3208 instead of 0.3031 for the README's row) without a word. Each graph records its schema's digest.
    copy = tmp_path / "criteo" / "1"
    shutil.copytree(bundles.criteo_v1.path, copy)
    bundle = load_bundle(copy)
    create_runtime(bundle, runtime, "cpu", threads=1).close()  # as exported: the records agree
    check_schema_digest("old bundle", None, bundle.schema)  # bundles exported before the record: not checked
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["schema"]["hash_seed"] != 7
    manifest["schema"]["hash_seed"] = 7
    (copy / "manifest.json").write_text(json.dumps(manifest))
    edited = load_bundle(copy)  # checksums and manifest entries: all fine
    recorded = schema_digest(bundle.schema)[:16]
    message = (
        rf"^{copy / RUNTIME_FILES[runtime]}: the graph was exported for another feature schema \(sha256 {recorded}"
    )
    with pytest.raises(ValueError, match=message + r"\.\.\.\) than manifest\.json gives"):
        create_runtime(edited, runtime, "cpu", threads=1)
