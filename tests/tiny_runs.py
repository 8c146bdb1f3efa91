"""Tiny run folders for the export and serving tests: one way to build a model whose tables are filled.

The callers choose the keys the tables know; this module builds the tiny-preset model of ``kind``,
fills its vocabulary index (``full``) or its signature table with random 60-bit signatures, as training
makes them (``lma``), and saves the run folder.
"""

from pathlib import Path

import numpy as np
import torch

from models.checkpoint import RunConfig, build_model, save_run
from models.dlrm import CTRModel, DLRMConfig
from models.embeddings import EmbeddingConfig
from models.hashtable import build_table
from models.schema import FeatureSchema


def save_tiny_run(
    run_dir: Path,
    kind: str,
    schema: FeatureSchema,
    keys: np.ndarray,
    seed: int,
    rng: np.random.Generator,
    full_buckets: int,
) -> tuple[CTRModel, RunConfig, np.ndarray]:
    """Save a tiny ``kind`` run whose tables know ``keys``; returns (model, config, keys with a stored entry).

    ``rng`` draws the lma signatures; ``full_buckets`` sizes the full kind's vocabulary index.
    """
    emb = EmbeddingConfig(kind=kind, embedding_dim=4, compression=2.0, seed=seed)
    full = kind == "full"
    cfg = RunConfig(
        schema=schema,
        model=DLRMConfig.from_preset("tiny", schema.num_dense, schema.num_fields),
        embedding=emb,
        full_embedding_bytes=int(keys.size) * emb.embedding_dim * 4,
        distinct_tokens=int(keys.size),
        vocab_size=int(keys.size) if full else 0,
        table_buckets=full_buckets if full else 0,
    )
    torch.manual_seed(seed)
    model = build_model(cfg)
    known = np.empty(0, dtype=np.int64)
    if full:
        table = model.dlrm.embedding.vocabulary
        k, v, p, report = build_table(keys, np.arange(keys.size), table.num_buckets, table.slots, seed, max_load=1.0)
        assert report["dropped"] == 0
        table.load(k, v, p)
        known = keys
    elif kind == "lma":
        table = model.dlrm.embedding.signatures
        bits = emb.num_hashes * emb.bits  # 60-bit packed minhash signatures, like training makes
        signatures = rng.integers(0, 2**bits, size=keys.size, dtype=np.int64)
        k, v, p, report = build_table(keys, signatures, table.num_buckets, table.slots, seed, emb.max_load)
        table.load(k, v, p)
        known = k[k >= 0]
        cfg.extra["signatures"] = {"signed_tokens": int(known.size), "table": dict(report)}
    model.eval()
    save_run(run_dir, model, cfg)
    return model, cfg, known
