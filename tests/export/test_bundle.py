"""Bundle loading refuses anything that is not exactly what was exported, with a clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from export.bundle import FORMAT_VERSION, Bundle, BundleError, latest_bundles, load_bundle


@pytest.fixture
def copy(bundles: dict[str, Bundle], tmp_path: Path) -> Path:
    """A private copy of the lma bundle (artifacts/lma/1) to tamper with."""
    dst = tmp_path / "lma" / "1"
    shutil.copytree(bundles["lma"].path, dst)
    return dst


def _edit_manifest(path: Path, **changes: object) -> None:
    m = json.loads((path / "manifest.json").read_text())
    for k, v in changes.items():
        if v is None:
            del m[k]
        else:
            m[k] = v
    (path / "manifest.json").write_text(json.dumps(m))


def test_a_copy_loads_and_names_its_files(copy: Path) -> None:
    b = load_bundle(copy)
    assert (b.name, b.version, b.path) == ("lma", "1", copy)
    assert b.file("onnx") == copy / "model.onnx" and b.file("torchscript") == copy / "model.ts"
    assert b.memory == b.manifest["memory"] and b.memory["kind"] == "lma"
    with pytest.raises(BundleError, match=r"unknown runtime 'tensorrt'"):
        b.file("tensorrt")


@pytest.mark.parametrize("name", ["model.onnx", "model.ts"])
def test_one_changed_byte_is_refused(copy: Path, name: str) -> None:
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{name}: sha256 [0-9a-f]{{16}}\.\.\. does not match the manifest's"):
        load_bundle(copy)


def test_truncated_file_is_refused(copy: Path) -> None:
    data = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(data[:-10])
    with pytest.raises(BundleError, match=rf"model\.onnx: {len(data) - 10} bytes, the manifest says {len(data)}"):
        load_bundle(copy)


def test_a_graph_from_another_bundle_is_refused(copy: Path, bundles: dict[str, Bundle]) -> None:
    shutil.copyfile(bundles["full"].file("onnx"), copy / "model.onnx")
    with pytest.raises(BundleError, match=r"model\.onnx: .*(bytes, the manifest says|does not match)"):
        load_bundle(copy)


@pytest.mark.parametrize("name", ["model.onnx", "model.ts"])
def test_missing_file_is_refused(copy: Path, name: str) -> None:
    (copy / name).unlink()
    with pytest.raises(BundleError, match=rf"1/{name}: missing \(listed in manifest\.json\)"):
        load_bundle(copy)


def test_missing_manifest_is_refused(copy: Path) -> None:
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest\.json: missing; .* is not a bundle"):
        load_bundle(copy)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (2, r"format_version 2 is not supported; this build reads 1"),
        ("1", r"format_version '1' is not supported"),
        (True, r"format_version True is not supported"),
        (None, r"format_version is missing"),
    ],
)
def test_wrong_format_version_is_refused(copy: Path, value: object, message: str) -> None:
    _edit_manifest(copy, format_version=value)
    with pytest.raises(BundleError, match=rf"manifest\.json: {message}"):
        load_bundle(copy)
    assert FORMAT_VERSION == 1


def test_manifest_that_does_not_list_a_graph_is_refused(copy: Path) -> None:
    m = json.loads((copy / "manifest.json").read_text())
    del m["files"]["model.ts"]
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"'files' does not list model\.ts"):
        load_bundle(copy)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"version": "2"}, r"says version 2 but lies in folder 1"),
        ({"version": "v1"}, r"version must be a positive integer as text, got 'v1'"),
        ({"name": "../x"}, r"invalid model name '\.\./x'"),
        ({"schema": {"dense_names": [], "categorical_names": []}}, r"invalid feature schema"),
        ({"memory": None}, r"missing entries \['memory'\]"),
        # what the server's gauges read: a bad one once loaded, then failed only as the version was swapped in
        ({"memory": "x"}, r"'memory' must be an object, got str"),
        (
            {"memory": {"total_bytes": -1}},
            r"'memory' entries \['full_embedding_bytes', 'embedding_bytes', "
            r"'dense_bytes', 'total_bytes', 'embedding_compression'\] must be non-neg",
        ),
        ({"embedding": "x"}, r"'embedding' must be an object with a string 'kind', got 'x'"),
        ({"files": {"../model.onnx": {"sha256": "0", "bytes": 1}, "model.ts": {}}}, r"does not list model\.onnx"),
    ],
)
def test_inconsistent_manifest_is_refused(copy: Path, changes: dict[str, object], message: str) -> None:
    _edit_manifest(copy, **changes)
    with pytest.raises(BundleError, match=message):
        load_bundle(copy)


def test_manifest_that_is_not_json_is_refused(copy: Path) -> None:
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest\.json: not valid JSON"):
        load_bundle(copy)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"nope: not a directory"):
        load_bundle(tmp_path / "nope")
    assert issubclass(BundleError, ValueError)  # the CLI turns it into one clear line, exit 2


def test_latest_bundles_picks_the_highest_numeric_version(bundles: dict[str, Bundle], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for version in ("1", "2", "10"):
        shutil.copytree(bundles["lma"].path, repo / "lma" / version)
    shutil.copytree(bundles["hash"].path, repo / "hash" / "3")
    (repo / "lma" / "11").mkdir()  # a version folder without a manifest: skipped
    shutil.copytree(bundles["lma"].path, repo / "lma" / ".tmp-12-abcd1234")  # an export in progress: skipped
    shutil.copytree(bundles["lma"].path, repo / "lma" / "010")  # not a canonical version: skipped
    (repo / "README.txt").write_text("not a model")
    (repo / "empty").mkdir()
    assert latest_bundles(repo) == {"hash": repo / "hash" / "3", "lma": repo / "lma" / "10"}
    # one model's folder of versions, as `lma export --out artifacts/NAME` writes it
    assert latest_bundles(repo / "lma") == {"lma": repo / "lma" / "10"}


def test_latest_bundles_of_one_bundle_folder(bundles: dict[str, Bundle], tmp_path: Path) -> None:
    assert latest_bundles(bundles["full"].path) == {"full": bundles["full"].path}
    assert latest_bundles(tmp_path) == {}
    with pytest.raises(BundleError, match=r"missing: model repository is not a directory"):
        latest_bundles(tmp_path / "missing")
    bad = tmp_path / "bad"
    shutil.copytree(bundles["full"].path, bad)
    _edit_manifest(bad, format_version=7)
    with pytest.raises(BundleError, match=r"format_version 7 is not supported"):
        latest_bundles(bad)


def test_a_bundle_of_another_key_hashing_scheme_is_refused_naming_both(copy: Path) -> None:
    # keys are hashed outside the graph (the server's featurization): a bundle trained on other keys would
    # score every request wrongly, so it is refused, and the message names its scheme and this build's
    m = json.loads((copy / "manifest.json").read_text())
    _edit_manifest(copy, schema={**m["schema"], "hash_scheme": "xxh64-v2"})
    with pytest.raises(
        BundleError, match=r"unknown hash_scheme 'xxh64-v2'; this build knows 'blake2b64-field-keyed-v1'"
    ):
        load_bundle(copy)
