"""Structured logs: one JSON object per line, never request payloads.

``configure_logging`` installs :class:`JsonLinesHandler` (with :class:`JsonFormatter`) on the root logger
(the CLI and ``app_from_env`` call it; :func:`server.app.build_app` leaves logging alone so tests and
embedding applications keep theirs). Fields passed with ``extra={"fields": {...}}`` become top-level keys.

Writers of many lines (the access log) format them with :func:`json_line` and hand them to
:meth:`JsonLinesHandler.write_lines`, which writes them a few kilobytes at a time, each write at most
``PIPE_BUF`` bytes cut at a line end: the workers share one stderr, and only writes of at most
``PIPE_BUF`` bytes to a pipe are atomic, so a longer write could interleave with another worker's mid-line.
"""

from __future__ import annotations

import contextvars
import logging
import select
import sys
import time
from collections.abc import Iterator, Sequence
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


PIPE_BUF = select.PIPE_BUF  # the longest write to a pipe that POSIX keeps whole (4,096 bytes on Linux)


_second: tuple[int, str] = (-1, "")  # the last second formatted, and its text: lines come many per second


def timestamp(created: float, millis: int | None = None) -> str:
    """``created`` (seconds since the epoch) as the lines' ``ts``: UTC, milliseconds (``millis``, else from
    ``created``), ``Z``."""
    global _second
    whole = int(created)
    second, text = _second
    if whole != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = (whole, text)  # one tuple: a thread reading it never sees half of an update
    if millis is None:
        millis = int((created - whole) * 1000)
    return f"{text}.{millis:03d}Z"


def json_entry(
    ts: str, level: str, logger: str, msg: str, request_id: str | None, fields: dict[str, Any] | None
) -> dict[str, Any]:
    """One log line's keys, in order: the one layout of every line, whoever writes it."""
    entry: dict[str, Any] = {"ts": ts, "level": level, "logger": logger, "msg": msg}
    if request_id is not None:
        entry["request_id"] = request_id
    if fields:
        entry.update(fields)
    return entry


def json_line(entry: dict[str, Any]) -> bytes:
    """An entry's JSON, without the newline."""
    return orjson.dumps(entry, default=str)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = json_entry(
            timestamp(record.created, int(record.msecs)), record.levelname.lower(), record.name, record.getMessage(),
            getattr(record, "request_id", None), getattr(record, "fields", None),
        )  # fmt: skip
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json_line(entry).decode()


def pipe_chunks(lines: Sequence[bytes], limit: int = PIPE_BUF) -> Iterator[bytes]:
    """``lines`` joined, each followed by a newline, in order, cut at line ends into chunks of at most ``limit``
    bytes; a line longer than that is a chunk of its own."""
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        n = len(line) + 1
        if chunk and size + n > limit:
            yield b"\n".join(chunk) + b"\n"
            chunk, size = [], 0
        chunk.append(line)
        size += n
    if chunk:
        yield b"\n".join(chunk) + b"\n"


class JsonLinesHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """JSON lines on a stream (stderr): one record at a time like any handler, or many at once."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self.setFormatter(JsonFormatter())

    def write_lines(self, lines: Sequence[bytes]) -> int:
        """Write lines made by :func:`json_line`, one ``write`` (and flush) per :func:`pipe_chunks` chunk, taking
        the handler's lock per chunk (a record logged meanwhile waits for one chunk, not the batch). A failing
        stream is reported once through :meth:`handleError`, as a failing record is. Returns how many lines were
        not written (those of the failed chunk and after)."""
        written = 0
        try:
            for chunk in pipe_chunks(lines):
                with self.lock:  # type: ignore[union-attr]
                    stream = self.stream
                    stream.flush()  # what another writer left in the stream's buffer goes out first, alone
                    stream.write(chunk.decode())
                    stream.flush()
                written += chunk.count(b"\n")  # one per line: JSON escapes newlines inside strings
        except Exception:
            message = f"{len(lines) - written} access-log lines not written"
            record = logging.LogRecord("lma.server.access", logging.ERROR, __file__, 0, message, (), None)
            self.handleError(record)
        return len(lines) - written


def lines_handler(logger: logging.Logger, level: int) -> JsonLinesHandler | None:
    """The handler that a record of ``level`` from ``logger`` would reach, when it is the only one, a
    :class:`JsonLinesHandler` with its own formatter and terminator, and no filter of ``logger`` or of the
    handler would see the record: lines written with its ``write_lines`` then come out as records would.
    None otherwise. (Logging applies the filters of the logger a record starts at, not of its parents.)"""
    if logger.disabled or logger.filters or not logger.isEnabledFor(level):
        return None
    found: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        found.extend(current.handlers)
        if not current.propagate:
            break
        current = current.parent
    if len(found) != 1 or type(found[0]) is not JsonLinesHandler:
        return None
    handler = found[0]
    if level < handler.level or handler.filters or type(handler.formatter) is not JsonFormatter:
        return None
    return handler if handler.terminator == "\n" else None


def configure_logging(level: str = "info") -> None:
    handler = JsonLinesHandler(sys.stderr)
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
