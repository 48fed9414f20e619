"""SMTP extension honesty: what the sidecar advertised and what the MX supports may differ.
Each case shows what reaches the client and what reaches the MX."""

from __future__ import annotations

from .harness import smtp_reply
from .stack import RelayStackFactory

BASE_CAPABILITIES = ["PIPELINING", "ENHANCEDSTATUSCODES"]


def size_limit(limit: int) -> object:
    """A MAIL reply like a real MX enforcing its advertised SIZE."""

    def answer(line: bytes) -> bytes:
        for word in line.split()[2:]:
            if word.upper().startswith(b"SIZE=") and int(word[5:]) > limit:
                return smtp_reply(552, "5.3.4 Message size exceeds fixed limit")
        return smtp_reply(250, "2.1.0 Ok")

    return answer


async def test_size_over_the_mx_limit_gets_the_mx_552(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack(
        mxes=[
            {
                "capabilities": [*BASE_CAPABILITIES, "SIZE 1000"],
                "replies": {"MAIL": size_limit(1000)},
            }
        ]
    )
    async with await stack.client() as client:
        assert (await client.command(b"MAIL FROM:<a@client.test> SIZE=5000")).startswith(b"250")
        # The sidecar's own limit is larger, so MAIL is fine locally; the MX's 552 arrives
        # as the RCPT reply, byte for byte.
        answer = await client.command(b"RCPT TO:<r@example.test>")
        assert answer == b"552 5.3.4 Message size exceeds fixed limit\r\n"
        assert (await client.command(b"DATA")).startswith(b"554 ")
    assert stack.mx.messages == []
    (connection,) = stack.mx.connections
    assert any(b"SIZE=5000" in command for command in connection.commands)


async def test_size_is_not_replayed_to_an_mx_without_size(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack(mxes=[{"capabilities": BASE_CAPABILITIES}])
    async with await stack.client() as client:
        await client.command(b"MAIL FROM:<a@client.test> SIZE=100 BODY=8BITMIME")
        assert (await client.command(b"RCPT TO:<r@example.test>")).startswith(b"250")
        assert (await client.command(b"DATA")).startswith(b"354")
        body = "Subject: caf\u00e9\r\n\r\n8-bit body: \u00e9\u00e8\r\n".encode()
        assert (await client.command(body + b".")).startswith(b"250")
    (message,) = stack.mx.messages
    # Neither SIZE nor BODY=8BITMIME reach an MX that did not advertise them ...
    assert message.mail_from == b"MAIL FROM:<a@client.test>"
    # ... and the 8-bit body is relayed unchanged: the sidecar cannot convert (it holds no
    # copy of the message), and refusing would bounce mail that nearly every MX accepts.
    assert message.data == body


async def test_smtputf8_to_an_mx_without_it_is_553_and_nothing_sent(
    relay_stack: RelayStackFactory,
) -> None:
    stack = await relay_stack(mxes=[{"capabilities": [*BASE_CAPABILITIES, "8BITMIME"]}])
    async with await stack.client() as client:
        await client.command("MAIL FROM:<j\u00f6rg@client.test> SMTPUTF8")
        answer = await client.command(b"RCPT TO:<r@example.test>")
        assert answer.startswith(b"553 5.6.7 "), answer
    assert all(b"MAIL" not in c for conn in stack.mx.connections for c in conn.commands)


async def test_dsn_is_not_advertised_and_dsn_parameters_are_refused(
    relay_stack: RelayStackFactory,
) -> None:
    """The sidecar does not offer DSN: it could not honour NOTIFY for an MX without DSN
    (RFC 3461 section 4.2 would make it send 'relayed' notices itself, which needs a queue), so
    the MTA keeps DSN duty and sends those notices itself."""
    stack = await relay_stack(mxes=[{"capabilities": [*BASE_CAPABILITIES, "DSN"]}])
    async with await stack.client(greet=False) as client:
        ehlo = await client.command(b"EHLO client.test")
        assert b"DSN" not in ehlo
        assert (await client.command(b"MAIL FROM:<a@client.test> RET=HDRS")).startswith(b"555 ")
        assert (await client.command(b"MAIL FROM:<a@client.test>")).startswith(b"250")
        answer = await client.command(b"RCPT TO:<r@example.test> NOTIFY=SUCCESS")
        assert answer.startswith(b"555 ")
    assert stack.mx.connections == []
