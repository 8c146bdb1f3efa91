"""`lma export`: run folder -> parity-verified bundle (and optionally a Triton repository entry).

Registration only builds the parser; the handler imports torch/onnx lazily.
"""

import argparse
from pathlib import Path
from typing import Any


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "export",
        help="export a run folder as a bundle (TorchScript + ONNX + manifest), parity-verified",
        description="Write artifacts/NAME/VERSION/{manifest.json, model.onnx, model.ts}; fails (exit 2) and writes"
        " nothing when the exported graphs disagree with the eager model beyond --tolerance.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run folder written by `lma train`")
    p.add_argument("--out", type=Path, required=True, help="model folder artifacts/NAME (its name is the model name)")
    p.add_argument("--version", default=None, help="version to write (default: one more than the highest existing)")
    p.add_argument("--triton", type=Path, default=None, metavar="REPO_DIR", help="also write REPO_DIR/NAME for Triton")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest accepted max |diff| of probabilities")
    p.add_argument("--onnx-exporter", choices=("legacy", "dynamo"), default="legacy", help="torch.onnx exporter")
    p.set_defaults(func=_export, extra="train")


def _export(args: argparse.Namespace) -> int:
    import time

    from export.exporter import export_run

    t0 = time.perf_counter()
    bundle = export_run(
        args.run_dir,
        args.out,
        version=args.version,
        triton=args.triton,
        tolerance=args.tolerance,
        onnx_exporter=args.onnx_exporter,
    )
    print(summary(bundle.manifest, bundle.path, time.perf_counter() - t0, args.triton))
    return 0


def summary(manifest: dict[str, Any], path: Path, seconds: float, triton: Path | None = None) -> str:
    """Human-readable export report: files, memory accounting, parity, ONNX graph size, time."""
    mem = manifest["memory"]
    lines = [f"exported {manifest['name']} version {manifest['version']} -> {path}"]
    for name, f in manifest["files"].items():
        lines.append(f"  {name:<12} {f['bytes']:>14,} bytes  sha256 {f['sha256'][:16]}")
    lines.append(
        f"memory ({mem['kind']}): embedding {mem['embedding_bytes']:,} B {mem['embedding_parts']}, dense"
        f" {mem['dense_bytes']:,} B, total {mem['total_bytes']:,} B; full embedding {mem['full_embedding_bytes']:,} B"
        f" -> embedding compression {mem['embedding_compression']:.2f}x, model {mem['model_compression']:.2f}x"
    )
    parity = manifest["parity"]
    worst = parity["worst"]
    lines.append(
        f"parity: {len(parity['cases'])} cases ({', '.join(parity['cases'])}), worst {worst['pair']} on"
        f" {worst['case']}: max |diff| {worst['max_abs_diff']:.3g} <= {parity['tolerance']:g};"
        " fallback_tokens equal"
    )
    onnx = manifest["onnx"]
    lines.append(
        f"onnx: opset {onnx['opset']} ({onnx['exporter']} exporter), {onnx['node_count']} nodes,"
        f" embedding part {onnx['embedding_node_count']}: {onnx['embedding_op_types']}"
    )
    if triton is not None:
        lines.append(f"triton: {Path(triton) / manifest['name']}/config.pbtxt + 1/model.onnx")
    lines.append(f"seconds: {seconds:.2f}")
    return "\n".join(lines)
