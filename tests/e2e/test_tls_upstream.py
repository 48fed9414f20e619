"""STARTTLS towards the MX (``delivery.tls``) end to end, through HAProxy: opportunistic,
required and disabled, a failed handshake, and bytes an MX pipelines after its ``220`` to
STARTTLS (CVE-2011-0411 class: they must never be taken as a reply after the handshake)."""

from __future__ import annotations

import logging
import ssl
from typing import Any

import pytest

from .harness import (
    MESSAGE,
    MXConnection,
    RelayStackFactory,
    SendResult,
    TestMX,
    final_status,
    refusal,
    send,
    smtp_reply,
)


def _verbs(connection: MXConnection) -> list[bytes]:
    return [command.split(b" ", 1)[0].upper() for command in connection.commands]


async def _deliver(
    relay_stack: RelayStackFactory, tls: str, **mx_options: Any
) -> tuple[SendResult, TestMX, str]:
    """One message to rcpt@example.test with ``delivery.tls = tls``; returns once the session
    is over (the MX connection closed)."""
    stack = await relay_stack(
        mxes=[mx_options],
        delivery={"tls": tls, "connect_timeout": 2, "banner_timeout": 2, "mx_command_timeout": 2},
    )
    mx = stack.mx
    result = await send(stack.endpoint, "a@client.test", ["rcpt@example.test"], MESSAGE)
    await mx.wait_for(lambda: bool(mx.connections) and all(c.closed for c in mx.connections))
    return result, mx, stack.source


@pytest.mark.parametrize("tls", ["opportunistic", "required"])
async def test_starttls_offered_is_used(
    relay_stack: RelayStackFactory,
    mx_tls_context: ssl.SSLContext,
    tls: str,
) -> None:
    result, mx, source = await _deliver(
        relay_stack,
        tls,
        tls_context=mx_tls_context,  # a certificate the sidecar has no reason to trust
    )
    assert final_status(result) == (250, "2.0.0")
    (connection,) = mx.connections
    (message,) = mx.messages
    assert message.tls and connection.tls
    assert message.peer_host == source
    assert message.data == MESSAGE
    assert result.final is not None and result.final[1] in message.reply
    assert _verbs(connection)[:6] == [b"EHLO", b"STARTTLS", b"EHLO", b"MAIL", b"RCPT", b"DATA"]
    assert message.ehlo == "sidecar.test"


async def test_opportunistic_without_starttls_is_plaintext(
    relay_stack: RelayStackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="sidecar.transaction"):
        result, mx, source = await _deliver(relay_stack, "opportunistic")
    fields = _transaction_fields(caplog)
    assert fields["tls"] is None and fields["tls_fallback"] is None  # nothing failed
    assert final_status(result) == (250, "2.0.0")
    (connection,) = mx.connections
    (message,) = mx.messages
    assert not message.tls and message.peer_host == source
    assert _verbs(connection)[:4] == [b"EHLO", b"MAIL", b"RCPT", b"DATA"]


async def test_required_without_starttls_is_not_delivered(
    relay_stack: RelayStackFactory,
) -> None:
    result, mx, _ = await _deliver(relay_stack, "required")
    assert refusal(result, "rcpt@example.test") == (451, "4.7.4")  # RFC 3463 X.7.4: TLS not offered
    assert b"STARTTLS" in result.refused["rcpt@example.test"][1]
    assert result.final is None
    assert mx.messages == []
    assert all(b"MAIL" not in _verbs(c) for c in mx.connections)


async def test_disabled_never_starts_tls(
    relay_stack: RelayStackFactory,
    mx_tls_context: ssl.SSLContext,
) -> None:
    result, mx, _ = await _deliver(
        relay_stack,
        "disabled",
        tls_context=mx_tls_context,
    )
    assert final_status(result) == (250, "2.0.0")
    (connection,) = mx.connections
    (message,) = mx.messages
    assert not message.tls
    assert b"STARTTLS" not in _verbs(connection)


def _transaction_fields(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    (record,) = [r for r in caplog.records if r.name == "sidecar.transaction"]
    fields: dict[str, Any] = record.fields  # type: ignore[attr-defined]
    return fields


async def test_opportunistic_retries_in_plaintext_after_a_failed_handshake(
    relay_stack: RelayStackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # STARTTLS is advertised and accepted, but the server side has no certificate: the
    # handshake fails.
    broken = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with caplog.at_level(logging.INFO, logger="sidecar"):
        result, mx, source = await _deliver(
            relay_stack,
            "opportunistic",
            tls_context=broken,
        )
    # The transaction line tells this plaintext from an MX without STARTTLS.
    fields = _transaction_fields(caplog)
    assert fields["tls"] is None
    assert fields["tls_fallback"].startswith("TLS handshake failed: "), fields
    assert any("delivering in plaintext" in r.getMessage() for r in caplog.records)
    assert final_status(result) == (250, "2.0.0")
    first, second = mx.connections
    assert _verbs(first)[:2] == [b"EHLO", b"STARTTLS"] and not first.messages
    assert b"STARTTLS" not in _verbs(second)
    (message,) = mx.messages
    assert not message.tls and message.peer_host == source
    assert message.connection_index == 1


async def test_required_with_a_failed_handshake_says_why(relay_stack: RelayStackFactory) -> None:
    """The reply names the handshake's failure (the reason is the cause of trio's empty
    BrokenResourceError), never "TLS handshake failed: " and nothing after it."""
    broken = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no certificate: the handshake fails
    result, mx, _ = await _deliver(relay_stack, "required", tls_context=broken)
    assert refusal(result, "rcpt@example.test") == (451, "4.7.5")  # the TLS policy failed
    text = result.refused["rcpt@example.test"][1]
    assert b"TLS handshake failed: EOF occurred in violation of protocol" in text, text
    assert mx.messages == []


@pytest.mark.parametrize(
    "injected",
    [smtp_reply(250, "injected"), smtp_reply(554, "5.7.1 injected")],
    ids=["250", "554"],
)
async def test_bytes_pipelined_after_the_starttls_220_are_discarded(
    relay_stack: RelayStackFactory,
    mx_tls_context: ssl.SSLContext,
    injected: bytes,
) -> None:
    result, mx, source = await _deliver(
        relay_stack,
        "required",
        tls_context=mx_tls_context,
        replies={"STARTTLS": smtp_reply(220, "go") + injected},
    )
    (connection,) = mx.connections
    (message,) = mx.messages
    assert message.tls and message.peer_host == source
    # Had the injected reply been read as the answer to the EHLO after the handshake, every
    # later reply would be off by one and the final reply would not be the MX's.
    assert result.error is None and result.final is not None
    assert final_status(result) == (250, "2.0.0")
    assert result.final[1] in message.reply
    assert message.queue_id.encode() in result.final[1]
    assert _verbs(connection)[:6] == [b"EHLO", b"STARTTLS", b"EHLO", b"MAIL", b"RCPT", b"DATA"]
    assert connection.discarded_before_tls == b""


@pytest.mark.parametrize(
    ("tls", "refusal_reply"),
    [
        ("opportunistic", smtp_reply(454, "4.7.0 TLS not available due to temporary reason")),
        ("opportunistic", smtp_reply(502, "5.5.1 not now")),
        ("required", smtp_reply(454, "4.7.0 TLS not available due to temporary reason")),
    ],
    ids=["opportunistic-454", "opportunistic-502", "required-454"],
)
async def test_starttls_refused_by_the_mx(
    relay_stack: RelayStackFactory,
    mx_tls_context: ssl.SSLContext,
    tls: str,
    refusal_reply: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """STARTTLS advertised but refused: opportunistic TLS delivers in plaintext (as MTAs do)
    and the transaction line says why, required TLS does not deliver."""
    with caplog.at_level(logging.INFO, logger="sidecar.transaction"):
        result, mx, source = await _deliver(
            relay_stack,
            tls,
            tls_context=mx_tls_context,
            replies={"STARTTLS": refusal_reply},
        )
    if tls == "required":
        assert refusal(result, "rcpt@example.test") == (451, "4.7.4")
        assert mx.messages == []
        return
    assert final_status(result) == (250, "2.0.0")
    (connection,) = mx.connections  # the same session goes on in plaintext
    (message,) = mx.messages
    assert not message.tls and message.peer_host == source
    assert result.final is not None and result.final[1] in message.reply
    assert _verbs(connection)[:5] == [b"EHLO", b"STARTTLS", b"MAIL", b"RCPT", b"DATA"]
    fields = _transaction_fields(caplog)
    assert fields["tls"] is None
    assert fields["tls_fallback"].startswith("STARTTLS refused: "), fields
