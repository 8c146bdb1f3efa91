"""Export cost and scoring speed: full vs lma, eager vs TorchScript vs ONNX Runtime, side by side.

    python -m export.benchmark --preset small --tokens 33762577 --kinds full,lma --threads 2 --out runs/bench
    python -m export.benchmark ... --runtimes torchscript,onnx --baseline runs/bench-main/artifacts   # before/after

For each embedding kind it builds a model of the preset whose tables have the size of a data set
with ``--tokens`` distinct tokens (33,762,577 = Criteo Kaggle), fills them with synthetic keys the
way training does (full: a vocabulary row for every token; lma: 60-bit signatures for the most
frequent tokens until the signature table reaches its load limit), writes it as a run folder, exports
it with :func:`export.exporter.export_run` (timed, parity included) and then scores the bundle's
graphs at each batch size with the same rows. Rows draw every key from a Zipf(``--zipf``) law over
the token ranks (rank 0 most frequent), plus ``--unseen`` random keys never seen in training, and
dense values like Criteo's counts. Latency is the median of repeated calls (p99 too at batch 1),
samples/s = batch / median; all (kind, runtime, batch) combinations are timed in interleaved rounds
and the best round is kept, which keeps load from other processes from favouring one kind.
``--profile`` adds ONNX Runtime's profile (node count, time per op type, costliest nodes) at each batch size.
ONNX Runtime runs with the server's session options (:func:`export.onnx_runtime.session_options`).

``--baseline DIR`` also times the bundles another build exported (``DIR/<kind>/<version>/``, e.g. the
``artifacts`` folder a ``--keep`` run of that build left) in the same interleaved rounds, as runtimes
``onnx-baseline`` and ``torchscript-baseline``: before/after numbers from one run, on the same rows.

The numbers go in docs/EXPORT.md; no test asserts a time.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.bundle import Bundle, BundleError, latest_bundles, load_bundle
from export.contract import DENSE_INPUT, KEYS_INPUT
from export.exporter import export_run
from export.graphs import export_onnx
from export.onnx_runtime import cpu_session, session_options
from export.tables import key_table
from models.checkpoint import RunConfig, build_model, load_run, save_run
from models.dlrm import PRESETS, DLRMConfig
from models.embeddings import EmbeddingConfig
from models.hashtable import build_table
from models.schema import KEY_MASK, criteo_schema, transform_dense

log = logging.getLogger("export.benchmark")
CRITEO_KAGGLE_TOKENS = 33_762_577


def token_universe(n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct random 62-bit keys in random order (index = frequency rank)."""
    rng = np.random.default_rng(seed)
    tokens = rng.permutation(np.unique(rng.integers(0, KEY_MASK, size=n, dtype=np.int64)))
    while tokens.size < n:  # collisions among 62-bit draws are rare; top up
        more = rng.integers(0, KEY_MASK, size=n - tokens.size, dtype=np.int64)
        tokens = np.concatenate([tokens, np.setdiff1d(more, tokens)])
    return tokens


def synthetic_run(run_dir: Path, kind: str, preset: str, tokens: np.ndarray, dim: int, compression: float) -> None:
    """A run folder of ``kind`` for a data set whose distinct tokens are ``tokens`` (rank order)."""
    schema = criteo_schema()
    emb = EmbeddingConfig(kind=kind, embedding_dim=dim, compression=compression)
    vocab, buckets = 0, 0
    if kind == "full":  # sized exactly as models.train.build_run_config sizes a vocabulary
        vocab = int(tokens.size)
        need = max(1, math.ceil(vocab / (emb.slots * emb.max_load)))
        buckets = 1 << (need - 1).bit_length()
    cfg = RunConfig(
        schema=schema,
        model=DLRMConfig.from_preset(preset, schema.num_dense, schema.num_fields, dim),
        embedding=emb,
        full_embedding_bytes=int(tokens.size) * dim * 4,
        distinct_tokens=int(tokens.size),
        vocab_size=vocab,
        table_buckets=buckets,
    )
    model = build_model(cfg)
    name, table = key_table(model)
    t0 = time.perf_counter()
    if kind == "full":
        k, v, p, report = build_table(tokens, np.arange(tokens.size), table.num_buckets, table.slots, 0, max_load=1.0)
        cfg.extra["vocabulary"] = dict(report, vocab_size=vocab)
    elif kind == "lma":
        capacity = int(emb.max_load * table.num_buckets * table.slots)
        signed = tokens[:capacity]  # the most frequent tokens are signed first
        rng = np.random.default_rng(1)
        sigs = rng.integers(0, 2 ** (emb.num_hashes * emb.bits), size=signed.size, dtype=np.int64)
        k, v, p, report = build_table(signed, sigs, table.num_buckets, table.slots, 0, emb.max_load)
        cfg.extra["signatures"] = {"signed_tokens": int(report["inserted"]), "synthetic": True, "table": dict(report)}
    if kind != "hash":
        table.load(k, v, p)
        log.info(
            "%s: %s of %d keys built in %.1f s (%s)",
            kind,
            name,
            report["inserted"],
            time.perf_counter() - t0,
            report,
        )
    save_run(run_dir, model, cfg)


def draw_rows(tokens: np.ndarray, rows: int, zipf: float, unseen: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(dense (rows, 13) transformed, keys (rows, 26)): Zipf over token ranks, a share of unseen keys."""
    rng = np.random.default_rng(seed)
    ranks = rng.zipf(zipf, size=(rows, 26)) - 1
    ranks = np.where(ranks < tokens.size, ranks, rng.integers(0, tokens.size, size=ranks.shape))
    keys = tokens[ranks]
    new = rng.random(keys.shape) < unseen
    keys[new] = rng.integers(0, KEY_MASK, size=int(new.sum()), dtype=np.int64)
    dense = transform_dense(np.floor(rng.lognormal(1.0, 2.0, size=(rows, 13))))
    return dense, keys


def time_calls(fn: Callable[[], object], min_seconds: float, min_calls: int = 5) -> tuple[list[float], float]:
    """Wall seconds of each call after a warm-up (at least ``min_calls`` calls and ``min_seconds`` in
    all), and the process CPU seconds per call: with one thread, CPU time is the work itself, which
    other processes on a shared machine cannot inflate the way they inflate wall time."""
    for _ in range(3):
        fn()
    times: list[float] = []
    start, cpu = time.perf_counter(), time.process_time()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times, (time.process_time() - cpu) / len(times)


RUNTIME_CHOICES = ("eager", "torchscript", "onnx")


def runtimes(
    bundle: Bundle,
    threads: int,
    extra_onnx: dict[str, Path],
    names: tuple[str, ...] = RUNTIME_CHOICES,
    baseline: Bundle | None = None,
) -> dict[str, Callable[..., Any]]:
    """name -> scorer(dense, keys) for the runtimes in ``names``, every extra ONNX graph, and the
    TorchScript and ONNX graphs of a ``baseline`` bundle (``<runtime>-baseline``)."""
    scorers: dict[str, Callable[..., Any]] = {}

    def torch_scorer(m: Any) -> Callable[..., Any]:
        def score(dense: np.ndarray, keys: np.ndarray) -> Any:
            with torch.inference_mode():
                return m(torch.from_numpy(dense), torch.from_numpy(keys))

        return score

    def onnx_scorer(session: Any) -> Callable[..., Any]:
        return lambda dense, keys: session.run(None, {DENSE_INPUT: dense, KEYS_INPUT: keys})

    if "eager" in names:
        scorers["eager"] = torch_scorer(load_run(Path(bundle.manifest["source_run"]))[0])
    for label, graphs in (("", bundle), ("-baseline", baseline)):
        if graphs is None:
            continue
        if "torchscript" in names:
            scorers[f"torchscript{label}"] = torch_scorer(torch.jit.load(str(graphs.file("torchscript"))))
        if "onnx" in names:
            scorers[f"onnx{label}"] = onnx_scorer(cpu_session(graphs.file("onnx"), threads))
    if "onnx" in names:
        for name, path in extra_onnx.items():
            scorers[f"onnx-{name}"] = onnx_scorer(cpu_session(path, threads))
    return scorers


def profile_onnx(path: Path, threads: int, dense: np.ndarray, keys: np.ndarray, calls: int = 30) -> dict[str, Any]:
    """ONNX Runtime's kernel time per op type and per node over ``calls`` runs (the server's session options plus
    profiling): the share of each op type, microseconds per run of the costliest nodes, and the node count."""
    opts = session_options(threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.gettempdir()) / "lma-ort-profile")
    session = cpu_session(path, options=opts)
    for _ in range(calls):
        session.run(None, {DENSE_INPUT: dense, KEYS_INPUT: keys})
    trace = Path(session.end_profiling())
    per_op: dict[str, float] = defaultdict(float)
    per_node: dict[str, float] = defaultdict(float)
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
            per_node[f"{event['args']['op_name']} {event['name'].removesuffix('_kernel_time')}"] += event["dur"]
    trace.unlink()
    total = sum(per_op.values()) or 1.0
    top = sorted(per_node.items(), key=lambda kv: -kv[1])[:12]
    return {
        "calls": calls,
        "kernel_us_per_run": total / calls,
        "nodes_run": len(per_node),
        "op_share": {op: us / total for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])},
        "top_nodes_us": {name: us / calls for name, us in top},
    }


def build_and_export(kind: str, args: argparse.Namespace, tokens: np.ndarray, work: Path) -> dict[str, Any]:
    """Phase 1 for one kind: synthetic run folder, timed export, extra ONNX exporters."""
    run_dir, art = work / "runs" / kind, work / "artifacts" / kind
    shutil.rmtree(art, ignore_errors=True)
    t0 = time.perf_counter()
    synthetic_run(run_dir, kind, args.preset, tokens, args.dim, args.compression)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bundle = export_run(run_dir, art)
    export_s = time.perf_counter() - t0
    log.info("%s: built in %.1f s, exported in %.1f s", kind, build_s, export_s)
    extra: dict[str, Path] = {}
    for name in args.onnx_exporters:
        if name != bundle.manifest["onnx"]["exporter"]:
            model, cfg = load_run(run_dir)
            (work / name).mkdir(exist_ok=True)
            extra[name] = work / name / f"{kind}.onnx"
            export_onnx(model, cfg.schema, extra[name], name)
            del model
    gc.collect()
    return {
        "kind": kind,
        "bundle": bundle,
        "extra_onnx": extra,
        "build_seconds": build_s,
        "export_seconds": export_s,
        "files": {n: f["bytes"] for n, f in bundle.manifest["files"].items()},
        "memory": bundle.memory,
        "onnx": bundle.manifest["onnx"],
        "parity_worst": bundle.manifest["parity"]["worst"],
        "speed": {},
    }


def measure(
    results: list[dict[str, Any]],
    args: argparse.Namespace,
    tokens: np.ndarray,
    scorers: dict[str, dict[str, Callable[..., Any]]] | None = None,
) -> None:
    """Phase 2: every (kind, runtime, batch) timed in interleaved rounds; the best round's median is kept,
    so a burst of load from other processes hits one round, not one kind."""
    if scorers is None:
        scorers = {
            r["kind"]: runtimes(r["bundle"], args.threads, r["extra_onnx"], args.runtimes, r.get("baseline"))
            for r in results
        }
    rows = {b: draw_rows(tokens, b, args.zipf, args.unseen, seed=b) for b in args.batch_sizes}
    for round_ in range(args.rounds):
        for batch, (dense, keys) in rows.items():
            for r in results:
                for name, score in scorers[r["kind"]].items():
                    times, cpu = time_calls(functools.partial(score, dense, keys), args.seconds)
                    med = statistics.median(times)
                    key = f"{name}/b{batch}"
                    best = r["speed"].get(key)
                    if best is None or med < best["median_ms"] / 1e3:
                        r["speed"][key] = {
                            "runtime": name,
                            "batch": batch,
                            "median_ms": med * 1e3,
                            "p99_ms": float(np.percentile(times, 99)) * 1e3,
                            "samples_per_s": batch / med,
                            "cpu_ms": cpu * 1e3,
                            "calls": len(times),
                            "round": round_,
                        }
                    log.info("round %d %s %s b%d: %.3f ms", round_, r["kind"], name, batch, med * 1e3)
    if args.profile:
        for r in results:
            r["onnx_profile"] = {
                batch: profile_onnx(r["bundle"].file("onnx"), args.threads, dense, keys, calls=max(20, 2_000 // batch))
                for batch, (dense, keys) in rows.items()
            }


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Markdown tables: export cost, then speed per runtime and batch size with the lma/full ratio."""
    lines = [
        f"preset `{args.preset}`, d = {args.dim}, {args.tokens:,} distinct tokens, compression {args.compression:g}x,"
        f" {args.threads} threads, Zipf {args.zipf}, {args.unseen:.0%} unseen keys",
        "",
        "| kind | export s | model.onnx | model.onnx.data | model.ts | embedding bytes (accounting) | total bytes |"
        " onnx nodes (embedding) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        f, m = r["files"], r["memory"]
        lines.append(
            f"| {r['kind']} | {r['export_seconds']:.1f} | {f.get('model.onnx', 0):,} | {f.get('model.onnx.data', 0):,}"
            f" | {f['model.ts']:,} | {m['embedding_bytes']:,} | {m['total_bytes']:,} |"
            f" {r['onnx']['node_count']} ({r['onnx']['embedding_node_count']}) |"
        )
    full = next((r for r in results if r["kind"] == "full"), None)
    others = [r for r in results if r is not full]
    header = "| runtime | batch | " + " | ".join(f"{r['kind']} samples/s (median ms; CPU ms)" for r in results)
    if full is not None:
        header += "".join(f" | {r['kind']}/full samples/s | {r['kind']}/full by CPU" for r in others)
    columns = len(results) + (2 * len(others) if full is not None else 0)
    lines += ["", header + " |", "|---|---:|" + "---:|" * columns]
    for key, first in results[0]["speed"].items():
        cells = []
        for r in results:
            s = r["speed"][key]
            cells.append(f"{s['samples_per_s']:,.0f} ({s['median_ms']:.3f}; {s['cpu_ms']:.3f})")
        if full is not None:
            f = full["speed"][key]
            for r in others:
                s = r["speed"][key]
                cells += [f"{s['samples_per_s'] / f['samples_per_s']:.2f}", f"{f['cpu_ms'] / s['cpu_ms']:.2f}"]
        lines.append(f"| {first['runtime']} | {first['batch']} | " + " | ".join(cells) + " |")
    if any("baseline" in r for r in results):
        lines += _baseline_table(results, full)
    for r in results:
        for batch, prof in r.get("onnx_profile", {}).items():
            top = ", ".join(f"{op} {share:.0%}" for op, share in list(prof["op_share"].items())[:8])
            lines.append(
                f"\nONNX Runtime profile, {r['kind']}, batch {batch}: {prof['nodes_run']} nodes,"
                f" {prof['kernel_us_per_run']:,.0f} us of kernel time per run; by op type: {top}"
            )
    return "\n".join(lines)


def _baseline_table(results: list[dict[str, Any]], full: dict[str, Any] | None) -> list[str]:
    """samples/s of this build over the baseline's, per kind, runtime and batch size; and of each other kind
    over the baseline's full model (the ratio the baseline's own table would have shown for this build)."""
    others = [r for r in results if r is not full]
    header = "| runtime | batch | " + " | ".join(f"{r['kind']} this/baseline" for r in results)
    if full is not None:
        header += "".join(f" | {r['kind']} this / full baseline" for r in others)
    lines = ["", "Against the baseline build (same rows, same rounds):", "", header + " |"]
    lines.append("|---|---:|" + "---:|" * (len(results) + (len(others) if full is not None else 0)))
    for key, first in results[0]["speed"].items():
        if first["runtime"] not in ("onnx", "torchscript"):
            continue
        base_key = f"{first['runtime']}-baseline/b{first['batch']}"
        cells = [f"{r['speed'][key]['samples_per_s'] / r['speed'][base_key]['samples_per_s']:.2f}" for r in results]
        if full is not None:
            cells += [
                f"{r['speed'][key]['samples_per_s'] / full['speed'][base_key]['samples_per_s']:.2f}" for r in others
            ]
        lines.append(f"| {first['runtime']} | {first['batch']} | " + " | ".join(cells) + " |")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--tokens", type=int, default=CRITEO_KAGGLE_TOKENS, help="distinct training tokens")
    p.add_argument("--compression", type=float, default=16.0)
    p.add_argument("--kinds", default="full,lma", help="comma-separated: full, hash, lma")
    p.add_argument("--batch-sizes", default="1,1024", help="comma-separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=0.5, help="time per runtime, batch size and round")
    p.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds; the best is kept")
    p.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of key ranks")
    p.add_argument("--unseen", type=float, default=0.05, help="share of keys never seen in training")
    p.add_argument("--onnx-exporters", default="legacy", help="also time graphs of these exporters: legacy,dynamo")
    p.add_argument("--runtimes", default=",".join(RUNTIME_CHOICES), help="comma-separated: eager, torchscript, onnx")
    p.add_argument(
        "--baseline", type=Path, default=None, metavar="DIR", help="also time another build's bundles DIR/<kind>/<v>"
    )
    p.add_argument("--profile", action="store_true", help="ONNX Runtime profile at each batch size")
    p.add_argument("--out", type=Path, default=None, help="folder for the work files and benchmark.json/.md")
    p.add_argument("--keep", action="store_true", help="keep the run folders and bundles")
    args = p.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.onnx_exporters = [e for e in args.onnx_exporters.split(",") if e]
    args.runtimes = tuple(r for r in args.runtimes.split(",") if r)
    unknown = sorted(set(args.runtimes) - set(RUNTIME_CHOICES))
    if unknown or not args.runtimes:
        p.error(f"--runtimes: choose from {', '.join(RUNTIME_CHOICES)}, got {args.runtimes}")
    return args


def baseline_bundles(folder: Path, kinds: list[str]) -> dict[str, Bundle]:
    """kind -> the latest bundle of ``folder/<kind>/`` (a --keep run's artifacts); every kind must have one."""
    found = latest_bundles(folder)
    missing = [k for k in kinds if k not in found]
    if missing:
        raise BundleError(f"{folder}: no baseline bundle for {missing} (found {sorted(found)})")
    return {k: load_bundle(found[k]) for k in kinds}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    work = args.out or Path(tempfile.mkdtemp(prefix="lma-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    baselines = baseline_bundles(args.baseline, args.kinds) if args.baseline else {}
    tokens = token_universe(args.tokens)
    results = [build_and_export(kind, args, tokens, work) for kind in args.kinds]
    for r in results:
        if r["kind"] in baselines:
            r["baseline"] = baselines[r["kind"]]
    measure(results, args, tokens)
    text = report(results, args)
    for r in results:
        r.pop("baseline", None)
        del r["bundle"], r["extra_onnx"]
    if not args.keep:
        for sub in ("runs", "artifacts", *args.onnx_exporters):
            shutil.rmtree(work / sub, ignore_errors=True)
    (work / "benchmark.json").write_text(json.dumps({"args": vars(args) | {"out": str(work)}, "results": results},
                                                    indent=2, default=str))  # fmt: skip
    (work / "benchmark.md").write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
