from __future__ import annotations

import json
import logging

import pytest

from sidecar.logs import JsonFormatter, log_transaction


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
