"""`lma features load|bench` and `lma publish`: the Redis tools (lma.commands entry point ``redis``).

Registration builds parsers only; the handlers import redis and the loaders when they run.

    lma features load data/train.txt --redis redis://127.0.0.1:6379/0 --entity-column C1 --ttl 86400
    lma features load users.csv --format csv --entity-column user_id --redis $LMA_REDIS_URL
    lma features bench --redis redis://127.0.0.1:6379/0 --batch-sizes 1,32,256 --iterations 5000
    lma publish artifacts/criteo/3 --redis redis://127.0.0.1:6379/0 --key keys/lma-signing.pub
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator

REDIS_ENV = "LMA_REDIS_URL"
TRUSTED_KEYS_ENV = "LMA_TRUSTED_KEYS"  # the server's setting: `lma publish` checks what the replicas will check
FORMATS = ("criteo", "criteo-csv", "avazu", "csv")  # server.redis_store.LOAD_FORMATS, without importing it


def _echo(line: str) -> None:
    print(line)  # noqa: T201 (command output)


def _add_redis(p: argparse.ArgumentParser) -> None:
    default = os.environ.get(REDIS_ENV) or None
    p.add_argument(
        "--redis", default=default, required=default is None, metavar="URL",
        help=f"redis://[user:password@]host:port/db or rediss://... (default: ${REDIS_ENV})",
    )  # fmt: skip


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    features = sub.add_parser("features", help="Redis online feature store: bulk-load a file, measure fetches")
    fsub = features.add_subparsers(dest="features_command", required=True, metavar="ACTION")

    load = fsub.add_parser("load", help="bulk-load a Criteo/Avazu file or a CSV into Redis, one hash per entity")
    load.add_argument("file", help="data file (plain or gzip for criteo/avazu)")
    _add_redis(load)
    load.add_argument(
        "--entity-column", required=True, metavar="COL",
        help="the key of each hash: 'row' (row number from 0), 'id' (criteo-csv/avazu row id), "
        "a categorical field, or a CSV column",
    )  # fmt: skip
    load.add_argument("--format", default="criteo", choices=FORMATS, help="file format (default criteo)")
    load.add_argument("--ttl", type=_positive_int, default=None, metavar="SECONDS", help="expire each hash after this")
    load.add_argument("--prefix", default="lma:features:", help="key prefix (default lma:features:)")
    load.add_argument("--batch", type=_positive_int, default=1000, help="entities per round trip (default 1000)")
    load.set_defaults(func=_load)

    bench = fsub.add_parser("bench", help="latency of one feature-store fetch by batch size (p50/p99)")
    _add_redis(bench)
    bench.add_argument("--batch-sizes", type=_sizes, default=[1, 32, 256], help="comma-separated (default 1,32,256)")
    bench.add_argument("--iterations", type=_positive_int, default=5000, help="timed fetches per batch size")
    bench.set_defaults(func=_bench)

    publish = sub.add_parser("publish", help="announce a verified bundle on the Redis model-update channel")
    publish.add_argument("artifact_dir", help="a bundle folder (artifacts/NAME/VERSION) or artifacts/NAME (latest)")
    _add_redis(publish)
    publish.add_argument(
        "--key", action="append", default=None, metavar="PUB.pem",
        help=f"trusted public key (repeatable): refuse to publish a bundle none of them signed"
        f" (default: ${TRUSTED_KEYS_ENV}, comma-separated; neither: checksums only)",
    )  # fmt: skip
    publish.set_defaults(func=_publish)


@contextlib.contextmanager
def _redis_errors(url: str) -> Iterator[None]:
    """A Redis error reply or a failed connection as one clear line naming the Redis (bad input: exit 2)."""
    import redis

    from server.redis_store import redact_url

    try:
        yield
    except redis.RedisError as e:
        raise ValueError(f"Redis at {redact_url(url)}: {e}") from None


def _load(args: argparse.Namespace) -> int:
    from server.redis_store import LoadReport, feature_rows, load_features

    report = LoadReport()
    rows = feature_rows(args.file, args.format, args.entity_column, report)
    with _redis_errors(args.redis):
        load_features(args.redis, rows, prefix=args.prefix, ttl_s=args.ttl, batch_size=args.batch, report=report)
    ttl = f", expiring in {args.ttl} s" if args.ttl else ""
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(report.skip_reasons.items()))
    if report.rows == 0:  # an empty file, or one of another format: nothing was written
        skipped = f"; all {report.skipped} lines were skipped ({reasons})" if report.skipped else ""
        raise ValueError(f"{args.file}: no {args.format} row to load{skipped}")
    _echo(
        f"loaded {report.rows} rows into hashes {args.prefix}<{args.entity_column}>{ttl}"
        f" in {report.seconds:.1f} s; skipped {report.skipped} lines" + (f" ({reasons})" if reasons else "")
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    from server.redis_store import bench_fetch, redact_url

    with _redis_errors(args.redis):
        rows = asyncio.run(bench_fetch(args.redis, args.batch_sizes, args.iterations))
    _echo(f"RedisFeatureStore.fetch against {redact_url(args.redis)}, {args.iterations} fetches per batch size")
    _echo("")
    _echo("| batch | p50 ms | p90 ms | p99 ms | mean ms | CPU ms per fetch | CPU µs per entity |")
    _echo("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        _echo(
            f"| {r['batch']:.0f} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['mean_ms']:.3f} "
            f"| {r['cpu_ms']:.3f} | {r['cpu_ms'] * 1000 / r['batch']:.1f} |"
        )
    return 0


def _publish(args: argparse.Namespace) -> int:
    from export.signing import TrustedKeys
    from server.model_channel import CHANNEL, publish

    keys = args.key or [k.strip() for k in os.environ.get(TRUSTED_KEYS_ENV, "").split(",") if k.strip()]
    trust = TrustedKeys.from_files(keys) if keys else None
    if trust is None:
        print(  # noqa: T201
            f"lma publish: signature not checked (no --key, ${TRUSTED_KEYS_ENV} unset); checksums only",
            file=sys.stderr,
        )
    with _redis_errors(args.redis):
        update, receivers = publish(args.redis, args.artifact_dir, trust=trust)
    signed = ", signature verified" if trust else ""
    _echo(
        f"published {update.name} version {update.version} ({update.path}{signed}) on {CHANNEL}: "
        f"{receivers} subscriber{'s' if receivers != 1 else ''} listening"
    )
    return 0


if __name__ == "__main__":  # python -m server.redis_cli ... (before the entry point is installed)
    parser = argparse.ArgumentParser(prog="lma")
    register(parser.add_subparsers(dest="command", required=True))
    cli_args = parser.parse_args()
    try:
        sys.exit(cli_args.func(cli_args))
    except (ValueError, FileNotFoundError) as e:
        print(f"lma {cli_args.command}: error: {e}", file=sys.stderr)  # noqa: T201
        sys.exit(2)
