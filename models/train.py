"""Training and evaluation of a DLRM (full, hash or LMA embeddings) or the linear reference; writes a run folder.

    lma train --data data/synth.tsv --embedding lma --compression 16 --preset small --out runs/lma16
    lma train --data data/synth.tsv --model lr --out runs/lr            # the linear reference (hash, 1x)
    lma train --data data/synth.tsv --nproc 2 --out runs/dp2            # data-parallel (models/distributed.py)

Run folder: model.safetensors (best validation AUC), config.json (schema, model, embedding, sizes,
training settings, data statistics, signature report), metrics.json (every validation, per-epoch
summaries, test metrics, memory accounting), curve.png.

The recipe (docs/RESULTS.md, "Small data" shows why each part is there): validation runs
``evals_per_epoch`` times per epoch and the checkpoint is rewritten whenever validation AUC improves
(so an interrupted run keeps its best, and a model that starts to overfit inside an epoch is caught
at its best); training stops after ``patience`` validations without a gain; the looked-up embedding
vectors carry an L2 penalty (``embedding_l2``, per occurrence: frequent tokens are held as much as
their data allows, a token seen twice cannot memorise its labels); the learning rate follows
``lr_schedule`` over the planned steps.

A DLRM with a linear part (the default, ``linear_part``; :mod:`models.dlrm`) trains in two stages: the
``linear`` stage trains the linear part alone (the other parameters get no gradient, and the DLRM's top
layer is still zero, so each step and each validation are exactly those of ``--model lr`` with the same
seed), then the ``all`` stage trains everything from the linear stage's best point (weights and
optimizer state), each stage for at most ``epochs`` epochs with its own early stop. The best validation
over both stages is what the run folder keeps. A model without a linear part has one stage, ``all``.
Every validation and epoch record says its stage.
"""

import argparse
import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models import distributed
from models.checkpoint import RunConfig, build_model, load_run, memory_accounting, save_run
from models.data import cache as data_cache
from models.data.batches import distinct_tokens, iter_batches, shard_of
from models.data.cache import Prepared
from models.data.formats import schema_for_format
from models.dlrm import CTRModel, DLRMConfig
from models.embeddings import FLOAT_BYTES, EmbeddingConfig, FullEmbedding, SharedMemoryEmbedding
from models.hashtable import build_table
from models.linear import LinearConfig
from models.names import LR_SCHEDULES, MODEL_KINDS
from models.signatures import compute_signatures

log = logging.getLogger(__name__)

DEFAULT_LR = {"sgd": 0.1, "adagrad": 0.02, "adam": 1e-3}
MAX_AUTO_BATCH, MIN_AUTO_BATCH, MIN_STEPS_PER_EPOCH = 1024, 64, 150
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
    model: str = "dlrm"
    preset: str = "small"
    linear_part: bool = True  # DLRM: a linear reference inside, trained first (models/dlrm.py)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    optimizer: str = "adagrad"
    lr: float = 0.0
    lr_schedule: str = "constant"
    embedding_l2: float = 0.0
    epochs: int = 10
    batch_size: int = 0  # 0: auto_batch_size()
    evals_per_epoch: int = 4
    seed: int = 0
    patience: int = 4
    threads: int = 0
    nproc: int = 1
    device: str = "auto"
    dist_timeout: float = 300.0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in DEFAULT_LR:
            raise ValueError(f"optimizer must be one of {sorted(DEFAULT_LR)}, got {self.optimizer!r}")
        if self.model not in MODEL_KINDS:
            raise ValueError(f"model must be one of {MODEL_KINDS}, got {self.model!r}")
        if self.model == "lr" and self.embedding.embedding_dim != 1:
            raise ValueError(f"the linear reference has one weight per token: embedding_dim must be 1, got "
                             f"{self.embedding.embedding_dim}")  # fmt: skip
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.lr == 0.0:
            self.lr = DEFAULT_LR[self.optimizer]
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be positive (0: auto), got {self.batch_size}")
        for name in ("lr", "epochs", "patience", "evals_per_epoch", "nproc", "dist_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.embedding_l2 >= 0:
            raise ValueError(f"embedding_l2 must be >= 0, got {self.embedding_l2}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: the cores, shared between local ranks), got {self.threads}")
        most = max(64, 4 * (os.cpu_count() or 1))  # past the cores threads only contend; far past, they fail to start
        if self.threads > most:
            raise ValueError(f"threads must be at most {most} on this machine, got {self.threads}")
        if not 0 < self.val_fraction < 1:  # validation picks the checkpoint kept: a run needs some
            raise ValueError(
                f"val_fraction must be in (0, 1): validation picks the checkpoint, got {self.val_fraction}"
            )
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if Path(self.cache_dir).exists() and not Path(self.cache_dir).is_dir():
            raise ValueError(f"cache_dir {self.cache_dir}: exists and is not a directory")
        if self.device != "auto":
            distributed.resolve_device(self.device)  # refuse cuda where there is none, now rather than in a rank

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainSettings":
        from models.dlrm import PRESETS

        model = getattr(args, "model", "dlrm")
        kind = args.embedding or ("hash" if model == "lr" else "lma")
        compression = args.compression if args.compression is not None else (1.0 if model == "lr" else 16.0)
        if model == "lr":
            if args.dim not in (0, 1):
                raise ValueError(f"--model lr has one weight per token: --dim must be 1 (or 0), got {args.dim}")
            dim = 1
        else:
            dim = args.dim or int(PRESETS[args.preset]["embedding_dim"])  # type: ignore[call-overload]
        emb = EmbeddingConfig(
            kind=kind,
            embedding_dim=dim,
            compression=compression,
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
            model=model,
            preset=args.preset,
            linear_part=getattr(args, "linear_part", True),
            embedding=emb,
            optimizer=args.optimizer,
            lr=args.lr,
            lr_schedule=args.lr_schedule,
            embedding_l2=args.embedding_l2,
            epochs=args.epochs,
            batch_size=args.batch_size,
            evals_per_epoch=args.evals_per_epoch,
            seed=args.seed,
            patience=args.patience,
            threads=args.threads,
            nproc=args.nproc,
            device=args.device,
            dist_timeout=args.dist_timeout,
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
            "model": self.metrics.get("model", "dlrm"),
            "kind": mem["kind"],
            "best_val_auc": self.metrics["best"]["val_auc"],
            "test_auc": self.metrics["test"]["auc"],
            "test_logloss": self.metrics["test"]["logloss"],
            "embedding_bytes": mem["embedding_bytes"],
            "full_embedding_bytes": mem["full_embedding_bytes"],
            "embedding_compression": round(mem["embedding_compression"], 3),
            "train_samples_per_s": last.get("train_samples_per_s"),
            "ranks": self.metrics.get("distributed", {}).get("world", 1),
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
def evaluate(
    model: CTRModel, prepared: Prepared, indices: np.ndarray, ctx: distributed.Context | None = None
) -> dict[str, float]:
    """AUC and logloss of ``model`` on the given rows; with a distributed ``ctx``, every rank scores its
    shard and the metrics are computed over all ranks' predictions (the same numbers on every rank)."""
    ctx = ctx or distributed.Context()
    was_training = model.training
    model.eval()
    probs, labels = [], []
    local = shard_of(np.asarray(indices), ctx.rank, ctx.world)
    for dense, keys, y in iter_batches(prepared, local, EVAL_BATCH, shuffle=False, seed=0):
        p, _ = model(dense.to(ctx.device), keys.to(ctx.device))
        probs.append(p.squeeze(1).cpu().numpy())
        labels.append(y.numpy())
    model.train(was_training)
    yv = np.concatenate(labels) if labels else np.zeros(0, np.float32)
    pv = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    yv, pv = distributed.gather_arrays(ctx, yv, pv)
    if yv.size == 0:
        return {"auc": float("nan"), "logloss": float("nan"), "rows": 0}
    return {"auc": roc_auc(yv, pv), "logloss": log_loss(yv, pv), "rows": int(yv.size)}


def auto_batch_size(train_rows: int) -> int:
    """The largest of 1024, 512, ..., 64 that gives an epoch at least 150 steps.

    Measured (docs/RESULTS.md): a DLRM is at its best after about one pass over small data and needs
    updates within that pass; on 50k rows batch 1024 (39 steps an epoch) ended 0.007 test AUC below
    batch 256, while on 1M rows 1024 lost nothing and runs fastest.
    """
    batch = MAX_AUTO_BATCH
    while batch > MIN_AUTO_BATCH and math.ceil(train_rows / batch) < MIN_STEPS_PER_EPOCH:
        batch //= 2
    return batch


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr)
    if settings.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=settings.lr)
    return torch.optim.Adam(params, lr=settings.lr)


def make_schedule(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``constant``, or a decay from the set rate to 0 at the last planned step (``linear``, ``cosine``)."""
    total = max(1, total_steps)

    def factor(step: int) -> float:
        done = min(step, total) / total
        if schedule == "linear":
            return 1.0 - done
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * done))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_run_config(
    settings: TrainSettings, prepared: Prepared, train_idx: np.ndarray
) -> tuple[RunConfig, dict[str, Any]]:
    """Token statistics of the training split -> sizes, and for ``full`` the vocabulary."""
    emb = settings.embedding
    tokens, counts = distinct_tokens(prepared, train_idx)
    full_bytes = int(tokens.size) * emb.embedding_dim * FLOAT_BYTES
    schema = prepared.schema
    model_cfg: DLRMConfig | LinearConfig
    if settings.model == "lr":
        model_cfg = LinearConfig(schema.num_dense, schema.num_fields)
    else:
        model_cfg = DLRMConfig.from_preset(settings.preset, schema.num_dense, schema.num_fields, emb.embedding_dim)
        if settings.linear_part:  # the recipe: the linear reference inside, in place of the first-order terms
            model_cfg = replace(model_cfg, linear=True, first_order=False)
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
    prepared: Prepared,
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


def plot_curve(path: Path, step_loss: list[tuple[int, float]], evaluations: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    if step_loss:
        s, loss = zip(*step_loss, strict=True)
        a1.plot(s, loss)
    a1.set_xlabel("samples")
    a1.set_ylabel("train loss (running mean)")
    a2.plot([e["samples"] for e in evaluations], [e["val_auc"] for e in evaluations], marker="o")
    a2.set_xlabel("samples")
    a2.set_ylabel("validation AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _prepare(settings: TrainSettings, progress: bool) -> Prepared:
    schema = schema_for_format(settings.format)
    return data_cache.prepare(
        settings.data, settings.format, settings.cache_dir, schema, max_rows=settings.max_rows, progress=progress
    )


def train(settings: TrainSettings, run_dir: Path) -> TrainResult | None:
    """Train as ``settings`` say and write ``run_dir``; ``settings.nproc > 1`` runs that many ranks here.

    Under torchrun (``WORLD_SIZE`` set), this process is one rank of the run torchrun started, and
    only rank 0 returns the result (the others return None).

    Raises:
        distributed.DistributedError: a rank failed; every rank was stopped.
    """
    run_dir = Path(run_dir)
    world = distributed.env_ranks()[1]
    if settings.nproc > 1 and world == 1:
        _prepare(settings, settings.progress)  # parse once, here, before the ranks start
        distributed.launch(settings.nproc, _rank_main, (settings, str(run_dir)), log.isEnabledFor(logging.DEBUG))
        return TrainResult(run_dir, json.loads((run_dir / "metrics.json").read_text()))
    if settings.nproc > 1 and settings.nproc != world:
        raise ValueError(
            f"--nproc {settings.nproc} under torchrun with WORLD_SIZE={world}: let torchrun start the ranks"
        )
    return _train(settings, run_dir)


def _rank_main(settings: TrainSettings, run_dir: str) -> None:
    import threading

    # tqdm's default lock is a multiprocessing semaphore, which a killed rank would leave to the
    # launcher's resource tracker ("leaked semaphore" warnings); a rank needs only a thread lock.
    tqdm.set_lock(threading.RLock())
    _train(settings, Path(run_dir))


def _train(settings: TrainSettings, run_dir: Path) -> TrainResult | None:
    """One rank's whole run (the only one without torch.distributed); returns the result on rank 0."""
    _, _, local_rank, local_world = distributed.env_ranks()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(settings.threads or max(1, cores // local_world))
    torch.manual_seed(settings.seed)
    ctx = distributed.init(settings.device, settings.dist_timeout)
    try:
        if ctx.distributed:  # the first rank of each machine parses (or finds) the cache, the others wait
            if local_rank == 0:
                prepared = _prepare(settings, settings.progress)
            torch.distributed.barrier()
            if local_rank != 0:
                prepared = _prepare(settings, False)
        else:
            prepared = _prepare(settings, settings.progress)
        return _fit(settings, run_dir, prepared, ctx)
    finally:
        distributed.shutdown(ctx)


def _fit(settings: TrainSettings, run_dir: Path, prepared: Prepared, ctx: distributed.Context) -> TrainResult | None:
    splits = prepared.split(settings.split, settings.val_fraction, settings.test_fraction, settings.seed)
    train_idx, val_idx, test_idx = splits["train"], splits["val"], splits["test"]
    if train_idx.size == 0 or val_idx.size == 0:
        raise ValueError(f"{settings.data}: too few rows ({prepared.rows}) for a train and a validation split")
    val_positives = int(np.count_nonzero(prepared.labels[val_idx]))
    if val_positives in (0, val_idx.size):  # no AUC, so no best checkpoint: the run would end with nothing kept
        raise ValueError(
            f"{settings.data}: the {val_idx.size:,} validation rows are all labelled {int(val_positives > 0)},"
            " so their AUC is undefined; the data needs clicks and non-clicks (more rows, or another --split)"
        )
    if not settings.batch_size:  # resolved from the data, the same on every rank; config.json records it
        settings = replace(settings, batch_size=auto_batch_size(int(train_idx.size)))

    # Rank 0 computes the token statistics, vocabulary or signatures once; every rank gets its model.
    table_report: dict[str, Any] = {}
    if ctx.main:
        cfg, extra = build_run_config(settings, prepared, train_idx)
        model = build_model(cfg)
        table_report = fill_tables(model, cfg, settings, prepared, train_idx, extra)
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
    cfg = RunConfig.from_dict(distributed.broadcast_json(ctx, cfg.to_dict() if ctx.main else None))
    if not ctx.main:
        model = build_model(cfg)
    model.to(ctx.device)
    distributed.broadcast_module(ctx, model)
    memory = memory_accounting(model, cfg.full_embedding_bytes)
    if ctx.main:
        log.info("memory: %s", json.dumps(memory))

    looked_up: list[torch.Tensor] = []
    if settings.embedding_l2:
        model.dlrm.embedding.register_forward_hook(lambda m, _i, out: looked_up.append(out[0]) if m.training else None)

    # One optimizer for both stages: in the linear stage only the linear part gets gradients, and the
    # optimizers step only parameters that have one, so that stage is exactly the reference's training.
    optimizer = make_optimizer(model, settings)
    batch = settings.batch_size
    steps_per_epoch = math.ceil(train_idx.size / batch)
    eval_every = max(1, math.ceil(steps_per_epoch / settings.evals_per_epoch))
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    epochs: list[dict[str, Any]] = []
    evaluations: list[dict[str, Any]] = []
    step_loss: list[tuple[int, float]] = []
    best: dict[str, Any] = {"epoch": 0, "step": 0, "samples": 0, "val_auc": -1.0, "stage": None}
    seen, step, epoch = 0, 0, 0
    stages: list[tuple[str, nn.Module]] = [("all", model.dlrm)]
    linear_part = getattr(model.dlrm, "linear", None)
    if isinstance(linear_part, nn.Module):
        stages.insert(0, ("linear", linear_part))

    since_best, stop = 0, False
    at_best: dict[str, Any] | None = None  # the best point of a stage before the last, where the next one starts

    def validate(stage: str, lr: float, snapshot: nn.Module | None) -> None:
        """Score the validation rows; on a new best, save the run, and keep ``snapshot``'s state (the module
        a stage before the last trains: nothing else changes in it) with the optimizer's."""
        nonlocal since_best, stop, at_best
        val = evaluate(model, prepared, val_idx, ctx)
        record = {"stage": stage, "epoch": epoch, "step": step, "samples": seen, "val_auc": val["auc"],
                  "val_logloss": val["logloss"], "lr": lr}  # fmt: skip
        evaluations.append(record)
        if val["auc"] > best["val_auc"]:
            best.update(epoch=epoch, step=step, samples=seen, val_auc=val["auc"], stage=stage)
            since_best = 0
            if ctx.main:
                save_run(run_dir, model, cfg)  # keep the best so far on disk
            if snapshot is not None:
                at_best = {"module": copy.deepcopy(snapshot.state_dict()),
                           "optimizer": copy.deepcopy(optimizer.state_dict())}  # fmt: skip
        else:
            since_best += 1
            stop = since_best >= settings.patience

    for stage, module in stages:
        snapshot = module if stage != stages[-1][0] else None  # a stage with one after it
        net = module
        if ctx.distributed:
            net = nn.parallel.DistributedDataParallel(
                module, device_ids=[ctx.device] if ctx.device.type == "cuda" else None, forward_sync_buffers=False
            )  # the tables are buffers, identical on every rank after the broadcast: not re-sent every step
        schedule = make_schedule(optimizer, settings.lr_schedule, steps_per_epoch * settings.epochs)
        since_best, stop, at_best = 0, False, None

        model.train()
        for _ in range(settings.epochs):
            epoch += 1
            t0, n, train_seconds, running = time.perf_counter(), 0, 0.0, 0.0
            batches = iter_batches(prepared, train_idx, batch, shuffle=True, seed=settings.seed + epoch,
                                   shard=(ctx.rank, ctx.world))  # fmt: skip
            bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch} ({stage})", unit="batch",
                       disable=not (settings.progress and ctx.main))  # fmt: skip
            tick = time.perf_counter()
            for i, (dense, keys, labels) in enumerate(bar):
                rows = min(batch, train_idx.size - i * batch)  # of the global batch, all ranks together
                labels = labels.to(ctx.device)
                logit, _ = net(dense.to(ctx.device), keys.to(ctx.device))
                # Sum over this rank's rows / global rows * world: DDP averages over ranks, so the gradient
                # is the mean over the global batch, as in one process.
                loss = loss_fn(logit.squeeze(1), labels)
                if looked_up:
                    loss = loss + settings.embedding_l2 * looked_up.pop().pow(2).sum()
                looked_up.clear()
                optimizer.zero_grad(set_to_none=True)
                (loss * (ctx.world / rows)).backward()
                optimizer.step()
                schedule.step()
                step += 1
                n += rows
                seen += rows
                local_loss = loss.item() / max(len(labels), 1)
                running = 0.98 * running + 0.02 * local_loss if i else local_loss
                if i % 20 == 0:
                    step_loss.append((seen, running))
                    bar.set_postfix(
                        loss=f"{running:.4f}", samples_s=f"{n / (train_seconds + time.perf_counter() - tick):,.0f}"
                    )
                if (i + 1) % eval_every == 0 or i == steps_per_epoch - 1:  # evenly within each epoch, and at its end
                    train_seconds += time.perf_counter() - tick
                    validate(stage, float(schedule.get_last_lr()[0]), snapshot)
                    tick = time.perf_counter()
                    if stop:
                        break
            bar.close()
            train_seconds += time.perf_counter() - tick
            last = evaluations[-1]
            record = {
                "stage": stage,
                "epoch": epoch,
                "val_auc": last["val_auc"],
                "val_logloss": last["val_logloss"],
                "train_loss": running,
                "train_samples_per_s": n / train_seconds if train_seconds else None,
                "seconds": time.perf_counter() - t0,
            }
            epochs.append(record)
            if ctx.main:
                log.info("epoch %d (%s): val_auc=%.5f val_logloss=%.5f %.0f samples/s (%d rank(s))", epoch,
                         stage, last["val_auc"], last["val_logloss"], record["train_samples_per_s"] or 0,
                         ctx.world)  # fmt: skip
            if stop:
                log.info("%s stage: early stop, no val AUC gain in %d validation(s)", stage, settings.patience)
                break
        if at_best is not None:  # the next stage starts from this one's best point (every rank alike)
            module.load_state_dict(at_best["module"])
            optimizer.load_state_dict(at_best["optimizer"])

    if not ctx.main:
        return None
    best_model, _ = load_run(run_dir)
    test = evaluate(best_model, prepared, test_idx) if test_idx.size else {"auc": None, "logloss": None, "rows": 0}
    metrics = {
        "model": settings.model,
        "batch_size": settings.batch_size,
        "epochs": epochs,
        "evaluations": evaluations,
        "best": best,
        "test": test,
        "memory": memory,
        "data": cfg.extra["data"],
        "distributed": {"world": ctx.world, "backend": "nccl" if ctx.device.type == "cuda" else "gloo",
                        "device": str(ctx.device)} if ctx.distributed else {"world": 1, "device": str(ctx.device)},
        **table_report,
    }  # fmt: skip
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_curve(run_dir / "curve.png", step_loss, evaluations)
    return TrainResult(run_dir, metrics)
