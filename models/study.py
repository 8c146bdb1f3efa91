"""The compression study: full / hash / lma over a list of compressions, and the linear reference; all else equal.

    lma study --data data/synth_1m.tsv --compressions 4,8,16,32,64 --seeds 0,1,2 --out runs/study

Writes OUT/study.json (every run's numbers), OUT/study.md (a table of means and spreads over seeds)
and OUT/auc_vs_bytes.png. Every run uses the same data split, preset, optimizer, epochs and batch
size; ``full`` has no compression knob and is trained once per seed, and so is ``lr``, the linear
reference (logistic regression, one hashed weight per token: ``--model lr``, hash at 1x). The table's
last column is each row's test AUC minus the linear reference's, paired by seed: whether the DLRM
beats a linear model on the same split.
"""

import argparse
import copy
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from models.distributed import env_ranks
from models.names import EMBEDDING_KINDS
from models.train import TrainSettings, train

log = logging.getLogger(__name__)

LINEAR = "lr"  # the study's name for the linear reference


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"expected a comma-separated list of numbers, got {text!r}") from e


def run_study(args: argparse.Namespace) -> str:
    if env_ranks()[1] > 1:
        raise ValueError("lma study starts its own ranks (--nproc N); do not run it under torchrun")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    compressions = _floats(args.compressions)
    seed_values = _floats(args.seeds)
    # every list checked before the first run: a bad entry must not fail the study hours in
    known = (*EMBEDDING_KINDS, LINEAR)
    for flag, values in (("--kinds", kinds), ("--compressions", compressions), ("--seeds", seed_values)):
        if not values:
            raise ValueError(f"{flag}: empty; give at least one")
    unknown = [k for k in kinds if k not in known]
    if unknown:
        raise ValueError(f"--kinds: unknown {unknown}; choose from {', '.join(known)}")
    if any(kind not in ("full", LINEAR) for kind in kinds) and not all(c >= 1 for c in compressions):
        raise ValueError(f"--compressions: each must be >= 1 (times smaller than the full table), got {compressions}")
    if not all(x.is_integer() and 0 <= x < 2**63 for x in seed_values):
        raise ValueError(f"--seeds: integers in [0, 2**63) only, got {args.seeds!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(x) for x in seed_values]
    records: list[dict[str, Any]] = []
    for seed in seeds:
        for kind in kinds:
            for comp in [1.0] if kind in ("full", LINEAR) else compressions:
                a = copy.copy(args)
                if kind == LINEAR:
                    a.model, a.embedding, a.compression, a.dim = "lr", "hash", 1.0, 0
                else:
                    a.model, a.embedding, a.compression = "dlrm", kind, comp
                a.seed = seed
                settings = TrainSettings.from_args(a)
                name = f"{kind}" if kind in ("full", LINEAR) else f"{kind}_{comp:g}x"
                result = train(settings, out / "runs" / f"{name}_s{seed}")
                assert result is not None  # (None only on the other ranks of a torchrun run)
                m = result.metrics
                mem = m["memory"]
                records.append({
                    "kind": kind,
                    "compression_setting": comp,
                    "seed": seed,
                    "val_auc": m["best"]["val_auc"],
                    "test_auc": m["test"]["auc"],
                    "test_logloss": m["test"]["logloss"],
                    "embedding_bytes": mem["embedding_bytes"],
                    "total_bytes": mem["total_bytes"],
                    "embedding_compression": mem["embedding_compression"],
                    "model_compression": mem["model_compression"],
                    "signature_table_bytes": mem["embedding_parts"].get("signature_table", 0),
                    "train_samples_per_s": m["epochs"][-1]["train_samples_per_s"],
                    "signed_tokens": m.get("signatures", {}).get("signed_tokens", 0),
                    "best_step": m["best"].get("step"),
                    "batch_size": m.get("batch_size"),
                })  # fmt: skip
                log.info("study: %s seed %d -> test AUC %.5f", name, seed, m["test"]["auc"])
                (out / "study.json").write_text(json.dumps(records, indent=2))
    table = summary_table(records)
    (out / "study.md").write_text(table + "\n")
    plot_study(records, out / "auc_vs_bytes.png")
    return table


def summary_table(records: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["kind"], r["compression_setting"]), []).append(r)
    linear = {r["seed"]: r["test_auc"] for r in records if r["kind"] == LINEAR}
    lines = [
        "| kind | setting | seeds | test AUC (mean ± sd) | test logloss | embedding bytes | total bytes |"
        " emb. compression (signatures counted) | signed tokens | train samples/s | vs lr (paired by seed) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (kind, comp), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] == LINEAR, kv[0][1], kv[0][0])):
        auc = np.array([r["test_auc"] for r in rs])
        ll = np.array([r["test_logloss"] for r in rs])
        paired = [r["test_auc"] - linear[r["seed"]] for r in rs if r["seed"] in linear]
        vs = "-" if kind == LINEAR or not paired else f"{np.mean(paired):+.4f} ± {np.std(paired):.4f}"
        setting = "hash 1x" if kind == LINEAR else "-" if kind == "full" else f"{comp:g}x"
        lines.append(
            f"| {kind} | {setting} | {len(rs)} | {auc.mean():.4f} ± {auc.std():.4f} |"
            f" {ll.mean():.4f} | {rs[0]['embedding_bytes']:,} | {rs[0]['total_bytes']:,} |"
            f" {rs[0]['embedding_compression']:.2f}x | {rs[0]['signed_tokens']:,} |"
            f" {np.mean([r['train_samples_per_s'] for r in rs]):,.0f} | {vs} |"
        )
    return "\n".join(lines)


def plot_study(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for kind, marker in (("full", "*"), ("hash", "o"), ("lma", "s"), (LINEAR, "x")):
        rs = [r for r in records if r["kind"] == kind]
        if not rs:
            continue
        by_bytes: dict[int, list[float]] = {}
        for r in rs:
            by_bytes.setdefault(r["embedding_bytes"], []).append(r["test_auc"])
        xs = sorted(by_bytes)
        means = [float(np.mean(by_bytes[x])) for x in xs]
        sds = [float(np.std(by_bytes[x])) for x in xs]
        ax.errorbar(xs, means, yerr=sds, marker=marker, capsize=3, label=kind)
    ax.set_xscale("log")
    ax.set_xlabel("embedding bytes (signature table counted)")
    ax.set_ylabel("test AUC")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
