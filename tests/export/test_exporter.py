"""Export round trip: run folder -> bundle -> ONNX Runtime / TorchScript score exactly like eager."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import export.exporter as exporter
import export.graphs
from export.bundle import RUNTIME_FILES, Bundle, BundleError, latest_bundles, load_bundle
from export.exporter import ParityError, export_run, next_version
from export.graphs import script_model
from export.onnx_runtime import cpu_session, session_options
from export.parity import data_cases
from models.checkpoint import memory_accounting, save_run
from models.schema import KEY_MASK, FeatureSchema, transform_dense

if TYPE_CHECKING:
    from conftest import TinyRun

KINDS = ("full", "hash", "lma")


def _inputs(run: TinyRun, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows mixing stored keys (table hits) and random 62-bit keys never seen in training."""
    rng = np.random.default_rng(seed)
    schema = run.cfg.schema
    keys = rng.integers(0, KEY_MASK, size=(batch, schema.num_fields), dtype=np.int64, endpoint=True)
    if run.known_keys.size:
        pick = rng.random(keys.shape) < 0.6
        keys[pick] = rng.choice(run.known_keys, size=int(pick.sum()))
    dense = transform_dense(rng.lognormal(1.0, 2.0, size=(batch, schema.num_dense)))
    return dense, keys


def _score_all(bundle: Bundle, run: TinyRun, dense: np.ndarray, keys: np.ndarray) -> dict[str, tuple[np.ndarray, ...]]:
    ts = torch.jit.load(str(bundle.file("torchscript")))
    session = cpu_session(bundle.file("onnx"), threads=1)
    d, k = torch.from_numpy(dense), torch.from_numpy(keys)
    with torch.inference_mode():
        eager = tuple(t.numpy() for t in run.model(d, k))
        scripted = tuple(t.numpy() for t in ts(d, k))
    ort_out = tuple(session.run(["probability", "fallback_tokens"], {"dense": dense, "keys": keys}))
    return {"eager": eager, "torchscript": scripted, "onnx": ort_out}


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_scores_like_eager(kind: str, tiny_runs: dict[str, TinyRun], bundles: dict[str, Bundle]) -> None:
    run, bundle = tiny_runs[kind], bundles[kind]
    dense, keys = _inputs(run, batch=65, seed=1)
    out = _score_all(bundle, run, dense, keys)
    p_eager, f_eager = out["eager"]
    assert p_eager.shape == (65, 1) and p_eager.dtype == np.float32
    assert f_eager.shape == (65,) and f_eager.dtype == np.int64
    for runtime in ("torchscript", "onnx"):
        p, f = out[runtime]
        assert p.dtype == np.float32 and f.dtype == np.int64
        np.testing.assert_allclose(p, p_eager, rtol=0, atol=1e-6, err_msg=runtime)
        np.testing.assert_array_equal(f, f_eager, err_msg=runtime)
    # fallback_tokens counts exactly the keys without a stored entry
    expected = (~np.isin(keys, run.known_keys)).sum(1) if kind != "hash" else np.full(65, keys.shape[1])
    np.testing.assert_array_equal(f_eager, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_unseen_keys_score_deterministically_in_both_runtimes(
    kind: str, tiny_runs: dict[str, TinyRun], bundles: dict[str, Bundle]
) -> None:
    run, bundle = tiny_runs[kind], bundles[kind]
    rng = np.random.default_rng(99)
    keys = rng.integers(2**40, KEY_MASK, size=(16, run.cfg.schema.num_fields), dtype=np.int64)
    assert not np.isin(keys, run.known_keys).any()
    dense = np.zeros((16, run.cfg.schema.num_dense), dtype=np.float32)
    first = _score_all(bundle, run, dense, keys)
    again = _score_all(bundle, run, dense, keys)  # fresh sessions / loads
    for runtime in ("eager", "torchscript", "onnx"):
        np.testing.assert_array_equal(first[runtime][0], again[runtime][0])
        np.testing.assert_array_equal(first[runtime][1], np.full(16, keys.shape[1]))
    np.testing.assert_array_equal(first["onnx"][1], first["torchscript"][1])
    np.testing.assert_allclose(first["onnx"][0], first["torchscript"][0], rtol=0, atol=1e-6)
    # a row scores the same alone as inside the batch (what a batching server relies on)
    alone = _score_all(bundle, run, dense[3:4], keys[3:4])
    np.testing.assert_allclose(alone["onnx"][0], first["onnx"][0][3:4], rtol=0, atol=1e-6)


def test_bundle_files_and_manifest(tiny_runs: dict[str, TinyRun], bundles: dict[str, Bundle]) -> None:
    run, bundle = tiny_runs["lma"], bundles["lma"]
    m = bundle.manifest
    assert (bundle.name, bundle.version, bundle.path.name) == ("lma", "1", "1")
    assert sorted(p.name for p in bundle.path.iterdir()) == ["manifest.json", "model.onnx", "model.ts"]
    assert m["format_version"] == 1 and m["created"].endswith("Z")
    assert m["schema"] == run.cfg.schema.to_dict() and bundle.schema == run.cfg.schema
    assert m["dense_input"] == "log1p-clip0"
    assert [(i["name"], i["dtype"], i["shape"]) for i in m["inputs"]] == [
        ("dense", "float32", ["batch", 13]),
        ("keys", "int64", ["batch", 26]),
    ]
    assert [(o["name"], o["dtype"], o["shape"]) for o in m["outputs"]] == [
        ("probability", "float32", ["batch", 1]),
        ("fallback_tokens", "int64", ["batch"]),
    ]
    assert m["memory"] == json.loads(json.dumps(memory_accounting(run.model, run.cfg.full_embedding_bytes)))
    assert bundle.memory["embedding_compression"] == pytest.approx(2.0, rel=1e-3)
    assert m["embedding"] == run.cfg.embedding.to_dict() and m["model"] == run.cfg.model.to_dict()
    assert m["tables"]["signature_table"]["stored_keys"] == run.known_keys.size
    assert m["run"]["signatures"]["signed_tokens"] == run.known_keys.size
    for name in RUNTIME_FILES.values():
        assert m["files"][name]["bytes"] == (bundle.path / name).stat().st_size
    parity = m["parity"]
    assert parity["tolerance"] == 1e-5 and parity["fallback_tokens_equal"] is True
    assert sorted(parity["max_abs_diff"]) == ["eager_vs_onnx", "eager_vs_torchscript", "torchscript_vs_onnx"]
    assert sorted(parity["max_abs_diff"]["eager_vs_onnx"]) == ["random/b1", "random/b1024", "random/b7"]
    assert all(0 <= d <= 1e-5 for pair in parity["max_abs_diff"].values() for d in pair.values())
    assert m["onnx"]["opset"] == 18 and m["onnx"]["exporter"] == "legacy"
    proto = onnx.load(str(bundle.file("onnx")))
    assert m["onnx"]["node_count"] == sum(1 for n in proto.graph.node if n.op_type != "Constant")
    assert m["onnx"]["embedding_op_types"]["Gather"] >= 2  # the two-choice table lookup is in the graph
    assert set(m["versions"]) == {"python", "torch", "onnx", "onnxruntime", "numpy"}


def test_onnx_graph_has_the_contract(bundles: dict[str, Bundle], schemas: dict[str, FeatureSchema]) -> None:
    for kind, bundle in bundles.items():
        proto = onnx.load(str(bundle.file("onnx")))
        onnx.checker.check_model(proto)
        shapes = {
            v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*proto.graph.input, *proto.graph.output]
        }
        n_dense, n_fields = schemas[kind].num_dense, schemas[kind].num_fields
        assert [i.name for i in proto.graph.input] == ["dense", "keys"], kind
        assert [o.name for o in proto.graph.output] == ["probability", "fallback_tokens"], kind
        assert shapes == {
            "dense": ["batch", n_dense],
            "keys": ["batch", n_fields],
            "probability": ["batch", 1],
            "fallback_tokens": ["batch"],
        }, kind


def test_no_dense_features_take_an_empty_dense_tensor(
    tiny_runs: dict[str, TinyRun], bundles: dict[str, Bundle]
) -> None:
    """Avazu-like schema: dense is (B, 0) float32 and both runtimes accept it."""
    run, bundle = tiny_runs["hash"], bundles["hash"]
    assert run.cfg.schema.num_dense == 0
    assert bundle.manifest["inputs"][0]["shape"] == ["batch", 0]
    dense, keys = _inputs(run, batch=5, seed=4)
    assert dense.shape == (5, 0)
    out = _score_all(bundle, run, dense, keys)
    np.testing.assert_allclose(out["onnx"][0], out["eager"][0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["torchscript"][0], out["eager"][0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_jit_script_is_the_torchscript_path(kind: str, tiny_runs: dict[str, TinyRun]) -> None:
    scripted = script_model(tiny_runs[kind].model)
    assert isinstance(scripted, torch.jit.RecursiveScriptModule)
    # scripted, not traced: the data-independent branches survive as control flow in the graph
    assert "prim::If" in str(scripted.dlrm.graph)
    dense, keys = _inputs(tiny_runs[kind], batch=3, seed=5)
    with torch.inference_mode():
        a = scripted(torch.from_numpy(dense), torch.from_numpy(keys))
        b = tiny_runs[kind].model(torch.from_numpy(dense), torch.from_numpy(keys))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_versions_increment_and_existing_version_is_refused(tiny_runs: dict[str, TinyRun], tmp_path: Path) -> None:
    run = tiny_runs["hash"]
    out = tmp_path / "m"
    assert next_version(out) == "1"
    assert export_run(run.run_dir, out).version == "1"
    (out / "9").mkdir()  # a stray numeric folder still counts: never reuse a number
    assert export_run(run.run_dir, out).version == "10"
    with pytest.raises(ValueError, match=r"m/10: already exists"):
        export_run(run.run_dir, out, version="10")
    for bad in ("0", "01", "v2", "-1"):
        with pytest.raises(ValueError, match="positive integer"):
            export_run(run.run_dir, out, version=bad)
    assert sorted(p.name for p in out.iterdir()) == ["1", "10", "9"]  # no temporary folder left behind


def test_export_into_a_repository_or_onto_a_file_is_refused_before_any_work(
    tiny_runs: dict[str, TinyRun], tmp_path: Path
) -> None:
    run = tiny_runs["hash"]
    repo = tmp_path / "artifacts"
    export_run(run.run_dir, repo / "m")
    # `--out artifacts` once wrote artifacts/1, and the server then took the repository for one model's folder
    # of versions: every other model vanished from it without a word
    with pytest.raises(BundleError, match=r"artifacts: holds model folders \(m\), so it is a repository of models"):
        export_run(run.run_dir, repo)
    assert sorted(p.name for p in repo.iterdir()) == ["m"]
    (repo / "1").mkdir()  # a repository made that way before is named, not served as one model
    shutil.copytree(repo / "m" / "1", repo / "1", dirs_exist_ok=True)
    with pytest.raises(BundleError, match=r"artifacts: holds both version folders \(1\) and model folders \(m\)"):
        latest_bundles(repo)
    (tmp_path / "file").write_text("")
    with pytest.raises(BundleError, match=r"^--out .*file: exists and is not a directory$"):
        export_run(run.run_dir, tmp_path / "file")
    with pytest.raises(BundleError, match=r"^--triton .*file: exists and is not a directory$"):
        export_run(run.run_dir, tmp_path / "n", triton=tmp_path / "file")
    assert not (tmp_path / "n").exists()


def test_parity_is_verified_before_the_version_becomes_visible(
    tiny_runs: dict[str, TinyRun], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    original = exporter.verify_parity

    def spy(model, ts_path, onnx_path, cases, tolerance):  # type: ignore[no-untyped-def]
        seen.append((tmp_path / "m" / "1").exists())
        assert ts_path.parent.name.startswith(".tmp-1-") and onnx_path.parent == ts_path.parent
        return original(model, ts_path, onnx_path, cases, tolerance)

    monkeypatch.setattr(exporter, "verify_parity", spy)
    export_run(tiny_runs["hash"].run_dir, tmp_path / "m")
    assert seen == [False]
    assert (tmp_path / "m" / "1" / "manifest.json").is_file()


def _scale_a_weight(path: Path, factor: float) -> None:
    proto = onnx.load(str(path))
    init = next(i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and "top" in i.name)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    onnx.save(proto, str(path))


def test_export_refuses_a_graph_that_differs(
    tiny_runs: dict[str, TinyRun], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = exporter.export_onnx

    def perturbed(model, schema, path, exporter_name="legacy"):  # type: ignore[no-untyped-def]
        original(model, schema, path, exporter_name)
        _scale_a_weight(path, 2.0)  # one layer of the top MLP doubled

    monkeypatch.setattr(exporter, "export_onnx", perturbed)
    with pytest.raises(ParityError, match=r"onnx differs from eager by max \|diff\| .* > tolerance 1e-05 \(random rows,"
                                          r" batch size 1\)"):  # fmt: skip
        export_run(tiny_runs["lma"].run_dir, tmp_path / "m")
    assert list((tmp_path / "m").iterdir()) == []  # nothing visible, temporary folder removed


def test_tolerance_is_the_limit(tiny_runs: dict[str, TinyRun], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = exporter.export_onnx

    def perturbed(model, schema, path, exporter_name="legacy"):  # type: ignore[no-untyped-def]
        original(model, schema, path, exporter_name)
        _scale_a_weight(path, 1.0 + 1e-3)

    monkeypatch.setattr(exporter, "export_onnx", perturbed)
    with pytest.raises(ParityError):
        export_run(tiny_runs["full"].run_dir, tmp_path / "m", tolerance=1e-6)
    bundle = export_run(tiny_runs["full"].run_dir, tmp_path / "m", tolerance=0.5)  # loose tolerance accepts it
    worst = bundle.manifest["parity"]["worst"]
    assert worst["pair"] in ("eager_vs_onnx", "torchscript_vs_onnx") and 1e-6 < worst["max_abs_diff"] <= 0.5


def test_parity_uses_training_rows_when_the_run_names_its_cache(
    tmp_path: Path, schemas: dict[str, FeatureSchema], make_tiny_run: Callable[..., TinyRun]
) -> None:
    schema = schemas["lma"]
    run = make_tiny_run(tmp_path / "run", "lma", schema, seed=5)
    rng = np.random.default_rng(0)
    cache = tmp_path / "cache"
    cache.mkdir()
    dense = transform_dense(rng.integers(-2, 1000, size=(50, schema.num_dense)))  # the cache holds model inputs
    keys = rng.choice(run.known_keys, size=(50, schema.num_fields))
    np.save(cache / "dense.npy", dense)
    np.save(cache / "keys.npy", keys)
    run.cfg.extra["data"] = {"cache": str(cache), "rows": 50}
    cases = data_cases(run.cfg)
    assert [(c.source, c.keys.shape) for c in cases] == [("data", (1, 26)), ("data", (7, 26))]
    np.testing.assert_array_equal(cases[1].keys, keys[:7])
    np.testing.assert_array_equal(cases[1].dense, dense[:7])
    save_run(run.run_dir, run.model, run.cfg)
    bundle = export_run(run.run_dir, tmp_path / "m")
    assert sorted(bundle.manifest["parity"]["max_abs_diff"]["eager_vs_onnx"]) == [
        "data/b1", "data/b7", "random/b1", "random/b1024", "random/b7",
    ]  # fmt: skip
    run.cfg.extra["data"] = {"cache": str(tmp_path / "gone")}
    assert data_cases(run.cfg) == []


def test_bad_run_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        export_run(tmp_path / "nope", tmp_path / "m")
    with pytest.raises(ValueError, match="model name"):
        export_run(tmp_path / "nope", tmp_path / ".hidden")


@pytest.mark.parametrize("kind", ["hash", "lma"])
def test_run_of_another_location_scheme_is_refused(
    kind: str, tmp_path: Path, schemas: dict[str, FeatureSchema], make_tiny_run: Callable[..., TinyRun]
) -> None:
    """A run folder written before location schemes were recorded (lma-locations-v1) is refused, naming both
    schemes: its shared memory was trained for other rows, so exporting it would silently score garbage."""
    run = make_tiny_run(tmp_path / "run", kind, schemas["lma"], seed=3)
    config = json.loads((run.run_dir / "config.json").read_text())
    assert config["embedding"]["location_scheme"] == "lma-locations-v2"
    del config["embedding"]["location_scheme"]
    (run.run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"location_scheme 'lma-locations-v1' is not supported: this build computes"
                                         r" LMA block locations with 'lma-locations-v2'.*retrain it"):  # fmt: skip
        export_run(run.run_dir, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    config["embedding"]["location_scheme"] = "lma-locations-v3"
    (run.run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: 'embedding': location_scheme 'lma-locations-v3' is not"):
        export_run(run.run_dir, tmp_path / "m")


def test_bundles_do_not_depend_on_the_location_scheme(bundles: dict[str, Bundle], tmp_path: Path) -> None:
    """A bundle is self-contained: one whose manifest predates location schemes (no location_scheme entry)
    loads and its graph scores exactly as before; the scheme is recorded in the embedding entry."""
    bundle = bundles["lma"]
    assert bundle.manifest["embedding"]["location_scheme"] == "lma-locations-v2"
    old = tmp_path / "old" / "1"
    shutil.copytree(bundle.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["embedding"]["location_scheme"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_bundle(old)
    keys = np.random.default_rng(4).integers(0, KEY_MASK, size=(5, 26), dtype=np.int64)
    dense = np.zeros((5, 13), dtype=np.float32)
    got = cpu_session(loaded.file("onnx")).run(None, {"dense": dense, "keys": keys})
    want = cpu_session(bundle.file("onnx")).run(None, {"dense": dense, "keys": keys})
    np.testing.assert_array_equal(got[0], want[0])


def test_loaded_bundle_equals_returned(bundles: dict[str, Bundle]) -> None:
    for bundle in bundles.values():
        again = load_bundle(bundle.path)
        assert again == bundle


@pytest.mark.parametrize("kind", ["full", "lma", "lr"])
def test_a_trained_run_exports_with_data_rows(kind: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """`lma train`'s own run folder (real signatures, real vocabulary, data cache) exports and verifies;
    ``lr`` is the linear reference (hashed weights, one per token), exported by the same code."""
    from models.embeddings import EmbeddingConfig
    from models.synth import synthesize
    from models.train import TrainSettings, train

    root = tmp_path_factory.mktemp(f"trained-{kind}")
    synthesize(root / "synth.tsv", rows=4000, seed=1, scale=0.0002)
    if kind == "lr":
        model, embedding = "lr", EmbeddingConfig(kind="hash", embedding_dim=1, compression=1.0)
    else:
        model, embedding = "dlrm", EmbeddingConfig(kind=kind, embedding_dim=8, compression=4.0, sample_rows=2000)
    settings = TrainSettings(
        data=root / "synth.tsv", cache_dir=root / "cache", model=model, preset="tiny", epochs=1, batch_size=256,
        threads=1, progress=False, embedding=embedding,
    )  # fmt: skip
    train(settings, root / "run")
    bundle = export_run(root / "run", root / "artifacts" / "synth")
    cases = bundle.manifest["parity"]["cases"]
    assert sorted(cases) == ["data/b1", "data/b1024", "data/b7", "random/b1", "random/b1024", "random/b7"]
    assert bundle.manifest["run"]["data"]["rows"] == 4000
    tables = {"lma": "signatures", "full": "vocabulary", "lr": None}[kind]
    assert tables is None or tables in bundle.manifest["run"]
    assert bundle.memory["kind"] == embedding.kind
    assert bundle.manifest["model"]["architecture"] == model


def test_large_graphs_keep_weights_in_one_external_file(
    tiny_runs: dict[str, TinyRun], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the threshold (2 GiB protobuf limit in real life) the weights go to model.onnx.data,
    which the manifest checksums like every other file and Triton gets a copy of."""
    from export.triton import write_triton

    monkeypatch.setattr(export.graphs, "EXTERNAL_DATA_BYTES", 1000)
    run = tiny_runs["full"]
    bundle = export_run(run.run_dir, tmp_path / "m", triton=tmp_path / "triton")
    assert sorted(bundle.manifest["files"]) == ["model.onnx", "model.onnx.data", "model.ts"]
    assert bundle.manifest["onnx"]["external_data"] == "model.onnx.data"
    assert (bundle.path / "model.onnx.data").stat().st_size > (bundle.path / "model.onnx").stat().st_size
    dense, keys = _inputs(run, batch=9, seed=3)
    out = _score_all(bundle, run, dense, keys)
    np.testing.assert_allclose(out["onnx"][0], out["eager"][0], rtol=0, atol=1e-6)
    triton_dir = tmp_path / "triton" / "m" / "1"
    assert (triton_dir / "model.onnx.data").read_bytes() == (bundle.path / "model.onnx.data").read_bytes()
    triton_out = cpu_session(triton_dir / "model.onnx", threads=1).run(None, {"dense": dense, "keys": keys})
    np.testing.assert_array_equal(triton_out[0], out["onnx"][0])
    # Triton versions are the bundle's and immutable: a second export adds version 2 beside 1
    with pytest.raises(BundleError, match=r"^--triton: .*/triton/m/1 already exists; Triton versions are not"):
        write_triton(bundle, tmp_path / "triton")
    second = export_run(run.run_dir, tmp_path / "m", triton=tmp_path / "triton")
    assert second.version == "2"
    assert sorted(p.name for p in (tmp_path / "triton" / "m").iterdir()) == ["1", "2", "config.pbtxt"]
    assert (tmp_path / "triton" / "m" / "2" / "model.onnx.data").read_bytes() == (
        second.path / "model.onnx.data"
    ).read_bytes()
    shutil.rmtree(second.path)  # the bundle gone, its Triton version left: refused before any work
    with pytest.raises(BundleError, match=r"^--triton: .*/triton/m/2 already exists; Triton versions are not"):
        export_run(run.run_dir, tmp_path / "m", triton=tmp_path / "triton")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]
    # the config is the model's: an export of a version below the newest leaves the newest one's config alone
    export_run(run.run_dir, tmp_path / "m", version="4", triton=tmp_path / "triton")
    config = (tmp_path / "triton" / "m" / "config.pbtxt").read_text()
    export_run(run.run_dir, tmp_path / "m", version="3", triton=tmp_path / "triton", triton_max_batch_size=7)
    assert (tmp_path / "triton" / "m" / "3" / "model.onnx").exists()
    assert (tmp_path / "triton" / "m" / "config.pbtxt").read_text() == config and "max_batch_size: 7" not in config
    data = bytearray((bundle.path / "model.onnx.data").read_bytes())
    data[5] ^= 0xFF
    (bundle.path / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.onnx\.data: sha256 .* does not match"):
        load_bundle(bundle.path)


def _interaction_reads_rows(graph: onnx.GraphProto) -> bool:
    """Whether the DLRM interaction's pairs are gathered from the transposed Gram matrix (rows, axis 0), as
    models.dlrm.DotInteraction exports them: a Gather (legacy) or GatherND (dynamo) reading a 2-D Transpose."""
    producer = {out: n for n in graph.node for out in n.output}
    for n in graph.node:
        source = producer.get(n.input[0]) if n.input else None
        if n.op_type not in ("Gather", "GatherND") or source is None or source.op_type != "Transpose":
            continue
        perm = [list(a.ints) for a in source.attribute if a.name == "perm"]
        axis = [a.i for a in n.attribute if a.name == "axis"]
        if perm == [[1, 0]] and axis in ([], [0]):
            return True
    return False


@pytest.mark.parametrize("kind", ["full", "hash", "lma"])
def test_interaction_pairs_are_gathered_as_rows(kind: str, bundles: dict[str, Bundle]) -> None:
    """The exported interaction gathers along axis 0 (ONNX Runtime's axis-1 Gather copies one float at a time)."""
    graph = onnx.load(str(bundles[kind].file("onnx")), load_external_data=False).graph
    assert _interaction_reads_rows(graph)
    column_gathers = [
        n for n in graph.node
        if n.op_type == "Gather" and n.input[1].endswith("interaction.flat_index")
        and [a.i for a in n.attribute if a.name == "axis"] != [0]
    ]  # fmt: skip
    assert column_gathers == []


def _table_compares(graph: onnx.GraphProto) -> list[tuple[str, ...]]:
    """For every Equal of the graph, the op types it reads from, back to the table gather, with the Split's axis
    and the Transpose's perm: ("Split", "0", "Transpose", "3,0,1,2", "Gather") where the compare is slot-major."""
    producer = {out: n for n in graph.node for out in n.output}

    def attr(n: onnx.NodeProto, name: str) -> str:
        return ",".join(str(v) for a in n.attribute if a.name == name for v in (list(a.ints) or [a.i]))

    chains = []
    for n in graph.node:
        if n.op_type != "Equal":
            continue
        split = producer.get(n.input[0])
        chain: list[str] = []
        if split is not None and split.op_type == "Split":
            chain += ["Split", attr(split, "axis")]
            transpose = producer.get(split.input[0])
            if transpose is not None and transpose.op_type == "Transpose":
                chain += ["Transpose", attr(transpose, "perm")]
                gather = producer.get(transpose.input[0])
                chain += [gather.op_type if gather is not None else "?"]
        chains.append(tuple(chain))
    return chains


@pytest.mark.parametrize("kind", ["full", "lma"])
def test_table_lookup_compares_slot_major(kind: str, bundles: dict[str, Bundle]) -> None:
    """The table's gathered buckets are transposed once, slot axis first, before the split and the key compare
    (models.hashtable.StaticHashTable.lookup): with the slot axis last, ONNX Runtime broadcast the key against
    spans of 4 slots, and the compare, split and max cost 0.3 of the demo graph at batch 256."""
    graph = onnx.load(str(bundles[kind].file("onnx")), load_external_data=False).graph
    assert _table_compares(graph) == [("Split", "0", "Transpose", "3,0,1,2", "Gather")]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hash", "lma"])
def test_dynamo_exporter_gives_the_same_scores(kind: str, tiny_runs: dict[str, TinyRun], tmp_path: Path) -> None:
    """The alternative exporter (`--onnx-exporter dynamo`) passes the same parity and keeps the contract."""
    run = tiny_runs[kind]
    bundle = export_run(run.run_dir, tmp_path / kind, onnx_exporter="dynamo")
    assert bundle.manifest["onnx"]["exporter"] == "dynamo"
    proto = onnx.load(str(bundle.file("onnx")))
    assert [i.name for i in proto.graph.input] == ["dense", "keys"]
    assert _interaction_reads_rows(proto.graph)
    dense, keys = _inputs(run, batch=33, seed=2)
    out = _score_all(bundle, run, dense, keys)
    np.testing.assert_allclose(out["onnx"][0], out["eager"][0], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out["onnx"][1], out["eager"][1])


@pytest.mark.parametrize("kind", ["full", "hash", "lma"])
def test_first_order_products_fuse_into_gemm(kind: str, bundles: dict[str, Bundle], tmp_path: Path) -> None:
    """ONNX Runtime fuses every matrix product of the first-order terms with the Add after it into one Gemm.

    It fuses only where it can prove the Add's two inputs have the same batch dimension: the shared-memory
    embedding's vectors must keep the graph's symbolic batch (a reshape to (-1, F, D) gave them a new one, and
    the lma and hash graphs ran up to three nodes more than they need at every batch size)."""
    options = session_options(1)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    cpu_session(bundles[kind].file("onnx"), options=options)
    graph = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph
    assert [n.name for n in graph.node if n.op_type == "MatMul"] == []
