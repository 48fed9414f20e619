from __future__ import annotations

import io
import json
import logging
import threading
import time

import pytest

from sidecar.logs import (
    TEXT_FORMAT,
    WORKER_TEXT_FORMAT,
    BufferedStreamHandler,
    JsonFormatter,
    TextFormatter,
    _TextFields,
    log_transaction,
    shutdown_logging,
    transaction_log,
)


def test_text_line_quotes_only_what_needs_it(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sidecar.transaction"):
        log_transaction({"session": "1a", "reply": "250 2.0.0 queued as X", "tls": None})
    assert caplog.messages == ['transaction session=1a reply="250 2.0.0 queued as X" tls=-']


def test_json_line_carries_the_fields(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sidecar.transaction"):
        log_transaction({"session": "1a", "bytes": 239})
    entry = json.loads(JsonFormatter().format(caplog.records[0]))
    assert entry["session"] == "1a" and entry["bytes"] == 239
    assert entry["level"] == "info" and entry["logger"] == "sidecar.transaction"
    assert entry["time"].endswith("Z")


def test_text_line_of_numbers_none_and_awkward_strings(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sidecar.transaction"):
        log_transaction(
            {"bytes": 239, "duration": 0.5, "site": None, "empty": "", "q": 'a"b', "eq": "k=v"}
        )
    assert caplog.messages == [
        'transaction bytes=239 duration=0.5 site=- empty="" q="a\\"b" eq="k=v"'
    ]


def test_json_transaction_message_does_not_repeat_the_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="sidecar.transaction"):
        log_transaction({"session": "1a", "outcome": "delivered"})
    entry = json.loads(JsonFormatter().format(caplog.records[0]))
    assert entry["message"] == "transaction" and entry["outcome"] == "delivered"


def test_text_formatter_time_matches_the_standard_one() -> None:
    record = logging.LogRecord("x", logging.INFO, "f", 1, "hi", (), None)
    formatter = TextFormatter()
    for created in (record.created, record.created + 0.25, record.created + 3600.5):
        record.created, record.msecs = created, (created % 1) * 1000
        assert formatter.format(record) == logging.Formatter(TEXT_FORMAT).format(record)


def _record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("sidecar.test", level, "f", 1, message, (), None)


def test_buffered_handler_writes_info_lines_in_a_batch_at_most_delay_late() -> None:
    stream = io.StringIO()
    handler = BufferedStreamHandler(stream, delay=0.05, lines=100)
    handler.handle(_record(logging.INFO, "one"))
    handler.handle(_record(logging.INFO, "two"))
    assert stream.getvalue() == ""  # buffered
    deadline = time.monotonic() + 5
    while not stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.getvalue() == "one\ntwo\n"
    handler.handle(_record(logging.INFO, "three"))  # the flusher serves later lines too
    while stream.getvalue().count("\n") < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.getvalue() == "one\ntwo\nthree\n"


def test_buffered_handler_writes_at_once_on_a_warning_and_soon_when_full() -> None:
    stream = io.StringIO()
    handler = BufferedStreamHandler(stream, delay=60, lines=3)
    handler.handle(_record(logging.INFO, "a"))
    handler.handle(_record(logging.WARNING, "w"))
    assert stream.getvalue() == "a\nw\n"
    for text in "bcd":
        handler.handle(_record(logging.INFO, text))
    # A full batch is the flusher thread's to write, without waiting for the delay.
    deadline = time.monotonic() + 5
    while stream.getvalue() != "a\nw\nb\nc\nd\n" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.getvalue() == "a\nw\nb\nc\nd\n"


class _StuckStream(io.StringIO):
    """A stream whose writes from the flusher thread block until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        if threading.current_thread().name == "log-flusher":
            self.release.wait(10)
        return super().write(text)


def test_buffered_handler_bounds_what_waits_when_the_writer_is_stuck() -> None:
    stream = _StuckStream()
    handler = BufferedStreamHandler(stream, delay=0.01, lines=2, max_lines=16)
    handler.handle(_record(logging.INFO, "first"))  # the flusher takes it and blocks
    time.sleep(0.1)
    threading.Timer(0.3, stream.release.set).start()
    started = time.monotonic()
    for index in range(16):  # max_lines: the logging thread waits for the writer
        handler.handle(_record(logging.INFO, str(index)))
    assert time.monotonic() - started > 0.2 and len(handler.buffer) < 16
    handler.close()
    assert stream.getvalue().split() == ["first"] + [str(index) for index in range(16)]


def test_buffered_handler_loses_nothing_on_flush_and_close() -> None:
    stream = io.StringIO()
    handler = BufferedStreamHandler(stream, delay=60, lines=1000)
    for index in range(10):
        handler.handle(_record(logging.INFO, str(index)))
    handler.flush()
    assert stream.getvalue().split() == [str(index) for index in range(10)]
    handler.handle(_record(logging.INFO, "last"))
    handler.close()
    assert stream.getvalue().split()[-1] == "last"


def test_logging_shutdown_writes_the_buffered_lines() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("sidecar.test.shutdown")
    handler = BufferedStreamHandler(stream, delay=60, lines=1000)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("first")  # starts the flusher
        logger.info("buffered")
        logger.setLevel(logging.INFO)
        logger.info("buffered too")
        assert "buffered too" not in stream.getvalue()
        shutdown_logging()
        assert stream.getvalue().splitlines()[-1] == "buffered too"
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize(
    ("formatter", "worker"),
    [
        (TextFormatter(), None),
        (TextFormatter(WORKER_TEXT_FORMAT), 2),
        (JsonFormatter(), None),
        (JsonFormatter(), 1),
    ],
    ids=["text", "text-worker", "json", "json-worker"],
)
def test_direct_transaction_line_is_the_formatted_record(
    formatter: TextFormatter | JsonFormatter, worker: int | None
) -> None:
    fields = {"session": "1a", "tls": None, "reply": "250 2.0.0 Ok", "bytes": 7}
    record = transaction_log.makeRecord(
        transaction_log.name, logging.INFO, "f", 1, "transaction %s",
        (_TextFields(fields),), None, extra={"fields": fields},
    )  # fmt: skip
    if worker is not None:
        record.worker = worker
    for created in (1_700_000_000.25, 1_700_003_600.999):
        record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
        assert formatter.transaction_line(created, fields, worker) == formatter.format(record)


def test_log_transaction_goes_straight_to_a_lone_buffered_handler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    handler = BufferedStreamHandler(stream, delay=60)
    handler.setFormatter(TextFormatter())
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    monkeypatch.setattr(logging.LogRecord, "__init__", None)  # no record may be made
    monkeypatch.setattr(transaction_log, "level", logging.INFO)
    log_transaction({"session": "1a", "outcome": "delivered"})
    handler.flush()
    assert stream.getvalue().endswith(
        " INFO sidecar.transaction: transaction session=1a outcome=delivered\n"
    )
