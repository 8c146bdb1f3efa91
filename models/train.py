"""Training and evaluation of DLRM with full, hash or LMA embeddings; writes a run folder.

    lma train --data data/synth.tsv --embedding lma --compression 16 --preset small --out runs/lma16

Run folder: model.safetensors (best validation AUC), config.json (schema, model, embedding, sizes,
training settings, data statistics, signature report), metrics.json (per-epoch val AUC/logloss,
test metrics, memory accounting), curve.png. The checkpoint is rewritten after every epoch that
improves validation AUC, so an interrupted run keeps its best epoch.
"""

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.data import batches as data_batches
from models.data import cache as data_cache
from models.data import formats as data_formats
from models.checkpoint import RunConfig, build_model, memory_accounting, save_run
from models.dlrm import CTRModel, DLRMConfig
from models.embeddings import FLOAT_BYTES, EmbeddingConfig, FullEmbedding, SharedMemoryEmbedding
from models.hashtable import build_table
from models.signatures import compute_signatures

log = logging.getLogger(__name__)

DEFAULT_LR = {"sgd": 0.1, "adagrad": 0.02, "adam": 1e-3}
EVAL_BATCH = 8192


@dataclass
class TrainSettings:
    data: Path
    format: str = "criteo"
    split: str = "order"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    max_rows: int = 0
    cache_dir: Path = Path("data/cache")
    preset: str = "small"
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    optimizer: str = "adagrad"
    lr: float = 0.0
    epochs: int = 1
    batch_size: int = 1024
    seed: int = 0
    patience: int = 1
    threads: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in DEFAULT_LR:
            raise ValueError(f"optimizer must be one of {sorted(DEFAULT_LR)}, got {self.optimizer!r}")
        if self.lr == 0.0:
            self.lr = DEFAULT_LR[self.optimizer]
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("lr, epochs, batch_size and patience must be positive")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainSettings":
        from models.dlrm import PRESETS

        dim = args.dim or int(PRESETS[args.preset]["embedding_dim"])  # type: ignore[call-overload]
        emb = EmbeddingConfig(
            kind=args.embedding,
            embedding_dim=dim,
            compression=args.compression,
            block_size=args.block_size,
            per_block=args.per_block,
            bits=args.bits,
            num_hashes=args.num_hashes,
            signature_share=args.signature_share,
            sample_rows=args.sample_rows,
            semantic=args.semantic,
            min_count=args.min_count,
            seed=args.seed,
        )
        return cls(
            data=args.data,
            format=args.format,
            split=args.split,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            max_rows=args.max_rows,
            cache_dir=args.cache_dir,
            preset=args.preset,
            embedding=emb,
            optimizer=args.optimizer,
            lr=args.lr,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            patience=args.patience,
            threads=args.threads,
            progress=not args.no_progress,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data"] = str(self.data)
        d["cache_dir"] = str(self.cache_dir)
        d.pop("embedding")
        return d


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        last = self.metrics["epochs"][-1] if self.metrics["epochs"] else {}
        mem = self.metrics["memory"]
        return {
            "run_dir": str(self.run_dir),
            "kind": mem["kind"],
            "best_val_auc": self.metrics["best"]["val_auc"],
            "test_auc": self.metrics["test"]["auc"],
            "test_logloss": self.metrics["test"]["logloss"],
            "embedding_bytes": mem["embedding_bytes"],
            "full_embedding_bytes": mem["full_embedding_bytes"],
            "embedding_compression": round(mem["embedding_compression"], 3),
            "train_samples_per_s": last.get("train_samples_per_s"),
        }


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    labels = np.asarray(labels, dtype=np.float64)
    pos = labels.sum()
    neg = labels.size - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(labels.size, dtype=np.float64)
    # average rank over runs of equal scores
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


@torch.no_grad()
def evaluate(model: CTRModel, prepared: "data_cache.Prepared", indices: np.ndarray) -> dict[str, float]:
    model.eval()
    probs, labels = [], []
    for dense, keys, y in data_batches.iter_batches(prepared, indices, EVAL_BATCH, shuffle=False, seed=0):
        p, _ = model(dense, keys)
        probs.append(p.squeeze(1).numpy())
        labels.append(y.numpy())
    model.train()
    if not probs:
        return {"auc": float("nan"), "logloss": float("nan"), "rows": 0}
    yv, pv = np.concatenate(labels), np.concatenate(probs)
    return {"auc": roc_auc(yv, pv), "logloss": log_loss(yv, pv), "rows": int(yv.size)}


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr)
    if settings.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=settings.lr)
    return torch.optim.Adam(params, lr=settings.lr)


def build_run_config(
    settings: TrainSettings, prepared: "data_cache.Prepared", train_idx: np.ndarray
) -> tuple[RunConfig, dict[str, Any]]:
    """Token statistics of the training split -> sizes, and for ``full`` the vocabulary."""
    emb = settings.embedding
    tokens, counts = data_batches.distinct_tokens(prepared, train_idx)
    full_bytes = int(tokens.size) * emb.embedding_dim * FLOAT_BYTES
    schema = prepared.schema
    model_cfg = DLRMConfig.from_preset(settings.preset, schema.num_dense, schema.num_fields, emb.embedding_dim)
    cfg = RunConfig(
        schema=schema,
        model=model_cfg,
        embedding=emb,
        full_embedding_bytes=full_bytes,
        distinct_tokens=int(tokens.size),
        data_format=settings.format,
    )
    extra: dict[str, Any] = {"tokens": tokens, "counts": counts}
    if emb.kind == "full":
        keep = counts >= emb.min_count
        vocab = tokens[keep]
        cfg.vocab_size = int(vocab.size)
        need = max(1, math.ceil(vocab.size / (emb.slots * emb.max_load)))
        cfg.table_buckets = 1 << (need - 1).bit_length()
        extra["vocab"] = vocab
    return cfg, extra


def fill_tables(
    model: CTRModel,
    cfg: RunConfig,
    settings: TrainSettings,
    prepared: "data_cache.Prepared",
    train_idx: np.ndarray,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Vocabulary index (full) or signature table (lma); returns a report for config.json."""
    emb_cfg = cfg.embedding
    emb = model.dlrm.embedding
    if emb_cfg.kind == "full":
        vocab = extra["vocab"]
        keys, values, params, report = build_table(
            vocab, np.arange(vocab.size, dtype=np.int64), cfg.table_buckets, emb_cfg.slots, emb_cfg.seed, max_load=1.0
        )
        if report["dropped"]:
            raise RuntimeError(f"vocabulary index dropped {report['dropped']} tokens; raise table size")
        assert isinstance(emb, FullEmbedding)
        emb.vocabulary.load(keys, values, params)
        return {"vocabulary": dict(report, vocab_size=int(vocab.size))}
    if emb_cfg.kind == "hash":
        return {}
    assert isinstance(emb, SharedMemoryEmbedding)
    rng = np.random.default_rng([settings.seed, 0x5A3])
    n = min(emb_cfg.sample_rows, train_idx.size)
    sample_idx = np.sort(rng.choice(train_idx, size=n, replace=False))
    sample_keys = np.asarray(prepared.keys[sample_idx])
    capacity = int(emb_cfg.max_load * emb.signatures.num_buckets * emb_cfg.slots)
    sigs = compute_signatures(sample_keys, emb_cfg, capacity, progress=settings.progress)
    keys, values, params, report = build_table(
        sigs.keys, sigs.signatures, emb.signatures.num_buckets, emb_cfg.slots, emb_cfg.seed, emb_cfg.max_load
    )
    emb.signatures.load(keys, values, params)
    return {"signatures": {**sigs.report, "table": dict(report)}}


def plot_curve(path: Path, step_loss: list[tuple[int, float]], epochs: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    if step_loss:
        s, loss = zip(*step_loss, strict=True)
        a1.plot(s, loss)
    a1.set_xlabel("samples")
    a1.set_ylabel("train loss (running mean)")
    a2.plot([e["epoch"] for e in epochs], [e["val_auc"] for e in epochs], marker="o")
    a2.set_xlabel("epoch")
    a2.set_ylabel("validation AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def train(settings: TrainSettings, run_dir: Path) -> TrainResult:
    run_dir = Path(run_dir)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    schema = data_formats.schema_for_format(settings.format)
    prepared = data_cache.prepare(
        settings.data,
        settings.format,
        settings.cache_dir,
        schema,
        max_rows=settings.max_rows,
        progress=settings.progress,
    )
    splits = prepared.split(settings.split, settings.val_fraction, settings.test_fraction, settings.seed)
    train_idx, val_idx, test_idx = splits["train"], splits["val"], splits["test"]
    if train_idx.size == 0 or val_idx.size == 0:
        raise ValueError(f"{settings.data}: too few rows ({prepared.rows}) for a train and a validation split")

    cfg, extra = build_run_config(settings, prepared, train_idx)
    model = build_model(cfg)
    table_report = fill_tables(model, cfg, settings, prepared, train_idx, extra)
    memory = memory_accounting(model, cfg.full_embedding_bytes)
    cfg.extra = {
        "training": settings.to_dict(),
        "data": {
            "path": str(settings.data),
            "cache": str(prepared.path),
            "rows": prepared.rows,
            **prepared.stats.to_dict(),
            "train_rows": int(train_idx.size),
            "val_rows": int(val_idx.size),
            "test_rows": int(test_idx.size),
        },
        **table_report,
    }
    log.info("memory: %s", json.dumps(memory))

    optimizer = make_optimizer(model, settings)
    loss_fn = nn.BCEWithLogitsLoss()
    epochs: list[dict[str, Any]] = []
    step_loss: list[tuple[int, float]] = []
    best_auc, best_epoch, seen = -1.0, 0, 0
    model.train()
    for epoch in range(1, settings.epochs + 1):
        t0, n, running = time.perf_counter(), 0, 0.0
        batches = data_batches.iter_batches(
            prepared, train_idx, settings.batch_size, shuffle=True, seed=settings.seed + epoch
        )
        total = math.ceil(train_idx.size / settings.batch_size)
        bar = tqdm(batches, total=total, desc=f"epoch {epoch}", disable=not settings.progress, unit="batch")
        for i, (dense, keys, labels) in enumerate(bar):
            logit, _ = model.dlrm(dense, keys)
            loss = loss_fn(logit.squeeze(1), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n += labels.shape[0]
            running = 0.98 * running + 0.02 * loss.item() if i else loss.item()
            if i % 20 == 0:
                step_loss.append((seen + n, running))
                bar.set_postfix(loss=f"{running:.4f}", samples_s=f"{n / (time.perf_counter() - t0):,.0f}")
        seen += n
        train_sps = n / (time.perf_counter() - t0)
        val = evaluate(model, prepared, val_idx)
        record = {
            "epoch": epoch,
            "val_auc": val["auc"],
            "val_logloss": val["logloss"],
            "train_loss": running,
            "train_samples_per_s": train_sps,
            "seconds": time.perf_counter() - t0,
        }
        epochs.append(record)
        log.info("epoch %d: val_auc=%.5f val_logloss=%.5f %.0f samples/s", epoch, val["auc"], val["logloss"], train_sps)
        if val["auc"] > best_auc:
            best_auc, best_epoch = val["auc"], epoch
            save_run(run_dir, model, cfg)  # keep the best so far on disk
        elif epoch - best_epoch >= settings.patience:
            log.info("early stop: no val AUC gain for %d epoch(s)", settings.patience)
            break

    from models.checkpoint import load_run

    best_model, _ = load_run(run_dir)
    test = evaluate(best_model, prepared, test_idx) if test_idx.size else {"auc": None, "logloss": None, "rows": 0}
    metrics = {
        "epochs": epochs,
        "best": {"epoch": best_epoch, "val_auc": best_auc},
        "test": test,
        "memory": memory,
        "data": cfg.extra["data"],
        **table_report,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_curve(run_dir / "curve.png", step_loss, epochs)
    return TrainResult(run_dir, metrics)
