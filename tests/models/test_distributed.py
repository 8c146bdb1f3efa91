"""Data-parallel training with 2 CPU processes (gloo): same result as one process, reproducible, and a killed
rank ends the whole run with a clear error (models/distributed.py, models/train.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from models import distributed
from models.checkpoint import load_run
from models.data.batches import iter_batches, shard_of
from models.data.cache import Prepared
from models.data.formats import ReadStats
from models.embeddings import EmbeddingConfig
from models.schema import FeatureSchema
from models.synth import synthesize
from models.train import TrainSettings, train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def synth_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "synth.tsv"
    synthesize(path, rows=20_000, seed=5, scale=0.0005)
    return path


def _settings(data: Path, cache: Path, nproc: int, **kw: object) -> TrainSettings:
    emb = EmbeddingConfig(kind="lma", embedding_dim=8, compression=4.0, sample_rows=5000, seed=2)
    defaults: dict[str, object] = dict(
        data=data, cache_dir=cache, preset="tiny", embedding=emb, epochs=1, batch_size=256, seed=2,
        nproc=nproc, progress=False, device="cpu",
    )  # fmt: skip
    defaults.update(kw)
    return TrainSettings(**defaults)  # type: ignore[arg-type]


def test_shards_partition_every_global_batch() -> None:
    rows = 10
    p = Prepared(
        Path("."),
        Path("x"),
        "criteo",
        rows,
        ReadStats(rows),
        FeatureSchema(("I1",), ("C1",)),
        np.arange(rows, dtype=np.float32)[:, None],
        np.zeros((rows, 1), np.int64),
        np.zeros(rows, np.float32),
    )
    idx = np.arange(rows)
    whole = [b[0][:, 0].tolist() for b in iter_batches(p, idx, 4, shuffle=True, seed=3)]
    parts = [
        [b[0][:, 0].tolist() for b in iter_batches(p, idx, 4, shuffle=True, seed=3, shard=(r, 3))] for r in range(3)
    ]
    assert [len(x) for x in parts] == [3, 3, 3]  # every rank takes every step, even with nothing in it
    for step, batch in enumerate(whole):
        assert parts[0][step] + parts[1][step] + parts[2][step] == batch
    assert [len(parts[r][2]) for r in range(3)] == [1, 1, 0]  # the last global batch has 2 rows
    assert shard_of(np.arange(7), 2, 3).tolist() == [5, 6]
    with pytest.raises(ValueError, match="shard must be"):
        list(iter_batches(p, idx, 4, shuffle=False, seed=0, shard=(3, 3)))


def test_two_ranks_match_one_process_and_repeat_exactly(synth_file: Path, tmp_path: Path) -> None:
    one = train(_settings(synth_file, tmp_path / "cache", 1), tmp_path / "one").metrics
    two = train(_settings(synth_file, tmp_path / "cache", 2), tmp_path / "two").metrics
    again = train(_settings(synth_file, tmp_path / "cache", 2), tmp_path / "again").metrics
    assert two["distributed"] == {"world": 2, "backend": "gloo", "device": "cpu"}
    # Same global batch: the same steps up to the order of float sums.
    assert abs(two["best"]["val_auc"] - one["best"]["val_auc"]) < 0.005
    assert abs(two["test"]["auc"] - one["test"]["auc"]) < 0.005
    assert two["best"]["val_auc"] > 0.6
    # Validation AUC over both ranks' predictions: every validation row was scored once.
    assert two["evaluations"][-1]["val_auc"] == two["epochs"][-1]["val_auc"]
    assert two["test"]["rows"] == one["test"]["rows"] == 2000
    # Same seed, same N: the same weights, bit for bit.
    wa, wb = load_run(tmp_path / "two")[0].state_dict(), load_run(tmp_path / "again")[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert again["evaluations"] == two["evaluations"]
    # Rank 0 wrote the one run folder (nothing else beside it).
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "config.json", "curve.png", "metrics.json", "model.safetensors",
    ]  # fmt: skip
    assert json.loads((tmp_path / "two" / "config.json").read_text())["training"]["nproc"] == 2


def _ranks(launcher: psutil.Process) -> list[psutil.Process]:
    found = []
    for child in launcher.children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def test_killing_one_rank_ends_the_run_with_a_clear_error(synth_file: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "models.main", "train", "--data", str(synth_file), "--cache-dir", str(tmp_path / "c"),
        "--preset", "tiny", "--dim", "8", "--compression", "4", "--sample-rows", "5000", "--batch-size", "64",
        "--epochs", "1000", "--patience", "100000", "--nproc", "2", "--device", "cpu", "--no-progress",
        "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    launcher = psutil.Process(proc.pid)
    try:
        deadline = time.monotonic() + 120
        ranks: list[psutil.Process] = []
        while time.monotonic() < deadline and proc.poll() is None:
            ranks = _ranks(launcher)
            # Training has started once rank 0 saved its first checkpoint (the ranks are in their step loop).
            if len(ranks) == 2 and (tmp_path / "run" / "model.safetensors").exists():
                break
            time.sleep(0.2)
        assert proc.poll() is None and len(ranks) == 2, proc.communicate()
        victim = max(ranks, key=lambda p: p.pid)  # the later-started rank
        victim.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)  # bounded: the launcher stops the survivor within its grace period
        assert time.monotonic() - t0 < 30
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("lma train: error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith("lma train: error: rank "), err
    assert errors[0].endswith(" of 2 was killed by SIGKILL (the other ranks were stopped)"), err
    assert "Traceback" not in err and "leaked" not in err, err
    for p in ranks:  # no rank outlives the run
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE


def test_failure_messages() -> None:
    assert distributed._failure(1, 2, -9, Path("/nonexistent")) == (
        "rank 1 of 2 was killed by SIGKILL (the other ranks were stopped)"
    )
    assert distributed._failure(0, 4, 3, Path("/nonexistent")) == (
        "rank 0 of 4 exited with code 3 (the other ranks were stopped)"
    )


def test_environment_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2 WORLD_SIZE=2"):
        distributed.env_ranks()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert distributed.env_ranks() == (0, 1, 0, 1)
    assert os.environ.get("WORLD_SIZE") is None


def test_leave_flushes_logs_and_output_and_skips_finalization(tmp_path: Path) -> None:
    # A rank ends through leave(): what it logged and printed arrives, and nothing runs at interpreter exit
    # (where gloo's worker threads would be ended mid-call and abort the process).
    marker = tmp_path / "finalized"
    script = (
        "import atexit, logging, sys\n"
        "from models import distributed\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').close())\n"
        "logging.getLogger('rank').info('logged before leaving')\n"
        "sys.stdout.write('printed, unflushed')\n"
        "distributed.leave(7)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "printed, unflushed"
    assert "logged before leaving" in proc.stderr
    assert not marker.exists()
