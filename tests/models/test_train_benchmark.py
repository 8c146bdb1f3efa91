"""models.benchmark: the per-stage rates its data-parallel table reports; the ingest benchmark end to end."""

import argparse
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from models import benchmark
from models.benchmark import _stage_rate
from models.data import cache, reader


def test_stage_rate_reads_the_first_epoch_of_each_stage() -> None:
    metrics = {
        "epochs": [
            {"stage": "linear", "epoch": 0, "train_samples_per_s": 300_000.0},
            {"stage": "linear", "epoch": 1, "train_samples_per_s": 310_000.0},
            {"stage": "all", "epoch": 0, "train_samples_per_s": 40_000.0},
        ]
    }
    assert _stage_rate(metrics, "linear") == 300_000.0
    assert _stage_rate(metrics, "all") == 40_000.0  # the DLRM's own stage, not the linear part's first epoch


def test_stage_rate_without_a_linear_stage() -> None:
    metrics = {"epochs": [{"epoch": 0, "train_samples_per_s": 45_000.0}]}  # records of before stages, or LR runs
    assert _stage_rate(metrics, "all") == 45_000.0
    assert math.isnan(_stage_rate(metrics, "linear"))


def _criteo_rows(n: int) -> str:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        dense = [str(int(v)) if v >= 0 else "" for v in rng.integers(-2, 50, 13)]
        cats = [f"{int(v):08x}" if v else "" for v in rng.integers(0, 40, 26)]
        lines.append("\t".join([str(i % 2), *dense, *cats]))
    lines[7] = "1\t2\t3"  # a wrong field count: skipped, and counted the same by both readers
    return "\n".join(lines) + "\n"


def _as_old_reader(iter_chunks: Any) -> SimpleNamespace:
    """This tree's reader in the shape of the old one (``models/data.py``: ReadStats, iter_chunks, prepare), so the
    harness is tested without the old revision in git history (a shallow clone has none)."""
    return SimpleNamespace(ReadStats=reader.ReadStats, iter_chunks=iter_chunks, prepare=cache.prepare)


def _ingest_args(tmp_path: Path) -> argparse.Namespace:
    data = tmp_path / "rows.tsv"
    data.write_text(_criteo_rows(3000))
    return argparse.Namespace(data=data, format="criteo", old_rev="b41178c", rounds=1, workers=2, tmp=tmp_path)


def test_ingest_benchmark_runs_both_readers_and_checks_they_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(benchmark, "old_reader", lambda rev: _as_old_reader(reader.iter_chunks))
    report = benchmark.bench_ingest(_ingest_args(tmp_path))
    assert report.startswith("2,999 rows of rows.tsv")
    assert "outputs identical in every round" in report
    assert "untimed first read of 1,000 rows before round 1: old " in report
    table = [line for line in report.splitlines() if line.startswith("| `")]
    assert [line.split("|")[1].strip() for line in table] == ["`iter_chunks`", "`prepare`"]
    assert not list(tmp_path.glob("lma-bench-cache-*"))  # the prepare rounds' caches are removed


def test_ingest_benchmark_fails_when_the_readers_differ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def one_row_short(*args: Any, **kw: Any) -> Any:
        for chunk in reader.iter_chunks(*args, **kw):
            yield reader.Chunk(chunk.dense[1:], chunk.keys[1:], chunk.labels[1:])

    monkeypatch.setattr(benchmark, "old_reader", lambda rev: _as_old_reader(one_row_short))
    with pytest.raises(AssertionError, match="iter_chunks: old and new readers differ"):
        benchmark.bench_ingest(_ingest_args(tmp_path))


def test_old_reader_names_a_revision_it_cannot_read() -> None:
    with pytest.raises(ValueError, match=r"cannot read models/data\.py at git revision .0000000000."):
        benchmark.old_reader("0000000000")
