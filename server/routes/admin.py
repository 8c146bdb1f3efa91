"""Admin routes: bearer ``LMA_ADMIN_TOKEN``; disabled (403) when no token is configured."""

from __future__ import annotations

import hmac

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from server import schemas
from server.errors import Forbidden, InvalidInput, ReloadFailed, Unauthorized
from server.http import json_response, request_context
from server.routes.deps import engine_of, json_object, settings_of

router = APIRouter(tags=["admin"])
_RELOAD_KEYS = frozenset(("path", "version"))


def require_admin(request: Request) -> None:
    token = settings_of(request).admin_token
    if token is None:
        raise Forbidden("the admin API is disabled: set LMA_ADMIN_TOKEN to enable it")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("admin route: send 'Authorization: Bearer <LMA_ADMIN_TOKEN>'")
    if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise Forbidden("admin route: invalid token")


@router.post(
    "/v1/models/{name}:reload",
    summary="Hot-swap a model to another bundle (default: the repository's latest version)",
    openapi_extra=schemas.body(schemas.ReloadRequest, required=False),
    responses=schemas.responses(schemas.ReloadResponse, 401, 403, 404, 422),
)
async def reload(name: str, request: Request) -> Response:
    require_admin(request)
    engine = engine_of(request)
    engine.model(name)  # 404 before reading anything else
    request_context(request).model = name
    body = await json_object(request, _RELOAD_KEYS)
    for key in _RELOAD_KEYS:
        if body.get(key) is not None and type(body[key]) is not str:
            raise InvalidInput(f"body.{key}: expected a string")
    result = await engine.reload(name, path=body.get("path"), version=body.get("version"))
    request_context(request).version = result.version or ""
    if not result.ok:
        raise ReloadFailed(f"model {name!r}: {result.message}; version {result.version} keeps serving")
    return json_response(result.to_dict())
