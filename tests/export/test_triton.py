"""Triton model repository: config.pbtxt parses into Triton's own ModelConfig and matches the graph."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest
from google.protobuf import text_format

from export.bundle import Bundle
from export.onnx_runtime import cpu_session
from export.triton import triton_config, write_triton


def triton_model_config() -> ModuleType:
    """tritonclient's ``model_config_pb2``, loaded from its file: importing ``tritonclient.grpc``
    itself needs the grpc extra, which the http-only install lacks; the protobuf module does not."""
    tritonclient = pytest.importorskip("tritonclient")
    path = Path(tritonclient.__path__[0]) / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pb2() -> ModuleType:
    return triton_model_config()


def _parse(pb2: ModuleType, text: str):  # type: ignore[no-untyped-def]
    return text_format.Parse(text, pb2.ModelConfig())  # strict: an unknown field is an error


def test_config_names_the_graph_tensors(bundles: dict[str, Bundle], tmp_path: Path, pb2: ModuleType) -> None:
    bundle = bundles["lma"]
    model_dir = write_triton(bundle, tmp_path / "triton", max_batch_size=512)
    assert model_dir == tmp_path / "triton" / "lma"
    assert sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*")) == ["1", "1/model.onnx", "config.pbtxt"]
    cfg = _parse(pb2, (model_dir / "config.pbtxt").read_text())
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("lma", "onnxruntime_onnx", 512)
    assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds == 1000
    inputs = [(i.name, i.data_type, list(i.dims), i.HasField("reshape")) for i in cfg.input]
    assert inputs == [("dense", pb2.TYPE_FP32, [13], False), ("keys", pb2.TYPE_INT64, [26], False)]
    outputs = [(o.name, o.data_type, list(o.dims)) for o in cfg.output]
    assert outputs == [("probability", pb2.TYPE_FP32, [1]), ("fallback_tokens", pb2.TYPE_INT64, [1])]
    assert not cfg.output[0].HasField("reshape")
    assert cfg.output[1].HasField("reshape") and list(cfg.output[1].reshape.shape) == []  # batch dim only
    # the repository's graph is the bundle's graph, byte for byte
    assert (model_dir / "1" / "model.onnx").read_bytes() == bundle.file("onnx").read_bytes()


def test_config_tensors_match_the_onnx_graph(bundles: dict[str, Bundle], tmp_path: Path, pb2: ModuleType) -> None:
    for kind, bundle in bundles.items():
        model_dir = write_triton(bundle, tmp_path / "triton")
        cfg = _parse(pb2, (model_dir / "config.pbtxt").read_text())
        graph = onnx.load(str(model_dir / "1" / "model.onnx")).graph
        assert [i.name for i in cfg.input] == [i.name for i in graph.input], kind
        assert [o.name for o in cfg.output] == [o.name for o in graph.output], kind
        for tensor, value in zip(cfg.input, graph.input, strict=True):
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
            assert dims[1:] == list(tensor.dims), kind  # the batch dimension is left out


def test_no_dense_features_drop_the_unused_input(bundles: dict[str, Bundle], tmp_path: Path, pb2: ModuleType) -> None:
    bundle = bundles["hash"]
    model_dir = write_triton(bundle, tmp_path / "triton")
    cfg = _parse(pb2, (model_dir / "config.pbtxt").read_text())
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("keys", [23])]
    session = cpu_session(model_dir / "1" / "model.onnx", threads=1)
    assert [i.name for i in session.get_inputs()] == ["keys"]
    keys = np.random.default_rng(0).integers(0, 2**62, size=(4, 23), dtype=np.int64)
    full = cpu_session(bundle.file("onnx"), threads=1).run(None, {"dense": np.zeros((4, 0), np.float32), "keys": keys})
    np.testing.assert_array_equal(session.run(None, {"keys": keys})[0], full[0])


def test_bad_max_batch_size(bundles: dict[str, Bundle]) -> None:
    with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
        triton_config(bundles["lma"], max_batch_size=0)
