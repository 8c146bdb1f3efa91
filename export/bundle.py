"""Bundles on disk: ``artifacts/<name>/<version>/{manifest.json, model.onnx, model.ts}``.

This module is the one reader of bundles; the exporter writes them and the server loads them
through :func:`load_bundle` (and finds them with :func:`latest_bundles`). Loading trusts nothing:
the manifest must have this build's ``format_version``, and every file it lists must be present
with its recorded size and sha256, so a model file that is not the one exported with this
manifest (a stray copy, a truncated transfer, one changed byte) is refused before any runtime
parses it. Nothing is unpickled: the manifest is JSON, the graphs are ONNX protobuf and
TorchScript zip archives, each loaded by its own runtime.

Example::

    >>> bundle = load_bundle("artifacts/criteo/3")          # doctest: +SKIP
    >>> bundle.file("onnx"), bundle.schema.num_fields       # doctest: +SKIP
    (PosixPath('artifacts/criteo/3/model.onnx'), 26)
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.contract import RUNTIME_FILES  # runtime -> file name (re-exported: export.bundle.RUNTIME_FILES)
from models.schema import FeatureSchema

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_REQUIRED = ("name", "version", "schema", "files", "memory", "inputs", "outputs")


class BundleError(ValueError):
    """A bundle (or a would-be bundle) is refused; the message names the file and what is wrong."""


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

    def file(self, runtime: str) -> Path:
        """The graph file of ``runtime`` ("onnx" or "torchscript")."""
        if runtime not in RUNTIME_FILES:
            raise BundleError(f"{self.path}: unknown runtime {runtime!r}; a bundle holds {sorted(RUNTIME_FILES)}")
        return self.path / RUNTIME_FILES[runtime]

    @property
    def memory(self) -> dict[str, Any]:
        """The manifest's memory accounting (:func:`models.checkpoint.memory_accounting`)."""
        return self.manifest["memory"]  # type: ignore[no-any-return]


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse ``path/manifest.json`` and check its format version (no file checks)."""
    mpath = Path(path) / MANIFEST_FILE
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing; {path} is not a bundle")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
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
    return manifest


def _check_files(path: Path, manifest: dict[str, Any]) -> None:
    mpath = path / MANIFEST_FILE
    files = manifest["files"]
    if not isinstance(files, dict):
        raise BundleError(f"{mpath}: 'files' must map file names to {{sha256, bytes}}")
    for required in RUNTIME_FILES.values():
        if required not in files:
            raise BundleError(f"{mpath}: 'files' does not list {required}")
    for fname, entry in files.items():
        if not isinstance(fname, str) or "/" in fname or "\\" in fname or fname in ("", ".", "..", MANIFEST_FILE):
            raise BundleError(f"{mpath}: invalid file name {fname!r} in 'files'")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or type(entry.get("bytes")) is not int
        ):
            raise BundleError(f"{mpath}: entry of {fname} must be {{'sha256': hex, 'bytes': int}}, got {entry!r}")
        fpath = path / fname
        if not fpath.is_file():
            raise BundleError(f"{fpath}: missing (listed in {MANIFEST_FILE})")
        size = fpath.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(f"{fpath}: {size} bytes, the manifest says {entry['bytes']}; not the exported file")
        digest = sha256_file(fpath)
        if digest != entry["sha256"]:
            raise BundleError(
                f"{fpath}: sha256 {digest[:16]}... does not match the manifest's {entry['sha256'][:16]}...;"
                " the file was changed after export or belongs to another bundle"
            )


def load_bundle(path: str | Path) -> Bundle:
    """Verify and open the bundle at ``path`` (format version, files present, sizes, sha256)."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: not a directory; a bundle is a folder holding {MANIFEST_FILE}")
    manifest = read_manifest(path)
    mpath = path / MANIFEST_FILE
    name, version = manifest["name"], manifest["version"]
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise BundleError(f"{mpath}: invalid model name {name!r}")
    if not isinstance(version, str) or not is_version(version):
        raise BundleError(f"{mpath}: version must be a positive integer as text, got {version!r}")
    if is_version(path.name) and path.name != version:
        raise BundleError(f"{mpath}: says version {version} but lies in folder {path.name}")
    _check_files(path, manifest)
    try:
        schema = FeatureSchema.from_dict(manifest["schema"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{mpath}: invalid feature schema ({e})") from e
    return Bundle(path=path, manifest=manifest, name=name, version=version, schema=schema)


def latest_bundles(repo: str | Path) -> dict[str, Path]:
    """name -> folder of the highest numeric version, for each model of a repository.

    ``repo`` is one bundle folder (``manifest.json`` inside; the name comes from it), one model's
    folder of versions ``<version>/manifest.json`` (the name comes from the latest manifest), or a
    tree ``<name>/<version>/manifest.json``. Folders whose name is not a positive integer (e.g.
    the exporter's hidden temporary folders) and version folders without a manifest are skipped;
    nothing is verified here: :func:`load_bundle` does that. An empty repository gives ``{}``.
    """
    repo = Path(repo)
    if not repo.is_dir():
        raise BundleError(f"{repo}: model repository is not a directory")
    if (repo / MANIFEST_FILE).is_file():
        name = read_manifest(repo)["name"]
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise BundleError(f"{repo / MANIFEST_FILE}: invalid model name {name!r}")
        return {name: repo}
    found: dict[str, Path] = {}
    own_versions = [v for v in repo.iterdir() if v.is_dir() and is_version(v.name) and (v / MANIFEST_FILE).is_file()]
    if own_versions:  # one model's folder of versions, e.g. artifacts/NAME as `lma export --out` writes it
        latest = max(own_versions, key=lambda v: int(v.name))
        return {str(read_manifest(latest)["name"]): latest}
    for model_dir in sorted(repo.iterdir()):
        if not model_dir.is_dir() or not NAME_PATTERN.match(model_dir.name):
            continue
        versions = [
            int(v.name)
            for v in model_dir.iterdir()
            if v.is_dir() and is_version(v.name) and (v / MANIFEST_FILE).is_file()
        ]
        if versions:
            found[model_dir.name] = model_dir / str(max(versions))
    return found
