"""The synthetic Criteo-format generator (models/synth.py): format, determinism, and the latent structure."""

import gzip
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from models.data.reader import ReadStats, iter_raw
from models.synth import BLOCK_ROWS, CRITEO_CARDINALITIES, SynthParams, scaled_cardinalities, synthesize

ROWS = 20_000


@pytest.fixture(scope="module")
def synth_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    out = tmp_path_factory.mktemp("synth") / "train.txt"
    summary = synthesize(out, rows=ROWS, seed=7, scale=0.001, chunk_rows=8192)
    return out, summary


@pytest.fixture(scope="module")
def lines(synth_file: tuple[Path, dict[str, object]]) -> list[list[str]]:
    return [line.split("\t") for line in synth_file[0].read_text().splitlines()]


def test_summary(synth_file: tuple[Path, dict[str, object]]) -> None:
    path, summary = synth_file
    json.dumps(summary)  # serialisable as is
    assert summary["path"] == str(path) and summary["rows"] == ROWS and summary["seed"] == 7
    assert summary["scale"] == 0.001 and summary["bytes"] == path.stat().st_size
    assert summary["cardinalities"] == scaled_cardinalities(0.001)
    assert 0.22 <= summary["positive_rate"] <= 0.28  # type: ignore[operator]


def test_scaled_cardinalities() -> None:
    assert scaled_cardinalities(1.0) == list(CRITEO_CARDINALITIES)
    small = scaled_cardinalities(0.001)
    assert small[:4] == [2, 2, 10131, 2203] and min(small) == 2 and len(small) == 26
    with pytest.raises(ValueError, match="scale must be a positive number, got 0"):
        scaled_cardinalities(0)


def test_format_and_counts(synth_file: tuple[Path, dict[str, object]], lines: list[list[str]]) -> None:
    path, summary = synth_file
    assert len(lines) == ROWS and all(len(f) == 40 for f in lines)
    stats = ReadStats()
    rows = list(iter_raw(path, "criteo", stats))  # the project's own reader accepts every line
    assert stats.to_dict() == {"rows": ROWS, "skipped": 0, "reasons": {}}
    assert sum(r.label for r in rows) / ROWS == summary["positive_rate"]
    hex8 = re.compile(r"^[0-9a-f]{8}$")
    assert all(v == "" or hex8.match(v) for f in lines for v in f[14:])
    assert all(re.match(r"^(0|-?[1-9][0-9]*)?$", v) for f in lines for v in f[1:14])
    for j in range(13):
        values = [int(f[1 + j]) for f in lines if f[1 + j]]
        if j == 1:  # I2 has a few negatives, as in Criteo
            assert set(v for v in values if v < 0) == {-1, -2, -3}
            assert 0.01 < sum(v < 0 for v in values) / len(values) < 0.03
        else:
            assert min(values) >= 0
        assert len(set(values)) > 1


def test_missing_rate(lines: list[list[str]]) -> None:
    cat_missing = sum(v == "" for f in lines for v in f[14:]) / (ROWS * 26)
    dense_missing = sum(v == "" for f in lines for v in f[1:14]) / (ROWS * 13)
    assert 0.035 < cat_missing < 0.045 and 0.035 < dense_missing < 0.045


def test_cardinality_bounds_and_zipf(lines: list[list[str]]) -> None:
    cards = scaled_cardinalities(0.001)
    for f, card in enumerate(cards):
        counts = Counter(row[14 + f] for row in lines if row[14 + f])
        assert 2 <= len(counts) <= card
        top = counts.most_common(2)
        if card >= 1000:  # heavy head, long tail: the top token is far above the uniform share
            assert top[0][1] / ROWS > 20 / card
            assert sum(1 for c in counts.values() if c == 1) > 0.2 * len(counts)


def test_labels_depend_on_tokens(lines: list[list[str]]) -> None:
    """Frequent tokens have click rates far from the global rate (z > 5), in more than one field."""
    labels = np.array([int(r[0]) for r in lines])
    rate = labels.mean()
    fields_with_signal = 0
    for f in range(26):
        column = np.array([r[14 + f] for r in lines])
        z_max = 0.0
        for token, count in Counter(column.tolist()).most_common(20):
            if count < 300 or token == "":
                continue
            token_rate = labels[column == token].mean()
            z_max = max(z_max, abs(token_rate - rate) / math.sqrt(rate * (1 - rate) / count))
        fields_with_signal += z_max > 5
    assert fields_with_signal >= 5


def test_missing_values_carry_no_signal(lines: list[list[str]]) -> None:
    """Missingness is drawn independently of everything else (as documented)."""
    labels = np.array([int(r[0]) for r in lines])
    missing = np.array([[v == "" for v in r[14:]] for r in lines]).any(1)
    n = int(missing.sum())
    z = abs(labels[missing].mean() - labels.mean()) / math.sqrt(labels.mean() * (1 - labels.mean()) / n)
    assert z < 4


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a.tsv", rows=500, seed=3, chunk_rows=200)
    b = synthesize(tmp_path / "b.tsv", rows=500, seed=3, chunk_rows=200)
    c = synthesize(tmp_path / "c.tsv", rows=500, seed=4, chunk_rows=200)
    assert (tmp_path / "a.tsv").read_bytes() == (tmp_path / "b.tsv").read_bytes()
    assert (tmp_path / "a.tsv").read_bytes() != (tmp_path / "c.tsv").read_bytes()
    assert a["positive_rate"] == b["positive_rate"] and a["bias"] == b["bias"]
    assert c["bias"] != a["bias"]
    # gzip output: the same bytes whatever the file name (no name or time in the gzip header)
    synthesize(tmp_path / "a.tsv.gz", rows=500, seed=3, chunk_rows=200)
    synthesize(tmp_path / "other.gz", rows=500, seed=3, chunk_rows=200)
    assert (tmp_path / "a.tsv.gz").read_bytes() == (tmp_path / "other.gz").read_bytes()
    assert gzip.decompress((tmp_path / "a.tsv.gz").read_bytes()) == (tmp_path / "a.tsv").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_shorter_file_is_a_prefix_and_chunking_does_not_matter(tmp_path: Path) -> None:
    rows = BLOCK_ROWS + 300  # crosses a block boundary
    synthesize(tmp_path / "short.tsv", rows=300, seed=1)
    synthesize(tmp_path / "long.tsv", rows=rows, seed=1, chunk_rows=1)
    synthesize(tmp_path / "long2.tsv", rows=rows, seed=1, chunk_rows=10 * BLOCK_ROWS)
    short = (tmp_path / "short.tsv").read_bytes()
    long = (tmp_path / "long.tsv").read_bytes()
    assert short.count(b"\n") == 300 and long.count(b"\n") == rows
    assert long.startswith(short)
    assert (tmp_path / "long2.tsv").read_bytes() == long


def test_params_change_the_data(tmp_path: Path) -> None:
    base = synthesize(tmp_path / "a.tsv", rows=2000, seed=0, chunk_rows=2000)
    high = synthesize(tmp_path / "b.tsv", rows=2000, seed=0, chunk_rows=2000, params=SynthParams(ctr=0.5))
    assert abs(high["positive_rate"] - 0.5) < 0.05 and high["bias"] > base["bias"]  # type: ignore[operator]
    none_missing = synthesize(tmp_path / "c.tsv", rows=200, seed=0, chunk_rows=200, params=SynthParams(missing=0.0))
    assert none_missing["rows"] == 200
    assert all(v != "" for line in (tmp_path / "c.tsv").read_text().splitlines() for v in line.split("\t"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rows": 0}, "rows must be a positive integer, got 0"),
        ({"scale": -1.0}, "scale must be a positive number, got -1.0"),
        ({"seed": -1}, "seed must be in"),
        ({"chunk_rows": 0}, "chunk_rows must be positive, got 0"),
    ],
)
def test_validation(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"rows": 10, "seed": 0, "scale": 0.001} | kwargs
    with pytest.raises(ValueError, match=message):
        synthesize(tmp_path / "x.tsv", **args)  # type: ignore[arg-type]
    assert not (tmp_path / "x.tsv").exists()


def test_params_validation() -> None:
    with pytest.raises(ValueError, match=r"rho must be in \[0, 1\], got 1\.5"):
        SynthParams(rho=1.5)
    with pytest.raises(ValueError, match="dense_log_means must have 13 values, got 2"):
        SynthParams(dense_log_means=(1.0, 2.0))
    with pytest.raises(FileNotFoundError, match="output folder does not exist"):
        synthesize(Path("/nonexistent-dir/x.tsv"), rows=10)
    with pytest.raises(
        ValueError, match=r"--out /tmp: is a directory; name the file to write \(e\.g\. /tmp/synth\.tsv\)"
    ):
        synthesize(Path("/tmp"), rows=10)
