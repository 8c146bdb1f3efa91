"""CI smoke of the README's first command: `make demo` on a small data set, as a new user runs it.

    .venv/bin/python .ci/demo_smoke.py [--rows 4000] [--keep]

Runs `make demo-build` (the demo's own synth, train and export commands and presets, only fewer rows) into a
scratch folder, starts `lma serve` on it in the background on a free loopback port, waits for
/v2/health/ready (bounded), scores the README's own curl body (HTTP 200, probabilities in (0, 1)), scrapes
/metrics (the demo model's gauges and the request just made), then stops the server by its PID with SIGTERM
and expects a clean exit 0. The server is killed and the scratch folder removed whatever happens. Needs no
Redis and no network beyond loopback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

READY_TIMEOUT_S = 180.0  # model load + warm-up on a loaded 2-core machine; a healthy start takes seconds
STOP_TIMEOUT_S = 60.0


def say(line: str) -> None:
    sys.stdout.write(f"demo smoke: {line}\n")
    sys.stdout.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout_s: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def wait_ready(base: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before it was ready:\n{log.read_text()}")
        try:
            if get(f"{base}/v2/health/ready", timeout_s=2)[0] == 200:
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready within {READY_TIMEOUT_S:.0f} s:\n{log.read_text()}")


def check_metrics(base: str, within_s: float = 2.0) -> None:
    """The compression ratio, and the README request counted as a 200 of model demo.

    With several workers a scrape may reach another worker than the one that answered, whose counts reach
    the shared metrics within ``server.metrics.FLUSH_S`` (0.1 s): so the scrape is repeated for up to
    ``within_s`` before the missing count is an error.
    """
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + within_s
    while True:
        status, text = get(f"{base}/metrics")
        if status != 200:
            raise RuntimeError(f"GET /metrics: HTTP {status}")
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
        ratio = [
            s.value for s in samples if s.name == "lma_model_compression_ratio" and s.labels.get("model") == "demo"
        ]
        if not ratio or not ratio[0] > 1:
            raise RuntimeError(f"GET /metrics: lma_model_compression_ratio of model demo is {ratio}, expected > 1")
        answered = sum(
            s.value
            for s in samples
            if s.name == "lma_requests_total" and s.labels.get("model") == "demo" and s.labels.get("code") == "200"
        )
        if answered >= 1:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"GET /metrics: lma_requests_total counts no 200 answer of model demo within {within_s} s"
            )
        time.sleep(0.1)
    say(f"/metrics: compression ratio {ratio[0]:.2f}, {answered:.0f} request(s) of model demo answered 200")


def main() -> int:
    p = argparse.ArgumentParser(description="CI smoke of `make demo` (see the module docstring).")
    p.add_argument("--rows", type=int, default=4000, help="synthetic rows (the demo itself uses 100000)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (data, run, bundle, server log)")
    args = p.parse_args()
    work = ROOT / "data" / "ci-demo-smoke"  # git-ignored, inside the checkout like the demo's own folders
    shutil.rmtree(work, ignore_errors=True)
    server: subprocess.Popen[bytes] | None = None
    try:
        t0 = time.monotonic()
        subprocess.run(["make", "demo-build", f"DEMO_ROOT={work}", f"DEMO_ROWS={args.rows}"], cwd=ROOT, check=True)
        say(f"make demo-build ({args.rows} rows): {time.monotonic() - t0:.0f} s")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = work / "server.log"
        lma = str(ROOT / ".venv" / "bin" / "lma")
        cmd = [lma, "serve", str(work / "artifacts" / "demo"), "--host", "127.0.0.1", "--port", str(port)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMA_")}  # the demo's defaults
        with log.open("wb") as out:
            server = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        say(f"lma serve started, PID {server.pid}, port {port}")
        wait_ready(base, server, log)
        scored = subprocess.run(  # exit 1 unless HTTP 200 with probabilities in (0, 1)
            [sys.executable, "deploy/demo_request.py", "--score", base], cwd=ROOT, capture_output=True, text=True
        )
        if scored.returncode != 0:
            raise RuntimeError(f"the README's curl body: {scored.stderr.strip()}")
        say(f"README curl body: HTTP 200, {scored.stdout.strip()}")
        check_metrics(base)
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=STOP_TIMEOUT_S)
        if code != 0:
            raise RuntimeError(f"SIGTERM: the server exited with {code}, expected 0:\n{log.read_text()}")
        say("SIGTERM: the server drained and exited 0")
        server = None
        say("passed")
        return 0
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
