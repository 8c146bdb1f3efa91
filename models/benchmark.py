"""Benchmarks of the data and training paths, old against new side by side in one run.

    flock /tmp/lma-timing.lock python -m models.benchmark ingest --data data/synth_1m.tsv --old-rev b41178c
    flock /tmp/lma-timing.lock python -m models.benchmark train --data data/synth_1m.tsv --kinds full,hash,lma
    flock /tmp/lma-timing.lock python -m models.benchmark dp --data data/synth_1m.tsv --nproc 1,2

``ingest``: the reader of a git revision (``models/data.py`` at ``--old-rev``, loaded from git into a
temporary module, so the product keeps one reader) against the reader of this tree, in alternating
rounds (old, new, old, new, ...) over the same file: :func:`iter_chunks` (bytes -> model-ready
arrays, consumed chunk by chunk) and :func:`prepare` (the same plus writing the cache). Every round
checks that both produce identical arrays (SHA-256 of dense, keys and labels) and identical skip
counts (for ``iter_chunks`` from one more run of each reader, untimed, that keeps its chunks).

``train``: training samples/s (forward, backward, optimizer step; no evaluation) of each embedding
kind at one batch size on the same prepared rows, kinds alternating over rounds.

``dp``: ``lma train`` with 1 process and with N data-parallel processes (same global batch, one epoch,
one validation), alternating; samples/s is the run's own ``train_samples_per_s`` (training steps only).

Both print a Markdown table with the load average before and after (the machine is shared: compare
the ratios, which alternating rounds keep fair, more than the absolute numbers).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any


def _progress(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def old_reader(rev: str) -> ModuleType:
    """``models/data.py`` as it was at git revision ``rev``, imported as a module of its own."""
    root = Path(__file__).resolve().parent.parent
    try:
        source = subprocess.run(
            ["git", "-C", str(root), "show", f"{rev}:models/data.py"], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise ValueError(f"cannot read models/data.py at git revision {rev!r}: {e}") from e
    folder = Path(tempfile.mkdtemp(prefix="lma-old-reader-"))
    path = folder / "lma_old_data.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("lma_old_data", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lma_old_data"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _digest(chunks: Any) -> tuple[int, str]:
    h = hashlib.sha256()
    rows = 0
    for c in chunks:
        for a in (c.dense, c.keys, c.labels):
            h.update(memoryview(a.tobytes()))
        rows += len(c)
    return rows, h.hexdigest()


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def bench_ingest(args: argparse.Namespace) -> str:
    from models.data import cache, reader
    from models.data.formats import schema_for_format

    old = old_reader(args.old_rev)
    schema = schema_for_format(args.format)
    path = Path(args.data)

    # A timed run returns what its digest is taken from after the clock stops. iter_chunks is a stream: the
    # timed run consumes it chunk by chunk and drops each chunk, as a training loop or the cache writer does
    # (keeping a file's chunks in a list measures page faults of fresh memory in the consumer, not the
    # reader), and an untimed run of the same reader keeps them for the digest. prepare's arrays are files.
    def chunks(module: Any, **kw: Any) -> tuple[Callable[[], Any], Callable[[], Any]]:
        def consume() -> Any:
            stats = module.ReadStats()
            rows = sum(len(c) for c in module.iter_chunks(path, args.format, schema, stats=stats, **kw))
            return rows, stats

        def keep() -> Any:
            stats = module.ReadStats()
            return list(module.iter_chunks(path, args.format, schema, stats=stats, **kw)), stats

        return consume, keep

    def prepared(module: Any, **kw: Any) -> tuple[Callable[[], Any], None]:
        def run() -> Any:
            folder = tempfile.mkdtemp(prefix="lma-bench-cache-", dir=args.tmp)
            p = module.prepare(path, args.format, folder, schema, progress=False, **kw)
            return [p], p.stats, folder

        return run, None

    impls: dict[str, dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]]] = {
        "iter_chunks": {"old": chunks(old), "new": chunks(reader, workers=args.workers)},
        "prepare": {"old": prepared(old), "new": prepared(cache, workers=args.workers)},
    }
    # Untimed first reads (1,000 rows each): imports, and the new reader's Numba kernels compiled or loaded from
    # their cache (models/jit.py), which a fresh checkout pays once; reported, not folded into round 1.
    first: dict[str, float] = {}
    for name, module, kw in (("old", old, {}), ("new", reader, {"workers": args.workers})):
        start = time.perf_counter()
        list(module.iter_chunks(path, args.format, schema, max_rows=1000, **kw))
        first[name] = time.perf_counter() - start
    load_before = _loadavg()
    results: dict[str, dict[str, list[tuple[float, float]]]] = {op: {"old": [], "new": []} for op in impls}
    rows = 0
    for r in range(args.rounds):
        for op, pair in impls.items():
            outputs = {}
            for name in ("old", "new"):  # alternating: old, new in every round
                timed, untimed = pair[name]
                out, wall, cpu = _timed(timed)
                timed_out = out
                if untimed is not None:
                    out = untimed()
                rows, digest = _digest(out[0])
                if untimed is not None and (rows, out[1].to_dict()) != (timed_out[0], timed_out[1].to_dict()):
                    raise AssertionError(f"{op} {name}: the timed and the untimed run differ")
                outputs[name] = (rows, digest, out[1].to_dict())
                if len(out) > 2:
                    shutil.rmtree(out[2], ignore_errors=True)
                del out
                results[op][name].append((wall, cpu))
                _progress(
                    f"round {r + 1} {op:11s} {name}: {rows / wall:,.0f} rows/s ({wall:.2f} s wall, {cpu:.2f} s CPU)"
                )
            if outputs["old"] != outputs["new"]:
                raise AssertionError(f"{op}: old and new readers differ: {outputs['old']} vs {outputs['new']}")
    load_after = _loadavg()
    lines = [
        f"{rows:,} rows of {path.name} ({path.stat().st_size:,} bytes, format {args.format}); "
        f"old = models/data.py at {args.old_rev}, new = this tree with {args.workers or 'all'} worker(s); "
        f"{args.rounds} alternating rounds; timed `iter_chunks` runs consume the stream chunk by chunk; outputs"
        " identical in every round (SHA-256 of dense, keys, labels; skip counts; for `iter_chunks` from one more,"
        " untimed run of each reader that keeps its chunks)",
        f"load average before: {load_before}, after: {load_after}; cores: {os.cpu_count()}; untimed first read of"
        f" 1,000 rows before round 1: old {first['old']:.2f} s, new {first['new']:.2f} s (with compiling or loading"
        " its kernels)",
        "",
        "| step | old rows/s (median) | new rows/s (median) | new / old (median of rounds) | old CPU s | new CPU s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for op, res in results.items():
        old_rate = [rows / w for w, _ in res["old"]]
        new_rate = [rows / w for w, _ in res["new"]]
        ratios = [n / o for n, o in zip(new_rate, old_rate, strict=True)]
        lines.append(
            f"| `{op}` | {statistics.median(old_rate):,.0f} | {statistics.median(new_rate):,.0f} |"
            f" {statistics.median(ratios):.2f}x | {statistics.median(c for _, c in res['old']):.2f} |"
            f" {statistics.median(c for _, c in res['new']):.2f} |"
        )
    return "\n".join(lines)


def bench_train(args: argparse.Namespace) -> str:
    import torch

    from models.checkpoint import build_model
    from models.data.batches import iter_batches
    from models.data.cache import prepare
    from models.data.formats import schema_for_format
    from models.embeddings import EmbeddingConfig
    from models.train import TrainSettings, build_run_config, fill_tables, make_optimizer

    torch.set_num_threads(args.threads)
    schema = schema_for_format(args.format)
    data = prepare(args.data, args.format, args.cache_dir, schema, max_rows=args.max_rows, progress=False)
    parts = data.split("order", 0.1, 0.1)
    train_idx = parts["train"]
    kinds = [k for k in args.kinds.split(",") if k]
    models = {}
    for kind in kinds:
        emb = EmbeddingConfig(kind=kind, embedding_dim=16, compression=1.0 if kind == "full" else args.compression)
        settings = TrainSettings(data=Path(args.data), cache_dir=Path(args.cache_dir), preset=args.preset,
                                 embedding=emb, batch_size=args.batch_size, linear_part=args.linear_part,
                                 progress=False)  # fmt: skip
        cfg, extra = build_run_config(settings, data, train_idx)
        model = build_model(cfg)
        fill_tables(model, cfg, settings, data, train_idx, extra)
        models[kind] = (model, make_optimizer(model, settings))
    batches = list(iter_batches(data, train_idx[: args.batch_size * args.steps], args.batch_size, shuffle=True, seed=0))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    load_before = _loadavg()
    for r in range(args.rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            model, opt = models[kind]
            t0 = time.perf_counter()
            n = 0
            for dense, keys, labels in batches:
                logit, _ = model.dlrm(dense, keys)
                loss = loss_fn(logit.squeeze(1), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                n += len(labels)
            rates[kind].append(n / (time.perf_counter() - t0))
            _progress(f"round {r + 1} {kind}: {rates[kind][-1]:,.0f} samples/s")
    load_after = _loadavg()
    lines = [
        f"training step (forward + backward + Adagrad step) on "
        f"{len(batches)} batches of {args.batch_size} rows of {Path(args.data).name}, preset {args.preset}, d = 16, "
        f"hash/lma at {args.compression:g}x, {'with' if args.linear_part else 'without'} the linear part, "
        f"{args.threads} torch thread(s), {args.rounds} alternating rounds",
        f"load average before: {load_before}, after: {load_after}; cores: {os.cpu_count()}",
        "",
        "| kind | samples/s (median) | samples/s per round | vs full |",
        "|---|---:|---|---:|",
    ]
    full = statistics.median(rates["full"]) if "full" in rates else None
    for kind in kinds:
        med = statistics.median(rates[kind])
        ratio = f"{med / full:.2f}x" if full else "-"
        per_round = ", ".join(f"{x:,.0f}" for x in rates[kind])
        lines.append(f"| {kind} | {med:,.0f} | {per_round} | {ratio} |")
    return "\n".join(lines)


def bench_dp(args: argparse.Namespace) -> str:
    counts = [int(x) for x in args.nproc.split(",") if x]
    results: dict[str, list[dict[str, Any]]] = {}
    load_before = _loadavg()
    with tempfile.TemporaryDirectory(prefix="lma-bench-dp-", dir=args.tmp) as tmp:
        for r in range(args.rounds):
            for n in counts if r % 2 == 0 else counts[::-1]:
                for threads in (args.threads // n, *((1,) if n == 1 and args.threads > 1 and args.single else ())):
                    label = f"{n} x {threads} thread(s)"
                    run = Path(tmp) / f"r{r}_{n}_{threads}"
                    cmd = [sys.executable, "-m", "models.main", "train", "--data", str(args.data), "--cache-dir",
                           str(args.cache_dir), "--epochs", "1", "--evals-per-epoch", "1", "--batch-size",
                           str(args.batch_size), "--nproc", str(n), "--threads", str(threads), "--device", "cpu",
                           "--max-rows", str(args.max_rows), "--no-progress", "--out", str(run)]  # fmt: skip
                    subprocess.run(cmd, check=True, capture_output=True)
                    m = json.loads((run / "metrics.json").read_text())
                    results.setdefault(label, []).append(m)
                    _progress(f"round {r + 1} {label}: {_stage_rate(m, 'all'):,.0f} samples/s, "
                              f"val AUC {m['best']['val_auc']:.5f}")  # fmt: skip
    load_after = _loadavg()
    lines = [
        f"`lma train` on {Path(args.data).name} ({args.max_rows or 'all'} rows), small preset, lma 16x, one epoch at "
        f"global batch {args.batch_size}, {args.rounds} alternating rounds; gloo on CPU",
        f"load average before: {load_before}, after: {load_after}; cores: {os.cpu_count()}",
        "",
        "| ranks x torch threads | train samples/s (median) | per round | linear stage samples/s (median) "
        "| val AUC (median) |",
        "|---|---:|---|---:|---:|",
    ]
    for label, ms in results.items():
        rates = [_stage_rate(m, "all") for m in ms]
        linear = [_stage_rate(m, "linear") for m in ms]
        aucs = [m["best"]["val_auc"] for m in ms]
        linear_cell = "-" if any(math.isnan(x) for x in linear) else f"{statistics.median(linear):,.0f}"
        lines.append(f"| {label} | {statistics.median(rates):,.0f} | {', '.join(f'{x:,.0f}' for x in rates)} |"
                     f" {linear_cell} | {statistics.median(aucs):.5f} |")  # fmt: skip
    return "\n".join(lines)


def _stage_rate(metrics: dict[str, Any], stage: str) -> float:
    """Train samples/s of the first epoch of ``stage`` ("linear": the DLRM's linear part alone, "all": the whole
    model) in a run's metrics.json; NaN when the run had no such stage (``--no-linear-part``)."""
    epoch = next((e for e in metrics["epochs"] if e.get("stage", "all") == stage), None)
    rate = None if epoch is None else epoch["train_samples_per_s"]  # None: an epoch of no measurable time
    return float("nan") if rate is None else float(rate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.benchmark", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ingest", help="old reader (a git revision) vs this tree's, alternating rounds")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--format", default="criteo")
    p.add_argument("--old-rev", default="b41178c", help="git revision whose models/data.py is the old reader")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="parser threads of the new reader (0: one per core)")
    p.add_argument("--tmp", type=Path, default=None, help="folder for the temporary caches of the prepare rounds")
    p.set_defaults(func=bench_ingest)
    p = sub.add_parser("train", help="training samples/s of each embedding kind, alternating rounds")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--format", default="criteo")
    p.add_argument("--cache-dir", type=Path, default=Path("data/cache"))
    p.add_argument("--max-rows", type=int, default=0)
    p.add_argument("--kinds", default="full,hash,lma")
    p.add_argument("--preset", default="small")
    p.add_argument("--compression", type=float, default=16.0)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=100, help="batches per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--linear-part", action=argparse.BooleanOptionalAction, default=True,
        help="the DLRMs with the linear part (lma train's default) or with first-order terms instead",
    )  # fmt: skip
    p.set_defaults(func=bench_train)
    p = sub.add_parser("dp", help="lma train with 1 and N data-parallel processes, alternating rounds")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--cache-dir", type=Path, default=Path("data/cache"))
    p.add_argument("--max-rows", type=int, default=0)
    p.add_argument("--nproc", default="1,2")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2, help="cores to use: each of N ranks gets threads // N")
    p.add_argument("--single", action="store_true", help="also 1 process with 1 thread")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tmp", type=Path, default=None)
    p.set_defaults(func=bench_dp)
    args = parser.parse_args(argv)
    sys.stdout.write(args.func(args) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
