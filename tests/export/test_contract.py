"""The owners of facts that several folders need: graph input/output names, runtime names and files, and the
ONNX Runtime session options. The server imports them; the Literal of its runtime setting cannot, so a test
checks that it agrees."""

import typing

import onnxruntime as ort

from export import contract
from export.bundle import RUNTIME_FILES
from export.onnx_runtime import cpu_session, session_options
from models.schema import criteo_schema


def test_names_of_the_contract() -> None:
    assert contract.INPUT_NAMES == ("dense", "keys")
    assert contract.OUTPUT_NAMES == ("probability", "fallback_tokens")
    assert contract.RUNTIME_FILES == {"onnx": "model.onnx", "torchscript": "model.ts"}
    assert contract.RUNTIMES == ("onnx", "torchscript")
    assert RUNTIME_FILES is contract.RUNTIME_FILES  # the bundle reader uses the owner's mapping


def test_graph_io_follows_the_schema() -> None:
    inputs, outputs = contract.graph_io(criteo_schema())
    assert [(t["name"], t["dtype"], t["shape"]) for t in inputs] == [
        ("dense", "float32", ["batch", 13]),
        ("keys", "int64", ["batch", 26]),
    ]
    assert [(t["name"], t["shape"]) for t in outputs] == [("probability", ["batch", 1]), ("fallback_tokens", ["batch"])]


def test_the_server_agrees_with_the_owners() -> None:
    from server import runtimes, settings

    assert runtimes.INPUTS == contract.INPUT_NAMES
    assert runtimes.OUTPUTS == contract.OUTPUT_NAMES
    assert tuple(runtimes.RUNTIMES) == contract.RUNTIMES
    assert typing.get_args(settings.Settings.model_fields["runtime"].annotation) == contract.RUNTIMES


def test_session_options_are_the_servers() -> None:
    opts = session_options(3)
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.inter_op_num_threads == 1
    assert opts.intra_op_num_threads == 3
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.log_severity_level == 3
    assert session_options(0).intra_op_num_threads == 0  # ONNX Runtime's default


def test_cpu_session_uses_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.INT64, [None])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [None])])  # fmt: skip
    path = tmp_path / "id.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))
    session = cpu_session(path, threads=1)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session.get_session_options().execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session.run(None, {"x": np.array([5], dtype=np.int64)})[0].tolist() == [5]
