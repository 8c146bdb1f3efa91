"""Tiny run folders of all three embedding kinds, with filled tables, exported once per session.

The run folders have the exact format `lma train` writes (models.checkpoint.save_run); the tables
are filled like training fills them: the lma signature table with 60-bit packed signatures of a
few hundred keys, the full vocabulary index with key -> row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from export.bundle import Bundle
from export.exporter import export_run
from models.checkpoint import RunConfig
from models.dlrm import CTRModel
from models.schema import FeatureSchema, avazu_schema, criteo_schema
from tests.tiny_runs import save_tiny_run

TOKENS = 400  # distinct training tokens of the tiny runs


@dataclass
class TinyRun:
    kind: str
    run_dir: Path
    model: CTRModel
    cfg: RunConfig
    known_keys: np.ndarray  # keys with a stored signature / vocabulary row


def make_run(run_dir: Path, kind: str, schema: FeatureSchema, seed: int = 0) -> TinyRun:
    """A run folder with a tiny model of ``kind`` and filled tables."""
    rng = np.random.default_rng(seed)
    tokens = np.unique(rng.integers(0, 2**62, size=TOKENS, dtype=np.int64))
    model, cfg, known = save_tiny_run(run_dir, kind, schema, tokens, seed, rng, full_buckets=128)
    return TinyRun(kind, run_dir, model, cfg, known)


SCHEMAS = {"full": criteo_schema(7), "hash": avazu_schema(3), "lma": criteo_schema(11)}


@pytest.fixture(scope="session")
def schemas() -> dict[str, FeatureSchema]:
    return SCHEMAS


@pytest.fixture(scope="session")
def make_tiny_run() -> Callable[..., TinyRun]:
    """The run-folder factory, for tests that need a run of their own."""
    return make_run


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyRun]:
    """One run per kind: full and lma on the Criteo schema, hash on Avazu's (no dense features)."""
    root = tmp_path_factory.mktemp("runs")
    return {kind: make_run(root / kind, kind, schema) for kind, schema in SCHEMAS.items()}


@pytest.fixture(scope="session")
def bundles(tiny_runs: dict[str, TinyRun], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bundle]:
    """Each tiny run exported once (version 1 of artifacts/<kind>); shared read-only by the tests."""
    root = tmp_path_factory.mktemp("artifacts")
    return {kind: export_run(run.run_dir, root / kind) for kind, run in tiny_runs.items()}
