"""Training end to end on synthetic data: learns, is reproducible, writes a complete run folder."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import load_run
from models.embeddings import EmbeddingConfig
from models.main import main
from models.synth import synthesize
from models.train import TrainSettings, log_loss, roc_auc, train


@pytest.fixture(scope="module")
def synth_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "synth.tsv"
    synthesize(path, rows=30_000, seed=3, scale=0.0005)
    return path


def _settings(data: Path, cache: Path, kind: str, **kw: object) -> TrainSettings:
    emb = EmbeddingConfig(kind=kind, embedding_dim=8, compression=float(kw.pop("compression", 4.0)), sample_rows=5000)
    defaults: dict[str, object] = dict(
        data=data, cache_dir=cache, preset="tiny", embedding=emb, epochs=2, batch_size=256, threads=1, progress=False
    )
    defaults.update(kw)
    return TrainSettings(**defaults)  # type: ignore[arg-type]


def test_roc_auc_and_logloss_exact() -> None:
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert roc_auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)  # ties count half
    assert log_loss(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(np.log(2))


@pytest.mark.parametrize("kind", ["full", "hash", "lma"])
def test_training_learns_and_writes_run_folder(kind: str, synth_file: Path, tmp_path: Path) -> None:
    result = train(_settings(synth_file, tmp_path / "cache", kind), tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m == json.loads(json.dumps(result.metrics))
    # Two stages of at most 2 epochs each (the linear part first), epochs numbered on across them.
    assert [e["epoch"] for e in m["epochs"]] == list(range(1, len(m["epochs"]) + 1))
    stages = [e["stage"] for e in m["epochs"]]
    assert stages[0] == "linear" and stages[-1] == "all" and all(stages.count(s) <= 2 for s in stages)
    assert m["best"]["val_auc"] > 0.6, m["epochs"]  # the latent structure is learnable
    assert m["data"]["rows"] == 30_000 and m["data"]["skipped"] == 0
    mem = m["memory"]
    assert mem["kind"] == kind
    if kind != "full":
        # a "4x" config is 4x in the accounting, signature table and seeds included; the linear part's
        # weights (one per training token, and their seeds) come on top, and are counted
        parts = mem["embedding_parts"]
        own = mem["embedding_bytes"] - parts["linear_weights"]
        assert mem["full_embedding_bytes"] / own == pytest.approx(4.0, rel=1e-3)
        assert parts["linear_weights"] == pytest.approx(mem["full_embedding_bytes"] / 8, rel=1e-2)  # dim 8 -> 1
    for name in ("model.safetensors", "config.json", "metrics.json", "curve.png"):
        assert (tmp_path / "run" / name).is_file()
    model, cfg = load_run(tmp_path / "run")
    assert cfg.embedding.kind == kind
    if kind == "lma":
        assert m["signatures"]["signed_tokens"] > 0
        assert model.dlrm.embedding.signatures.num_buckets > 0


def test_same_seed_same_metrics(synth_file: Path, tmp_path: Path) -> None:
    a = train(_settings(synth_file, tmp_path / "cache", "lma", epochs=1), tmp_path / "a").metrics
    b = train(_settings(synth_file, tmp_path / "cache", "lma", epochs=1), tmp_path / "b").metrics
    assert a["epochs"][0]["val_auc"] == b["epochs"][0]["val_auc"]
    assert a["test"] == b["test"]
    wa = load_run(tmp_path / "a")[0].state_dict()
    wb = load_run(tmp_path / "b")[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cli_train_bad_input_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--data", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    assert "missing.tsv" in capsys.readouterr().err
    code = main(["train", "--data", str(tmp_path / "x.tsv"), "--out", str(tmp_path / "r"), "--compression", "0.5"])
    assert code == 2
    assert "compression" in capsys.readouterr().err
    # each once failed late or obscurely: a segfault starting 100,000 threads, an overflow not naming --seed,
    # a FileExistsError at the first checkpoint
    (tmp_path / "file").write_text("")
    for flags, message in (
        (["--threads", "100000"], "threads must be at most "),
        (["--seed", "-1"], "seed must be in [0, 2**63), got -1"),
        (["--val-fraction", "0"], "val_fraction must be in (0, 1): validation picks the checkpoint, got 0.0"),
        (["--compression", "0"], "compression"),  # once silently the default 16x
        (["--seed", str(2**64)], f"seed must be in [0, 2**63), got {2**64}"),
        (["--cache-dir", str(tmp_path / "file")], f"cache_dir {tmp_path / 'file'}: exists and is not a directory"),
    ):
        code = main(["train", "--data", str(tmp_path / "x.tsv"), "--out", str(tmp_path / "r"), *flags])
        assert code == 2 and message in capsys.readouterr().err


def test_cli_train_keeps_a_run_that_is_there(
    synth_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # it once replaced every file of an existing run without a word, and a run that never validated left the
    # old weights beside its own metrics
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "model.safetensors").write_bytes(b"old")
    args = ["train", "--data", str(synth_file), "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--out", str(run)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lma train: error: --out {run}: holds a run already (config.json, model.safetensors); write to another"
        " folder, or pass --overwrite to replace it"
    )
    assert (run / "model.safetensors").read_bytes() == b"old"
    (tmp_path / "file").write_text("")
    assert main([*args, "--out", str(tmp_path / "file")]) == 2
    assert (
        capsys.readouterr().err.strip() == f"lma train: error: --out {tmp_path / 'file'}: exists and is not a directory"
    )
    # a path through a file: once a traceback at the first checkpoint, after the training
    assert main([*args, "--out", str(tmp_path / "file" / "run")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lma train: error: --out {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file, so no folder can be"
        " made under it"
    )
    # validation rows of one label: no AUC, so no best checkpoint; refused before any training
    one_class = tmp_path / "zeros.tsv"
    one_class.write_text("".join("0" + line[1:] for line in synth_file.read_text().splitlines(keepends=True)[:3000]))
    assert main([*args, "--data", str(one_class), "--out", str(run), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lma train: error: {one_class}: the ") and err.endswith(
        " validation rows are all labelled 0, so their AUC is undefined; the data needs clicks and non-clicks"
        " (more rows, or another --split)"
    )
    assert not (run / "model.safetensors").exists()  # --overwrite: the old run went, as asked


def test_auto_batch_size() -> None:
    from models.train import auto_batch_size

    # The largest of 1024 ... 64 with at least 150 steps an epoch.
    assert [auto_batch_size(n) for n in (4_000, 40_000, 80_000, 800_000, 10)] == [64, 256, 512, 1024, 64]


def test_validations_within_epochs_keep_the_best(synth_file: Path, tmp_path: Path) -> None:
    settings = _settings(synth_file, tmp_path / "cache", "hash", epochs=3, batch_size=0, evals_per_epoch=3,
                         patience=100, lr_schedule="cosine", embedding_l2=1e-4, linear_part=False)  # fmt: skip
    m = train(settings, tmp_path / "run").metrics
    assert m["batch_size"] == 128  # 24,000 training rows: 188 steps an epoch
    evals = m["evaluations"]
    assert [(e["epoch"], e["step"]) for e in evals] == [(1, 63), (1, 126), (1, 188), (2, 251), (2, 314), (2, 376),
                                                        (3, 439), (3, 502), (3, 564)]  # fmt: skip
    assert [e["val_auc"] for e in m["epochs"]] == [evals[2]["val_auc"], evals[5]["val_auc"], evals[8]["val_auc"]]
    best = max(evals, key=lambda e: e["val_auc"])
    assert m["best"] == {"epoch": best["epoch"], "step": best["step"], "samples": best["samples"],
                         "val_auc": best["val_auc"], "stage": "all"}  # fmt: skip
    assert evals[0]["lr"] < 0.02 and evals[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine down to 0
    # The saved weights are those of the best validation: scoring again gives its AUC.
    from models.data.cache import lookup
    from models.data.formats import schema_for_format
    from models.train import evaluate

    prepared = lookup(synth_file, "criteo", tmp_path / "cache", schema_for_format("criteo"))
    assert prepared is not None
    val = prepared.split("order", 0.1, 0.1)["val"]
    assert evaluate(load_run(tmp_path / "run")[0], prepared, val)["auc"] == pytest.approx(best["val_auc"], abs=1e-12)


def test_early_stop_counts_validations(synth_file: Path, tmp_path: Path) -> None:
    settings = _settings(synth_file, tmp_path / "cache", "hash", epochs=50, evals_per_epoch=4, patience=2, lr=0.5)
    m = train(settings, tmp_path / "run").metrics
    evals = m["evaluations"]
    assert {e["stage"] for e in evals} == {"linear", "all"}
    best = -1.0
    for stage in ("linear", "all"):  # each stage stops after 2 validations without a gain on the best so far
        aucs = [e["val_auc"] for e in evals if e["stage"] == stage]
        gains = [i for i, auc in enumerate(aucs) if auc > max([best, *aucs[:i]])]
        assert len(aucs) == (gains[-1] if gains else -1) + 1 + 2, (stage, aucs, best)
        best = max(best, *aucs)
    assert len(m["epochs"]) < 100


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kinds", "lma,foo"], "--kinds: unknown ['foo']; choose from full, hash, lma, lr"),
        (["--kinds", ","], "--kinds: empty; give at least one"),
        (["--compressions", "16,0.5"], "--compressions: each must be >= 1 (times smaller than the full table)"),
        (["--seeds", ""], "--seeds: empty; give at least one"),
        (["--seeds", "1.5"], "--seeds: integers in [0, 2**63) only, got '1.5'"),
    ],
)
def test_cli_study_checks_its_lists_before_the_first_run(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # each once trained the first runs, then failed, or ran nothing and exited 0, or took 1.5 for seed 1
    code = main(["study", "--data", str(tmp_path / "x.tsv"), "--out", str(tmp_path / "study"), *flags])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "study").exists()
