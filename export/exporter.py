"""Run folder -> bundle: TorchScript + ONNX graphs, parity-verified, with a checksummed manifest.

    lma export runs/lma16 --out artifacts/criteo            # -> artifacts/criteo/<next version>/

This module is the orchestration; each step has its own module:

- :mod:`export.contract`: the graphs' input/output names and the runtime files (DESIGN section 6);
- :mod:`export.graphs`: writing the TorchScript and ONNX graphs;
- :mod:`export.parity`: scoring the saved graphs against the eager model;
- :mod:`export.manifest`: the manifest;
- :mod:`export.tables`: the model's in-graph hash tables (parity keys, manifest occupancy).

Export is all or nothing: the files go to a hidden temporary folder next to the final one, the
saved graphs are reloaded from disk and scored against the eager model; only when every |difference|
is within tolerance and every ``fallback_tokens`` is equal is the manifest written and the folder
renamed into place. A failed export leaves nothing behind.

Any model :func:`models.checkpoint.load_run` builds with ``forward(dense, keys) -> (probability,
fallback_tokens)`` exports this way; nothing here depends on the model's class.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from export.bundle import (
    MANIFEST_FILE,
    NAME_PATTERN,
    Bundle,
    BundleError,
    is_version,
    load_bundle,
    model_folders,
    sha256_file,
)
from export.contract import RUNTIME_FILES
from export.graphs import DEFAULT_ONNX_EXPORTER, export_onnx, export_torchscript, onnx_summary
from export.manifest import build_manifest
from export.parity import DEFAULT_TOLERANCE, PARITY_BATCH_SIZES, ParityError, data_cases, random_cases, verify_parity
from models.checkpoint import load_run

__all__ = ["ParityError", "export_run", "next_version"]

if TYPE_CHECKING:
    from export.signing import BundleSigner

log = logging.getLogger(__name__)


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
        triton: also write the Triton model repository entry ``triton/NAME/VERSION/`` (and its config).
        tolerance: largest accepted max |diff| of ``probability`` between any two runtimes.
        onnx_exporter: ``legacy`` or ``dynamo`` (see :func:`export.graphs.export_onnx`).
        triton_max_batch_size: ``max_batch_size`` of the Triton config.
        signer: signs the bundle before it is renamed into place (so no unsigned version ever appears).

    Returns:
        The bundle, loaded back through :func:`export.bundle.load_bundle`.

    Raises:
        ParityError: an exported graph disagrees with the eager model; nothing is written.
        BundleError: bad name or version, or the version exists already.
        ValueError: the run folder is not one this build can export (e.g. another LMA location scheme).
    """
    t0 = time.perf_counter()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    name = out_dir.name
    if not NAME_PATTERN.match(name):
        raise BundleError(f"{out_dir}: model name {name!r} must match {NAME_PATTERN.pattern}")
    # every output place checked before the long work, so that a bad one fails at once and writes nothing
    for place, what in ((out_dir, "--out"), (triton, "--triton")):
        if place is not None and place.exists() and not place.is_dir():
            raise BundleError(f"{what} {place}: exists and is not a directory")
    models = model_folders(out_dir) if out_dir.is_dir() else []
    if models:
        raise BundleError(
            f"{out_dir}: holds model folders ({', '.join(models)}), so it is a repository of"
            f" models, not one model's folder; export to {out_dir}/NAME (its name is the model's)"
        )
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    version = next_version(out_dir) if version is None else str(version)
    if not is_version(version):
        raise BundleError(f"version must be a positive integer as text (1, 2, ...), got {version!r}")
    final = out_dir / version
    if final.exists():
        raise BundleError(f"{final}: already exists; bundle versions are immutable, export a new version")
    if triton is not None:
        from export.triton import triton_version_dir

        taken = triton_version_dir(triton, name, version)
        if taken.exists():
            raise BundleError(
                f"--triton: {taken} already exists; Triton versions are not overwritten (the Triton version is the"
                " bundle's)"
            )

    model, cfg = load_run(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"  # hidden: never taken for a version
    tmp.mkdir()
    try:
        ts_path, onnx_path = tmp / RUNTIME_FILES["torchscript"], tmp / RUNTIME_FILES["onnx"]
        export_torchscript(model, cfg.schema, ts_path)
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
