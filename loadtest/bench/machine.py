"""Facts of the run: the machine, the model, the rows replayed; and the graph alone, timed in process."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.payloads import Rows, read_rows, synthetic_rows


def machine_facts() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    facts: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu": cpu or platform.processor(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    import psutil

    facts["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    for module in ("onnxruntime", "uvicorn", "fastapi", "numpy"):
        with contextlib.suppress(Exception):
            facts[module] = __import__(module).__version__
    with contextlib.suppress(Exception):
        facts["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    return facts


def model_facts(bundle: Path) -> dict[str, Any]:
    from export.bundle import read_manifest

    m = read_manifest(bundle)
    memory = m.get("memory", {})
    return {
        "name": m["name"],
        "version": str(m["version"]),
        "path": str(bundle),
        "embedding": m.get("embedding", {}).get("kind", "?"),
        "embedding_dim": m.get("embedding", {}).get("embedding_dim"),
        "num_dense": len(m["schema"]["dense_names"]),
        "num_fields": len(m["schema"]["categorical_names"]),
        "total_bytes": memory.get("total_bytes"),
        "embedding_compression": memory.get("embedding_compression"),
        "onnx_bytes": (bundle / "model.onnx").stat().st_size if (bundle / "model.onnx").is_file() else None,
    }


def load_rows(data: Path | None, data_format: str, rows: int, demo_data: Path | None) -> Rows:
    if data is not None:
        return read_rows(data, data_format, rows)
    if demo_data is not None:
        return read_rows(demo_data, "criteo", rows)
    return synthetic_rows(rows, seed=0)


def featurize(bundle: Path, rows: Rows, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows (replayed round robin) as graph inputs: transformed dense values, keys of the bundle's schema."""
    from export.bundle import load_bundle
    from models.schema import transform_dense

    schema = load_bundle(bundle).schema
    picked = [rows.rows[i % len(rows)] for i in range(n)]
    dense = transform_dense(np.array([[np.nan if v is None else v for v in r.dense] for r in picked], np.float64))
    return dense, schema.keys_for([r.categorical for r in picked])


def raw_throughput(
    bundle: Path, rows: Rows, batch_sizes: Sequence[int], threads: Sequence[int], seconds: float = 1.0
) -> list[dict[str, Any]]:
    """Samples/s of the bundle's ONNX graph in this process, with the server's session options.

    The inputs are ``rows`` featurized once (keys hashed with the bundle's schema, dense values
    transformed): this is the graph's ceiling, without HTTP, JSON, featurization or batching.
    """
    from export.onnx_runtime import cpu_session

    dense, keys = featurize(bundle, rows, max(batch_sizes))
    out = []
    for t in threads:
        session = cpu_session(bundle / "model.onnx", t)
        for size in batch_sizes:
            feeds = {"dense": dense[:size], "keys": keys[:size]}
            for _ in range(5):
                session.run(None, feeds)
            calls = 0
            cpu0, start = time.process_time(), time.perf_counter()
            while time.perf_counter() - start < seconds:
                session.run(None, feeds)
                calls += 1
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
            out.append(
                {
                    "batch_size": size,
                    "threads": t,
                    "samples_per_s": calls * size / elapsed,
                    "us_per_call": elapsed / calls * 1e6,
                    "cpu_us_per_sample": cpu / (calls * size) * 1e6,
                }
            )
    return out
