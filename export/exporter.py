"""Run folder -> bundle: TorchScript + ONNX graphs, parity-verified, with a checksummed manifest.

    lma export runs/lma16 --out artifacts/criteo            # -> artifacts/criteo/<next version>/

Both graphs have the same contract (DESIGN section 6):

    inputs   dense            float32 (B, n_dense)  already transform_dense'd ("log1p-clip0")
             keys             int64   (B, F)        token keys of models.schema
    outputs  probability      float32 (B, 1)
             fallback_tokens  int64   (B,)          tokens of the row without a stored signature / vocabulary row

The whole embedding (hash tables, LMA hashing, the shared memory) is inside the graphs, so a runtime
needs nothing but the keys. With no dense features (Avazu) ``dense`` is (B, 0): the TorchScript graph
ignores it, and the ONNX graph declares it as an unused input (the legacy exporter drops unused
inputs; we put it back) so every runtime feeds the same two tensors.

Export is all or nothing: the files go to a hidden temporary folder next to the final one, the
saved graphs are reloaded from disk and scored against the eager model (TorchScript and ONNX
Runtime on the CPU provider, random keys including never-seen 62-bit keys, and rows of the
training data when the run folder says where they are, at batch sizes 1, 7 and 1024); only when
every |difference| is within tolerance and every ``fallback_tokens`` is equal is the manifest
written and the folder renamed into place. A failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import shutil
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from export.bundle import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    NAME_PATTERN,
    RUNTIME_FILES,
    Bundle,
    BundleError,
    is_version,
    load_bundle,
    sha256_file,
)
from models.checkpoint import RunConfig, load_run, memory_accounting
from models.dlrm import CTRModel
from models.embeddings import FullEmbedding, SharedMemoryEmbedding
from models.hashtable import StaticHashTable
from models.schema import KEY_MASK, FeatureSchema, transform_dense

if TYPE_CHECKING:
    from export.signing import BundleSigner

log = logging.getLogger(__name__)

ONNX_OPSET = 18
ONNX_EXPORTERS = ("legacy", "dynamo")
DEFAULT_ONNX_EXPORTER = "legacy"
PARITY_BATCH_SIZES = (1, 7, 1024)
ONNX_DATA_FILE = "model.onnx.data"  # weights of graphs too large for one protobuf file
EXTERNAL_DATA_BYTES = 1 << 30
DEFAULT_TOLERANCE = 1e-5
INPUT_NAMES = ("dense", "keys")
OUTPUT_NAMES = ("probability", "fallback_tokens")
PAIRS = ("eager_vs_torchscript", "eager_vs_onnx", "torchscript_vs_onnx")


class ParityError(BundleError):
    """An exported graph scores differently from the eager model (beyond tolerance)."""


# --------------------------------------------------------------------------------------------
# Graph contract


def graph_io(schema: FeatureSchema) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The manifest's ``inputs`` and ``outputs``: name, dtype, shape ("batch" = dynamic)."""
    dense: dict[str, Any] = {
        "name": "dense",
        "dtype": "float32",
        "shape": ["batch", schema.num_dense],
        "transform": schema.dense_transform,
    }
    if schema.num_dense == 0:
        dense["note"] = "no dense features: feed a (batch, 0) float32 tensor; both graphs ignore it"
    inputs: list[dict[str, Any]] = [dense, {"name": "keys", "dtype": "int64", "shape": ["batch", schema.num_fields]}]
    outputs: list[dict[str, Any]] = [
        {"name": "probability", "dtype": "float32", "shape": ["batch", 1]},
        {"name": "fallback_tokens", "dtype": "int64", "shape": ["batch"]},
    ]
    return inputs, outputs


def _example_inputs(schema: FeatureSchema, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    dense = torch.from_numpy(rng.random((batch, schema.num_dense), dtype=np.float32))
    keys = torch.from_numpy(rng.integers(0, KEY_MASK, size=(batch, schema.num_fields), dtype=np.int64))
    return dense, keys


# --------------------------------------------------------------------------------------------
# TorchScript and ONNX


def script_model(model: CTRModel) -> torch.jit.ScriptModule:
    """``torch.jit.script`` (not trace): the table lookups keep their exact integer semantics."""
    return torch.jit.script(model.eval())


def export_torchscript(model: CTRModel, path: Path) -> None:
    torch.jit.save(script_model(model), str(path))


def export_onnx(model: CTRModel, schema: FeatureSchema, path: Path, exporter: str = DEFAULT_ONNX_EXPORTER) -> None:
    """Write ``model`` as ONNX (opset :data:`ONNX_OPSET`, dynamic batch) and check it with onnx.checker.

    ``legacy`` (TorchScript-based ``torch.onnx.export(dynamo=False)``) is the default: it exports
    in a fraction of a second where ``dynamo`` takes several, and its graph ran faster in ONNX
    Runtime (docs/EXPORT.md: dynamo emits GatherND plus index-wrapping ops for every advanced
    index); both give identical integer results.

    A graph whose weights pass :data:`EXTERNAL_DATA_BYTES` (a full-embedding model at Criteo scale;
    protobuf caps one file at 2 GiB) keeps them in one side file, :data:`ONNX_DATA_FILE`, next to it.
    """
    import onnx

    if exporter not in ONNX_EXPORTERS:
        raise ValueError(f"ONNX exporter must be one of {ONNX_EXPORTERS}, got {exporter!r}")
    model = model.eval()
    args = _example_inputs(schema)
    staging = path.parent / f".onnx-{uuid.uuid4().hex[:8]}"  # large exports write side files: keep them apart
    staging.mkdir()
    raw = staging / path.name
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # the exporters' chatter (deprecations, dynamo progress lines)
            if exporter == "legacy":
                torch.onnx.export(
                    model,
                    args,
                    str(raw),
                    input_names=list(INPUT_NAMES),
                    output_names=list(OUTPUT_NAMES),
                    dynamic_axes={name: {0: "batch"} for name in INPUT_NAMES + OUTPUT_NAMES},
                    opset_version=ONNX_OPSET,
                    dynamo=False,
                )
            else:
                batch = torch.export.Dim("batch", min=1)
                program = torch.onnx.export(
                    model,
                    args,
                    input_names=list(INPUT_NAMES),
                    output_names=list(OUTPUT_NAMES),
                    dynamic_shapes=({0: batch}, {0: batch}),
                    opset_version=ONNX_OPSET,
                    dynamo=True,
                    optimize=True,
                    verbose=False,
                )
                if program is None:
                    raise BundleError("the dynamo ONNX exporter returned no program")
                program.save(str(raw))
        proto = onnx.load(str(raw))  # pulls in any external data the exporter wrote
        _ensure_dense_input(proto, schema)
        weights = sum(len(t.raw_data) for t in proto.graph.initializer)
        if weights > EXTERNAL_DATA_BYTES:
            onnx.save_model(
                proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                location=ONNX_DATA_FILE, size_threshold=1024,
            )  # fmt: skip
        else:
            onnx.save_model(proto, str(path))
        del proto
        onnx.checker.check_model(str(path), full_check=True)  # by path: works with external data too
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _ensure_dense_input(proto: Any, schema: FeatureSchema) -> None:
    """Keep the two-input contract when ``dense`` is unused (n_dense = 0): declare it, unused."""
    from onnx import TensorProto, helper

    names = [i.name for i in proto.graph.input]
    if "dense" in names:
        return
    if schema.num_dense:
        raise BundleError(
            f"the ONNX exporter dropped the dense input of a model with {schema.num_dense} dense features"
        )
    dense = helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["batch", 0])
    proto.graph.input.insert(0, dense)


def onnx_summary(path: Path, exporter: str) -> dict[str, Any]:
    """Opset, node count and op-type counts of the graph, and of its embedding part alone."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    nodes = [n for n in proto.graph.node if n.op_type != "Constant"]
    embedding = [n for n in nodes if "embedding" in n.name]
    external = (path.parent / ONNX_DATA_FILE).is_file()
    return {
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "external_data": ONNX_DATA_FILE if external else None,
        "ir_version": int(proto.ir_version),
        "exporter": exporter,
        "node_count": len(nodes),
        "constant_nodes": len(proto.graph.node) - len(nodes),
        "op_types": dict(sorted(Counter(n.op_type for n in nodes).items())),
        "embedding_node_count": len(embedding),
        "embedding_op_types": dict(sorted(Counter(n.op_type for n in embedding).items())),
    }


def onnx_session(path: Path, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session (``threads`` = 0: ORT's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------
# Parity


@dataclass
class ParityCase:
    source: str  # "random" or "data"
    dense: np.ndarray  # float32 (B, n_dense), transformed
    keys: np.ndarray  # int64 (B, F)

    @property
    def label(self) -> str:
        return f"{self.source}/b{self.keys.shape[0]}"


def key_table(model: CTRModel) -> tuple[str, StaticHashTable]:
    """The embedding's in-graph hash table: the signature table (hash/lma) or the vocabulary index (full)."""
    emb = model.dlrm.embedding
    if isinstance(emb, SharedMemoryEmbedding):
        return "signature_table", emb.signatures
    if isinstance(emb, FullEmbedding):
        return "vocabulary_index", emb.vocabulary
    raise BundleError(f"cannot export an embedding of type {type(emb).__name__}")


def stored_keys(model: CTRModel) -> np.ndarray:
    """Keys the model's table stores (signatures for lma, vocabulary for full): hits to exercise."""
    keys = key_table(model)[1].get_buffer("table_keys").numpy().ravel()
    return keys[keys >= 0]


def random_cases(model: CTRModel, schema: FeatureSchema, seed: int = 0) -> list[ParityCase]:
    """Random rows at each parity batch size: half the keys stored in the model's table (where it has
    one), half random 62-bit keys (never seen in training), plus the extreme keys 0 and 2**62 - 1;
    dense values drawn like heavy-tailed counts (some missing, some negative) and transformed."""
    rng = np.random.default_rng(seed)
    known = stored_keys(model)
    cases = []
    for b in PARITY_BATCH_SIZES:
        keys = rng.integers(0, KEY_MASK, size=(b, schema.num_fields), dtype=np.int64, endpoint=True)
        if known.size:
            pick = rng.random(keys.shape) < 0.5
            keys[pick] = rng.choice(known, size=int(pick.sum()))
        if b > 1:
            keys[-1, 0], keys[-1, -1] = 0, KEY_MASK
        raw = np.floor(rng.lognormal(mean=1.0, sigma=2.0, size=(b, schema.num_dense)))
        raw[rng.random(raw.shape) < 0.1] = np.nan
        raw[rng.random(raw.shape) < 0.05] = -1.0
        cases.append(ParityCase("random", transform_dense(raw), keys))
    return cases


def data_cases(cfg: RunConfig, limit: int = max(PARITY_BATCH_SIZES)) -> list[ParityCase]:
    """Rows of the run's training data (``config.json`` ``data.cache``), if that cache is readable.

    The cache is the folder :func:`models.data.prepare` writes (``dense.npy``, already transformed,
    and ``keys.npy``, memory-mapped); rows are taken evenly spaced over the file. Returns [] when
    the run names no cache or it is gone or does not match the schema.
    """
    cache = cfg.extra.get("data", {}).get("cache") if isinstance(cfg.extra.get("data"), dict) else None
    if not cache:
        return []
    try:
        dense_all, keys_all = _read_cache(Path(cache))
    except (OSError, ValueError) as e:
        log.warning("parity on random rows only: data cache %s unreadable (%s)", cache, e)
        return []
    n = keys_all.shape[0]
    if n == 0 or keys_all.shape[1] != cfg.schema.num_fields or dense_all.shape[1] != cfg.schema.num_dense:
        log.warning("parity on random rows only: data cache %s does not match the schema", cache)
        return []
    idx = np.unique(np.linspace(0, n - 1, num=min(limit, n)).astype(np.int64))
    dense = np.asarray(dense_all[idx], dtype=np.float32)
    keys = np.asarray(keys_all[idx], dtype=np.int64)
    return [ParityCase("data", dense[:b], keys[:b]) for b in PARITY_BATCH_SIZES if b <= idx.size]


def _read_cache(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    dense = np.load(cache / "dense.npy", mmap_mode="r", allow_pickle=False)
    keys = np.load(cache / "keys.npy", mmap_mode="r", allow_pickle=False)
    if dense.ndim != 2 or keys.ndim != 2 or dense.shape[0] != keys.shape[0]:
        raise ValueError(f"dense {dense.shape} and keys {keys.shape} are not two tables of one row count")
    return dense, keys


def _score(scorer: Any, case: ParityCase) -> tuple[np.ndarray, np.ndarray]:
    """(probability, fallback_tokens) of one case from a torch module or an ONNX Runtime session."""
    if isinstance(scorer, torch.nn.Module | torch.jit.ScriptModule):
        with torch.inference_mode():
            p, f = scorer(torch.from_numpy(case.dense), torch.from_numpy(case.keys))
        return p.numpy(), f.numpy()
    p, f = scorer.run(list(OUTPUT_NAMES), {"dense": case.dense, "keys": case.keys})
    return np.asarray(p), np.asarray(f)


def verify_parity(
    model: CTRModel, ts_path: Path, onnx_path: Path, cases: list[ParityCase], tolerance: float
) -> dict[str, Any]:
    """Score every case with eager, the saved TorchScript and the saved ONNX graph; compare.

    Raises:
        ParityError: naming the runtime pair, the case (source and batch size) and max |diff|,
            when a probability differs by more than ``tolerance`` or any fallback count differs.
    """
    scripted = torch.jit.load(str(ts_path), map_location="cpu")
    session = onnx_session(onnx_path)
    diffs: dict[str, dict[str, float]] = {pair: {} for pair in PAIRS}
    worst = ("", "", -1.0)
    for case in cases:
        probs, fallbacks = {}, {}
        for runtime, scorer in (("eager", model), ("torchscript", scripted), ("onnx", session)):
            try:
                probs[runtime], fallbacks[runtime] = _score(scorer, case)
            except Exception as e:  # any failure to score is a parity failure of that runtime
                raise ParityError(
                    f"parity: {runtime} failed on {case.source} rows at batch size {case.keys.shape[0]}: {e}"
                ) from e
        for pair in PAIRS:
            a, b = pair.split("_vs_")
            if probs[b].shape != probs[a].shape or fallbacks[b].shape != fallbacks[a].shape:
                raise ParityError(
                    f"parity: {b} returned shapes {probs[b].shape}/{fallbacks[b].shape}, {a} {probs[a].shape}/"
                    f"{fallbacks[a].shape} ({case.source} rows, batch size {case.keys.shape[0]})"
                )
            if not np.array_equal(fallbacks[a], fallbacks[b]):
                bad = int(np.flatnonzero(fallbacks[a] != fallbacks[b])[0])
                raise ParityError(
                    f"parity: fallback_tokens of {b} differ from {a} ({case.source} rows, batch size"
                    f" {case.keys.shape[0]}, row {bad}: {fallbacks[b][bad]} vs {fallbacks[a][bad]})"
                )
            d = float(np.max(np.abs(probs[a].astype(np.float64) - probs[b]))) if probs[a].size else 0.0
            if not np.all(np.isfinite(probs[b])):
                d = float("inf")
            diffs[pair][case.label] = d
            if d > worst[2]:
                worst = (pair, case.label, d)
            if not d <= tolerance:
                raise ParityError(
                    f"parity: {b} differs from {a} by max |diff| {d:.3g} > tolerance {tolerance:g}"
                    f" ({case.source} rows, batch size {case.keys.shape[0]})"
                )
    return {
        "tolerance": tolerance,
        "cases": {c.label: {"source": c.source, "batch_size": int(c.keys.shape[0])} for c in cases},
        "max_abs_diff": diffs,
        "fallback_tokens_equal": True,
        "worst": {"pair": worst[0], "case": worst[1], "max_abs_diff": worst[2]},
    }


# --------------------------------------------------------------------------------------------
# Manifest


def table_stats(model: CTRModel) -> dict[str, Any]:
    """Occupancy of the in-graph hash table (signature table for hash/lma, vocabulary index for full)."""
    emb = model.dlrm.embedding
    name, table = key_table(model)
    if isinstance(emb, SharedMemoryEmbedding):
        extra: dict[str, Any] = {"memory_floats": emb.memory_size, "block_size": emb.block_size}
    elif isinstance(emb, FullEmbedding):
        extra = {"rows": int(emb.weight.shape[0]), "vocab_size": int(emb.vocab_size)}
    stored = int((table.get_buffer("table_keys") >= 0).sum().item())
    capacity = table.num_buckets * table.slots
    return {
        name: {
            "buckets": table.num_buckets,
            "slots": table.slots,
            "stored_keys": stored,
            "load": stored / capacity if capacity else 0.0,
            "bytes": table.memory_bytes,
        },
        **extra,
    }


def library_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def build_manifest(
    name: str,
    version: str,
    run_dir: Path,
    model: CTRModel,
    cfg: RunConfig,
    files: dict[str, dict[str, Any]],
    parity: dict[str, Any],
    onnx_info: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    inputs, outputs = graph_io(cfg.schema)
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "source_run": str(Path(run_dir).resolve()),
        "schema": cfg.schema.to_dict(),
        "dense_input": cfg.schema.dense_transform,
        "inputs": inputs,
        "outputs": outputs,
        "runtimes": {rt: {"file": f} for rt, f in RUNTIME_FILES.items()},
        "embedding": cfg.embedding.to_dict(),
        "model": cfg.model.to_dict(),
        "sizes": {
            "full_embedding_bytes": cfg.full_embedding_bytes,
            "distinct_tokens": cfg.distinct_tokens,
            "vocab_size": cfg.vocab_size,
            "table_buckets": cfg.table_buckets,
        },
        "memory": memory_accounting(model, cfg.full_embedding_bytes),
        "tables": table_stats(model),
        "run": {k: cfg.extra[k] for k in ("signatures", "vocabulary", "data", "training") if k in cfg.extra},
        "files": files,
        "parity": parity,
        "onnx": onnx_info,
        "versions": library_versions(),
        "export_seconds": round(seconds, 3),
    }


# --------------------------------------------------------------------------------------------
# Export


def next_version(out_dir: Path) -> str:
    """One more than the highest numeric version folder under ``out_dir`` ("1" when none)."""
    if not out_dir.is_dir():
        return "1"
    versions = [int(p.name) for p in out_dir.iterdir() if is_version(p.name)]
    return str(max(versions, default=0) + 1)


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    version: str | None = None,
    triton: Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    onnx_exporter: str = DEFAULT_ONNX_EXPORTER,
    triton_max_batch_size: int = max(PARITY_BATCH_SIZES),
    signer: BundleSigner | None = None,
) -> Bundle:
    """Export the run folder ``run_dir`` as ``out_dir/VERSION`` (``out_dir`` = ``artifacts/NAME``).

    Args:
        run_dir: a run folder of ``lma train`` (config.json + model.safetensors).
        out_dir: the model's folder; its name is the model name.
        version: a positive integer as text; None: the next one after the highest existing.
        triton: also write a Triton model repository entry ``triton/NAME/``.
        tolerance: largest accepted max |diff| of ``probability`` between any two runtimes.
        onnx_exporter: ``legacy`` or ``dynamo`` (see :func:`export_onnx`).
        triton_max_batch_size: ``max_batch_size`` of the Triton config.
        signer: signs the bundle before it is renamed into place (so no unsigned version ever appears).

    Returns:
        The bundle, loaded back through :func:`export.bundle.load_bundle`.

    Raises:
        ParityError: an exported graph disagrees with the eager model; nothing is written.
        BundleError: bad name or version, or the version exists already.
    """
    t0 = time.perf_counter()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    name = out_dir.name
    if not NAME_PATTERN.match(name):
        raise BundleError(f"{out_dir}: model name {name!r} must match {NAME_PATTERN.pattern}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    version = next_version(out_dir) if version is None else str(version)
    if not is_version(version):
        raise BundleError(f"version must be a positive integer as text (1, 2, ...), got {version!r}")
    final = out_dir / version
    if final.exists():
        raise BundleError(f"{final}: already exists; bundle versions are immutable, export a new version")

    model, cfg = load_run(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"  # hidden: never taken for a version
    tmp.mkdir()
    try:
        ts_path, onnx_path = tmp / RUNTIME_FILES["torchscript"], tmp / RUNTIME_FILES["onnx"]
        export_torchscript(model, ts_path)
        export_onnx(model, cfg.schema, onnx_path, onnx_exporter)
        cases = random_cases(model, cfg.schema) + data_cases(cfg)
        parity = verify_parity(model, ts_path, onnx_path, cases, tolerance)
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        manifest = build_manifest(
            name, version, run_dir, model, cfg, files, parity, onnx_summary(onnx_path, onnx_exporter),
            time.perf_counter() - t0,
        )  # fmt: skip
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if signer is not None:
            signer.sign(tmp)
        if final.exists():
            raise BundleError(f"{final}: appeared during the export; not overwriting it")
        os.rename(tmp, final)  # atomic on one file system: the version appears complete or not at all
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    bundle = load_bundle(final)
    if triton is not None:
        from export.triton import write_triton

        write_triton(bundle, Path(triton), max_batch_size=triton_max_batch_size)
    log.info("exported %s version %s to %s in %.1f s", name, version, final, time.perf_counter() - t0)
    return bundle
