"""`lma export`, `lma sign`, `lma verify`, `lma keygen`: bundles and their signatures.

    lma keygen keys/lma-signing.pem                       # + keys/lma-signing.pub
    lma export runs/lma16 --out artifacts/criteo --sign-key keys/lma-signing.pem
    lma sign artifacts/criteo/3 --key keys/lma-signing.pem
    lma verify artifacts/criteo/3 --key keys/lma-signing.pub   # exit 0 verified, 1 refused (the reason on stderr)

Registration only builds the parsers; the handlers import torch/onnx/model-signing lazily.
"""

import argparse
import sys
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
    p.add_argument(
        "--sign-key", type=Path, default=None, metavar="KEY.pem",
        help="sign the bundle with this EC private key (mode 0600) before it appears (see `lma keygen`)",
    )  # fmt: skip
    p.set_defaults(func=_export, extra="train")

    s = sub.add_parser(
        "sign",
        help="sign an existing bundle (OpenSSF model-signing, EC key): writes BUNDLE/model.sig",
        description="Sign every file of the bundle, manifest included, after checking its checksums. An encrypted"
        " key reads its password from $LMA_SIGNING_KEY_PASSWORD.",
    )
    s.add_argument("bundle", type=Path, metavar="BUNDLE", help="a bundle folder, or artifacts/NAME (its latest)")
    s.add_argument("--key", type=Path, required=True, metavar="KEY.pem", help="EC private key (mode 0600)")
    s.set_defaults(func=_sign)

    v = sub.add_parser(
        "verify",
        help="verify a bundle's signature and checksums: exit 0 verified, 1 refused (with the reason)",
        description="What the server does with LMA_TRUSTED_KEYS: the bundle must be signed by one of the keys and"
        " be exactly what was signed (no file changed, added or removed).",
    )
    v.add_argument("bundle", type=Path, metavar="BUNDLE", help="a bundle folder, or artifacts/NAME (its latest)")
    v.add_argument(
        "--key", type=Path, action="append", required=True, metavar="PUB.pem",
        help="trusted public key; repeat for several (key rotation)",
    )  # fmt: skip
    v.set_defaults(func=_verify)

    k = sub.add_parser(
        "keygen",
        help="make a signing key pair: KEY.pem (private, mode 0600) and KEY.pub",
        description="The same as: openssl ecparam -name prime256v1 -genkey -noout -out KEY.pem && chmod 600 KEY.pem"
        " && openssl ec -in KEY.pem -pubout -out KEY.pub. Keep KEY.pem off servers, images and bundles.",
    )
    k.add_argument("private_key", type=Path, metavar="KEY.pem", help="where to write the private key")
    k.add_argument("--public", type=Path, default=None, metavar="PUB", help="public key file (default KEY.pub)")
    k.add_argument("--curve", choices=("P-256", "P-384", "P-521"), default="P-256", help="elliptic curve")
    k.set_defaults(func=_keygen)


def _export(args: argparse.Namespace) -> int:
    import time

    from export.bundle import SIGNATURE_FILE
    from export.exporter import export_run
    from export.signing import BundleSigner

    signer = BundleSigner(args.sign_key) if args.sign_key is not None else None  # a bad key fails before the export
    t0 = time.perf_counter()
    bundle = export_run(
        args.run_dir,
        args.out,
        version=args.version,
        triton=args.triton,
        tolerance=args.tolerance,
        onnx_exporter=args.onnx_exporter,
        signer=signer,
    )
    print(summary(bundle.manifest, bundle.path, time.perf_counter() - t0, args.triton))
    if signer is not None:
        print(f"signed: {bundle.path / SIGNATURE_FILE} by key {signer.key_id[:16]} ({signer.path})")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from export.bundle import SIGNATURE_FILE, resolve_bundle
    from export.signing import BundleSigner

    signer = BundleSigner(args.key)
    path = resolve_bundle(args.bundle)
    signed = signer.sign(path)
    print(
        f"signed {path}: {len(signed.digests)} files ({', '.join(sorted(signed.digests))}) by key {signer.key_id[:16]}"
    )
    print(f"  -> {path / SIGNATURE_FILE}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from export.bundle import BundleError, load_bundle, resolve_bundle
    from export.signing import TrustedKeys

    trust = TrustedKeys.from_files(args.key)  # a bad key file: exit 2, like any bad input
    path = resolve_bundle(args.bundle)  # no bundle there: bad input (exit 2), not a refused bundle
    try:
        bundle = load_bundle(path, trust)
    except BundleError as e:
        reason = getattr(e, "reason", "checksum")
        print(f"lma verify: REFUSED ({reason}): {e}", file=sys.stderr)
        return 1
    assert bundle.signed_by is not None
    print(
        f"verified {bundle.name} version {bundle.version} ({path}): signed by key {bundle.signed_by[:16]},"
        f" {len(bundle.manifest['files']) + 1} files intact"
    )
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from export.signing import check_public_key_file as load_public
    from export.signing import generate_key_pair, key_id

    public = generate_key_pair(args.private_key, args.public, args.curve)
    print(
        f"private key {args.private_key} (mode 0600: keep it on the signing machine only, never in an image or bundle)"
    )
    print(f"public key  {public} (key id {key_id(load_public(public))[:16]}; give it to servers: LMA_TRUSTED_KEYS)")
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
        lines.append(f"triton: {Path(triton) / manifest['name']}/config.pbtxt + {manifest['version']}/model.onnx")
    lines.append(f"seconds: {seconds:.2f}")
    return "\n".join(lines)
