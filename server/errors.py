"""Every failure the server reports, sorted by kind; each kind maps to one HTTP status, here and only here.

Routes, the engine, the batcher and the feature store raise these; :func:`register_error_handlers`
(called by the app factory) turns them into responses of one shape::

    {"error": "instances[2].categorical.C7: expected a string, an integer or null, got float",
     "kind": "invalid_input"}

``error`` is a string so that Open Inference Protocol v2 clients (tritonclient) read it as is.
Bad input is always a :class:`InvalidInput` (422), never a 500.
"""

from __future__ import annotations

from typing import ClassVar

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

RETRY_AFTER_S = 1


class ServingError(Exception):
    """Base of the errors the server answers with; ``status`` and ``kind`` are fixed per subclass."""

    status: ClassVar[int] = 500
    kind: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}


class InvalidInput(ServingError):
    """The request does not fit the protocol or the model's feature schema (names instance and field)."""

    status = 422
    kind = "invalid_input"


class ModelNotFound(ServingError):
    status = 404
    kind = "model_not_found"


class EntityNotFound(ServingError):
    """An instance names a feature-store entity with nothing stored (and did not ask for defaults)."""

    status = 404
    kind = "entity_not_found"


class PayloadTooLarge(ServingError):
    status = 413
    kind = "too_large"


class Unauthorized(ServingError):
    """No credentials where the admin API needs them."""

    status = 401
    kind = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(ServingError):
    """Wrong credentials, or the admin API is disabled."""

    status = 403
    kind = "forbidden"


class _RetryLater(ServingError):
    status = 503

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)}


class Overloaded(_RetryLater):
    """The model's queue is full: rejected at once, before any work."""

    kind = "overloaded"


class NotReady(_RetryLater):
    """No model loaded yet, or the server is shutting down."""

    kind = "not_ready"


class FeatureStoreUnavailable(_RetryLater):
    """The request needs stored features and the feature store cannot deliver them."""

    kind = "feature_store_unavailable"


class DeadlineExceeded(ServingError):
    """The request's deadline (LMA_REQUEST_TIMEOUT_MS) passed before it reached the model."""

    status = 504
    kind = "deadline_exceeded"


class ReloadFailed(ServingError):
    """A new model version was refused; the previous one keeps serving."""

    status = 422
    kind = "reload_failed"


class InferenceFailed(ServingError):
    """The runtime failed on a batch; only that batch's requests get this."""

    status = 500
    kind = "inference_failed"


class ClientDisconnected(ServingError):
    """The client went away before its answer was ready (logged and counted as 499, never sent)."""

    status = 499
    kind = "client_disconnected"


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps({"error": message, "kind": kind})
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def serving_error_response(exc: ServingError) -> Response:
    return error_response(exc.status, exc.kind, exc.message, exc.headers())


async def _on_serving_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServingError)
    return serving_error_response(exc)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    # Only path and query parameters are declared to FastAPI (bodies are parsed by hand).
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"])
    return error_response(422, InvalidInput.kind, f"{where}: {first['msg']}" if where else str(first["msg"]))


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    kind = "not_found" if exc.status_code == 404 else "http_error"
    return error_response(exc.status_code, kind, str(exc.detail), dict(exc.headers or {}))


def register_error_handlers(app: FastAPI) -> None:
    """The one place error kinds become statuses (unexpected exceptions: see :mod:`server.http`)."""
    app.add_exception_handler(ServingError, _on_serving_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
