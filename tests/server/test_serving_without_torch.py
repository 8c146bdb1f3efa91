"""The serving path never imports torch (DESIGN section 2: the base install is the serving set, without torch).

A fresh interpreter builds the `lma` parser, builds the app over the shared bundle repository, scores a row
through ONNX Runtime and answers /metrics; then no module of the [train] extra may be loaded. Its score must be
the one this process's app gives (ONNX Runtime on CPU is bit-identical across processes and batch sizes).
"""

from __future__ import annotations

import json
import subprocess
import sys

from fastapi.testclient import TestClient

from models.extras import EXTRA_MODULES
from tests.helpers.serving import Bundles, instance

SCRIPT = """
import json, sys
from fastapi.testclient import TestClient
from models.main import build_parser
from server.app import build_app
from server.settings import Settings

build_parser()  # every subcommand's registration, as `lma serve` does it
settings = Settings(model_dir=sys.argv[1], runtime="onnx", device="cpu", watch_interval_s=0, intra_op_threads=1)
with TestClient(build_app(settings)) as client:
    r = client.post("/v1/models/criteo:predict", json={"instances": [json.loads(sys.argv[2])]})
    metrics = client.get("/metrics")
print(json.dumps({
    "status": r.status_code, "body": r.json(), "metrics": metrics.status_code,
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in json.loads(sys.argv[3])),
}))
"""


def test_scoring_through_onnx_runtime_imports_no_torch(bundles: Bundles, app_client: TestClient) -> None:
    row = instance(3)
    train_modules = sorted(set(EXTRA_MODULES["train"]) | set(EXTRA_MODULES["torchscript"]))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(bundles.repo), json.dumps(row), json.dumps(train_modules)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    expected = app_client.post("/v1/models/criteo:predict", json={"instances": [row]}).json()
    assert result == {"status": 200, "body": expected, "metrics": 200, "loaded": []}
    assert expected["version"] == "2" and 0 < expected["predictions"][0] < 1
