"""The linear reference end to end: `lma train --model lr` -> `lma export` -> the server scores it like any model."""

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
