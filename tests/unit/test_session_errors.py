"""A session's answers to hostile MAIL parameters and to its own bugs, with in-memory streams:
never an exception out of ``Session.run`` (it would take the whole server down)."""

from __future__ import annotations

import io
import logging
from typing import Any

import pytest
import trio
import trio.testing

from sidecar.config import parse_config
from sidecar.logs import BufferedStreamHandler, TextFormatter
from sidecar.server import build_context
from sidecar.session import Session

CONFIG = {
    "server": {"hostname": "sidecar.test", "max_line_length": 10_000},
    "listener": [{"address": "127.0.0.1:2525", "binding": "b1"}],
    "binding": {"b1": {"ha_proxy_server": "127.0.0.1:9", "ha_proxy_src_addr": "192.0.2.1"}},
}


async def converse(data: bytes) -> list[bytes]:
    """Send ``data`` (then EOF) to one session; its reply lines, banner excluded."""
    context = build_context(parse_config(CONFIG))
    client, server = trio.testing.memory_stream_pair()
    received = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Session(server, "127.0.0.1", context.config.listeners[0], context).run)
        await client.send_all(data)
        while chunk := await client.receive_some(65536):
            received += chunk
    lines = received.split(b"\r\n")
    assert lines[0].startswith(b"220 ") and lines.pop() == b""
    return [line for line in lines[1:] if not line.startswith(b"250-")]


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("²", b"501 5.5.4 "),  # str.isdigit() says yes, int() says no
        ("١٢٣", b"501 5.5.4 "),  # Arabic-Indic digits
        ("\uff11\uff10", b"501 5.5.4 "),  # fullwidth digits
        ("9" * 5000, b"552 5.3.4 "),  # more digits than int() converts
        ("9" * 21, b"552 5.3.4 "),
        ("0" * 5000 + "42", b"250 2.1.0 "),  # leading zeros: it is 42
        ("0", b"250 2.1.0 "),
        ("", b"501 5.5.4 "),
    ],
)
async def test_mail_size_values(size: str, expected: bytes) -> None:
    command = f"MAIL FROM:<a@b.test> SIZE={size}".encode() if size else b"MAIL FROM:<a@b.test> SIZE"
    replies = await converse(b"EHLO c.test\r\n" + command + b"\r\nQUIT\r\n")
    assert replies[0].startswith(b"250 ")  # EHLO
    assert replies[1].startswith(expected), replies[1]
    assert replies[2].startswith(b"221 ")


async def test_unexpected_error_is_421_and_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(self: Session, event: Any) -> None:
        raise KeyError("a bug")

    # A bug in the session's handling of an event of the SMTP core (here: a RSET that ends a
    # transaction).
    monkeypatch.setattr(Session, "on_reset", broken)
    with caplog.at_level(logging.ERROR, logger="sidecar.session"):
        replies = await converse(b"NOOP\r\nHELO c.test\r\nMAIL FROM:<a@b.test>\r\nRSET\r\nNOOP\r\n")
    # The replies already due go out first; the session ends there.
    assert replies[:3] == [b"250 2.0.0 OK", b"250 sidecar.test", b"250 2.1.0 Sender OK"]
    assert replies[3:] == [
        b"250 2.0.0 OK",  # the RSET, answered by the SMTP core before the session's part
        b"421 4.3.0 Local error in processing, closing connection",
    ]
    (record,) = caplog.records
    assert "unhandled error" in record.getMessage() and record.exc_info is not None


async def test_a_crashed_session_still_logs_its_transaction_within_the_flush_delay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken(self: Session, event: Any) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(Session, "on_reset", broken)
    stream = io.StringIO()
    handler = BufferedStreamHandler(stream, delay=0.05)
    handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        await converse(b"HELO c.test\r\nMAIL FROM:<a@b.test>\r\nRSET\r\n")
        with trio.fail_after(5):
            while "outcome=aborted" not in stream.getvalue():
                await trio.sleep(0.01)  # written by the flusher, no flush() asked for
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
    (line,) = [line for line in stream.getvalue().splitlines() if "sidecar.transaction" in line]
    assert "rcpt=0/0/0 outcome=aborted" in line
