"""Writing the two graphs of a bundle: TorchScript (``torch.jit.script``) and ONNX, with the graph contract's names.

Both take any model with ``forward(dense, keys) -> (probability, fallback_tokens)`` (:mod:`export.contract`); the
whole embedding (hash tables, LMA hashing, the shared memory) is inside the graphs, so a runtime needs nothing but
the keys. With no dense features (Avazu) ``dense`` is (B, 0): the TorchScript graph ignores it, and the ONNX graph
declares it as an unused input (the legacy exporter drops unused inputs; we put it back) so every runtime feeds the
same two tensors.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.bundle import BundleError
from export.contract import BATCH_DIM, DENSE_INPUT, INPUT_NAMES, OUTPUT_NAMES, SCHEMA_DIGEST_KEY, schema_digest
from models.schema import KEY_MASK, FeatureSchema

ONNX_OPSET = 18
ONNX_EXPORTERS = ("legacy", "dynamo")
DEFAULT_ONNX_EXPORTER = "legacy"
ONNX_DATA_FILE = "model.onnx.data"  # weights of graphs too large for one protobuf file
EXTERNAL_DATA_BYTES = 1 << 30


def example_inputs(schema: FeatureSchema, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense, keys) of ``batch`` random rows: what the exporters trace the model with."""
    rng = np.random.default_rng(0)
    dense = torch.from_numpy(rng.random((batch, schema.num_dense), dtype=np.float32))
    keys = torch.from_numpy(rng.integers(0, KEY_MASK, size=(batch, schema.num_fields), dtype=np.int64))
    return dense, keys


def script_model(model: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script`` (not trace): the table lookups keep their exact integer semantics."""
    return torch.jit.script(model.eval())


def export_torchscript(model: nn.Module, schema: FeatureSchema, path: Path) -> None:
    """Write ``model`` as TorchScript, recording the schema it takes (:data:`export.contract.SCHEMA_DIGEST_KEY`)."""
    torch.jit.save(script_model(model), str(path), _extra_files={SCHEMA_DIGEST_KEY: schema_digest(schema)})


def export_onnx(model: nn.Module, schema: FeatureSchema, path: Path, exporter: str = DEFAULT_ONNX_EXPORTER) -> None:
    """Write ``model`` as ONNX (opset :data:`ONNX_OPSET`, dynamic batch) and check it with onnx.checker.

    ``legacy`` (TorchScript-based ``torch.onnx.export(dynamo=False)``) is the default: it exports
    in a fraction of a second where ``dynamo`` takes several, and its graph ran faster in ONNX
    Runtime (docs/EXPORT.md: dynamo emits GatherND plus index-wrapping ops for every advanced
    index); both give identical integer results.

    A graph whose weights pass :data:`EXTERNAL_DATA_BYTES` (a full-embedding model at Criteo scale;
    protobuf caps one file at 2 GiB) keeps them in one side file, :data:`ONNX_DATA_FILE`, next to it.
    """
    import onnx

    if exporter not in ONNX_EXPORTERS:
        raise ValueError(f"ONNX exporter must be one of {ONNX_EXPORTERS}, got {exporter!r}")
    model = model.eval()
    args = example_inputs(schema)
    staging = path.parent / f".onnx-{uuid.uuid4().hex[:8]}"  # large exports write side files: keep them apart
    staging.mkdir()
    raw = staging / path.name
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # the exporters' chatter (deprecations, dynamo progress lines)
            if exporter == "legacy":
                torch.onnx.export(
                    model,
                    args,
                    str(raw),
                    input_names=list(INPUT_NAMES),
                    output_names=list(OUTPUT_NAMES),
                    dynamic_axes={name: {0: BATCH_DIM} for name in INPUT_NAMES + OUTPUT_NAMES},
                    opset_version=ONNX_OPSET,
                    dynamo=False,
                )
            else:
                batch = torch.export.Dim(BATCH_DIM, min=1)
                program = torch.onnx.export(
                    model,
                    args,
                    input_names=list(INPUT_NAMES),
                    output_names=list(OUTPUT_NAMES),
                    dynamic_shapes=({0: batch}, {0: batch}),
                    opset_version=ONNX_OPSET,
                    dynamo=True,
                    optimize=True,
                    verbose=False,
                )
                if program is None:
                    raise BundleError("the dynamo ONNX exporter returned no program")
                program.save(str(raw))
        proto = onnx.load(str(raw))  # pulls in any external data the exporter wrote
        _ensure_dense_input(proto, schema)
        proto.metadata_props.add(key=SCHEMA_DIGEST_KEY, value=schema_digest(schema))
        weights = sum(len(t.raw_data) for t in proto.graph.initializer)
        if weights > EXTERNAL_DATA_BYTES:
            onnx.save_model(
                proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                location=ONNX_DATA_FILE, size_threshold=1024,
            )  # fmt: skip
        else:
            onnx.save_model(proto, str(path))
        del proto
        onnx.checker.check_model(str(path), full_check=True)  # by path: works with external data too
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _ensure_dense_input(proto: Any, schema: FeatureSchema) -> None:
    """Keep the two-input contract when ``dense`` is unused (n_dense = 0): declare it, unused."""
    from onnx import TensorProto, helper

    names = [i.name for i in proto.graph.input]
    if DENSE_INPUT in names:
        return
    if schema.num_dense:
        raise BundleError(
            f"the ONNX exporter dropped the dense input of a model with {schema.num_dense} dense features"
        )
    dense = helper.make_tensor_value_info(DENSE_INPUT, TensorProto.FLOAT, [BATCH_DIM, 0])
    proto.graph.input.insert(0, dense)


def onnx_summary(path: Path, exporter: str) -> dict[str, Any]:
    """Opset, node count and op-type counts of the graph, and of its embedding part alone."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    nodes = [n for n in proto.graph.node if n.op_type != "Constant"]
    embedding = [n for n in nodes if "embedding" in n.name]
    external = (path.parent / ONNX_DATA_FILE).is_file()
    return {
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "external_data": ONNX_DATA_FILE if external else None,
        "ir_version": int(proto.ir_version),
        "exporter": exporter,
        "node_count": len(nodes),
        "constant_nodes": len(proto.graph.node) - len(nodes),
        "op_types": dict(sorted(Counter(n.op_type for n in nodes).items())),
        "embedding_node_count": len(embedding),
        "embedding_op_types": dict(sorted(Counter(n.op_type for n in embedding).items())),
    }
