"""SMTP extension honesty: what the sidecar advertised and what the MX supports may differ.
Each case shows what reaches the client and what reaches the MX."""

from __future__ import annotations

from .harness import (
    RelayStackFactory,
    smtp_reply,
)

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


WITHOUT_SMTPUTF8 = [*BASE_CAPABILITIES, "8BITMIME"]
WITH_SMTPUTF8 = [*WITHOUT_SMTPUTF8, "SMTPUTF8"]


async def test_smtputf8_with_an_ascii_envelope_goes_without_the_parameter(
    relay_stack: RelayStackFactory,
) -> None:
    """RFC 6531 forbids only sending mail that needs SMTPUTF8 to an MX without it; Postfix
    delivers such mail without the parameter. An 8-bit body does not need it (8BITMIME)."""
    stack = await relay_stack(mxes=[{"capabilities": WITHOUT_SMTPUTF8}])
    body = "Subject: plain\r\n\r\nGrüße, 8-bit body\r\n".encode()
    async with await stack.client() as client:
        assert (await client.command(b"MAIL FROM:<alice@client.test> SMTPUTF8")).startswith(b"250")
        assert (await client.command(b"RCPT TO:<r@example.test>")).startswith(b"250")
        assert (await client.command(b"DATA")).startswith(b"354")
        final = await client.command(body + b".")
    (message,) = stack.mx.messages
    assert final == message.reply and final.startswith(b"250")
    assert message.mail_from == b"MAIL FROM:<alice@client.test>"
    assert message.data == body


async def test_non_ascii_addresses_to_an_mx_without_smtputf8_are_553_and_nothing_sent(
    relay_stack: RelayStackFactory,
) -> None:
    stack = await relay_stack(mxes=[{"capabilities": WITHOUT_SMTPUTF8}])
    async with await stack.client() as client:
        await client.command("MAIL FROM:<j\u00f6rg@client.test> SMTPUTF8")
        answer = await client.command(b"RCPT TO:<r@example.test>")
        assert answer.startswith(b"553 5.6.7 ") and b"sender" in answer, answer
        await client.command(b"RSET")
        await client.command(b"MAIL FROM:<alice@client.test> SMTPUTF8")
        answer = await client.command("RCPT TO:<j\u00fcrgen@example.test>")
        assert answer.startswith(b"553 5.6.7 ") and b"recipient" in answer, answer
        # An ASCII recipient in the same transaction still goes.
        assert (await client.command(b"RCPT TO:<r@example.test>")).startswith(b"250")
    commands = [c for conn in stack.mx.connections for c in conn.commands]
    assert not any(b"j\xc3" in c for c in commands), commands
    assert not any(b"SMTPUTF8" in c for c in commands), commands


async def test_non_ascii_header_to_an_mx_without_smtputf8_is_554_and_never_ends_at_the_mx(
    relay_stack: RelayStackFactory,
) -> None:
    stack = await relay_stack(mxes=[{"capabilities": WITHOUT_SMTPUTF8}])
    async with await stack.client() as client:
        await client.command(b"MAIL FROM:<alice@client.test> SMTPUTF8")
        assert (await client.command(b"RCPT TO:<r@example.test>")).startswith(b"250")
        assert (await client.command(b"DATA")).startswith(b"354")
        header = "From: Jörg <alice@client.test>\r\nSubject: Grüße\r\n\r\nbody\r\n".encode()
        final = await client.command(header + b".")
        assert final.startswith(b"554 5.6.9 "), final
        # The session goes on: the next message (ASCII header) is delivered.
        await client.command(b"MAIL FROM:<alice@client.test> SMTPUTF8")
        assert (await client.command(b"RCPT TO:<r@example.test>")).startswith(b"250")
        assert (await client.command(b"DATA")).startswith(b"354")
        final = await client.command(b"Subject: ok\r\n\r\nbody\r\n.")
        assert final.startswith(b"250"), final
    (message,) = await stack.mx.wait_for_messages(1)
    assert message.data == b"Subject: ok\r\n\r\nbody\r\n"


async def test_smtputf8_to_an_mx_with_it_is_relayed_as_written(
    relay_stack: RelayStackFactory,
) -> None:
    stack = await relay_stack(
        mxes=[{"capabilities": WITH_SMTPUTF8}], domains={"xn--bcher-kva.example.test": 0}
    )
    header = "Subject: Grüße\r\n\r\nbody\r\n".encode()
    async with await stack.client() as client:
        assert (await client.command("MAIL FROM:<jörg@bücher.client.test> SMTPUTF8")).startswith(
            b"250"
        )
        answer = await client.command("RCPT TO:<jürgen@bücher.example.test>")
        assert answer.startswith(b"250"), answer
        assert (await client.command(b"DATA")).startswith(b"354")
        assert (await client.command(header + b".")).startswith(b"250")
    (message,) = stack.mx.messages
    assert message.mail_from == "MAIL FROM:<jörg@bücher.client.test> SMTPUTF8".encode()
    assert message.rcpt_to == ["RCPT TO:<jürgen@bücher.example.test>".encode()]
    assert message.data == header


async def test_utf8_domains_without_smtputf8_go_as_a_labels(
    relay_stack: RelayStackFactory,
) -> None:
    """Without SMTPUTF8 no UTF-8 may reach the MX (even one that offers SMTPUTF8): a U-label
    domain goes in its A-label form, which means the same domain."""
    stack = await relay_stack(
        mxes=[{"capabilities": WITH_SMTPUTF8}], domains={"xn--bcher-kva.example.test": 0}
    )
    async with await stack.client() as client:
        assert (await client.command("MAIL FROM:<alice@bücher.client.test>")).startswith(b"250")
        answer = await client.command("RCPT TO:<bob@bücher.example.test>")
        assert answer.startswith(b"250"), answer
        assert (await client.command(b"DATA")).startswith(b"354")
        assert (await client.command(b"Subject: x\r\n\r\nbody\r\n.")).startswith(b"250")
    (message,) = stack.mx.messages
    assert message.mail_from == b"MAIL FROM:<alice@xn--bcher-kva.client.test>"
    assert message.rcpt_to == [b"RCPT TO:<bob@xn--bcher-kva.example.test>"]


async def test_utf8_local_part_without_smtputf8_is_553(relay_stack: RelayStackFactory) -> None:
    """RFC 6531 section 3.5: a non-ASCII address without the SMTPUTF8 parameter is refused
    with 553 5.6.7; it has no ASCII form the sidecar could send instead."""
    stack = await relay_stack(mxes=[{"capabilities": WITH_SMTPUTF8}])
    async with await stack.client() as client:
        answer = await client.command("MAIL FROM:<jörg@client.test>")
        assert answer.startswith(b"553 5.6.7 "), answer
        assert (await client.command(b"MAIL FROM:<alice@client.test>")).startswith(b"250")
        answer = await client.command("RCPT TO:<jürgen@example.test>")
        assert answer.startswith(b"553 5.6.7 "), answer
    assert stack.mx.connections == []


async def test_long_local_parts_are_relayed(relay_stack: RelayStackFactory) -> None:
    """RFC 5321 section 4.5.3.1.1's 64 octets is a minimum to accept: SRS and VERP addresses
    are longer, and go through unchanged."""
    srs = b"SRS0=Ab3d=XY=newsletter-sender.example.org=bounce-0123456789abcdef@client.test"
    verp = b"list-bounces+" + b"x" * 200 + b"=client.test@example.test"
    stack = await relay_stack()
    async with await stack.client() as client:
        assert (await client.command(b"MAIL FROM:<" + srs + b">")).startswith(b"250")
        assert (await client.command(b"RCPT TO:<" + verp + b">")).startswith(b"250")
        assert (await client.command(b"DATA")).startswith(b"354")
        assert (await client.command(b"Subject: x\r\n\r\nbody\r\n.")).startswith(b"250")
    (message,) = stack.mx.messages
    assert message.mail_from == b"MAIL FROM:<" + srs + b">"
    assert message.rcpt_to == [b"RCPT TO:<" + verp + b">"]


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
