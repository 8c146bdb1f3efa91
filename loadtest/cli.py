"""`lma bench` (registered through the lma.commands entry point): the benchmark harness of loadtest/bench.py.

lma bench                                              # demo model, default and 1 worker, about 6 minutes (5m49s here)
lma bench --model-dir artifacts/demo --reference --out docs/BENCHMARKS.md
"""

import argparse
import shlex
import sys
from pathlib import Path

from export.contract import RUNTIMES


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "bench",
        help="start servers, load them (closed and open loop), write a Markdown report with a plot",
        description="Start `lma serve` (and, with --reference, a FastAPI + ONNX Runtime reference server) on free "
        "loopback ports, drive them with the built-in load generator and write the report (see "
        "loadtest/bench/__init__.py). Without --model-dir a small demo model is built first.",
    )
    p.add_argument("--model-dir", type=Path, help="a bundle, artifacts/NAME (latest version), or a one-model repo")
    p.add_argument("--data", type=Path, help="rows to replay (default: the demo data, or synthetic Criteo rows)")
    p.add_argument("--format", default="criteo", help="format of --data (criteo, criteo-csv, avazu)")
    p.add_argument(
        "--workers", default="0,1", help="worker counts of the project's server (0: its default, one per core)"
    )
    p.add_argument("--reference", action="store_true", help="also measure the reference server side by side")
    p.add_argument(
        "--variant", action="append", default=[], metavar="LABEL:LMA_X=V[,LMA_Y=W]",
        help="closed loop: also the default configuration with these settings, side by side (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--v2-binary", action="store_true",
        help="closed loop: also the default configuration on its v2 route, raw values as binary BYTES tensors",
    )  # fmt: skip
    p.add_argument("--runtime", default="onnx", choices=RUNTIMES)
    p.add_argument("--rounds", type=int, default=4, help="closed-loop rounds, servers alternating (default 4)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per request kind (default 1)")
    p.add_argument("--concurrency", default="16,64", help="closed-loop connection counts (default 16,64)")
    p.add_argument("--batch", type=int, default=32, help="samples per batched request (default 32)")
    p.add_argument("--rates", default="", help="open-loop rates in requests/s (default: --rate-fractions)")
    p.add_argument("--rate-fractions", default="0.8,2,5", help="open-loop rates as multiples of the open-loop capacity")
    p.add_argument(
        "--deadlines", default="default,100", help="LMA_REQUEST_TIMEOUT_MS of the open-loop runs, ms or 'default'"
    )
    p.add_argument(
        "--max-connections", type=int, default=1024, help="open loop: most requests in flight (default 1024)"
    )
    p.add_argument("--access-log", action="store_true", help="keep the per-request access log on (default off)")
    p.add_argument(
        "--server-env", action="append", default=[], metavar="LMA_X=VALUE", help="a server setting (repeatable)"
    )
    p.add_argument("--out", type=Path, default=Path("docs/BENCHMARKS.md"), help="the Markdown report")
    p.add_argument("--plot", type=Path, help="the latency/throughput plot (default: docs/benchmarks.png beside --out)")
    p.add_argument("--json", type=Path, help="also write every number as JSON here")
    p.add_argument("--work-dir", type=Path, help="keep the demo model and server logs here (default: temporary)")
    p.add_argument("--demo-rows", type=int, default=20000, help="rows of the demo model's synthetic data")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    import importlib.util

    from loadtest.bench import BenchConfig, dump_json, parse_deadlines, parse_list, run_bench, write_report
    from models.extras import check

    if args.model_dir is None:
        check("torch", "train", "lma bench without --model-dir (it trains a demo model first)")
    if args.runtime == "torchscript":
        check("torch", "torchscript", "lma bench --runtime torchscript")
    variants = []
    for item in args.variant:
        label, sep, settings = item.partition(":")
        pairs = [kv.partition("=") for kv in settings.split(",") if kv]
        if not sep or not label or not pairs or any(not s or not k.startswith("LMA_") for k, s, _ in pairs):
            raise ValueError(f"--variant: expected LABEL:LMA_NAME=VALUE[,LMA_NAME=VALUE], got {item!r}")
        variants.append((label, tuple((k, v) for k, _, v in pairs)))
    env = []
    for item in args.server_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("LMA_"):
            raise ValueError(f"--server-env: expected LMA_NAME=VALUE, got {item!r}")
        env.append((key, value))
    cfg = BenchConfig(
        model_dir=args.model_dir,
        data=args.data,
        data_format=args.format,
        workers=parse_list(args.workers, int, "--workers"),
        reference=args.reference,
        variants=tuple(variants),
        v2_binary=args.v2_binary,
        runtime=args.runtime,
        rounds=args.rounds,
        duration_s=args.duration,
        warmup_s=args.warmup,
        concurrency=parse_list(args.concurrency, int, "--concurrency"),
        batch_size=args.batch,
        rates=parse_list(args.rates, float, "--rates") if args.rates.strip() else (),
        rate_fractions=parse_list(args.rate_fractions, float, "--rate-fractions") if args.rate_fractions else (),
        deadlines_ms=parse_deadlines(args.deadlines),
        max_connections=args.max_connections,
        access_log=args.access_log,
        server_env=tuple(env),
        out=args.out,
        plot=args.plot,
        work_dir=args.work_dir,
        demo_rows=args.demo_rows,
        command="lma " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "lma bench",
    )
    plot_path = cfg.plot_path if importlib.util.find_spec("matplotlib") is not None else None
    if plot_path is None:
        print("matplotlib is not installed (the [train] extra): the report is written without its plot", flush=True)
    report = run_bench(cfg, say=lambda line: print(line, flush=True))
    write_report(report, cfg.out, plot_path)
    if args.json:
        dump_json(report, args.json)
    print(f"wrote {cfg.out}{f' and {plot_path}' if plot_path else ''} in {report.wall_s:.0f} s")
    return 0
