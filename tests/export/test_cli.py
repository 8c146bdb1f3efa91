"""`lma export` through the real console entry point."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from export.bundle import load_bundle
from models.main import main

if TYPE_CHECKING:
    from conftest import TinyRun


def test_export_command_writes_bundle_and_triton_and_prints_summary(
    tiny_runs: dict[str, TinyRun], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, repo = tmp_path / "artifacts" / "ctr", tmp_path / "triton"
    code = main(["export", str(tiny_runs["lma"].run_dir), "--out", str(out), "--triton", str(repo)])
    assert code == 0
    text = capsys.readouterr().out
    bundle = load_bundle(out / "1")
    assert text.startswith(f"exported ctr version 1 -> {out / '1'}\n")
    for name, f in bundle.manifest["files"].items():
        assert re.search(rf"{re.escape(name)}\s+{f['bytes']:,} bytes  sha256 {f['sha256'][:16]}", text)
    mem = bundle.memory
    assert f"memory (lma): embedding {mem['embedding_bytes']:,} B" in text
    assert "embedding compression 2.00x" in text
    assert re.search(r"parity: 3 cases \(random/b1, random/b7, random/b1024\), worst \w+ on random/b\d+", text)
    assert re.search(r"onnx: opset 18 \(legacy exporter\), \d+ nodes", text)
    assert f"triton: {repo / 'ctr'}/config.pbtxt + 1/model.onnx" in text
    assert re.search(r"seconds: \d+\.\d\d$", text.strip())
    assert (repo / "ctr" / "config.pbtxt").is_file() and (repo / "ctr" / "1" / "model.onnx").is_file()

    code = main(["export", str(tiny_runs["lma"].run_dir), "--out", str(out), "--version", "1"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"lma export: error: {out / '1'}: already exists; bundle versions are immutable, export a new version"
    )


def test_export_command_bad_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "norun"), "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lma export: error: {tmp_path / 'norun'} is not a run folder: config.json is missing"
    )


def test_registration_imports_nothing_heavy() -> None:
    code = (
        "import argparse, sys\n"
        "import export.cli\n"
        "p = argparse.ArgumentParser(); export.cli.register(p.add_subparsers())\n"
        "heavy = sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'numpy', 'export.exporter') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
