"""The graph contract of every bundle: the names of the graphs' inputs and outputs, and the runtimes a bundle holds.

One owner for these names (DESIGN section 6). The exporter writes both graphs with them and records them in the
manifest (:func:`graph_io`), the bundle loader finds each runtime's file by them, the server's runtimes check a
loaded graph against them and feed it by them, the runtime benchmark and the Triton config use them. Importable
without torch or ONNX Runtime (the serving install has no torch).

    inputs   dense            float32 (B, n_dense)  already transform_dense'd (models.schema)
             keys             int64   (B, F)        token keys of models.schema
    outputs  probability      float32 (B, 1)
             fallback_tokens  int64   (B,)          tokens of the row without a stored signature / vocabulary row

Any model with ``forward(dense, keys) -> (probability, fallback_tokens)`` fits it (DLRM, a linear model, ...).
"""

from __future__ import annotations

from typing import Any

from models.schema import FeatureSchema

DENSE_INPUT = "dense"
KEYS_INPUT = "keys"
INPUT_NAMES = (DENSE_INPUT, KEYS_INPUT)  # in graph order
PROBABILITY_OUTPUT = "probability"
FALLBACK_OUTPUT = "fallback_tokens"
OUTPUT_NAMES = (PROBABILITY_OUTPUT, FALLBACK_OUTPUT)  # in graph order
BATCH_DIM = "batch"  # the name of the dynamic batch dimension, in the graphs and the manifest

# Where each graph records the feature schema it was exported for (sha256 of :func:`schema_digest`): ONNX
# metadata_props / a TorchScript extra file. The manifest carries the schema the server featurizes with, and is
# no file the manifest can checksum: an edit of its hash_seed would score other keys without a word. Graphs are
# checksummed, so the runtimes compare the two at load (bundles exported before this have no record: not checked).
SCHEMA_DIGEST_KEY = "lma.schema_sha256"


def schema_digest(schema: FeatureSchema) -> str:
    """sha256 (hex) of the schema's manifest form, canonical JSON."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(schema.to_dict(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_schema_digest(where: str, recorded: str | None, schema: FeatureSchema) -> None:
    """Raise ValueError when the graph at ``where`` recorded another schema than ``schema`` (None: no record)."""
    if recorded is not None and recorded != schema_digest(schema):
        raise ValueError(
            f"{where}: the graph was exported for another feature schema (sha256 {recorded[:16]}...) than"
            f" manifest.json gives (sha256 {schema_digest(schema)[:16]}...): the manifest was changed after export;"
            " export the run again"
        )


# runtime name (the server's LMA_RUNTIME) -> the file of its graph inside a bundle
RUNTIME_FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}
RUNTIMES = tuple(RUNTIME_FILES)  # ("onnx", "torchscript")


def graph_io(schema: FeatureSchema) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The manifest's ``inputs`` and ``outputs``: name, dtype, shape (``"batch"`` = dynamic)."""
    dense: dict[str, Any] = {
        "name": DENSE_INPUT,
        "dtype": "float32",
        "shape": [BATCH_DIM, schema.num_dense],
        "transform": schema.dense_transform,
    }
    if schema.num_dense == 0:
        dense["note"] = "no dense features: feed a (batch, 0) float32 tensor; both graphs ignore it"
    inputs: list[dict[str, Any]] = [
        dense,
        {"name": KEYS_INPUT, "dtype": "int64", "shape": [BATCH_DIM, schema.num_fields]},
    ]
    outputs: list[dict[str, Any]] = [
        {"name": PROBABILITY_OUTPUT, "dtype": "float32", "shape": [BATCH_DIM, 1]},
        {"name": FALLBACK_OUTPUT, "dtype": "int64", "shape": [BATCH_DIM]},
    ]
    return inputs, outputs
