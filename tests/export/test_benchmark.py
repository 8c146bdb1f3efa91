"""export.benchmark end to end at a tiny size: the report's structure, the baseline comparison and the profile.

No timing is asserted (timings are measurements, never test results): only that every (kind, runtime,
batch) cell was measured, that a baseline build's bundles are timed in the same rounds, and that the
ONNX Runtime profile covers every batch size.
"""

import json
from pathlib import Path

import pytest

from export import benchmark
from export.bundle import BundleError

TINY = ["--preset", "tiny", "--dim", "4", "--tokens", "3000", "--batch-sizes", "1,8", "--threads", "1",
        "--rounds", "1", "--seconds", "0.01"]  # fmt: skip


def test_benchmark_with_a_baseline_and_a_profile(tmp_path: Path) -> None:
    first = tmp_path / "first"
    assert benchmark.main([*TINY, "--runtimes", "torchscript,onnx", "--keep", "--out", str(first)]) == 0
    assert sorted(p.name for p in (first / "artifacts").iterdir()) == ["full", "lma"]

    second = tmp_path / "second"
    args = [*TINY, "--runtimes", "torchscript,onnx", "--baseline", str(first / "artifacts"), "--profile"]
    assert benchmark.main([*args, "--out", str(second)]) == 0
    results = {r["kind"]: r for r in json.loads((second / "benchmark.json").read_text())["results"]}
    runtimes = ["torchscript", "onnx", "torchscript-baseline", "onnx-baseline"]
    for r in results.values():
        assert sorted(r["speed"]) == sorted(f"{rt}/b{b}" for rt in runtimes for b in (1, 8))
        assert all(s["samples_per_s"] > 0 and s["calls"] >= 5 for s in r["speed"].values())
        assert sorted(r["onnx_profile"]) == ["1", "8"]
        assert all(p["nodes_run"] > 10 and p["op_share"] for p in r["onnx_profile"].values())
    text = (second / "benchmark.md").read_text()
    assert "Against the baseline build (same rows, same rounds):" in text
    assert "| runtime | batch | full this/baseline | lma this/baseline | lma this / full baseline |" in text
    assert sum(line.startswith(("| onnx |", "| torchscript |")) for line in text.splitlines()) == 8  # 2 tables
    assert "ONNX Runtime profile, lma, batch 8:" in text


def test_baseline_needs_every_kind(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"no baseline bundle for \['full', 'lma'\]"):
        benchmark.main([*TINY, "--baseline", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])


def test_unknown_runtime_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as e:
        benchmark.parse_args(["--runtimes", "onnx,tensorrt"])
    assert e.value.code == 2
