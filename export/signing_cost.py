"""What signature verification costs when a Criteo-scale bundle is loaded (the numbers in docs/SCALE.md).

    python -m export.signing_cost --work artifacts/signing-cost     # builds once (minutes), then measures
    flock /tmp/lma-timing.lock python -m export.signing_cost --work artifacts/signing-cost --rounds 5

The first run builds the ``criteo-kaggle`` 16x LMA DLRM of :mod:`models.scale` (135,050,308 embedding
bytes, signature table filled to capacity with random keys), saves it as a run folder, exports it with
``lma export`` (TorchScript + ONNX, parity-verified) and signs it with a fresh key; later runs reuse it.
Then, in alternating rounds (A, B, A, B, ...), it times the steps of a server load:

- ``checksums``: :func:`export.bundle.load_bundle` without trusted keys (sha256 of every file);
- ``signed``: the same with the trusted key (signature, file set, signed manifest bytes, digests);
- ``signature only``: :meth:`export.signing.TrustedKeys.verify` (the ECDSA check of ``model.sig``);
- ``read``: :meth:`export.bundle.Bundle.read_verified` of ``model.onnx`` alone (read, sha256, compare);
- ``session``: the ONNX Runtime session the server builds (:class:`server.runtimes.OnnxRuntime`: the
  verified bytes, then parsed), next to the same class handed the file's name instead (what the server
  did before it parsed verified bytes): same session options, same checks.

Medians of ``--rounds`` rounds, with the load average, as a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from export.bundle import Bundle

NAME = "criteo-scale"


def build_bundle(work: Path) -> tuple[Path, Path]:
    """The signed Criteo-scale bundle under ``work`` and its public key (built on the first call)."""
    from export.signing import BundleSigner, generate_key_pair

    bundle, public = work / NAME / "1", work / "signing.pub"
    if (bundle / "model.sig").is_file() and public.is_file():
        return bundle, public
    import numpy as np
    import torch

    from export.exporter import export_run
    from models.checkpoint import build_model, save_run
    from models.embeddings import SharedMemoryEmbedding
    from models.scale import criteo_kaggle_config, fill_table

    torch.manual_seed(0)
    cfg = criteo_kaggle_config()
    model = build_model(cfg)
    emb = model.dlrm.embedding
    assert isinstance(emb, SharedMemoryEmbedding)
    report, _ = fill_table(emb, np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), seed=0)
    cfg.extra["signatures"] = {"signed_tokens": report["capacity"], "table": {}}
    model.eval()
    save_run(work / "run", model, cfg)
    if not (work / "signing.pem").is_file():
        generate_key_pair(work / "signing.pem", public)
    export_run(work / "run", work / NAME, version="1", signer=BundleSigner(work / "signing.pem"))
    return bundle, public


@dataclasses.dataclass(frozen=True)
class _ByName(Bundle):
    """A bundle whose runtime opens the graph by file name (InferenceSession takes a path or bytes)."""

    def read_verified(self, runtime: str) -> bytes:
        return str(self.file(runtime))  # type: ignore[return-value]


def _time(fn: Callable[[], object], times: list[float]) -> None:
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)


def measure(bundle: Path, public: Path, rounds: int) -> dict[str, Any]:
    from export.bundle import load_bundle
    from export.signing import TrustedKeys
    from server.runtimes import OnnxRuntime

    trust = TrustedKeys.from_files([public])
    plain = load_bundle(bundle)
    sizes = {name: entry["bytes"] for name, entry in plain.manifest["files"].items()}
    by_name = _ByName(**{f.name: getattr(plain, f.name) for f in dataclasses.fields(plain)})
    steps: dict[str, list[float]] = {k: [] for k in ("checksums", "signed", "signature", "read", "session", "by_name")}
    run: dict[str, Callable[[], object]] = {
        "checksums": lambda: load_bundle(bundle),
        "signed": lambda: load_bundle(bundle, trust),
        "signature": lambda: trust.verify(bundle),
        "read": lambda: plain.read_verified("onnx"),
        "session": lambda: OnnxRuntime(plain, "cpu", threads=1).close(),
        "by_name": lambda: OnnxRuntime(by_name, "cpu", threads=1).close(),
    }
    load_before = os.getloadavg()
    for r in range(rounds):
        pairs = [("checksums", "signed"), ("session", "by_name")]
        for a, b in pairs:
            for step in (a, b) if r % 2 == 0 else (b, a):  # A, B / B, A
                _time(run[step], steps[step])
        _time(run["signature"], steps["signature"])
        _time(run["read"], steps["read"])
    return {
        "command": "python -m export.signing_cost " + " ".join(sys.argv[1:]),
        "files": sizes,
        "bundle_bytes": sum(sizes.values()) + (bundle / "manifest.json").stat().st_size,
        "rounds": rounds,
        "load_average": (load_before, os.getloadavg()),
        "median_s": {k: statistics.median(v) for k, v in steps.items()},
        "all_s": steps,
    }


def to_markdown(r: dict[str, Any]) -> str:
    m = r["median_s"]
    files = ", ".join(f"{name} {n:,} B" for name, n in r["files"].items())
    (a1, _, _), (a2, _, _) = r["load_average"]
    rows = [
        ("`load_bundle`, checksums only (sha256 of every file)", m["checksums"]),
        ("`load_bundle` with the trusted key (signature + file set + digests)", m["signed"]),
        ("of which the signature check of `model.sig` alone", m["signature"]),
        ("`read_verified` of model.onnx alone (read + sha256 + compare)", m["read"]),
        ("ONNX Runtime session from the verified bytes (the server's `OnnxRuntime`)", m["session"]),
        ("the same, handed the file by name (before)", m["by_name"]),
    ]
    lines = [
        f"`{r['command']}`: {r['rounds']} alternating rounds, medians; load average {a1:.2f} before,"
        f" {a2:.2f} after (1 min). Bundle: {files}, {r['bundle_bytes']:,} B in all.",
        "",
        "| step | median s |",
        "|---|---:|",
        *[f"| {what} | {s:.3f} |" for what, s in rows],
        "",
        f"Signature overhead at load: {m['signed'] - m['checksums']:+.3f} s over checksums"
        f" ({(m['signed'] - m['checksums']) / (m['checksums'] + m['session']):+.1%} of checksums + session);"
        f" verified bytes instead of the file name: {m['session'] - m['by_name']:+.3f} s.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.signing_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("artifacts/signing-cost"), help="where the bundle is built")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians are reported)")
    args = p.parse_args(argv)
    bundle, public = build_bundle(args.work)
    print(to_markdown(measure(bundle, public, args.rounds)))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
