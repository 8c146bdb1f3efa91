"""The install by job and the `lma` command's contract: extras, lock files, exit codes, the README's request.

- a subcommand or runtime whose extra is missing says in one line which extra to install and exits 2
  (a missing module is simulated with ``sys.modules[name] = None``, which makes ``import name`` fail as an
  uninstalled one does);
- models/extras.py names the modules each extra of pyproject.toml brings;
- every lock pins every requirement of pyproject.toml that it covers, with hashes (deploy/lock.py);
- `lma --version`; usage errors one line, exit 2; an unexpected exception exits 1 and points to -v;
- the README's curl command is what `make demo` prints and what the CI smoke scores.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from models import cli as models_cli
from models.extras import EXTRA_MODULES, MissingExtra, check
from models.main import main

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCKS = ROOT / "deploy" / "locks"


def run_lma(args: list[str], blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`lma ARGS` in a fresh interpreter in which the ``blocked`` modules cannot be imported."""
    code = (
        "import sys\n"
        f"for name in {list(blocked)!r}: sys.modules[name] = None\n"
        "from models.main import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


# ----------------------------------------------------------------------------------------------------------
# Missing extras


def test_train_without_torch_names_the_train_extra(tmp_path: Path) -> None:
    data = tmp_path / "d.tsv"
    data.write_text("")
    done = run_lma(["train", "--data", str(data), "--out", str(tmp_path / "run")], blocked=("torch",))
    assert done.returncode == 2
    assert done.stderr == (
        "lma train: error: this command needs the [train] extra (module 'torch' is not installed):"
        " pip install 'lma-ctr[train]' (in a checkout: make setup)\n"
    )


def test_export_without_onnx_names_the_train_extra(tmp_path: Path) -> None:
    """Checked before any work: a missing folder is not reported first, a long run never dies at its end."""
    done = run_lma(["export", str(tmp_path / "run"), "--out", str(tmp_path / "m")], blocked=("onnxscript",))
    assert done.returncode == 2
    assert done.stderr == (
        "lma export: error: this command needs the [train] extra (module 'onnxscript' is not installed):"
        " pip install 'lma-ctr[train]' (in a checkout: make setup)\n"
    )


def test_synth_needs_no_extra(tmp_path: Path) -> None:
    done = run_lma(["synth", "--rows", "20", "--out", str(tmp_path / "d.tsv")], blocked=EXTRA_MODULES["train"])
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "d.tsv").read_text().splitlines()) == 20


def test_torchscript_runtime_without_torch_names_its_extra(tmp_path: Path) -> None:
    done = run_lma(["serve", str(tmp_path), "--runtime", "torchscript"], blocked=("torch",))
    assert done.returncode == 2
    assert done.stderr == (
        "lma serve: error: the torchscript runtime needs the [torchscript] extra (module 'torch' is not installed):"
        " pip install 'lma-ctr[torchscript]' (in a checkout: make setup)\n"
    )


def test_bench_without_a_model_and_without_torch_names_the_train_extra() -> None:
    done = run_lma(["bench", "--duration", "1"], blocked=("torch",))
    assert done.returncode == 2
    assert done.stderr.startswith(
        "lma bench: error: lma bench without --model-dir (it trains a demo model first) needs the [train] extra"
    )


def test_bench_of_the_torchscript_runtime_without_torch_names_its_extra(tmp_path: Path) -> None:
    done = run_lma(["bench", "--model-dir", str(tmp_path), "--runtime", "torchscript"], blocked=("torch",))
    assert done.returncode == 2
    assert done.stderr.startswith(
        "lma bench: error: lma bench --runtime torchscript needs the [torchscript] extra (module 'torch'"
    )


def test_a_missing_module_of_no_extra_is_unexpected_not_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args: Any) -> int:
        import lma_no_such_module  # type: ignore[import-not-found]  # noqa: F401

        return 0

    monkeypatch.setattr(models_cli, "_synth", broken)
    assert main(["synth", "--rows", "1", "--out", "x.tsv"]) == 1


def test_check_names_the_extra_and_imports_nothing() -> None:
    check("json", "train", "json")  # installed: nothing happens
    with pytest.raises(MissingExtra) as e:
        check("lma_no_such_module", "train", "the thing")
    assert str(e.value) == (
        "the thing needs the [train] extra (module 'lma_no_such_module' is not installed):"
        " pip install 'lma-ctr[train]' (in a checkout: make setup)"
    )
    assert (e.value.extra, e.value.module) == ("train", "lma_no_such_module")


def test_extra_modules_are_the_modules_of_the_pyproject_extras() -> None:
    """EXTRA_MODULES[extra] holds one importable top-level module of each distribution the extra lists."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert set(EXTRA_MODULES) == {"train", "torchscript"}
    dist_of = importlib.metadata.packages_distributions()
    for extra, modules in EXTRA_MODULES.items():
        dists = {canonicalize_name(Requirement(r).name) for r in extras[extra]}
        owners = {m: {canonicalize_name(d) for d in dist_of.get(m, [])} for m in modules}
        assert all(owners.values()), owners  # every listed module is installed here and owned by a distribution
        assert set().union(*owners.values()) == dists, (extra, owners, dists)


def test_base_dependencies_are_the_serving_set() -> None:
    base = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}
    assert base == {
        "numpy", "onnxruntime-gpu", "onnxruntime", "fastapi", "uvicorn", "pydantic", "pydantic-settings", "orjson",
        "prometheus-client", "redis", "psutil", "httpx",
        "model-signing", "pyopenssl",  # the server verifies bundle signatures (pyOpenSSL: model-signing's undeclared)
        "numba",  # compiled kernels: the native predict body scan and packed-token keys (server), the data readers
    }  # fmt: skip
    train = PYPROJECT["project"]["optional-dependencies"]["train"]
    assert not base & {canonicalize_name(Requirement(r).name) for r in train}


# ----------------------------------------------------------------------------------------------------------
# Lock files


def load_lock_tool() -> Any:
    spec = importlib.util.spec_from_file_location("lma_lock", ROOT / "deploy" / "lock.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_lock(path: Path) -> dict[str, list[tuple[Version, Marker | None, int]]]:
    """name -> [(version, marker, number of hashes)] of a `uv pip compile --generate-hashes` file."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    pins: dict[str, list[tuple[Version, Marker | None, int]]] = {}
    for line in text.splitlines():
        if not line or line.lstrip().startswith("#"):
            continue
        spec = line.partition(" --hash")[0]
        req = Requirement(spec.strip())
        (specifier,) = req.specifier
        assert specifier.operator == "==", line
        hashes = len(re.findall(r"sha256:[0-9a-f]{64}", line))
        pins.setdefault(canonicalize_name(req.name), []).append((Version(specifier.version), req.marker, hashes))
    return pins


LINUX_311 = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
MACOS_311 = {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"}


def pinned(pins: dict[str, list[tuple[Version, Marker | None, int]]], name: str, env: dict[str, str]) -> Version | None:
    env = {"python_full_version": "3.11.7", "python_version": "3.11", "implementation_name": "cpython", **env}
    found = [v for v, marker, _ in pins.get(canonicalize_name(name), []) if marker is None or marker.evaluate(env)]
    assert len(found) <= 1, (name, found)
    return found[0] if found else None


@pytest.mark.parametrize("lock", ["serve.txt", "serve-cpu.txt", "dev.txt"])
def test_lock_pins_every_requirement_of_pyproject_with_hashes(lock: str) -> None:
    """A dependency added to pyproject.toml without `make lock` fails here (and `make setup`'s pip check)."""
    plan = load_lock_tool().PLAN
    assert set(plan) == {p.name for p in LOCKS.glob("*.txt") if not p.name.endswith(".overrides.txt")}
    pins = parse_lock(LOCKS / lock)
    assert all(n > 0 for versions in pins.values() for _, _, n in versions), "a pin without --hash"
    requirements = list(PYPROJECT["project"]["dependencies"])
    for extra in plan[lock]:
        requirements += PYPROJECT["project"]["optional-dependencies"][extra]
    constraints = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if line[:1].isalpha()
    )
    for env in (LINUX_311, MACOS_311):
        for text in requirements:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": "", **env}):
                continue
            name = canonicalize_name(req.name)
            if name == "torch" or (lock == "serve-cpu.txt" and name == "onnxruntime-gpu"):
                assert pinned(pins, name, env) is None, (lock, name)  # left out on purpose (overrides)
                continue
            version = pinned(pins, name, env)
            assert version is not None, f"{lock} pins no {name} for {env['sys_platform']}: run `make lock`"
            assert req.specifier.contains(version, prereleases=True), (lock, text, version)
            if name in constraints:
                assert version == Version(constraints[name]), (lock, name)


def test_cpu_lock_serves_with_plain_onnxruntime_everywhere() -> None:
    pins = parse_lock(LOCKS / "serve-cpu.txt")
    for env in (LINUX_311, MACOS_311):
        assert pinned(pins, "onnxruntime", env) is not None
        assert pinned(pins, "onnxruntime-gpu", env) is None
    assert pinned(parse_lock(LOCKS / "serve.txt"), "onnxruntime-gpu", LINUX_311) is not None
    # the override's bound is pyproject.toml's
    (override,) = [
        line for line in (LOCKS / "serve-cpu.overrides.txt").read_text().splitlines() if line.startswith("onnxruntime>")
    ]
    base = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    (ort,) = [r for r in base if r.name == "onnxruntime"]
    assert Requirement(override).specifier == ort.specifier
    for lock in ("serve.txt", "serve-cpu.txt"):
        assert {"torch", "matplotlib", "onnxscript", "safetensors"}.isdisjoint(parse_lock(LOCKS / lock)), lock


# ----------------------------------------------------------------------------------------------------------
# The lma command


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"lma-ctr {PYPROJECT['project']['version']}\n"


def test_usage_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--rows", "5", "--out", "/nonexistent-folder/x.tsv"]) == 2
    assert capsys.readouterr().err == "lma synth: error: output folder does not exist: /nonexistent-folder\n"
    with pytest.raises(SystemExit) as e:  # argparse's own usage errors: exit 2 too
        main(["synth", "--rows", "many", "--out", "x.tsv"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "lma synth: error: argument --rows: invalid int value: 'many'"


def test_unexpected_exception_exits_1_and_points_to_verbose(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: Any) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(models_cli, "_synth", broken)
    assert main(["synth", "--rows", "1", "--out", "x.tsv"]) == 1
    assert capsys.readouterr().err == (
        "lma synth: unexpected error: RuntimeError: boom (rerun with `lma -v synth ...` for the traceback)\n"
    )
    assert main(["-v", "synth", "--rows", "1", "--out", "x.tsv"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):\n")
    assert 'raise RuntimeError("boom")' in err
    assert err.endswith("lma synth: unexpected error: RuntimeError: boom (the traceback is above)\n")


def test_verbose_shows_the_traceback_of_a_usage_error_too(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-v", "synth", "--rows", "5", "--out", "/nonexistent-folder/x.tsv"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):\n")
    assert err.endswith("lma synth: error: output folder does not exist: /nonexistent-folder\n")


# ----------------------------------------------------------------------------------------------------------
# The README's request


def test_demo_prints_the_readme_curl_command() -> None:
    readme = (ROOT / "README.md").read_text()
    done = subprocess.run(
        [sys.executable, "deploy/demo_request.py", "--curl", "http://127.0.0.1:8000"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    first, second = done.stdout.splitlines()
    # the README writes the same command with two spaces less indentation
    assert f"{first.strip()}\n  {second.strip()}" in readme
    body = subprocess.run(
        [sys.executable, "deploy/demo_request.py", "--body"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    (instance,) = json.loads(body)["instances"]
    assert (len(instance["dense"]), len(instance["categorical"])) == (13, 26)  # the Criteo schema of the demo
    makefile = (ROOT / "Makefile").read_text()
    assert "@$(BIN)/python deploy/demo_request.py --curl http://$(HOST):$(PORT)" in makefile
