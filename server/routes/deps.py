"""What every route needs from the app: the engine, the settings, and the request's JSON body."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

from server.engine import Engine
from server.errors import InvalidInput
from server.featurize import json_type
from server.http import read_body
from server.settings import Settings


def engine_of(request: Request) -> Engine:
    return request.app.state.engine  # type: ignore[no-any-return]


def settings_of(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def json_object(request: Request, allowed: frozenset[str], required: str | None = None) -> dict[str, Any]:
    """The body as a JSON object with only ``allowed`` keys (an empty body is ``{}``)."""
    return parse_json_object(await read_body(request, settings_of(request).max_body_bytes), allowed, required)


def parse_json_object(body: bytes, allowed: frozenset[str], required: str | None = None) -> dict[str, Any]:
    """``body`` as a JSON object with only ``allowed`` keys (empty: ``{}`` unless a key is ``required``)."""
    if required is None and not body.strip():
        return {}
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"body: not valid JSON ({e})") from None
    if type(obj) is not dict:
        raise InvalidInput(f"body: expected an object, got {json_type(obj)}")
    if not obj.keys() <= allowed:
        raise InvalidInput(f"body: unknown key {sorted(set(obj) - allowed)[0]!r}; expected {sorted(allowed)}")
    if required is not None and required not in obj:
        raise InvalidInput(f"body: {required!r} is missing")
    return obj
