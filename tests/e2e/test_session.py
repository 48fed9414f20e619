"""The front SMTP session end to end: local replies, PIPELINING, one route per transaction
(DESIGN.md invariant 3), the MX's replies passed through byte for byte (invariant 1), connection
limits, and swaks as a real client. Every test runs the sidecar in-process behind a real HAProxy
and dnsmasq, with TestMXes on their own 127.0.0.x addresses."""

from __future__ import annotations

import pytest
import trio

from .harness import (
    MESSAGE,
    Lab,
    MXConnection,
    RawSMTPClient,
    RelayStack,
    RelayStackFactory,
    final_status,
    send,
    smtp_reply,
)

MAIL = b"MAIL FROM:<sender@client.test>"
BODY = b"Subject: session test\r\n\r\nHello.\r\n"


async def settle() -> None:
    """Give the sidecar a moment to do anything it might (wrongly) do on its own."""
    await trio.sleep(0.1)


async def deliver(client: RawSMTPClient, recipients: list[bytes], body: bytes = BODY) -> bytes:
    """One transaction with every recipient accepted; returns the final reply."""
    assert (await client.command(MAIL)).startswith(b"250 2.1.0")
    for recipient in recipients:
        answer = await client.command(b"RCPT TO:<" + recipient + b">")
        assert answer.startswith(b"250 "), (recipient, answer)
    assert (await client.command(b"DATA")).startswith(b"354 ")
    await client.send(body + b".\r\n")
    return await client.read_reply()


# -- 1. the front SMTP dialogue --------------------------------------------------------------


async def test_front_smtp_local_replies(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack(server={"max_message_size": 1_000_000, "max_line_length": 512})
    mx = stack.mx
    async with await stack.client(greet=False) as client:
        assert (await client.command(MAIL)).startswith(b"503 5.5.1 ")
        ehlo = await client.command(b"EHLO client.test")
        lines = ehlo.split(b"\r\n")
        assert lines.pop() == b""
        assert lines[0].startswith(b"250-sidecar.test ")
        assert all(line.startswith(b"250-") for line in lines[1:-1])
        assert lines[-1].startswith(b"250 ")
        keywords = [line[4:].decode() for line in lines[1:]]
        assert keywords[:5] == [
            "PIPELINING",
            "8BITMIME",
            "SIZE 1000000",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        ]
        assert len(keywords) == 6 and keywords[5].startswith("LIMITS ")
        assert "RCPTDOMAINMAX=1" in keywords[5].split()
        for absent in ("STARTTLS", "DSN", "CHUNKING", "BINARYMIME", "AUTH"):
            assert not any(keyword.split()[0] == absent for keyword in keywords)

        assert await client.command(b"HELO client.test") == b"250 sidecar.test\r\n"
        assert (await client.command(b"NOOP")).startswith(b"250 2.0.0 ")
        assert (await client.command(b"RSET")).startswith(b"250 2.0.0 ")
        assert (await client.command(b"VRFY someone")).startswith(b"252 2.5.0 ")
        help_reply = await client.command(b"HELP")
        assert help_reply.startswith(b"214-2.0.0 ") or help_reply.startswith(b"214 2.0.0 ")
        assert (await client.command(b"FROBNICATE")).startswith(b"500 5.5.1 ")
        assert (await client.command(b"EXPN list")).startswith(b"502 5.5.1 ")
        assert (await client.command(b"STARTTLS")).startswith(b"502 5.5.1 ")
        assert (await client.command(b"RCPT TO:<r@example.test>")).startswith(b"503 5.5.1 ")
        assert (await client.command(b"DATA")).startswith(b"503 5.5.1 ")
        assert (await client.command(b"MAIL FROM:<no-at-sign>")).startswith(b"501 5.1.7 ")
        assert (await client.command(b"MAIL FROM:<a@@client.test>")).startswith(b"501 5.1.7 ")
        assert (await client.command(MAIL + b" FOO=bar")).startswith(b"555 5.5.4 ")
        assert (await client.command(MAIL + b" SIZE=1000001")).startswith(b"552 5.3.4 ")
        # A command line over max_line_length: 500 5.5.6, and the session goes on.
        assert (await client.command(b"NOOP " + b"x" * 600)).startswith(b"500 5.5.6 ")
        assert (await client.command(b"NOOP")).startswith(b"250 2.0.0 ")

        assert (await client.command(MAIL + b" SIZE=1000")).startswith(b"250 2.1.0 ")
        # MAIL is answered locally: no MX connection exists yet.
        await settle()
        assert mx.connections == []
        assert (await client.command(b"DATA")).startswith(b"503 5.5.1 ")
        assert (await client.command(MAIL)).startswith(b"503 5.5.1 ")
        bad_rcpt = await client.command(b"RCPT TO:<r@exa mple.test>")
        assert bad_rcpt.startswith(b"501 5.1.3 ")
        assert (await client.command(b"RSET")).startswith(b"250 2.0.0 ")
        assert (await client.command(b"QUIT")).startswith(b"221 2.0.0 ")
        assert await client.read_reply() == b""  # closed after QUIT
    assert mx.connections == []


async def test_too_many_errors_gets_421_and_close(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack(server={"max_errors": 3})
    async with await stack.client() as client:
        assert (await client.command(b"BOGUS one")).startswith(b"500 5.5.1 ")
        assert (await client.command(b"RCPT TO:<r@example.test>")).startswith(b"503 5.5.1 ")
        assert (await client.command(b"BOGUS three")).startswith(b"500 5.5.1 ")
        assert (await client.read_reply()).startswith(b"421 4.7.0 ")
        assert await client.read_reply() == b""


async def test_over_long_lines_are_errors_not_crashes(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack(server={"max_line_length": 100, "max_errors": 50})
    async with await stack.client() as client:
        # Several over-long lines in one write, one split over writes, then a normal command.
        await client.send(b"NOOP " + b"a" * 300 + b"\r\n" + b"NOOP " + b"b" * 150 + b"\r\n")
        assert (await client.read_reply()).startswith(b"500 5.5.6 ")
        assert (await client.read_reply()).startswith(b"500 5.5.6 ")
        await client.send(b"x" * 80)
        await trio.sleep(0.02)
        await client.send(b"y" * 80 + b"\r\nNOOP\r\n")
        assert (await client.read_reply()).startswith(b"500 5.5.6 ")
        assert (await client.read_reply()).startswith(b"250 2.0.0 ")
        assert (await client.command(b"QUIT")).startswith(b"221 ")


# -- 2. PIPELINING ----------------------------------------------------------------------------


async def test_pipelined_envelope_in_one_write(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack()
    mx = stack.mx
    async with await stack.client() as client:
        await client.send(
            MAIL + b"\r\nRCPT TO:<one@example.test>\r\nRCPT TO:<two@example.test>\r\nDATA\r\n"
        )
        replies = [await client.read_reply() for _ in range(4)]
        assert replies[0].startswith(b"250 2.1.0 ")
        assert replies[1] == replies[2] == b"250 2.1.5 Ok\r\n"  # the MX's own RCPT replies
        assert replies[3].startswith(b"354 ")
        await client.send(BODY + b".\r\nQUIT\r\n")
        final = await client.read_reply()
        assert (await client.read_reply()).startswith(b"221 ")
    (message,) = await mx.wait_for_messages(1)
    assert final == message.reply and final.startswith(b"250 2.0.0 Ok: queued as ")
    assert message.mail_from == MAIL
    assert message.rcpt_to == [b"RCPT TO:<one@example.test>", b"RCPT TO:<two@example.test>"]
    assert message.data == BODY
    assert message.peer_host == stack.source
    await settle()
    assert len(mx.messages) == 1
    assert len(mx.connections) == 1


def mx_commands(connection: MXConnection) -> list[tuple[bytes, bool]]:
    """(verb, arrived pipelined) for each command the MX read on ``connection``."""
    verbs = [command.split(b" ")[0] for command in connection.commands]
    return list(zip(verbs, connection.pipelined, strict=True))


async def test_data_pipelined_by_the_client_goes_to_the_mx_with_the_rcpt(
    relay_stack: RelayStackFactory,
) -> None:
    """A client that pipelines MAIL, RCPT and DATA (Postfix, Exim) costs one MX round trip
    less per message: DATA goes out with the RCPT, and the 354 passed on is the MX's."""
    stack = await relay_stack()
    mx = stack.mx
    async with await stack.client() as client:
        await client.send(MAIL + b"\r\nRCPT TO:<one@example.test>\r\nDATA\r\n")
        replies = [await client.read_reply() for _ in range(3)]
        assert replies[0].startswith(b"250 2.1.0 ")
        assert replies[1] == b"250 2.1.5 Ok\r\n"
        assert replies[2] == b"354 End data with <CR><LF>.<CR><LF>\r\n"  # the MX's text
        await client.send(BODY + b".\r\n")
        final = await client.read_reply()
        # A client that waits for each reply: DATA is sent when it arrives.
        second = await deliver(client, [b"two@example.test"], b"second\r\n")
    first_message, second_message = await mx.wait_for_messages(2)
    assert final == first_message.reply and second == second_message.reply
    assert first_message.data == BODY
    assert mx_commands(mx.connections[0])[-6:] == [
        (b"MAIL", False),
        (b"RCPT", True),
        (b"DATA", True),
        (b"MAIL", False),
        (b"RCPT", True),
        (b"DATA", False),
    ]


async def test_pipelined_data_after_the_only_recipient_is_refused(
    relay_stack: RelayStackFactory,
) -> None:
    stack = await relay_stack(
        mxes=[{"replies": {"RCPT": smtp_reply(550, "5.1.1 <one@example.test>: no such user")}}]
    )
    mx = stack.mx
    async with await stack.client() as client:
        await client.send(MAIL + b"\r\nRCPT TO:<one@example.test>\r\nDATA\r\n")
        replies = [await client.read_reply() for _ in range(3)]
        assert replies[1].startswith(b"550 5.1.1 <one@example.test>")
        assert replies[2].startswith(b"554 5.5.1 ")  # the MX refused the DATA too
        assert (await client.command(b"RSET")).startswith(b"250 ")
    await settle()
    assert mx.messages == []
    assert mx_commands(mx.connections[0])[-2:] == [(b"DATA", True), (b"RSET", False)]


async def test_pipelined_data_after_a_refused_last_recipient_sends_the_message(
    relay_stack: RelayStackFactory,
) -> None:
    def rcpt(line: bytes) -> bytes:
        if b"two@" in line:
            return smtp_reply(550, "5.1.1 no such user")
        return smtp_reply(250, "2.1.5 Ok")

    stack = await relay_stack(mxes=[{"replies": {"RCPT": rcpt}}])
    async with await stack.client() as client:
        await client.send(
            MAIL + b"\r\nRCPT TO:<one@example.test>\r\nRCPT TO:<two@example.test>\r\nDATA\r\n"
        )
        replies = [await client.read_reply() for _ in range(4)]
        assert [reply[:4] for reply in replies] == [b"250 ", b"250 ", b"550 ", b"354 "]
        await client.send(BODY + b".\r\n")
        final = await client.read_reply()
    (message,) = await stack.mx.wait_for_messages(1)
    assert final == message.reply and final.startswith(b"250 ")
    assert message.rcpt_to == [b"RCPT TO:<one@example.test>"]


async def test_an_mx_that_waits_for_data_after_refusing_mail_is_dropped(
    relay_stack: RelayStackFactory,
) -> None:
    """A broken MX that answers a pipelined DATA with 354 after refusing MAIL waits for data:
    that connection must not be reused (its next "MAIL" would become message text)."""
    stack = await relay_stack(
        mxes=[
            {
                "replies": {
                    "MAIL": smtp_reply(550, "5.7.1 sender refused"),
                    "DATA": smtp_reply(354, "go ahead"),
                }
            }
        ]
    )
    mx = stack.mx
    async with await stack.client() as client:
        await client.send(MAIL + b"\r\nRCPT TO:<one@example.test>\r\nDATA\r\n")
        replies = [await client.read_reply() for _ in range(3)]
        assert replies[1].startswith(b"550 5.7.1 sender refused")
        assert replies[2].startswith(b"554 5.5.1 ")
        closed = await mx.wait_closed(0)
        assert closed.commands[-1] == b"DATA" and mx.messages == []


async def test_pipelined_whole_transaction_with_rset_and_second_mail(
    relay_stack: RelayStackFactory,
) -> None:
    stack = await relay_stack()
    mx = stack.mx
    async with await stack.client() as client:
        await client.send(MAIL + b"\r\nRCPT TO:<one@example.test>\r\nRSET\r\nNOOP\r\n")
        replies = [await client.read_reply() for _ in range(4)]
        assert [r[:4] for r in replies] == [b"250 ", b"250 ", b"250 ", b"250 "]
        final = await deliver(client, [b"two@example.test"])
        assert final.startswith(b"250 2.0.0 ")
    (message,) = await mx.wait_for_messages(1)
    assert message.rcpt_to == [b"RCPT TO:<two@example.test>"]
    assert b"RSET" in mx.connections[0].commands


# -- 3. one route per transaction ----------------------------------------------------------------


async def test_second_route_is_452_then_its_own_transaction(
    relay_stack: RelayStackFactory,
) -> None:
    stack = await relay_stack(mxes=[{}, {}], domains={"d1.test": 0, "d2.test": 1})
    mx1, mx2 = stack.mxes
    async with await stack.client() as client:
        assert (await client.command(MAIL)).startswith(b"250 2.1.0 ")
        assert await client.command(b"RCPT TO:<a@d1.test>") == b"250 2.1.5 Ok\r\n"
        assert (await client.command(b"RCPT TO:<b@d2.test>")).startswith(b"452 4.5.3 ")
        assert (await client.command(b"DATA")).startswith(b"354 ")
        await client.send(BODY + b".\r\n")
        first = await client.read_reply()
        (message1,) = await mx1.wait_for_messages(1)
        assert first == message1.reply and first.startswith(b"250 ")
        assert message1.rcpt_to == [b"RCPT TO:<a@d1.test>"]
        assert mx2.connections == []

        second = await deliver(client, [b"b@d2.test"], b"second\r\n")
        (message2,) = await mx2.wait_for_messages(1)
        assert second == message2.reply and second.startswith(b"250 ")
        assert message2.rcpt_to == [b"RCPT TO:<b@d2.test>"]
        assert message2.data == b"second\r\n"
        assert message2.peer_host == stack.source
        # The old upstream was closed politely.
        closed = await mx1.wait_closed(0)
        assert closed.commands[-1] == b"QUIT"
        assert len(mx1.messages) == 1
        assert (await client.command(b"QUIT")).startswith(b"221 ")
    closed2 = await mx2.wait_closed(0)
    assert closed2.commands[-1] == b"QUIT"


async def test_domains_sharing_an_mx_host_share_a_transaction(
    relay_stack: RelayStackFactory,
) -> None:
    stack = await relay_stack(domains={"d1.test": 0, "d2.test": 0})
    mx = stack.mx
    async with await stack.client() as client:
        final = await deliver(client, [b"a@d1.test", b"b@d2.test"])
    (message,) = await mx.wait_for_messages(1)
    assert final == message.reply
    assert message.rcpt_to == [b"RCPT TO:<a@d1.test>", b"RCPT TO:<b@d2.test>"]
    assert len(mx.connections) == 1


async def test_consecutive_transactions_reuse_the_upstream(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack()
    mx = stack.mx
    async with await stack.client() as client:
        first = await deliver(client, [b"a@example.test"], b"first\r\n")
        second = await deliver(client, [b"b@example.test"], b"second\r\n")
        assert (await client.command(b"QUIT")).startswith(b"221 ")
    first_message, second_message = await mx.wait_for_messages(2)
    assert (first, second) == (first_message.reply, second_message.reply)
    assert [m.data for m in mx.messages] == [b"first\r\n", b"second\r\n"]
    assert len(mx.connections) == 1
    assert first_message.connection_index == second_message.connection_index == 0
    closed = await mx.wait_closed(0)
    assert closed.commands[-1] == b"QUIT"


# -- 4. the MX's replies, byte for byte -------------------------------------------------------


async def test_multiline_final_reply_passes_through(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack(mxes=[{"multiline_final_reply": True}])
    async with await stack.client() as client:
        final = await deliver(client, [b"r@example.test"])
    (message,) = await stack.mx.wait_for_messages(1)
    assert final == message.reply
    assert final.count(b"\r\n") == 2 and final.startswith(b"250-2.0.0 Ok: queued as ")


async def test_mx_rcpt_rejection_passes_through(relay_stack: RelayStackFactory) -> None:
    rejection = smtp_reply(550, "5.1.1 <nobody@example.test>: no such user")
    stack = await relay_stack(
        mxes=[
            {
                "replies": {
                    "RCPT": lambda line: rejection if b"nobody" in line else smtp_reply(250, "ok")
                }
            }
        ]
    )
    async with await stack.client() as client:
        assert (await client.command(MAIL)).startswith(b"250 ")
        assert await client.command(b"RCPT TO:<nobody@example.test>") == rejection
        assert await client.command(b"RCPT TO:<somebody@example.test>") == b"250 ok\r\n"
        assert (await client.command(b"DATA")).startswith(b"354 ")
        await client.send(BODY + b".\r\n")
        final = await client.read_reply()
    (message,) = await stack.mx.wait_for_messages(1)
    assert final == message.reply
    assert message.rcpt_to == [b"RCPT TO:<somebody@example.test>"]


async def test_only_rejected_recipients_then_data_is_554(relay_stack: RelayStackFactory) -> None:
    rejection = smtp_reply(550, "5.1.1 no such user")
    stack = await relay_stack(mxes=[{"replies": {"RCPT": rejection}}])
    async with await stack.client() as client:
        assert (await client.command(MAIL)).startswith(b"250 ")
        assert await client.command(b"RCPT TO:<nobody@example.test>") == rejection
        assert (await client.command(b"DATA")).startswith(b"554 5.5.1 ")
        assert (await client.command(b"RSET")).startswith(b"250 ")
    await settle()
    assert stack.mx.messages == []


async def test_mx_mail_rejection_becomes_the_rcpt_reply(relay_stack: RelayStackFactory) -> None:
    rejection = smtp_reply(550, "5.7.1 sender refused by policy")
    stack = await relay_stack(mxes=[{"replies": {"MAIL": rejection}}])
    async with await stack.client() as client:
        assert (await client.command(MAIL)).startswith(b"250 2.1.0 ")  # local
        assert await client.command(b"RCPT TO:<r@example.test>") == rejection
        assert (await client.command(b"DATA")).startswith(b"554 5.5.1 ")
    await settle()
    assert stack.mx.messages == []
    assert [c for c in stack.mx.connections[0].commands if c.startswith(b"MAIL")] == [MAIL]


@pytest.mark.parametrize(
    "final",
    [
        smtp_reply(452, "4.3.1 Insufficient system storage"),
        smtp_reply(451, "4.7.1 greylisted", "4.7.1 please come back later"),
        smtp_reply(554, "5.7.1 message refused: spam"),
    ],
    ids=["452", "451-multiline", "554"],
)
async def test_mx_final_rejection_passes_through(
    relay_stack: RelayStackFactory, final: bytes
) -> None:
    stack = await relay_stack(mxes=[{"replies": {"END": final}}])
    async with await stack.client() as client:
        assert await deliver(client, [b"r@example.test"]) == final
        # The session and the upstream stay usable.
        stack.mx.replies.pop("END")
        accepted = await deliver(client, [b"r@example.test"])
    first, second = await stack.mx.wait_for_messages(2)
    assert first.reply == final and second.reply == accepted and accepted.startswith(b"250 ")


async def test_mx_data_refusal_passes_through(relay_stack: RelayStackFactory) -> None:
    refusal = smtp_reply(554, "5.7.0 not now, not ever")
    stack = await relay_stack(mxes=[{"replies": {"DATA": refusal}}])
    async with await stack.client() as client:
        assert (await client.command(MAIL)).startswith(b"250 ")
        assert (await client.command(b"RCPT TO:<r@example.test>")).startswith(b"250 ")
        assert await client.command(b"DATA") == refusal
        assert (await client.command(b"NOOP")).startswith(b"250 ")
    await settle()
    assert stack.mx.messages == []


# -- 7. connection limits ----------------------------------------------------------------------


async def test_client_outside_allowed_clients_is_refused(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack(server={"allowed_clients": ["127.0.0.250/32"]})
    async with await RawSMTPClient.connect(stack.endpoint) as client:
        assert (await client.read_reply()).startswith(b"554 5.7.1 ")
        assert await client.read_reply() == b""
    assert stack.mx.connections == []


async def test_max_connections(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack(server={"max_connections": 2})
    first = await stack.client()
    second = await stack.client()
    try:
        async with await RawSMTPClient.connect(stack.endpoint) as third:
            with trio.fail_after(2):
                assert (await third.read_reply()).startswith(b"421 4.3.2 ")
                assert await third.read_reply() == b""
        # The two sessions are unaffected; once one ends, a new one is served.
        assert (await first.command(b"NOOP")).startswith(b"250 ")
        assert (await first.command(b"QUIT")).startswith(b"221 ")
        assert await first.read_reply() == b""
        with trio.fail_after(2):
            while True:
                async with await RawSMTPClient.connect(stack.endpoint) as fourth:
                    banner = await fourth.read_reply()
                if banner.startswith(b"220 "):
                    break
                await trio.sleep(0.02)  # the first session may still be finishing
        assert (await second.command(b"NOOP")).startswith(b"250 ")
    finally:
        await first.aclose()
        await second.aclose()


# -- 8. swaks ------------------------------------------------------------------------------------


async def test_swaks_delivers_with_pipelining(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack()
    with trio.fail_after(20):
        result = await trio.run_process(
            [
                "swaks",
                "--server",
                f"{stack.endpoint.host}:{stack.endpoint.port}",
                "--from",
                "sender@client.test",
                "--to",
                "rcpt@example.test",
                "--pipeline",
                "--timeout",
                "10",
                "--body",
                "Sent by swaks.",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    transcript = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 0, transcript
    assert "PIPELINING" in transcript
    (message,) = await stack.mx.wait_for_messages(1)
    assert message.rcpt_to == [b"RCPT TO:<rcpt@example.test>"]
    assert b"Sent by swaks." in message.data
    assert message.peer_host == stack.source
    assert message.reply.decode().strip() in transcript


async def test_smtplib_main_path(relay_stack: RelayStackFactory) -> None:
    """The smtplib client of stack.py against a RelayStack (sanity check of the helper)."""
    from .harness import send

    stack: RelayStack = await relay_stack()
    result = await send(stack.endpoint, "a@client.test", ["rcpt@example.test"], MESSAGE)
    assert result.error is None and not result.refused, result
    (message,) = await stack.mx.wait_for_messages(1)
    assert message.data == MESSAGE
    assert result.final is not None and result.final[0] == 250


# -- shutdown ------------------------------------------------------------------------------------


async def test_shutdown_lets_a_transaction_finish_then_421(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack(server={"shutdown_grace": 10})
    mx = stack.mx
    async with await stack.client() as client:
        idle = await stack.client()
        async with idle:
            assert (await client.command(MAIL)).startswith(b"250 ")
            assert (await client.command(b"RCPT TO:<r@example.test>")).startswith(b"250 ")
            stack.sidecar.shutdown.set()
            # The idle session is told at once; the transaction in progress goes on.
            with trio.fail_after(2):
                assert (await idle.read_reply()).startswith(b"421 4.3.0 ")
                assert await idle.read_reply() == b""
            with trio.fail_after(2):
                while True:  # the listener is closed
                    try:
                        extra = await RawSMTPClient.connect(stack.endpoint)
                    except OSError:
                        break
                    await extra.aclose()
                    await trio.sleep(0.02)
            assert (await client.command(b"DATA")).startswith(b"354 ")
            await client.send(BODY + b".\r\n")
            final = await client.read_reply()
            (message,) = await mx.wait_for_messages(1)
            assert final == message.reply and final.startswith(b"250 ")
            # Once the transaction is over, the session ends with 421 too.
            with trio.fail_after(2):
                assert (await client.read_reply()).startswith(b"421 4.3.0 ")
                assert await client.read_reply() == b""
    closed = await mx.wait_closed(0)
    assert closed.commands[-1] == b"QUIT"


# -- the kept upstream going away between transactions ----------------------------------------


async def test_upstream_closed_by_the_mx_between_transactions_is_reopened(
    relay_stack: RelayStackFactory, lab: Lab
) -> None:
    """An MX that drops an idle connection (its own timeout, a restart) must not cost the next
    transaction a 4xx: the sidecar opens a new upstream when the kept one turns out dead."""
    stack = await relay_stack()
    old = stack.mx
    async with await stack.client() as client:
        first = await deliver(client, [b"a@example.test"], b"first\r\n")
        assert first.startswith(b"250 ")
        old.close()  # the MX goes away with the idle connection...
        with trio.fail_after(5):
            while not (old.connections and old.connections[0].closed):
                await trio.sleep(0.01)
        new = await lab.mx(old.endpoint)  # ...and comes back on the same address
        await trio.sleep(0.1)  # HAProxy passes the close on to the sidecar's side
        second = await deliver(client, [b"b@example.test"], b"second\r\n")
        (message,) = await new.wait_for_messages(1)
        assert second == message.reply and second.startswith(b"250 ")
        assert message.data == b"second\r\n"
        assert message.rcpt_to == [b"RCPT TO:<b@example.test>"]


async def test_mx_421_on_rcpt_passes_through_and_drops_the_upstream(
    relay_stack: RelayStackFactory,
) -> None:
    closing = smtp_reply(421, "4.3.2 mx.test shutting down")
    stack = await relay_stack(mxes=[{"replies": {"RCPT": closing}}])
    mx = stack.mx
    async with await stack.client() as client:
        assert (await client.command(MAIL)).startswith(b"250 ")
        assert await client.command(b"RCPT TO:<a@example.test>") == closing
        assert (await client.command(b"RSET")).startswith(b"250 ")
        await mx.wait_closed(0)  # the sidecar does not keep a connection the MX is closing
        del mx.replies["RCPT"]
        final = await deliver(client, [b"b@example.test"])
    (message,) = await mx.wait_for_messages(1)
    assert final == message.reply and final.startswith(b"250 ")
    assert message.connection_index == 1


async def test_mx_closing_at_data_command_is_451(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack(mxes=[{"close_at": "DATA"}])
    async with await stack.client() as client:
        assert (await client.command(MAIL)).startswith(b"250 ")
        assert (await client.command(b"RCPT TO:<a@example.test>")).startswith(b"250 ")
        assert (await client.command(b"DATA")).startswith(b"451 4.4.2 ")
        stack.mx.close_at = None
        final = await deliver(client, [b"a@example.test"])
    (message,) = await stack.mx.wait_for_messages(1)
    assert final == message.reply and final.startswith(b"250 ")


async def test_max_recipients(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack(server={"max_recipients": 2})
    async with await stack.client(greet=False) as client:
        ehlo = await client.command(b"EHLO client.test")
        assert b"LIMITS RCPTMAX=2 RCPTDOMAINMAX=1\r\n" in ehlo
        assert (await client.command(MAIL)).startswith(b"250 ")
        for name in (b"a", b"b"):
            answer = await client.command(b"RCPT TO:<" + name + b"@example.test>")
            assert answer.startswith(b"250 ")
        assert (await client.command(b"RCPT TO:<c@example.test>")).startswith(b"452 4.5.3 ")
        assert (await client.command(b"DATA")).startswith(b"354 ")
        await client.send(BODY + b".\r\n")
        final = await client.read_reply()
    (message,) = await stack.mx.wait_for_messages(1)
    assert final == message.reply
    assert message.rcpt_to == [b"RCPT TO:<a@example.test>", b"RCPT TO:<b@example.test>"]


async def test_mail_parameters_are_replayed(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack()
    async with await stack.client() as client:
        assert (await client.command(MAIL + b" SIZE=1234 BODY=8BITMIME")).startswith(b"250 ")
        assert (await client.command(b"RCPT TO:<a@example.test>")).startswith(b"250 ")
        assert (await client.command(b"DATA")).startswith(b"354 ")
        await client.send("Subject: é\r\n\r\nünïcødé\r\n.\r\n".encode())
        final = await client.read_reply()
    (message,) = await stack.mx.wait_for_messages(1)
    assert final == message.reply
    assert message.mail_from == MAIL + b" SIZE=1234 BODY=8BITMIME"


async def test_smtputf8_needs_an_mx_that_offers_it(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack(mxes=[{"capabilities": ["PIPELINING", "8BITMIME", "SIZE 1000000"]}])
    async with await stack.client() as client:
        assert (await client.command(MAIL + b" SMTPUTF8")).startswith(b"250 ")
        answer = await client.command("RCPT TO:<üser@example.test>".encode())
        assert answer.startswith(b"553 5.6.7 ")
    await settle()
    assert stack.mx.messages == []


async def test_kept_upstream_answering_421_is_replaced(relay_stack: RelayStackFactory) -> None:
    """Postfix and others send "421 4.4.2 timeout" on an idle connection, then close; the next
    MAIL on that kept connection reads the 421. The sidecar reconnects instead of passing on a
    421 that concerns a connection the client never saw."""
    answers = iter([smtp_reply(250, "2.1.0 Ok"), smtp_reply(421, "4.4.2 mx.test timeout")])
    stack = await relay_stack(
        mxes=[{"replies": {"MAIL": lambda line: next(answers, smtp_reply(250, "2.1.0 Ok"))}}]
    )
    mx = stack.mx
    async with await stack.client() as client:
        first = await deliver(client, [b"a@example.test"], b"first\r\n")
        second = await deliver(client, [b"b@example.test"], b"second\r\n")
    first_message, second_message = await mx.wait_for_messages(2)
    assert (first, second) == (first_message.reply, second_message.reply)
    assert (first_message.connection_index, second_message.connection_index) == (0, 1)
    assert second_message.data == b"second\r\n"


async def test_mx_replying_out_of_turn_at_data_is_not_taken_as_final(
    relay_stack: RelayStackFactory,
) -> None:
    """An MX that sends a 250 together with its 354, before any data: that 250 cannot be about
    the message, so the client gets a 4xx and the MX no end of data."""
    stack = await relay_stack(mxes=[{"replies": {"DATA": b"354 go\r\n250 2.0.0 fake\r\n"}}])
    async with await stack.client() as client:
        assert (await client.command(b"MAIL FROM:<a@client.test>")).startswith(b"250")
        assert (await client.command(b"RCPT TO:<r@example.test>")).startswith(b"250")
        assert (await client.command(b"DATA")).startswith(b"451 4.4.2 ")
    assert stack.mx.messages == []


async def test_unsolicited_bytes_after_a_reply_retire_the_connection(
    relay_stack: RelayStackFactory,
) -> None:
    """Extra bytes after the MX's final reply would be read as the reply to the next command;
    the kept connection is replaced instead, and the next message goes out on a new one."""
    extra = b"250 2.0.0 queued\r\n250 2.0.0 unsolicited\r\n"
    stack = await relay_stack(mxes=[{"replies": {"END": extra}}])
    async with await stack.client() as client:
        for _ in range(2):
            assert (await client.command(b"MAIL FROM:<a@client.test>")).startswith(b"250")
            assert (await client.command(b"RCPT TO:<r@example.test>")).startswith(b"250")
            assert (await client.command(b"DATA")).startswith(b"354")
            assert await client.command(MESSAGE + b".") == b"250 2.0.0 queued\r\n"
    assert len(stack.mx.messages) == 2
    assert len(stack.mx.connections) == 2


async def test_slow_mx_replies_are_waited_for_and_timeouts_say_so(
    relay_stack: RelayStackFactory,
) -> None:
    """Issue 10, item 8 through real sockets (the default values are pinned by
    tests/unit/test_session_mx_waits.py): an RCPT reply slower than the old fixed wait but
    within mx_command_timeout gets through; one past it is a 4xx that says "timed out"."""
    stack = await relay_stack(
        mxes=[{"delays": {"RCPT": 1.5}}],
        delivery={"mx_command_timeout": 3, "setup_timeout": 8, "data_done_timeout": 3},
    )
    result = await send(stack.endpoint, "a@client.test", ["rcpt@example.test"], MESSAGE)
    assert final_status(result) == (250, "2.0.0"), result
    stack.mx.delays["RCPT"] = 4
    result = await send(stack.endpoint, "a@client.test", ["rcpt@example.test"], MESSAGE)
    code, text = result.refused["rcpt@example.test"]
    assert (code, text) == (
        451,
        b"4.4.2 Timed out waiting for the MX while sending the envelope (no reply within 3s);"
        b" message not delivered, try later",
    )
    stack.mx.delays["RCPT"] = 0
    stack.mx.delays["END"] = 4
    client = await stack.client()
    for command in (b"MAIL FROM:<a@client.test>", b"RCPT TO:<rcpt@example.test>", b"DATA"):
        assert (await client.command(command))[:1] in (b"2", b"3")
    final = await client.command(MESSAGE + b".")
    assert final.startswith(b"451 4.4.2 Timed out waiting for the MX before its final reply"), final
    await client.aclose()


async def test_end_of_grace_421s_open_transactions_and_passes_owed_final_replies(
    relay_stack: RelayStackFactory,
) -> None:
    """Issue 10, item 10: when shutdown_grace runs out, a session whose end of data the MX
    already has waits for the MX's reply and passes it on (the MX may have accepted the
    message: a 421 would make the client send it again); sessions not yet past their end of
    data get 421 and their MX sees no end of data."""
    stack = await relay_stack(
        mxes=[{"delays": {"END": 2.5}}],
        server={"shutdown_grace": 1},
        delivery={"data_done_timeout": 10},
    )
    mx = stack.mx
    owed = await stack.client()
    mid_data = await stack.client()
    envelope_only = await stack.client()
    for client in (owed, mid_data, envelope_only):
        assert (await client.command(MAIL)).startswith(b"250 ")
        assert (await client.command(b"RCPT TO:<r@example.test>")).startswith(b"250 ")
    for client in (owed, mid_data):
        assert (await client.command(b"DATA")).startswith(b"354 ")
    await owed.send(BODY + b".\r\n")
    await mid_data.send(BODY)  # no end of data yet
    await mx.wait_for(lambda: len(mx.messages) == 1)  # the owed end of data is at the MX
    began = trio.current_time()
    stack.sidecar.shutdown.set()
    with trio.fail_after(5):
        for client in (mid_data, envelope_only):
            assert (await client.read_reply()).startswith(b"421 4.3.0 ")
            assert await client.read_reply() == b""
    assert 0.9 <= trio.current_time() - began < 2.4  # at the end of the grace
    with trio.fail_after(5):
        final = await owed.read_reply()
    (message,) = mx.messages
    assert final == message.reply and final.startswith(b"250 ")  # the MX's own, after the grace
    with trio.fail_after(2):
        assert (await owed.read_reply()).startswith(b"421 4.3.0 ")
    for client in (owed, mid_data, envelope_only):
        await client.aclose()
    # Nothing else reached an end of data, and each aborted MX transaction was cut off.
    await mx.wait_for(lambda: all(connection.closed for connection in mx.connections))
    assert len(mx.messages) == 1
