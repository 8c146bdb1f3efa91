"""The linear reference end to end: `lma train --model lr` -> `lma export` -> the server scores it like any model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from export.exporter import export_run
from models.checkpoint import load_run
from models.data.reader import iter_raw
from models.main import main
from models.schema import transform_dense
from models.synth import synthesize
from server.app import build_app
from server.settings import Settings


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lr")
    synthesize(root / "synth.tsv", rows=6000, seed=4, scale=0.0005)
    code = main([
        "train", "--data", str(root / "synth.tsv"), "--cache-dir", str(root / "cache"), "--model", "lr",
        "--epochs", "3", "--threads", "1", "--no-progress", "--out", str(root / "run"),
    ])  # fmt: skip
    assert code == 0
    return root


def test_train_export_serve(trained: Path) -> None:
    model, cfg = load_run(trained / "run")
    assert cfg.model.to_dict() == {"architecture": "lr", "num_dense": 13, "num_fields": 26}
    assert cfg.embedding.kind == "hash" and cfg.embedding.embedding_dim == 1 and cfg.embedding.compression == 1.0
    assert cfg.full_embedding_bytes == cfg.distinct_tokens * 4  # one float per training token
    bundle = export_run(trained / "run", trained / "artifacts" / "linear")
    assert bundle.manifest["model"]["architecture"] == "lr"
    assert [o["name"] for o in bundle.manifest["outputs"]] == ["probability", "fallback_tokens"]

    rows = [r for _, r in zip(range(5), iter_raw(trained / "synth.tsv", "criteo"), strict=False)]
    dense = transform_dense(np.array([[np.nan if v is None else v for v in r.dense] for r in rows]))
    keys = cfg.schema.keys_for([r.categorical for r in rows])
    with torch.inference_mode():
        expected = model(torch.from_numpy(dense), torch.from_numpy(keys))[0].numpy()[:, 0]
    settings = Settings(model_dir=trained / "artifacts" / "linear", watch_interval_s=0, intra_op_threads=1)
    with TestClient(build_app(settings)) as client:
        body = {"instances": [{"dense": r.dense, "categorical": r.categorical} for r in rows]}
        response = client.post("/v1/models/linear:predict", json=body)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["predictions"], expected, rtol=0, atol=1e-6)


def test_lr_refuses_a_dimension(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--data", str(tmp_path / "x.tsv"), "--model", "lr", "--dim", "8", "--out", str(tmp_path)])
    assert code == 2
    assert "--model lr has one weight per token: --dim must be 1 (or 0), got 8" in capsys.readouterr().err


def test_the_dlrm_trains_through_the_linear_reference(trained: Path) -> None:
    """The default DLRM holds the reference: its first stage is `--model lr` step for step, so it ends at or above."""
    root = trained
    code = main([
        "train", "--data", str(root / "synth.tsv"), "--cache-dir", str(root / "cache"), "--preset", "tiny",
        "--epochs", "3", "--threads", "1", "--no-progress", "--out", str(root / "dlrm"),
    ])  # fmt: skip
    assert code == 0
    lr = json.loads((root / "run" / "metrics.json").read_text())
    dlrm = json.loads((root / "dlrm" / "metrics.json").read_text())
    stages = [e["stage"] for e in dlrm["evaluations"]]
    assert stages == sorted(stages, key=["linear", "all"].index) and set(stages) == {"linear", "all"}
    linear = [(e["epoch"], e["step"], e["val_auc"]) for e in dlrm["evaluations"] if e["stage"] == "linear"]
    assert linear == [(e["epoch"], e["step"], e["val_auc"]) for e in lr["evaluations"]]  # exactly, not nearly
    assert dlrm["best"]["val_auc"] >= lr["best"]["val_auc"]
    # The second stage starts from the first one's best point: its epochs are numbered on from there.
    assert [e["epoch"] for e in dlrm["epochs"]] == list(range(1, len(dlrm["epochs"]) + 1))

    model, cfg = load_run(root / "dlrm")
    assert cfg.model.linear and not cfg.model.first_order
    lr_model, _ = load_run(root / "run")
    assert model.dlrm.linear.embedding.memory.numel() == lr_model.dlrm.embedding.memory.numel()
    mem = dlrm["memory"]  # the per-token weights are per-token memory: counted with the embedding
    assert mem["embedding_parts"]["linear_weights"] == lr["memory"]["embedding_bytes"]
    assert mem["embedding_bytes"] == sum(mem["embedding_parts"].values())
    assert mem["embedding_compression"] == pytest.approx(mem["full_embedding_bytes"] / mem["embedding_bytes"])
    bundle = export_run(root / "dlrm", root / "artifacts" / "dlrm")  # eager, TorchScript, ONNX Runtime agree
    assert bundle.manifest["memory"] == mem


def test_no_linear_part_is_the_recipe_before_it(trained: Path) -> None:
    code = main([
        "train", "--data", str(trained / "synth.tsv"), "--cache-dir", str(trained / "cache"), "--preset", "tiny",
        "--epochs", "1", "--threads", "1", "--no-progress", "--no-linear-part", "--out", str(trained / "plain"),
    ])  # fmt: skip
    assert code == 0
    _, cfg = load_run(trained / "plain")
    assert not cfg.model.linear and cfg.model.first_order
    metrics = json.loads((trained / "plain" / "metrics.json").read_text())
    assert {e["stage"] for e in metrics["evaluations"]} == {"all"}
    assert "linear_weights" not in metrics["memory"]["embedding_parts"]
