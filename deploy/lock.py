"""`make lock`: rewrite the lock files in deploy/locks/ from pyproject.toml (and constraints.txt) with uv.

    make lock                         # after editing pyproject.toml: pins what is new, keeps every other pin
    make lock ARGS=--upgrade          # move every pin to the newest release the ranges allow
    .venv/bin/python deploy/lock.py --check   # exit 1 if a lock no longer matches pyproject.toml

Each lock is universal (one file for Linux, macOS and Windows, x86-64 and ARM: markers choose per machine)
for Python 3.11, with the sha256 of every file, so `pip install --require-hashes -r LOCK` installs the same
bytes everywhere:

- ``serve.txt``: the base install (the serving set), as ``pip install lma-ctr`` resolves it: onnxruntime-gpu on
  Linux x86-64. The GPU image installs it.
- ``serve-cpu.txt``: the same with plain onnxruntime in place of onnxruntime-gpu (17 MB against 347 MB): the
  CPU image installs it.
- ``dev.txt``: base + every extra (train, torchscript, dev), *without torch*: `make setup` installs torch first
  from constraints.txt (the pinned CPU build, from a local file or the PyTorch CPU index, neither of which the
  lock can name for every machine), then this lock, then the project with ``--no-deps``.

Why uv and not pip-tools (measured on the 2-core machine, serving set, same versions resolved; the commands are
in README "Extras, lock and image"): ``uv pip compile --generate-hashes`` took 0.8 s with a cold cache and 0.6 s
warm, ``pip-compile --generate-hashes`` 82 s and 71 s; and only uv resolves for every platform at once
(``--universal``; pip-tools locks the interpreter's platform only) and can replace one package by another
(``--override``, needed for serve-cpu.txt). uv comes with the [dev] extra, pinned by dev.txt itself.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "deploy" / "locks"
PYTHON_VERSION = "3.11"


# lock file -> extras; deploy/locks/NAME.overrides.txt, where there is one, replaces requirements (a marker that
# never holds removes a package).
PLAN: dict[str, list[str]] = {
    "serve.txt": [],
    "serve-cpu.txt": [],
    "dev.txt": ["train", "torchscript", "dev"],
}


def overrides_of(name: str) -> Path | None:
    path = LOCKS / name.replace(".txt", ".overrides.txt")
    return path if path.exists() else None


def compile_lock(uv: str, name: str, out: Path, upgrade: bool) -> None:
    cmd = [uv, "pip", "compile", "pyproject.toml", "--quiet", "--universal", "--python-version", PYTHON_VERSION]
    cmd += ["--generate-hashes", "--constraint", "constraints.txt", "--custom-compile-command", "make lock"]
    overrides = overrides_of(name)
    if overrides is not None:
        cmd += ["--override", str(overrides.relative_to(ROOT))]
    for extra in PLAN[name]:
        cmd += ["--extra", extra]
    if upgrade:
        cmd.append("--upgrade")
    cmd += ["-o", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upgrade", action="store_true", help="newest releases the ranges allow (default: keep pins)")
    p.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 if a lock would change")
    args = p.parse_args()
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        raise SystemExit("uv is not installed: it comes with the [dev] extra (make setup)")
    LOCKS.mkdir(parents=True, exist_ok=True)
    stale = []
    for name in PLAN:
        target = LOCKS / name
        if not args.check:
            compile_lock(uv, name, target, args.upgrade)
            print(f"wrote {target.relative_to(ROOT)}")
            continue
        with tempfile.TemporaryDirectory(prefix="lma-lock-") as tmp:
            fresh = Path(tmp) / name
            if target.exists():
                shutil.copy(target, fresh)  # uv keeps the pins of the file it rewrites
            compile_lock(uv, name, fresh, upgrade=False)
            old = target.read_text().splitlines() if target.exists() else []
            diff = list(difflib.unified_diff(old, fresh.read_text().splitlines(), str(target), "fresh", lineterm=""))
            if diff:
                stale.append(name)
                print("\n".join(diff[:40]))
    if stale:
        print(f"stale lock files: {', '.join(stale)}; run `make lock`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
