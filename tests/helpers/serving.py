"""Helpers of the serving tests: tiny exported bundles, valid instances, in-thread and process servers.

Tiny run folders are made the way ``lma train`` writes them, with filled tables (signature table /
vocabulary index) for the raw tokens ``t0``..``t49`` of every field, and exported with
:func:`export.exporter.export_run`.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI

from export.bundle import Bundle
from export.exporter import export_run
from loadtest.bench.process import ServerProcess, free_port, lma_serve_command
from models.schema import FeatureSchema, avazu_schema, criteo_schema, transform_dense
from server.runtimes import OnnxRuntime
from server.settings import Settings
from server.types import Batch, Scores
from tests.tiny_runs import save_tiny_run

TOKENS = [f"t{j}" for j in range(50)]  # raw values that have stored entries in the runs below
SIGNATURE_BITS = 60  # packed signatures of the lma runs: 15 x 4 bits, as training makes them
ADMIN_TOKEN = "test-admin-token-0123456789"


def make_run(run_dir: Path, kind: str, schema: FeatureSchema, seed: int) -> Path:
    """A run folder of a tiny ``kind`` model whose tables know the tokens of :data:`TOKENS`."""
    keys = np.unique([schema.key(f, t) for f in range(schema.num_fields) for t in TOKENS]).astype(np.int64)
    buckets = 1 << int(np.ceil(np.log2(keys.size / 2)))
    save_tiny_run(run_dir, kind, schema, keys, seed, np.random.default_rng(seed), full_buckets=buckets)
    return run_dir


@dataclass(frozen=True)
class Bundles:
    repo: Path  # criteo/1, criteo/2, avazu/1
    criteo_v1: Bundle
    criteo_v2: Bundle
    avazu: Bundle


def make_repo(root: Path, *bundles: Bundle) -> Path:
    """A model repository under ``root`` holding copies of ``bundles`` (as NAME/VERSION)."""
    for b in bundles:
        shutil.copytree(b.path, root / b.name / b.version)
    return root


def settings_for(model_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model_dir": model_dir,
        "max_wait_ms": 1.0,
        "watch_interval_s": 0,
        "access_log": False,
        "intra_op_threads": 1,
        "admin_token": ADMIN_TOKEN,
        # no queue-delay cap: the tests that make requests wait (long max_wait_ms) mean deadlines alone to decide;
        # test_routes and test_http_protocol set it where it is the point
        "max_queue_delay_ms": 0,
        **overrides,
    }
    return Settings(**values)


def instance(i: int = 0, n_dense: int = 13, n_fields: int = 26) -> dict[str, Any]:
    """A valid instance: known tokens in even fields, unknown ones in odd fields."""
    return {
        "dense": [float((i + j) % 7) for j in range(n_dense)],
        "categorical": [TOKENS[(i + j) % len(TOKENS)] if j % 2 == 0 else f"unseen-{i}-{j}" for j in range(n_fields)],
    }


class LiveServer:
    """A real uvicorn server (the server's HTTP protocol, uvloop) on a free port, in a background thread."""

    def __init__(self, app: FastAPI, http: str = "server.http_protocol:LmaHttpProtocol") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_config=None, access_log=False, lifespan="on",
            http=http, proxy_headers=False,
        )  # fmt: skip  # by default what `lma serve` runs; http="httptools" is stock uvicorn
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=60)


def export_bundles(root: Path) -> Bundles:
    """criteo/1, criteo/2 (lma) and avazu/1 (hash) in the repository ``root/repo``."""
    runs, repo = root / "runs", root / "repo"
    criteo = criteo_schema(5)
    v1 = export_run(make_run(runs / "criteo1", "lma", criteo, 0), repo / "criteo")
    v2 = export_run(make_run(runs / "criteo2", "lma", criteo, 1), repo / "criteo")
    avazu = export_run(make_run(runs / "avazu", "hash", avazu_schema(3), 2), repo / "avazu")
    return Bundles(repo, v1, v2, avazu)


def export_full_bundle(root: Path) -> Bundle:
    """A full-embedding model on the Criteo schema, as ``root/criteo-full/1``."""
    return export_run(make_run(root / "run", "full", criteo_schema(5), 3), root / "criteo-full")


def direct_scores(bundle: Bundle, instances: list[dict[str, Any]]) -> Scores:
    """What the model says for list-form ``instances``, computed without the server."""
    dense = transform_dense(
        np.array([[np.nan if v is None else v for v in inst["dense"]] for inst in instances], dtype=np.float64)
    )
    keys = bundle.schema.keys_for([inst["categorical"] for inst in instances])
    return OnnxRuntime(bundle, "cpu", threads=1).run(Batch(dense, keys))


def as_float32(predictions: list[float]) -> np.ndarray:
    return np.array(predictions, dtype=np.float64).astype(np.float32)


def serve(model_dir: Path, log: Path, workers: int = 1, **env: str) -> ServerProcess:
    """``lma serve model_dir`` as a real process (loadtest.bench.ServerProcess: the one way tests and benchmarks
    start a server), with the admin token of these tests, one runtime thread, and ``env`` on top."""
    settings = {"LMA_ADMIN_TOKEN": ADMIN_TOKEN, "LMA_INTRA_OP_THREADS": "1", **env}
    return ServerProcess(lambda port: lma_serve_command(model_dir, port, workers), settings, log)


def flip_a_byte(path: Path, mask: int = 0x01) -> bytes:
    """XOR the middle byte of ``path`` with ``mask`` (a corrupted file of the same size); the new contents."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= mask
    path.write_bytes(bytes(data))
    return bytes(data)


def forge(bundle_dir: Path) -> Path:
    """Change the bundle's model.onnx and write its new sha256 into the manifest: checksums pass, signatures don't."""
    import hashlib
    import json

    data = flip_a_byte(bundle_dir / "model.onnx")
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["files"]["model.onnx"]["sha256"] = hashlib.sha256(data).hexdigest()
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return bundle_dir
