"""What every route needs from the app: the engine, the settings, and the request's JSON body."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from server.engine import Engine
from server.featurize import parse_json_object
from server.http import read_body
from server.settings import Settings


def engine_of(request: Request) -> Engine:
    return request.app.state.engine  # type: ignore[no-any-return]


def settings_of(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def json_object(request: Request, allowed: frozenset[str], required: str | None = None) -> dict[str, Any]:
    """The body as a JSON object with only ``allowed`` keys (an empty body is ``{}``)."""
    return parse_json_object(await read_body(request, settings_of(request).max_body_bytes), allowed, required)
