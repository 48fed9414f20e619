"""Logging set-up: readable text by default, one JSON object per line for log shippers, and the
one-line-per-transaction record.

The transaction line is on the hot path (one per message), so it is cheap: the record is made
without a caller look-up, its text is built only by a formatter that prints it, and
:class:`BufferedStreamHandler` writes lines in batches: at most ``FLUSH_DELAY`` seconds or
``FLUSH_LINES`` lines late, at once for WARNING and above, and always on flush/close
(``logging.shutdown``, which runs at exit and in each worker's exit path).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from typing import IO, Literal

LogFormat = Literal["text", "json"]
transaction_log = logging.getLogger("sidecar.transaction")
_ROOT = logging.getLogger()

FLUSH_DELAY = 0.2  # seconds a buffered line may wait before it is written
FLUSH_LINES = 256  # lines that wake the writer at once
# Lines that may wait while a write is slow (a file system stalls, a pipe is full; ~6 MiB):
# beyond that the logging thread writes, and waits, itself.
FLUSH_MAX_LINES = 16384


class _Clock:
    """``2026-11-25T10:00:00`` style strings of a time, the last second's kept (one strftime
    per second rather than one per line)."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.second = -1
        self.text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self.second:
            self.text = time.strftime(self.pattern, time.gmtime(second))
            self.second = second
        return self.text


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a transaction's fields are keys of their own (its
    ``message`` is then just ``transaction``)."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock("%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        entry: dict[str, object] = {
            "time": f"{self._clock(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": "transaction" if isinstance(fields, Mapping) else record.getMessage(),
        }
        worker = getattr(record, "worker", None)
        if worker is not None:
            entry["worker"] = worker
        if isinstance(fields, Mapping):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)

    def transaction_line(
        self, created: float, fields: Mapping[str, object], worker: int | None
    ) -> str | None:
        """What :meth:`format` makes of a transaction record created at ``created``."""
        msecs = int((created - int(created)) * 1000)
        entry: dict[str, object] = {
            "time": f"{self._clock(created)}.{msecs:03d}Z",
            "level": "info",
            "logger": transaction_log.name,
            "message": "transaction",
        }
        if worker is not None:
            entry["worker"] = worker
        entry.update(fields)
        return json.dumps(entry, default=str, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WORKER_TEXT_FORMAT = "%(asctime)s %(levelname)s [worker %(worker)s] %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """``logging.Formatter`` with the local time string made once per second."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)
        self._clock = _Clock(self.default_time_format)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._clock.second:
            self._clock.text = time.strftime(self._clock.pattern, time.localtime(second))
            self._clock.second = second
        return f"{self._clock.text},{int(record.msecs):03d}"

    def transaction_line(
        self, created: float, fields: Mapping[str, object], worker: int | None
    ) -> str | None:
        """What :meth:`format` makes of a transaction record created at ``created``; None
        for a format other than the two of ``sidecar run``."""
        if self._fmt == TEXT_FORMAT:
            where = ""
        elif self._fmt == WORKER_TEXT_FORMAT and worker is not None:
            where = f" [worker {worker}]"
        else:
            return None
        second = int(created)
        if second != self._clock.second:
            self._clock.text = time.strftime(self._clock.pattern, time.localtime(second))
            self._clock.second = second
        msecs = int((created - second) * 1000)
        return (
            f"{self._clock.text},{msecs:03d} INFO{where} {transaction_log.name}: transaction"
            f" {_TextFields(fields)}"
        )


class BufferedStreamHandler(logging.StreamHandler[IO[str]]):
    """A StreamHandler that writes in batches, each line at most ``delay`` seconds late.

    A daemon thread (started on demand, again after a fork) writes the batch ``delay``
    seconds after its first line, or at once when ``lines`` are waiting: the write (which may
    block on a slow file or pipe) is off the event loop's thread. Lines at WARNING and above
    write the batch at once, from the thread that logs them, and so does any line when
    ``max_lines`` are waiting (the writer cannot keep up: memory stays bounded). ``flush()``
    and ``close()`` write everything, so ``logging.shutdown`` loses nothing; a line can only
    be lost if the process is killed (SIGKILL) within ``delay``. Lines keep their order.
    """

    def __init__(
        self,
        stream: IO[str],
        delay: float = FLUSH_DELAY,
        lines: int = FLUSH_LINES,
        max_lines: int = FLUSH_MAX_LINES,
    ) -> None:
        super().__init__(stream)
        self.delay = delay
        self.lines = lines
        self.max_lines = max(lines, max_lines)
        self.buffer: list[str] = []
        self.worker: int | None = None  # the [worker i] of a transaction line (tag_worker)
        self._buffer_lock = threading.Lock()  # the buffer only: held for an append or a swap
        self._write_lock = threading.Lock()  # a batch taken and written, one at a time
        self._pending = threading.Event()  # lines wait
        self._full = threading.Event()  # write them now
        self._flusher_running = False
        _BUFFERED.add(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._add(line, record.levelno)

    def emit_transaction(self, created: float, fields: Mapping[str, object]) -> bool:
        """Buffer a transaction line made by the formatter straight from ``fields`` (no
        LogRecord); False if this handler's formatter cannot (then log it the usual way)."""
        formatter = self.formatter
        if not isinstance(formatter, TextFormatter | JsonFormatter):
            return False
        line = formatter.transaction_line(created, fields, self.worker)
        if line is None:
            return False
        self._add(line, logging.INFO)
        return True

    def _add(self, line: str, level: int) -> None:
        """Buffer ``line``; write now if it is urgent or far too many wait."""
        if not self._flusher_running:
            self._flusher_running = True
            threading.Thread(target=self._flusher, name="log-flusher", daemon=True).start()
        with self._buffer_lock:
            self.buffer.append(line)
            waiting = len(self.buffer)
        if level >= logging.WARNING or waiting >= self.max_lines:
            self.flush()
        elif waiting == 1:
            self._pending.set()
        elif waiting == self.lines:
            self._full.set()

    def flush(self) -> None:
        with self._write_lock:
            with self._buffer_lock:
                batch, self.buffer = self.buffer, []
            if batch:
                try:
                    self.stream.write("\n".join(batch) + "\n")
                except Exception:
                    sys.stderr.write("sidecar: cannot write log lines\n")
            with contextlib.suppress(Exception):
                self.stream.flush()

    def close(self) -> None:
        self.flush()
        super().close()

    def _after_fork_in_child(self) -> None:
        # What the parent had buffered is the parent's to write; the flusher thread is gone.
        self.buffer = []
        self._buffer_lock = threading.Lock()  # not ones a lost thread may hold
        self._write_lock = threading.Lock()
        self._pending = threading.Event()
        self._full = threading.Event()
        self._flusher_running = False

    def _flusher(self) -> None:
        pending = self._pending
        while pending is self._pending:  # a forked child has a new one (and no such thread)
            pending.wait()
            self._full.wait(self.delay)
            self._full.clear()
            pending.clear()
            self.flush()


_BUFFERED: weakref.WeakSet[BufferedStreamHandler] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for handler in list(_BUFFERED):
        handler._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _WorkerTag(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def tag_worker(index: int) -> None:
    """In worker process ``index`` (``server.workers``): every log line says which worker."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerTag(index))
        if isinstance(handler, BufferedStreamHandler):
            handler.worker = index
        if not isinstance(handler.formatter, JsonFormatter):
            handler.setFormatter(TextFormatter(WORKER_TEXT_FORMAT))


def configure_logging(level: str = "info", log_format: LogFormat = "text") -> None:
    """Log to stderr at ``level``, as text or one JSON object per line, in batches
    (:class:`BufferedStreamHandler`)."""
    handler = BufferedStreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    # No format here shows the thread, process or process name: not looked up per record.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def shutdown_logging() -> None:
    """Write every buffered line and close the handlers (at exit, before ``os._exit``)."""
    logging.shutdown()


_NEEDS_QUOTES = re.compile(r'[ "=\\]').search


def _text_value(value: object) -> str:
    text = "-" if value is None else str(value)
    if not text or _NEEDS_QUOTES(text) is not None:
        return json.dumps(text, ensure_ascii=False)
    return text


class _TextFields:
    """The ``key=value`` text of a transaction's fields, built only when a formatter asks."""

    __slots__ = ("fields",)

    def __init__(self, fields: Mapping[str, object]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        parts = []
        for key, value in self.fields.items():
            if value is None:
                parts.append(f"{key}=-")
            elif isinstance(value, str):
                plain = value and _NEEDS_QUOTES(value) is None
                parts.append(f"{key}={value if plain else _text_value(value)}")
            elif value.__class__ is int or value.__class__ is float:
                parts.append(f"{key}={value}")
            else:
                parts.append(f"{key}={_text_value(value)}")
        return " ".join(parts)


def transaction_logging() -> bool:
    """Whether transaction lines are logged (callers skip building them when not)."""
    return transaction_log.isEnabledFor(logging.INFO)


def _nothing_on_the_way() -> bool:
    """No handler or filter between the transaction logger and the root, and propagation."""
    logger: logging.Logger | None = transaction_log
    while logger is not None and logger is not _ROOT:
        if logger.handlers or logger.filters or not logger.propagate:
            return False
        logger = logger.parent
    return True


def log_transaction(fields: Mapping[str, object]) -> None:
    """One INFO line for one transaction: ``key=value`` pairs in text, the fields in JSON.

    ``fields`` is kept, not copied: the caller must not change it afterwards."""
    if not transaction_log.isEnabledFor(logging.INFO):
        return
    # The usual set-up (one buffered handler on the root, nothing on the way): the line
    # goes straight into its buffer, without a LogRecord and the handling around it.
    handlers = _ROOT.handlers
    if (
        len(handlers) == 1
        and _nothing_on_the_way()
        and isinstance(handler := handlers[0], BufferedStreamHandler)
        and all(isinstance(item, _WorkerTag) for item in handler.filters)
        and handler.level <= logging.INFO
        and handler.emit_transaction(time.time(), fields)
    ):
        return
    record = transaction_log.makeRecord(
        transaction_log.name, logging.INFO, "(transaction)", 0, "transaction %s",
        (_TextFields(fields),), None, extra={"fields": fields},
    )  # fmt: skip
    transaction_log.handle(record)
