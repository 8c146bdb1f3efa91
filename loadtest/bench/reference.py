"""The reference server ``lma bench --reference`` measures the project against: what a user would assemble from
stock parts in an afternoon.

FastAPI on uvicorn (httptools, uvloop), one process per core (uvicorn's ``--workers``), one ONNX Runtime
session per process on the same ``model.onnx`` with the server's session options
(:func:`export.onnx_runtime.session_options`, one intra-op thread: the processes share the cores), and one model
call per request, made inline on the event loop (for a graph this small, a thread hand-off costs more than
it frees). It gets the easy half of the work: keys already hashed and dense values already transformed
(``{"dense": [[...]], "keys": [[...]]}``, built by :func:`reference_body`), where the project's server
receives raw values, which is what users send. No batching across requests, no admission, no deadlines.

Run it: ``LMA_REFERENCE_MODEL=artifacts/demo/1/model.onnx uvicorn --factory
loadtest.bench.reference:app_from_env --workers 2 --http httptools --loop uvloop --no-access-log``.

The floor (:func:`floor_app`) is the other yardstick: a bare ASGI app on the same uvicorn stack that answers
every POST with a canned 503 without looking at it. No Python server on uvicorn answers for less, so its CPU
per answer is what any request costs here before any work is done, and the rate it can answer at all bounds
what a server of this kind can refuse on this machine (the overload targets at several times the capacity).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request, Response

READY_PATH = "/health"
PREDICT_PATH = "/predict"


def build_app(model: Path, threads: int = 1) -> FastAPI:
    from export.onnx_runtime import cpu_session

    session = cpu_session(model, threads)
    app = FastAPI(title="reference: FastAPI + ONNX Runtime, one model call per request")

    @app.get(READY_PATH)
    async def health() -> Response:
        return Response(b'{"ready":true}', media_type="application/json")

    @app.post(PREDICT_PATH)
    async def predict(request: Request) -> Response:
        body = orjson.loads(await request.body())
        dense = np.asarray(body["dense"], dtype=np.float32)
        keys = np.asarray(body["keys"], dtype=np.int64)
        probability, _ = session.run(None, {"dense": dense, "keys": keys})
        return Response(orjson.dumps({"predictions": probability.reshape(-1).tolist()}), media_type="application/json")

    return app


def app_from_env() -> FastAPI:
    """Factory for uvicorn: the graph of ``LMA_REFERENCE_MODEL``, ``LMA_REFERENCE_THREADS`` intra-op threads."""
    return build_app(Path(os.environ["LMA_REFERENCE_MODEL"]), int(os.environ.get("LMA_REFERENCE_THREADS", "1")))


def command(port: int, workers: int, factory: str = "app_from_env") -> list[str]:
    """The reference server's (or, with ``factory="floor_app"``, the floor's) command line on 127.0.0.1:``port``."""
    return [
        sys.executable, "-m", "uvicorn", "--factory", f"loadtest.bench.reference:{factory}",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        "--http", "httptools", "--loop", "uvloop", "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip


FLOOR_BODY = b'{"error":"overloaded; retry later","kind":"overloaded"}'
_FLOOR_START = {
    "type": "http.response.start",
    "status": 503,
    "headers": [
        (b"retry-after", b"1"), (b"content-length", b"%d" % len(FLOOR_BODY)), (b"content-type", b"application/json"),
    ],
}  # fmt: skip
_FLOOR_ANSWER = {"type": "http.response.body", "body": FLOOR_BODY}
_READY_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
_READY_ANSWER = {"type": "http.response.body", "body": b"{}"}


def floor_app() -> Any:
    """Factory for uvicorn: the floor, a bare ASGI app that answers every POST with a canned 503 (its body unread)
    and ``GET /health`` with 200."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["method"] == "POST":
            await send(_FLOOR_START)
            await send(_FLOOR_ANSWER)
        else:
            await send(_READY_START)
            await send(_READY_ANSWER)

    return app


def reference_body(dense: np.ndarray, keys: np.ndarray) -> bytes:
    """A request of the reference server: transformed dense values and hashed keys, rows as JSON arrays."""
    return orjson.dumps({"dense": dense.tolist(), "keys": keys.tolist()})


def reference_bodies(dense: np.ndarray, keys: np.ndarray, samples: int) -> list[bytes]:
    """Bodies of ``samples`` rows each, cut in order from the featurized rows ``dense`` / ``keys``."""
    n = dense.shape[0] // samples
    return [
        reference_body(dense[i * samples : (i + 1) * samples], keys[i * samples : (i + 1) * samples]) for i in range(n)
    ]


def response_problem(body: Any, expected: int) -> str | None:
    """What is wrong with a reference answer (None: ``expected`` probabilities in (0, 1))."""
    values: Sequence[Any] = body.get("predictions", ()) if isinstance(body, dict) else ()
    if len(values) != expected or not all(isinstance(v, float) and 0.0 < v < 1.0 for v in values):
        return f"expected {expected} probabilities, got {str(body)[:200]}"
    return None
