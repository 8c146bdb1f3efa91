"""Criteo Kaggle scale on paper and in a run: the 16x LMA DLRM built at full size.

    python -m models.scale                      # Markdown report on stdout (docs/SCALE.md holds one)
    python -m models.scale --json scale.json    # the same numbers, machine-readable

Builds the ``criteo-kaggle`` DLRM with an LMA embedding at compression 16 for Criteo Kaggle's
33,762,577 tokens (full table: 33,762,577 x 16 x 4 = 2,160,804,928 bytes), then measures what a run
at that scale costs:

1. the memory accounting of the built model (shared memory, signature table, seeds, dense) against
   the 2.16 GB full table, and both compressions;
2. the signature computation (:func:`models.signatures.compute_signatures`) on a 125,000-row sample
   of 26 fields at Criteo Kaggle's per-field cardinalities with Zipf(1.1) token frequencies, in both
   semantic modes (``rows`` and ``context``);
3. filling the signature table to capacity: the sample's tokens (most frequent first), topped up with
   random distinct 62-bit keys and random signatures, and the time of :func:`models.hashtable.build_table`;
4. an eager forward pass at batch 1024 over new rows of the same distribution, in samples/s, at one
   thread and at torch's default thread count.

The sample is synthetic (no Criteo file is needed): the numbers are about sizes and speed, not AUC.
"""

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import RunConfig, build_model, memory_accounting
from models.dlrm import CTRModel, DLRMConfig
from models.embeddings import FLOAT_BYTES, EmbeddingConfig, SharedMemoryEmbedding, seed_bytes
from models.hashtable import build_table, table_bytes
from models.schema import KEY_MASK, criteo_schema
from models.signatures import compute_signatures

# Distinct values per categorical field C1..C26 of Criteo Kaggle (train.txt); they sum to 33,762,577.
CRITEO_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
CRITEO_KAGGLE_TOKENS = sum(CRITEO_CARDINALITIES)
EMBEDDING_DIM = 16
COMPRESSION = 16.0
ZIPF_EXPONENT = 1.1


def criteo_kaggle_config(compression: float = COMPRESSION) -> RunConfig:
    """The run config of a 16x LMA DLRM (criteo-kaggle preset) for Criteo Kaggle's vocabulary."""
    schema = criteo_schema()
    return RunConfig(
        schema=schema,
        model=DLRMConfig.from_preset("criteo-kaggle", schema.num_dense, schema.num_fields),
        embedding=EmbeddingConfig(kind="lma", embedding_dim=EMBEDDING_DIM, compression=compression),
        full_embedding_bytes=CRITEO_KAGGLE_TOKENS * EMBEDDING_DIM * FLOAT_BYTES,
        distinct_tokens=CRITEO_KAGGLE_TOKENS,
        data_format="criteo",
    )


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (uint64 arithmetic wraps by design)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def zipf_sample(rows: int, cardinalities: tuple[int, ...], exponent: float, seed: int) -> np.ndarray:
    """int64 (rows, F) token keys: field f draws rank r < cardinality_f with P(r) ∝ (r + 1)^-exponent.

    Keys are 62-bit and field-specific (a mix of the field index and the rank), like the schema's.
    """
    rng = np.random.default_rng(seed)
    keys = np.empty((rows, len(cardinalities)), dtype=np.int64)
    for f, n in enumerate(cardinalities):
        cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -exponent)
        ranks = np.minimum(np.searchsorted(cdf, rng.random(rows) * cdf[-1], side="right"), n - 1)
        mixed = splitmix64(ranks.astype(np.uint64) + np.uint64(f << 40))
        keys[:, f] = (mixed & np.uint64(KEY_MASK)).astype(np.int64)
    return keys


def timed(fn, *args: Any, **kwargs: Any) -> tuple[Any, float]:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def paper_numbers(cfg: RunConfig) -> dict[str, int | float]:
    """The byte budget of the config, computed from the formulas alone (DESIGN section 4)."""
    emb = cfg.embedding
    budget = cfg.full_embedding_bytes / emb.compression
    share = budget * emb.signature_share
    # Largest power-of-two bucket count whose table (16 bytes a slot, plus six int64 seeds) fits the share.
    buckets = 1 << (int((share - 48) // (emb.slots * 16)).bit_length() - 1)
    table = table_bytes(buckets, emb.slots)
    seeds = seed_bytes(emb)
    return {
        "full_embedding_bytes": cfg.full_embedding_bytes,
        "budget_bytes": budget,
        "signature_share_bytes": share,
        "table_buckets": buckets,
        "table_capacity": int(emb.max_load * buckets * emb.slots),
        "table_bytes": table,
        "seed_bytes": seeds,
        "memory_floats": int((budget - table - seeds) // FLOAT_BYTES),
    }


def fill_table(
    emb: SharedMemoryEmbedding, keys: np.ndarray, signatures: np.ndarray, seed: int
) -> tuple[dict[str, Any], float]:
    """Load ``keys`` (priority order) topped up with random keys and signatures to the table's capacity."""
    capacity = int(emb.config.max_load * emb.signatures.num_buckets * emb.config.slots)
    rng = np.random.default_rng([seed, 1])
    need = capacity - keys.size
    pad = np.empty(0, dtype=np.int64)
    while pad.size < need:  # distinct, and distinct from the sample's keys
        draw = rng.integers(0, 2**62, size=need - pad.size + 1024, dtype=np.int64)
        pad = np.unique(np.concatenate([pad, draw[~np.isin(draw, keys)]]))
    pad = rng.permutation(pad)[: max(need, 0)]
    all_keys = np.concatenate([keys, pad])
    all_sigs = np.concatenate([signatures, rng.integers(0, 2**emb.signature_bits, size=pad.size, dtype=np.int64)])
    (tk, tv, params, report), seconds = timed(
        build_table, all_keys, all_sigs, emb.signatures.num_buckets, emb.config.slots, emb.config.seed,
        emb.config.max_load,
    )  # fmt: skip
    emb.signatures.load(tk, tv, params)
    return {**report, "sample_keys": int(keys.size), "random_keys": int(pad.size), "capacity": capacity}, seconds


def _median_seconds(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    for _ in range(3):  # warm-up
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def forward_speed(
    model: CTRModel, dense: torch.Tensor, keys: torch.Tensor, repeats: int, threads: int
) -> dict[str, float]:
    """Eager inference at one batch size and thread count: the whole model, and its embedding alone."""
    model.eval()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            whole = _median_seconds(lambda: model(dense, keys), repeats)
            embedding = _median_seconds(lambda: model.dlrm.embedding(keys), repeats)
            _, fallback = model(dense, keys)
    finally:
        torch.set_num_threads(before)
    return {
        "threads": threads,
        "batch": int(keys.shape[0]),
        "median_ms": whole * 1e3,
        "samples_per_s": keys.shape[0] / whole,
        "embedding_median_ms": embedding * 1e3,
        "fallback_share": float(fallback.sum()) / keys.numel(),
    }


def measure(sample_rows: int, batch: int, repeats: int, seed: int) -> dict[str, Any]:
    load_average = os.getloadavg()  # timings below are wall-clock: a busy machine slows them
    torch.manual_seed(seed)
    cfg = criteo_kaggle_config()
    paper = paper_numbers(cfg)
    model, build_s = timed(build_model, cfg)
    emb = model.dlrm.embedding
    assert isinstance(emb, SharedMemoryEmbedding)
    capacity = int(cfg.embedding.max_load * emb.signatures.num_buckets * cfg.embedding.slots)

    # The signature sample and, after it, a batch of new rows from the same distribution (serving traffic:
    # tokens the sample never saw fall back to hashing).
    rows, synth_s = timed(zipf_sample, sample_rows + batch, CRITEO_CARDINALITIES, ZIPF_EXPONENT, seed)
    sample, batch_keys = rows[:sample_rows], torch.from_numpy(rows[sample_rows:])
    signatures: dict[str, Any] = {}
    sets = {}
    for mode in ("rows", "context"):
        sets[mode], seconds = timed(compute_signatures, sample, replace(cfg.embedding, semantic=mode), capacity)
        signatures[mode] = {**sets[mode].report, "seconds": seconds}

    table_report, table_s = fill_table(emb, sets["rows"].keys, sets["rows"].signatures, seed)
    accounting = memory_accounting(model, cfg.full_embedding_bytes)

    rng = np.random.default_rng([seed, 2])
    dense = torch.from_numpy(np.log1p(rng.exponential(20.0, size=(batch, 13))).astype(np.float32))
    speed = [forward_speed(model, dense, batch_keys, repeats, n) for n in sorted({1, torch.get_num_threads()})]

    return {
        "command": "python -m models.scale " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average": load_average,
        "paper": paper,
        "model_build_seconds": build_s,
        "memory_floats": emb.memory_size,
        "paper_matches_build": paper["memory_floats"] == emb.memory_size
        and paper["table_buckets"] == emb.signatures.num_buckets,
        "accounting": accounting,
        "sample": {
            "rows": sample_rows,
            "fields": sample.shape[1],
            "zipf_exponent": ZIPF_EXPONENT,
            "distinct_tokens": int(np.unique(sample).size),
            "synthesis_seconds": synth_s,
        },
        "signatures": signatures,
        "signature_table": {**table_report, "build_seconds": table_s},
        "forward": speed,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def to_markdown(r: dict[str, Any]) -> str:
    acc, paper, parts = r["accounting"], r["paper"], r["accounting"]["embedding_parts"]
    table, sample = r["signature_table"], r["sample"]
    lines = [
        f"Command: `{r['command'].strip()}` (torch {r['torch']}, {r['threads']} threads, {r['cpus']} CPUs,"
        f" load average {r['load_average'][0]:.1f} at the start)",
        "",
        "| part | bytes | |",
        "|---|---:|---|",
        f"| full embedding (33,762,577 x 16 x 4) | {acc['full_embedding_bytes']:,} |"
        f" {_mb(acc['full_embedding_bytes'])} |",
        f"| budget at {COMPRESSION:g}x | {paper['budget_bytes']:,.2f} | |",
        f"| shared memory M ({r['memory_floats']:,} floats) | {parts['shared_memory']:,} |"
        f" {_mb(parts['shared_memory'])} |",
        f"| signature table ({paper['table_buckets']:,} buckets x 4 slots) | {parts['signature_table']:,} |"
        f" {_mb(parts['signature_table'])} |",
        f"| seeds | {parts['seeds']:,} | |",
        f"| **LMA embedding total** | **{acc['embedding_bytes']:,}** | {_mb(acc['embedding_bytes'])} |",
        f"| dense (MLP parameters x 4) | {acc['dense_bytes']:,} | {_mb(acc['dense_bytes'])} |",
        f"| model total | {acc['total_bytes']:,} | {_mb(acc['total_bytes'])} |",
        "",
        f"Embedding compression **{acc['embedding_compression']:.6f}x**, model compression"
        f" **{acc['model_compression']:.6f}x**. Built in {r['model_build_seconds']:.2f} s.",
        "",
        f"On paper (DESIGN section 4 formulas alone): m = {paper['memory_floats']:,} floats,"
        f" {paper['table_buckets']:,} buckets, {paper['seed_bytes']:,} bytes of seeds;"
        f" the built model has {'exactly these sizes' if r['paper_matches_build'] else 'DIFFERENT sizes'}.",
        "",
        f"Sample: {sample['rows']:,} rows x {sample['fields']} fields, Zipf({sample['zipf_exponent']}) per field at"
        f" Criteo Kaggle cardinalities, {sample['distinct_tokens']:,} distinct tokens.",
        "",
        "| semantic | signed tokens | eligible | coverage of occurrences | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, s in r["signatures"].items():
        lines.append(
            f"| {mode} | {s['signed_tokens']:,} | {s['eligible_tokens']:,} | {s['occurrence_coverage']:.3f} |"
            f" {s['seconds']:.2f} |"
        )
    lines += [
        "",
        f"Signature table: capacity {table['capacity']:,} keys ({table['sample_keys']:,} from the sample,"
        f" {table['random_keys']:,} random), inserted {table['inserted']:,}, dropped {table['dropped']:,},"
        f" load {table['load']:.4f}; build_table {table['build_seconds']:.2f} s.",
        "",
        "| eager forward, batch | threads | median ms | samples/s | embedding alone, ms | fallback share |",
        "|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {f['batch']} | {f['threads']} | {f['median_ms']:.1f} | {f['samples_per_s']:,.0f} |"
            f" {f['embedding_median_ms']:.1f} | {f['fallback_share']:.3f} |"
            for f in r["forward"]
        ),
        "",
        f"Peak resident memory of the process: {_mb(r['peak_rss_bytes'])}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--sample-rows", type=int, default=125_000, help="rows of the synthetic signature sample")
    p.add_argument("--batch", type=int, default=1024, help="batch size of the forward pass")
    p.add_argument("--repeats", type=int, default=20, help="timed forward passes (median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is measured too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.sample_rows < args.batch:
        p.error(f"--sample-rows ({args.sample_rows}) must be >= --batch ({args.batch})")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.sample_rows, args.batch, args.repeats, args.seed)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    sys.stdout.write(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
