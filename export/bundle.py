"""Bundles on disk: ``artifacts/<name>/<version>/{manifest.json, model.onnx, model.ts[, model.sig]}``.

This module is the one reader of bundles and the one owner of where they lie: the exporter writes
them, the server loads them through :func:`load_bundle`, and every tool that is handed a path
(`lma serve`, `lma publish`, `lma sign`, `lma verify`, the admin reload, `lma bench`) finds the
bundle it means with :func:`resolve_bundle` / :func:`latest_bundles`.

Loading trusts nothing. The manifest must have this build's ``format_version``, and every file it
lists must be present with its recorded size and sha256, so a model file that is not the one
exported with this manifest (a stray copy, a truncated transfer, one changed byte) is refused
before any runtime parses it. Checksums catch corruption, not forgery: whoever can write the
folder can also rewrite a sha256 in the manifest. Given trusted keys (:class:`export.signing.TrustedKeys`,
the server's ``LMA_TRUSTED_KEYS``), :func:`load_bundle` first verifies the bundle's signature
(:data:`SIGNATURE_FILE`, OpenSSF model-signing format) and then checks that the folder holds exactly
the files it signs, that ``manifest.json`` is the signed one byte for byte (only then is it parsed),
and that every file has its signed digest; anything else raises :class:`SignatureError`.

A runtime never reopens a graph file by name after that check: :meth:`Bundle.read_verified` reads
the file's bytes once, checks them against the verified digest and hands those same bytes over, so
a file replaced between the check and the load is refused instead of parsed. Nothing is unpickled:
the manifest is JSON, the graphs are ONNX protobuf and TorchScript zip archives, each loaded by its
own runtime.

Example::

    >>> bundle = load_bundle("artifacts/criteo/3")          # doctest: +SKIP
    >>> bundle.file("onnx"), bundle.schema.num_fields       # doctest: +SKIP
    (PosixPath('artifacts/criteo/3/model.onnx'), 26)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.contract import RUNTIME_FILES  # runtime -> file name (re-exported: export.bundle.RUNTIME_FILES)
from models.schema import FeatureSchema

if TYPE_CHECKING:
    from export.signing import SignedFiles, TrustedKeys

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "model.sig"  # the bundle's signature (Sigstore bundle JSON); not listed in the manifest
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_REQUIRED = ("name", "version", "schema", "files", "memory", "inputs", "outputs")
_MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few KB; anything this large is not one


class BundleError(ValueError):
    """A bundle (or a would-be bundle) is refused; the message names the file and what is wrong."""


class SignatureError(BundleError):
    """A bundle is refused because trusted keys are required and it is not exactly what one of them signed.

    ``reason`` is one of :data:`SIGNATURE_REASONS` (for logs and metrics); the message names the
    bundle, the file and what is wrong.
    """

    def __init__(self, reason: str, message: str) -> None:
        assert reason in SIGNATURE_REASONS, reason
        super().__init__(message)
        self.reason = reason


SIGNATURE_REASONS = (
    "unsigned",  # no model.sig
    "malformed_signature",  # model.sig is not a signature this build can read
    "untrusted_key",  # signed, but by a key that is not trusted
    "bad_signature",  # the signature does not verify with the key it names: model.sig was altered
    "unsupported_signature",  # verifies, but signs other digests than per-file sha256
    "file_added",  # the folder holds a file the signature does not cover
    "file_removed",  # a signed file is missing
    "file_changed",  # a file's content is not the signed one
)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_version(text: str) -> bool:
    """A version is a positive integer written without sign or leading zeros: "1", "2", ..."""
    return text.isascii() and text.isdigit() and not text.startswith("0")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its folder, parsed manifest and feature schema."""

    path: Path  # artifacts/NAME/VERSION
    manifest: dict[str, Any]
    name: str
    version: str  # a positive integer as text
    schema: FeatureSchema
    signed_by: str | None = None  # key id (sha256 of the public key) whose signature was verified; None: not checked

    def file(self, runtime: str) -> Path:
        """The graph file of ``runtime`` ("onnx" or "torchscript")."""
        if runtime not in RUNTIME_FILES:
            raise BundleError(f"{self.path}: unknown runtime {runtime!r}; a bundle holds {sorted(RUNTIME_FILES)}")
        return self.path / RUNTIME_FILES[runtime]

    def read_verified(self, runtime: str) -> bytes:
        """The bytes of ``runtime``'s graph file, checked against the verified manifest: what a runtime parses.

        Read once and checked in memory, so a file replaced on disk after :func:`load_bundle` is
        refused here, never handed to a parser (a TorchScript file is code the server runs).
        """
        fpath = self.file(runtime)
        entry = self.manifest["files"][fpath.name]
        try:
            data = fpath.read_bytes()
        except OSError as e:
            raise BundleError(f"{fpath}: cannot be read ({e.strerror})") from None
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != entry["bytes"] or digest != entry["sha256"]:
            message = (
                f"{fpath}: changed on disk after the bundle was verified (sha256 {digest[:16]}...); not loading it"
            )
            if self.signed_by is not None:
                raise SignatureError("file_changed", message)
            raise BundleError(message)
        return data

    @property
    def memory(self) -> dict[str, Any]:
        """The manifest's memory accounting (:func:`models.checkpoint.memory_accounting`)."""
        return self.manifest["memory"]  # type: ignore[no-any-return]


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse ``path/manifest.json`` and check its format version (no file checks, no signature)."""
    return parse_manifest(_read_manifest_bytes(Path(path)), Path(path) / MANIFEST_FILE)


def _read_manifest_bytes(path: Path) -> bytes:
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing; {path} is not a bundle")
    if mpath.stat().st_size > _MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath}: {mpath.stat().st_size:,} bytes; not a manifest")
    return mpath.read_bytes()


def parse_manifest(data: bytes, mpath: Path) -> dict[str, Any]:
    """Parse the manifest bytes ``data`` (read from ``mpath``) and check its format version and entries."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath}: expected a JSON object, got {type(manifest).__name__}")
    if "format_version" not in manifest:
        raise BundleError(f"{mpath}: format_version is missing; this build reads format_version {FORMAT_VERSION}")
    fv = manifest["format_version"]
    if type(fv) is not int or fv != FORMAT_VERSION:
        raise BundleError(f"{mpath}: format_version {fv!r} is not supported; this build reads {FORMAT_VERSION}")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"{mpath}: missing entries {missing}")
    _check_memory(manifest["memory"], mpath)
    embedding = manifest.get("embedding", {})
    if not isinstance(embedding, dict) or not isinstance(embedding.get("kind", ""), str):
        raise BundleError(f"{mpath}: 'embedding' must be an object with a string 'kind', got {embedding!r}")
    return manifest


_MEMORY_NUMBERS = ("full_embedding_bytes", "embedding_bytes", "dense_bytes", "total_bytes", "embedding_compression")


def _check_memory(memory: object, mpath: Path) -> None:
    """The manifest's memory accounting, as the server's gauges read it (a bad one once passed the load and
    failed only as the new version was swapped in, leaving it serving without its metrics)."""

    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and type(v) is not bool and math.isfinite(v) and v >= 0

    if not isinstance(memory, dict):
        raise BundleError(f"{mpath}: 'memory' must be an object, got {type(memory).__name__}")
    bad = [k for k in _MEMORY_NUMBERS if not number(memory.get(k))]
    if bad:
        raise BundleError(f"{mpath}: 'memory' entries {bad} must be non-negative numbers")
    parts = memory.get("embedding_parts")
    if not isinstance(parts, dict) or not all(type(v) is int and v >= 0 for v in parts.values()):
        raise BundleError(f"{mpath}: 'memory.embedding_parts' must map part names to byte counts, got {parts!r}")


def _check_files(path: Path, manifest: dict[str, Any], signed: SignedFiles | None) -> None:
    """Every listed file present with its recorded size and sha256 (and, when signed, its signed digest)."""
    mpath = path / MANIFEST_FILE
    files = manifest["files"]
    if not isinstance(files, dict):
        raise BundleError(f"{mpath}: 'files' must map file names to {{sha256, bytes}}")
    for required in RUNTIME_FILES.values():
        if required not in files:
            raise BundleError(f"{mpath}: 'files' does not list {required}")
    for fname, entry in files.items():
        if (
            not isinstance(fname, str)
            or "/" in fname
            or "\\" in fname
            or fname in ("", ".", "..", MANIFEST_FILE, SIGNATURE_FILE)
        ):
            raise BundleError(f"{mpath}: invalid file name {fname!r} in 'files'")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or type(entry.get("bytes")) is not int
        ):
            raise BundleError(f"{mpath}: entry of {fname} must be {{'sha256': hex, 'bytes': int}}, got {entry!r}")
        if signed is not None and signed.digests.get(fname) != entry["sha256"]:
            # Both are authentic (the manifest is the signed one): the signer signed a bundle whose
            # manifest does not describe its files. lma sign refuses to, so this is not our signer.
            raise BundleError(f"{mpath}: the sha256 of {fname} differs from the digest its signature gives")
        fpath = path / fname
        if not fpath.is_file():
            raise BundleError(f"{fpath}: missing (listed in {MANIFEST_FILE})")
        size = fpath.stat().st_size
        changed = "changed after signing" if signed is not None else "changed after export or belongs to another bundle"
        if size != entry["bytes"]:
            _refuse(
                signed, f"{fpath}: {size} bytes, the manifest says {entry['bytes']}; not the exported file ({changed})"
            )
        digest = sha256_file(fpath)
        if digest != entry["sha256"]:
            _refuse(
                signed,
                f"{fpath}: sha256 {digest[:16]}... does not match the manifest's {entry['sha256'][:16]}...;"
                f" the file was {changed}",
            )


def _refuse(signed: SignedFiles | None, message: str) -> None:
    if signed is not None:
        raise SignatureError("file_changed", message)
    raise BundleError(message)


def _check_signed_folder(path: Path, signed: SignedFiles) -> bytes:
    """The folder holds exactly the signed files (plus the signature); returns the signed manifest's bytes."""
    present = {p.name for p in path.iterdir()} - {SIGNATURE_FILE}
    added, removed = sorted(present - set(signed.digests)), sorted(set(signed.digests) - present)
    if added:
        raise SignatureError(
            "file_added", f"{path}: holds {', '.join(added)}, which the signature does not cover (added after signing)"
        )
    if removed:
        raise SignatureError(
            "file_removed", f"{path}: signed file {', '.join(removed)} is missing (removed after signing)"
        )
    if MANIFEST_FILE not in signed.digests:
        raise SignatureError("file_removed", f"{path}: the signature does not cover {MANIFEST_FILE}")
    data = _read_manifest_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    if digest != signed.digests[MANIFEST_FILE]:
        raise SignatureError(
            "file_changed",
            f"{path / MANIFEST_FILE}: sha256 {digest[:16]}... is not the signed"
            f" {signed.digests[MANIFEST_FILE][:16]}...; the manifest was changed after signing",
        )
    return data


def load_bundle(path: str | Path, trust: TrustedKeys | None = None) -> Bundle:
    """Verify and open the bundle at ``path`` (signature when ``trust`` is given, format version, files, sha256).

    Args:
        path: the bundle folder.
        trust: the keys whose signatures are accepted; None: checksums only (no signature is read).

    Raises:
        SignatureError: ``trust`` is given and the bundle is not exactly what one of its keys signed.
        BundleError: anything else wrong with the bundle.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: not a directory; a bundle is a folder holding {MANIFEST_FILE}")
    mpath = path / MANIFEST_FILE
    signed = None
    if trust is not None:
        signed = trust.verify(path)  # reads and parses model.sig only
        data = _check_signed_folder(path, signed)
    else:
        data = _read_manifest_bytes(path)
    manifest = parse_manifest(data, mpath)  # with trust: the signed bytes, nothing else
    name, version = manifest["name"], manifest["version"]
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise BundleError(f"{mpath}: invalid model name {name!r}")
    if not isinstance(version, str) or not is_version(version):
        raise BundleError(f"{mpath}: version must be a positive integer as text, got {version!r}")
    if is_version(path.name) and path.name != version:
        raise BundleError(f"{mpath}: says version {version} but lies in folder {path.name}")
    _check_files(path, manifest, signed)
    try:
        schema = FeatureSchema.from_dict(manifest["schema"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{mpath}: invalid feature schema ({e})") from e
    return Bundle(
        path=path,
        manifest=manifest,
        name=name,
        version=version,
        schema=schema,
        signed_by=signed.key_id if signed is not None else None,
    )


# --- where bundles lie: the one place that knows the repository layout ---


def _versions(model_dir: Path) -> list[Path]:
    """The version folders of one model's folder that hold a manifest (hidden temporary folders never do)."""
    return [v for v in model_dir.iterdir() if v.is_dir() and is_version(v.name) and (v / MANIFEST_FILE).is_file()]


def model_folders(repo: Path) -> list[str]:
    """The names of ``repo``'s subfolders that are models' folders of versions (``<name>/<version>/manifest.json``)."""
    return sorted(d.name for d in repo.iterdir() if d.is_dir() and NAME_PATTERN.match(d.name) and _versions(d))


def _latest(model_dir: Path) -> Path | None:
    versions = _versions(model_dir)
    return max(versions, key=lambda v: int(v.name)) if versions else None


def _manifest_name(path: Path) -> str:
    name = read_manifest(path)["name"]
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise BundleError(f"{path / MANIFEST_FILE}: invalid model name {name!r}")
    return name


def _versions_name(versions: list[Path]) -> str:
    """The model name of a folder of ``versions`` (oldest first): what its oldest readable manifest says.

    Not the newest's: a new version whose manifest cannot be read, or names another model, would then hide
    the model or serve under another name. With the name fixed, that version is refused when it is loaded
    (:meth:`server.registry.ModelRegistry.swap` checks the name), counted, and the one serving stays.
    """
    error: BundleError | None = None
    for version in versions:
        try:
            return _manifest_name(version)
        except BundleError as e:
            error = error or e
    assert error is not None
    raise error


def latest_bundles(repo: str | Path) -> dict[str, Path]:
    """name -> folder of the highest numeric version, for each model of a repository.

    ``repo`` is one bundle folder (``manifest.json`` inside; the name comes from it), one model's
    folder of versions ``<version>/manifest.json`` (the name comes from the oldest readable manifest), or a
    tree ``<name>/<version>/manifest.json``. Folders whose name is not a positive integer (e.g.
    the exporter's hidden temporary folders) and version folders without a manifest are skipped;
    nothing is verified here: :func:`load_bundle` does that. An empty repository gives ``{}``.
    """
    repo = Path(repo)
    if not repo.is_dir():
        raise BundleError(f"{repo}: model repository is not a directory")
    if (repo / MANIFEST_FILE).is_file():
        return {_manifest_name(repo): repo}
    versions = sorted(_versions(repo), key=lambda v: int(v.name))
    if versions:  # one model's folder of versions, e.g. artifacts/NAME as `lma export --out` writes it
        models = model_folders(repo)
        if models:  # `lma export --out artifacts` into a repository: which is meant cannot be guessed
            raise BundleError(
                f"{repo}: holds both version folders ({', '.join(v.name for v in versions)}) and model folders"
                f" ({', '.join(models)}); a repository holds <name>/<version>/ only: move the versions to"
                f" {repo}/<name>/"
            )
        return {_versions_name(versions): versions[-1]}
    found: dict[str, Path] = {}
    for model_dir in sorted(repo.iterdir()):
        if model_dir.is_dir() and NAME_PATTERN.match(model_dir.name):
            latest = _latest(model_dir)
            if latest is not None:
                found[model_dir.name] = latest
    return found


def resolve_bundle(path: str | Path, *, name: str | None = None, version: str | None = None) -> Path:
    """The one bundle folder that ``path`` means (nothing is verified: :func:`load_bundle` does that).

    Args:
        path: a bundle folder, one model's folder of versions, or a repository of ``<name>/<version>/``.
        name: the model, where ``path`` is a repository holding more than one (or to say which one
            is meant: a repository without it is refused).
        version: that version instead of the latest; for a bundle folder, a sibling of it (the
            model's other versions lie beside it).

    Raises:
        BundleError: ``path`` is not a directory, holds no bundle, holds several models and
            ``name`` is not given, or the version asked for is not there. The message says which.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: not a directory (a bundle, a model folder of versions, or a repository)")
    if version is not None and not is_version(version):
        raise BundleError(f"version must be a positive integer as text, got {version!r}")
    own_latest = _latest(path)
    if (path / MANIFEST_FILE).is_file():  # a bundle: its model's versions are its siblings
        model_dir, latest = path.parent, path
    elif own_latest is not None:  # a model's folder of versions
        model_dir, latest = path, own_latest
    else:  # a repository
        found = latest_bundles(path)
        if name is None and len(found) == 1:
            name = next(iter(found))
        if name is None:
            if not found:
                raise BundleError(
                    f"{path}: holds no bundle (expected {MANIFEST_FILE}, <version>/{MANIFEST_FILE}"
                    f" or <name>/<version>/{MANIFEST_FILE})"
                )
            raise BundleError(f"{path}: holds {len(found)} models {sorted(found)}; say which one")
        if name not in found:
            raise BundleError(f"{path}: holds no bundle of model {name!r}; it holds {sorted(found)}")
        model_dir, latest = path / name, found[name]
    if version is None:
        return latest
    chosen = model_dir / version
    if not (chosen / MANIFEST_FILE).is_file():
        raise BundleError(f"{chosen}: no such version (no {MANIFEST_FILE} there)")
    return chosen
