"""Logging set-up: readable text by default, one JSON object per line for log shippers, and the
one-line-per-transaction record."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Literal

LogFormat = Literal["text", "json"]
transaction_log = logging.getLogger("sidecar.transaction")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        worker = getattr(record, "worker", None)
        if worker is not None:
            entry["worker"] = worker
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WORKER_TEXT_FORMAT = "%(asctime)s %(levelname)s [worker %(worker)s] %(name)s: %(message)s"


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
        if not isinstance(handler.formatter, JsonFormatter):
            handler.setFormatter(logging.Formatter(WORKER_TEXT_FORMAT))


def configure_logging(level: str = "info", log_format: LogFormat = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _text_value(value: object) -> str:
    text = "-" if value is None else str(value)
    if not text or any(c in text for c in ' "=\\'):
        return json.dumps(text, ensure_ascii=False)
    return text


def transaction_logging() -> bool:
    """Whether transaction lines are logged (callers skip building them when not)."""
    return transaction_log.isEnabledFor(logging.INFO)


def log_transaction(fields: Mapping[str, object]) -> None:
    """One INFO line for one transaction: ``key=value`` pairs in text, the fields in JSON."""
    if not transaction_log.isEnabledFor(logging.INFO):
        return
    message = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
    transaction_log.info("transaction %s", message, extra={"fields": dict(fields)})


def shutdown_logging() -> None:
    """Flush and close the log handlers (at exit)."""
    logging.shutdown()
