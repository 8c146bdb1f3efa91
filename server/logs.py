"""Structured logs: one JSON object per line, never request payloads.

``configure_logging`` installs :class:`JsonFormatter` on the root logger (the CLI and
``app_from_env`` call it; :func:`server.app.build_app` leaves logging alone so tests and embedding
applications keep theirs). Fields passed with ``extra={"fields": {...}}`` become top-level keys.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

import orjson

# The id of the request being served, in the task (context) that serves it: every log line written while
# serving it carries it, whichever module writes it. Set by the request wrapper (server.app.LmaApp).
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("lma_request_id", default=None)
_factory = logging.getLogRecordFactory()


def _record_with_request_id(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _factory(*args, **kwargs)
    record.request_id = request_id.get()
    return record


logging.setLogRecordFactory(_record_with_request_id)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid is not None:
            entry["request_id"] = rid
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):  # route uvicorn's own lines through ours
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # The server writes its own access lines. uvicorn formats its line whenever the logger has a handler
    # anywhere up the tree (client address, quoted path: ~1.5% of the server's time in py-spy), so this one
    # has none and does not propagate.
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.handlers[:] = []
    uvicorn_access.propagate = False
    uvicorn_access.disabled = True
