"""``GET /metrics``: the Prometheus exposition, as prometheus_client's own ASGI app serves it.

Text format 0.0.4, or OpenMetrics when the scraper's ``Accept`` asks for it; gzip when ``Accept-Encoding``
allows it; ``?name[]=...`` filters. The route stays a FastAPI route (it is in the OpenAPI document and goes
through the app's request wrapper); it runs ``Metrics.asgi_app`` and answers what that sends.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

router = APIRouter(tags=["operations"])


@router.get("/metrics", summary="Prometheus metrics (text or OpenMetrics, gzip when accepted)", response_class=Response)
async def metrics(request: Request) -> Response:
    metrics = request.app.state.metrics
    metrics.pending.flush()  # this process's counts, exact up to now
    app = getattr(request.app.state, "metrics_app", None)
    if app is None:
        app = request.app.state.metrics_app = metrics.asgi_app()
    sent: dict[str, Any] = {}

    async def send(message: Message) -> None:
        sent[message["type"]] = message

    await app(request.scope, request.receive, send)
    start, body = sent["http.response.start"], sent["http.response.body"]
    response = Response(body.get("body", b""), status_code=start["status"])
    response.raw_headers = [*start["headers"], (b"content-length", b"%d" % len(body.get("body", b"")))]
    return response
