"""Every failure the server reports, sorted by kind; each kind maps to one HTTP status, here and only here.

Routes, the engine, the batcher and the feature store raise these; :meth:`server.http.Reply.error` (the
one renderer, used by the request wrapper and by the app's FastAPI exception handlers) turns them into
responses of one shape::

    {"error": "instances[2].categorical.C7: expected a string, an integer or null, got float",
     "kind": "invalid_input"}

``error`` is a string so that Open Inference Protocol v2 clients (tritonclient) read it as is; v2 routes
answer ``{"error": "..."}`` alone, as the OIP spec's error response has it, and bad input there is 400
(the spec's status for a request that cannot be inferred), where native routes answer 422:
:func:`status_of` is that one difference. Bad input is always a :class:`InvalidInput`, never a 500.
"""

from __future__ import annotations

from typing import ClassVar

RETRY_AFTER_S = 1


class ServingError(Exception):
    """Base of the errors the server answers with; ``status`` and ``kind`` are fixed per subclass.

    A subclass names them in its class line: ``class NotFound(ServingError, status=404, kind="not_found")``.
    """

    status: ClassVar[int] = 500
    kind: ClassVar[str] = "internal"

    def __init_subclass__(cls, status: int | None = None, kind: str | None = None, **kw: object) -> None:
        super().__init_subclass__(**kw)
        if status is not None:
            cls.status = status
        if kind is not None:
            cls.kind = kind

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}


class InvalidInput(ServingError, status=422, kind="invalid_input"):
    """The request does not fit the protocol or the model's feature schema (names instance and field)."""


class UnsupportedMediaType(ServingError, status=415, kind="unsupported_media_type"):
    """A body in an encoding the server cannot decode (RFC 9110 15.5.16)."""


class ModelNotFound(ServingError, status=404, kind="model_not_found"):
    """No model of that name is loaded, or not that version of it."""


class EntityNotFound(ServingError, status=404, kind="entity_not_found"):
    """An instance names a feature-store entity with nothing stored (and did not ask for defaults)."""


class PayloadTooLarge(ServingError, status=413, kind="too_large"):
    """More instances or body bytes than the server takes in one request."""


class Unauthorized(ServingError, status=401, kind="unauthorized"):
    """No credentials where the admin API needs them."""

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(ServingError, status=403, kind="forbidden"):
    """Wrong credentials, or the admin API is disabled."""


class _RetryLater(ServingError, status=503):
    """Answered with Retry-After: the same request may succeed a moment later."""

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)}


class Overloaded(_RetryLater, kind="overloaded"):
    """The request cannot be answered within its deadline (or the queue is full): refused at once, before any work."""


class NotReady(_RetryLater, kind="not_ready"):
    """No model loaded yet, or the server is shutting down."""


class FeatureStoreUnavailable(_RetryLater, kind="feature_store_unavailable"):
    """The request needs stored features and the feature store cannot deliver them."""


class DeadlineExceeded(ServingError, status=504, kind="deadline_exceeded"):
    """The request's deadline (LMA_REQUEST_TIMEOUT_MS) passed before it reached the model."""


class BodyTimeout(ServingError, status=408, kind="request_timeout"):
    """The request's body did not arrive by its deadline; the connection is closed (RFC 9110 15.5.9)."""

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class ReloadFailed(ServingError, status=422, kind="reload_failed"):
    """A new model version was refused; the previous one keeps serving."""


class InferenceFailed(ServingError, status=500, kind="inference_failed"):
    """The runtime failed on a batch; only that batch's requests get this."""


class HttpError(ServingError, kind="http_error"):
    """A routing-level refusal from the framework (unknown path, method not allowed, bad path parameter)."""

    def __init__(self, message: str, status: int, kind: str = "http_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.http_status = status
        self.kind = kind  # type: ignore[misc]
        self._headers = headers or {}

    def headers(self) -> dict[str, str]:
        return self._headers


class ClientDisconnected(ServingError, status=499, kind="client_disconnected"):
    """The client went away before its answer was ready (logged and counted as 499, never sent)."""


def status_of(exc: ServingError, protocol: str = "native") -> int:
    """The HTTP status of ``exc`` on a route of ``protocol`` ("native" or "v2")."""
    if protocol == "v2" and isinstance(exc, InvalidInput):
        return 400
    if isinstance(exc, HttpError):
        return exc.http_status
    return exc.status
