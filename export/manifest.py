"""The manifest of a bundle: what its graphs are, where they came from, what they weigh, and what was verified.

``format_version`` (:data:`export.bundle.FORMAT_VERSION`), name, version, creation time, source run, feature schema
(with the key-hashing scheme and seed), graph inputs/outputs (:func:`export.contract.graph_io`), runtime files,
embedding config (with the LMA location scheme) and model config, sizes, memory accounting
(:func:`models.checkpoint.memory_accounting`: the numbers training and the server report), the in-graph tables,
the run's reports, sha256 and size of every file, the parity report, the ONNX graph summary, library versions.
:func:`export.bundle.load_bundle` is its reader.
"""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.bundle import FORMAT_VERSION
from export.contract import RUNTIME_FILES, graph_io
from export.tables import table_stats
from models.checkpoint import RunConfig, memory_accounting


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
    model: nn.Module,
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
        "memory": memory_accounting(model, cfg.full_embedding_bytes),  # type: ignore[arg-type]
        "tables": table_stats(model),
        "run": {k: cfg.extra[k] for k in ("signatures", "vocabulary", "data", "training") if k in cfg.extra},
        "files": files,
        "parity": parity,
        "onnx": onnx_info,
        "versions": library_versions(),
        "export_seconds": round(seconds, 3),
    }
