"""Parity: the saved graphs, reloaded from disk, must score like the eager model.

Eager vs TorchScript vs ONNX Runtime (CPU provider, the server's session options) on random rows (keys stored in
the model's tables and never-seen 62-bit keys) and on rows of the training data when the run folder names its
data cache, at batch sizes 1, 7 and 1024. ``probability`` may differ by ``tolerance`` at most and
``fallback_tokens`` must be equal; anything else raises :class:`ParityError` naming the runtime pair, the case and
the difference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.bundle import BundleError
from export.contract import DENSE_INPUT, KEYS_INPUT, OUTPUT_NAMES
from export.onnx_runtime import cpu_session
from export.tables import stored_keys
from models.checkpoint import RunConfig
from models.schema import KEY_MASK, FeatureSchema, transform_dense

log = logging.getLogger(__name__)

PARITY_BATCH_SIZES = (1, 7, 1024)
DEFAULT_TOLERANCE = 1e-5
PAIRS = ("eager_vs_torchscript", "eager_vs_onnx", "torchscript_vs_onnx")


class ParityError(BundleError):
    """An exported graph scores differently from the eager model (beyond tolerance)."""


@dataclass
class ParityCase:
    source: str  # "random" or "data"
    dense: np.ndarray  # float32 (B, n_dense), transformed
    keys: np.ndarray  # int64 (B, F)

    @property
    def label(self) -> str:
        return f"{self.source}/b{self.keys.shape[0]}"


def random_cases(model: nn.Module, schema: FeatureSchema, seed: int = 0) -> list[ParityCase]:
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

    The cache is the folder :func:`models.data.cache.prepare` writes (``dense.npy``, already transformed,
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
    p, f = scorer.run(list(OUTPUT_NAMES), {DENSE_INPUT: case.dense, KEYS_INPUT: case.keys})
    return np.asarray(p), np.asarray(f)


def verify_parity(
    model: nn.Module, ts_path: Path, onnx_path: Path, cases: list[ParityCase], tolerance: float
) -> dict[str, Any]:
    """Score every case with eager, the saved TorchScript and the saved ONNX graph; compare.

    Raises:
        ParityError: naming the runtime pair, the case (source and batch size) and max |diff|,
            when a probability differs by more than ``tolerance`` or any fallback count differs.
    """
    scripted = torch.jit.load(str(ts_path), map_location="cpu")
    session = cpu_session(onnx_path)
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
