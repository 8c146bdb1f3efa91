"""The access log: lines formatted on the event loop, written by a thread in batches of pipe-atomic writes.

- the chunks of a batch are exact: every line whole, in order, none longer than ``PIPE_BUF`` unless one line is;
- a line written in a batch is the very text the formatter makes of the same line as a record;
- with any other handler in the way (caplog, an embedding app's), each line is a record, with its finish time;
- a stalled stream drops lines past the bound and counts them, as a failing stream's; a failed batch does not
  stop the thread; nothing is written below the logger's level;
- four processes writing at once into one pipe (the workers' shared stderr) never interleave mid-line.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import time

import orjson
import pytest
from prometheus_client import CollectorRegistry, Counter

from server.http import AccessLog, RequestContext, access_line, access_log
from server.logs import PIPE_BUF, JsonFormatter, JsonLinesHandler, lines_handler, pipe_chunks, timestamp

ROUTE = "/v1/models/{name}:predict"


def _line(i: int, finished: float = 1_700_000_000.25, status: int = 200) -> bytes:
    ctx = RequestContext(f"req-{i}")
    ctx.model, ctx.version = "criteo", "1"
    ctx.timings["parse_ms"] = 0.0001234
    return access_line(finished, "POST", ROUTE, ctx, status, 0.0015)


@pytest.fixture
def own() -> tuple[logging.Logger, io.StringIO]:
    """An access logger of its own writing only to a JsonLinesHandler on a StringIO (the lines' direct path).

    Made outside logging's registry, so that pytest's capture handlers (which it adds to every registered
    logger that does not propagate) stay off it."""
    stream = io.StringIO()
    logger = logging.Logger(access_log.name, logging.INFO)
    logger.addHandler(JsonLinesHandler(stream))
    return logger, stream


def test_a_batch_is_cut_at_line_ends_into_pipe_atomic_chunks() -> None:
    lines = [b"a" * 9, b"b" * 9, b"c" * 25, b"d" * 4, b"e" * 4]
    assert PIPE_BUF >= 512  # POSIX's least; Linux: 4,096
    assert list(pipe_chunks(lines, limit=20)) == [
        b"a" * 9 + b"\n" + b"b" * 9 + b"\n",
        b"c" * 25 + b"\n",
        b"dddd\neeee\n",
    ]
    assert list(pipe_chunks([], limit=20)) == []
    many = [b"x" * n for n in (100, 3000, 995, 1, 4095, 4096, 17, 2000, 2000, 96)]
    chunks = list(pipe_chunks(many, limit=4096))
    assert b"".join(chunks) == b"".join(x + b"\n" for x in many)
    assert all(c.endswith(b"\n") for c in chunks)
    assert [len(c) for c in chunks] == [3102, 998, 4096, 4097, 4020, 97]  # 4097: the one line of 4096 bytes


def test_timestamps_are_utc_with_milliseconds_across_seconds() -> None:
    for t, text in [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1_700_000_000.9995, "2023-11-14T22:13:20.999Z"),
        (1_700_000_001.0, "2023-11-14T22:13:21.000Z"),
        (1_700_000_000.25, "2023-11-14T22:13:20.250Z"),  # back to an earlier second: not the cached one
    ]:
        assert timestamp(t) == text


def test_only_a_lone_json_lines_handler_takes_lines_directly(own: tuple[logging.Logger, io.StringIO]) -> None:
    logger, _ = own
    (handler,) = logger.handlers
    assert lines_handler(logger, logging.INFO) is handler
    logger.disabled = True
    assert lines_handler(logger, logging.INFO) is None
    logger.disabled = False
    handler.setLevel(logging.WARNING)
    assert lines_handler(logger, logging.INFO) is None
    handler.setLevel(logging.NOTSET)
    logger.addFilter(lambda r: True)
    assert lines_handler(logger, logging.INFO) is None
    logger.filters.clear()
    handler.addFilter(lambda r: True)
    assert lines_handler(logger, logging.INFO) is None
    handler.filters.clear()
    formatter = handler.formatter
    handler.setFormatter(type("WithHost", (JsonFormatter,), {})())  # a subclass may add keys: records only
    assert lines_handler(logger, logging.INFO) is None
    handler.setFormatter(formatter)
    handler.terminator = "\r\n"
    assert lines_handler(logger, logging.INFO) is None
    handler.terminator = "\n"
    logger.addHandler(logging.StreamHandler(io.StringIO()))
    assert lines_handler(logger, logging.INFO) is None
    logger.handlers[:] = [logging.StreamHandler(io.StringIO())]  # a plain one formats records its own way
    assert lines_handler(logger, logging.INFO) is None
    logger.handlers[:] = [handler]
    assert lines_handler(logger, logging.INFO) is handler
    assert lines_handler(access_log, logging.INFO) is None  # under pytest, its capture handlers are in the way


def test_logging_disable_takes_the_lines_too(own: tuple[logging.Logger, io.StringIO]) -> None:
    logger, _ = own  # first call on this logger: nothing cached by isEnabledFor yet
    logging.disable(logging.INFO)
    try:
        assert lines_handler(logger, logging.INFO) is None
    finally:
        logging.disable(logging.NOTSET)


def test_the_handler_may_sit_on_a_parent(own: tuple[logging.Logger, io.StringIO]) -> None:
    parent, _ = own
    (handler,) = parent.handlers
    child = logging.Logger(access_log.name + ".child")
    child.parent = parent
    assert lines_handler(child, logging.INFO) is handler
    parent.addFilter(lambda r: False)  # logging applies the filters of the logger a record starts at only
    assert lines_handler(child, logging.INFO) is handler
    child.propagate = False
    assert lines_handler(child, logging.INFO) is None


def test_lines_written_in_a_batch_are_what_the_formatter_makes_of_records(
    own: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = own
    log = AccessLog(interval=3600, logger=logger)  # nothing is written until close
    finished = [1_700_000_000.25 + i * 0.4 for i in range(40)]  # spans several seconds
    for i, t in enumerate(finished):
        log.write(t, _line(i, t, status=200 if i % 3 else 503))
    assert stream.getvalue() == ""
    log.close()
    written = stream.getvalue().splitlines()
    assert len(written) == 40
    first = orjson.loads(written[0])
    assert list(first) == [
        "ts", "level", "logger", "msg", "request_id", "method", "route", "model", "version", "status",
        "duration_ms", "parse_ms",
    ]  # fmt: skip
    assert (first["ts"], first["request_id"], first["status"], first["duration_ms"], first["parse_ms"]) == (
        "2023-11-14T22:13:20.250Z", "req-0", 503, 1.5, 0.123,
    )  # fmt: skip
    # the same line as a record, through the formatter every other line goes through: the same text
    formatter = JsonFormatter()
    for i, (t, text) in enumerate(zip(finished, written, strict=True)):
        fields = orjson.loads(text)
        for key in ("ts", "level", "logger", "msg"):
            del fields[key]
        record = logging.LogRecord(access_log.name, logging.INFO, __file__, 0, "request", (), None)
        record.created, record.msecs, record.fields, record.request_id = t, int((t - int(t)) * 1000), fields, None
        assert formatter.format(record) == text, i


def test_with_another_handler_each_line_is_a_record_with_its_finish_time(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lma.server.access"):
        log = AccessLog(interval=3600)
        log.write(1_700_000_000.25, _line(7))
        log.close()
    (record,) = [r for r in caplog.records if r.name == "lma.server.access"]
    assert (record.threadName, record.created, record.msecs, record.getMessage()) == (
        "lma-access-log", 1_700_000_000.25, 250, "request",
    )  # fmt: skip
    assert record.fields == {  # type: ignore[attr-defined]
        "request_id": "req-7", "method": "POST", "route": ROUTE, "model": "criteo", "version": "1", "status": 200,
        "duration_ms": 1.5, "parse_ms": 0.123,
    }  # fmt: skip


def test_lines_past_the_bound_are_dropped_and_counted(
    own: tuple[logging.Logger, io.StringIO], caplog: pytest.LogCaptureFixture
) -> None:
    logger, stream = own
    registry = CollectorRegistry()
    log = AccessLog(Counter("dropped", "lines dropped", registry=registry), interval=3600, max_queued=3, logger=logger)
    for i in range(5):
        log.write(1_700_000_000.25, _line(i))
    with caplog.at_level(logging.WARNING, logger="lma.server"):
        log.close()
    assert [orjson.loads(x)["request_id"] for x in stream.getvalue().splitlines()] == ["req-0", "req-1", "req-2"]
    assert registry.get_sample_value("dropped_total") == 2
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.fields == {"queue_full": 2, "not_written": 0, "max_queued": 3}  # type: ignore[attr-defined]


class _Failing(io.StringIO):
    """A stream whose writes fail while ``broken``."""

    broken = True

    def write(self, text: str) -> int:
        if self.broken:
            raise OSError(32, "Broken pipe")
        return super().write(text)


def test_lines_a_failing_stream_did_not_take_are_counted(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = _Failing()
    logger = logging.Logger(access_log.name, logging.INFO)
    logger.addHandler(JsonLinesHandler(stream))
    registry = CollectorRegistry()
    log = AccessLog(Counter("dropped", "lines dropped", registry=registry), interval=3600, logger=logger)
    for i in range(3):
        log.write(1_700_000_000.25, _line(i))
    with caplog.at_level(logging.WARNING, logger="lma.server"):
        log.close()
    assert registry.get_sample_value("dropped_total") == 3
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.fields == {"queue_full": 0, "not_written": 3, "max_queued": 65_536}  # type: ignore[attr-defined]
    err = capsys.readouterr().err  # logging's own report of a failing handler, as for a record
    assert "--- Logging error ---" in err and "Broken pipe" in err and "3 access-log lines not written" in err


def test_the_thread_lives_on_when_a_batch_fails(own: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = own

    class Raising:
        def inc(self, n: int) -> None:
            raise OSError("the metrics file is gone")

    log = AccessLog(Raising(), interval=0.01, max_queued=1, logger=logger)
    try:
        log.write(1_700_000_000.25, _line(0))
        log.write(1_700_000_000.25, _line(1))  # refused: the queue is full, and counting it raises
        time.sleep(0.1)
        log.write(1_700_000_000.25, _line(2))
        deadline = time.monotonic() + 10
        while "req-2" not in stream.getvalue():
            assert time.monotonic() < deadline, "the thread stopped writing"
            time.sleep(0.01)
    finally:
        log.close()
    assert [orjson.loads(x)["request_id"] for x in stream.getvalue().splitlines()] == ["req-0", "req-2"]


def test_nothing_is_written_below_the_loggers_level(own: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = own
    logger.setLevel(logging.WARNING)
    log = AccessLog(interval=3600, logger=logger)
    log.write(1_700_000_000.25, _line(0))
    log.close()
    assert stream.getvalue() == ""


def test_the_thread_writes_while_requests_keep_coming(own: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = own
    log = AccessLog(interval=0.01, logger=logger)
    try:
        log.write(1_700_000_000.25, _line(0))
        deadline = time.monotonic() + 10
        while not stream.getvalue():
            assert time.monotonic() < deadline, "no line written before close"
            time.sleep(0.01)
        assert orjson.loads(stream.getvalue())["request_id"] == "req-0"
    finally:
        log.close()


def test_with_nothing_queued_the_thread_sleeps_until_a_line_comes(own: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = own
    log = AccessLog(interval=0.001, logger=logger)
    try:
        for i in range(3):  # each time: idle (waiting on its event, not waking every interval), then woken by a line
            deadline = time.monotonic() + 10
            while not log._idle:
                assert time.monotonic() < deadline, "the thread never went idle"
                time.sleep(0.005)
            log.write(1_700_000_000.25, _line(i))
            while f"req-{i}" not in stream.getvalue():
                assert time.monotonic() < deadline, "the line was not written"
                time.sleep(0.005)
    finally:
        log.close()
    assert not log._thread.is_alive()
    assert [orjson.loads(x)["request_id"] for x in stream.getvalue().splitlines()] == ["req-0", "req-1", "req-2"]


_WRITER = """
import logging, sys, time
from server.http import AccessLog, RequestContext, access_line, access_log
from server.logs import configure_logging, lines_handler
configure_logging("info")
assert lines_handler(access_log, logging.INFO) is not None  # the batched path, as in `lma serve`
worker, lines = sys.argv[1], int(sys.argv[2])
log = AccessLog(interval=0.002)
for i in range(lines):
    ctx = RequestContext(f"{worker}-{i}-" + "x" * (i * 37 % 700))  # lines of 250 to 950 bytes
    ctx.model, ctx.version = "criteo", "1"
    log.write(time.time(), access_line(time.time(), "POST", "/r", ctx, 200, 0.001))
    if i % 500 == 0:
        time.sleep(0.003)  # let batches of every size form
log.close()
"""


@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["PYTHONUNBUFFERED=1", "buffered stderr"])
def test_workers_sharing_one_pipe_never_interleave_mid_line(unbuffered: str) -> None:
    read_end, write_end = os.pipe()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONUNBUFFERED": unbuffered}
    lines = 4000
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, f"w{k}", str(lines)], stderr=write_end, env=env)
        for k in range(4)
    ]
    os.close(write_end)
    data = bytearray()
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(1500):  # a slow reader: the pipe fills and writers block mid-batch
            data += chunk
            time.sleep(0.0002)
    assert [w.wait(timeout=60) for w in writers] == [0, 0, 0, 0]
    seen: dict[str, list[int]] = {f"w{k}": [] for k in range(4)}
    for text in data.decode().splitlines():
        entry = orjson.loads(text)  # a line cut by another worker's write would not parse
        worker, i, _ = entry["request_id"].split("-")
        seen[worker].append(int(i))
    assert seen == {f"w{k}": list(range(lines)) for k in range(4)}
