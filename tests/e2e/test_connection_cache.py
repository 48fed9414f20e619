"""The connection cache: finished upstream sessions reused by the next transaction on the same
route from any client session, within an idle time and a reuse count; a stale one replaced
transparently; one with an open transaction never parked."""

from __future__ import annotations

import ssl

import trio

from .harness import (
    MESSAGE,
    RelayStack,
    RelayStackFactory,
    final_status,
    rcpt_reply,
    send,
)


async def deliver(stack: RelayStack, recipient: str = "rcpt@example.test") -> None:
    result = await send(stack.endpoint, "a@client.test", [recipient], MESSAGE)
    assert final_status(result) == (250, "2.0.0"), result


async def test_client_sessions_share_one_mx_connection(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack()
    for _ in range(3):
        await deliver(stack)  # a new client connection each time
    assert len(stack.mx.messages) == 3
    assert len(stack.mx.connections) == 1
    assert all(message.peer_host == stack.source for message in stack.mx.messages)


async def test_idle_connections_are_closed_politely(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack(delivery={"connection_cache_idle": 0.2})
    await deliver(stack)
    (connection,) = stack.mx.connections
    with trio.fail_after(5):
        while not connection.closed:
            await trio.sleep(0.05)
    assert connection.commands[-1].upper().startswith(b"QUIT")
    await deliver(stack)  # a new one after the idle time
    assert len(stack.mx.connections) == 2


async def test_reuse_limit(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack(delivery={"connection_reuse_limit": 2})
    for _ in range(5):
        await deliver(stack)
    assert [len(c.messages) for c in stack.mx.connections] == [2, 2, 1]


async def test_stale_cached_connection_is_replaced_transparently(
    relay_stack: RelayStackFactory,
) -> None:
    """The MX answers the cached connection's next MAIL with 421 (its idle timeout, as
    Postfix's smtpd does): the message still goes out, on a new connection, and the client
    never notices."""
    mails = 0

    def mail_reply(line: bytes) -> bytes:
        nonlocal mails
        mails += 1
        return (
            b"421 4.4.2 mx.test Error: timeout exceeded\r\n" if mails == 2 else b"250 2.1.0 Ok\r\n"
        )

    stack = await relay_stack(mxes=[{"replies": {"MAIL": mail_reply}}])
    await deliver(stack)
    await deliver(stack)
    assert len(stack.mx.messages) == 2
    assert len(stack.mx.connections) == 2
    assert stack.mx.connections[0].messages and stack.mx.connections[1].messages


async def test_open_transaction_is_never_parked(relay_stack: RelayStackFactory) -> None:
    """A client that QUITs after an accepted RCPT leaves a transaction open at the MX: that
    connection is closed, not cached, so the next client gets a clean one."""
    stack = await relay_stack()
    answer = await rcpt_reply(stack.endpoint, "rcpt@example.test")
    assert answer.startswith(b"250")
    await deliver(stack)
    assert len(stack.mx.messages) == 1
    assert len(stack.mx.connections) == 2
    await stack.mx.wait_for(lambda: stack.mx.connections[0].closed)
    first = stack.mx.connections[0]
    assert first.messages == [] and first.commands[-1].upper().startswith(b"QUIT")


async def test_disabled_cache_opens_a_connection_per_message(
    relay_stack: RelayStackFactory,
) -> None:
    stack = await relay_stack(delivery={"connection_cache": False})
    for _ in range(2):
        await deliver(stack)
    assert len(stack.mx.connections) == 2
    await stack.mx.wait_for(lambda: all(c.closed for c in stack.mx.connections))
    assert all(c.commands[-1].upper().startswith(b"QUIT") for c in stack.mx.connections)


async def test_connection_with_unsolicited_bytes_is_never_reused(
    relay_stack: RelayStackFactory,
) -> None:
    """Issue 10, item 1: the MX sends an extra reply 0.1 s after its end-of-data reply. The
    next transaction must not take it as the reply to its MAIL (and so tell the client a
    refused recipient was accepted): the cached connection is out of step, it is closed and the
    transaction goes out on a fresh one, with every reply the MX's own for its command."""

    def rcpt_reply_for(line: bytes) -> bytes:
        if b"refused@" in line:
            return b"550 5.1.1 <refused@example.test>: Recipient address rejected\r\n"
        return b"250 2.1.5 Ok\r\n"

    stack = await relay_stack(
        mxes=[
            {
                "replies": {"RCPT": rcpt_reply_for},
                "unsolicited_after_end": (0.1, b"250 2.0.0 extra\r\n"),
            }
        ]
    )
    await deliver(stack)
    await trio.sleep(0.3)  # the extra line is there now, on the parked connection
    refused = await send(
        stack.endpoint, "a@client.test", ["refused@example.test", "rcpt@example.test"], MESSAGE
    )
    assert refused.refused == {
        "refused@example.test": (550, b"5.1.1 <refused@example.test>: Recipient address rejected")
    }, refused
    assert final_status(refused) == (250, "2.0.0"), refused
    assert len(stack.mx.messages) == 2
    assert stack.mx.messages[1].rcpt_to == [b"RCPT TO:<rcpt@example.test>"]
    assert len(stack.mx.connections) == 2  # the out-of-step one was not reused


async def test_session_kept_connection_with_unsolicited_bytes_is_not_reused(
    relay_stack: RelayStackFactory,
) -> None:
    """The same within one client session: the upstream it keeps between its transactions
    got an unsolicited line; the next transaction goes out on a fresh connection."""
    stack = await relay_stack(mxes=[{"unsolicited_after_end": (0.1, b"250 2.0.0 extra\r\n")}])
    client = await stack.client()
    for round_ in range(2):
        assert (await client.command(b"MAIL FROM:<a@client.test>")).startswith(b"250")
        answer = await client.command(b"RCPT TO:<rcpt@example.test>")
        assert answer.startswith(b"250"), (round_, answer)
        assert (await client.command(b"DATA")).startswith(b"354")
        final = await client.command(MESSAGE + b".")
        assert final.startswith(b"250 2.0.0"), (round_, final)
        await trio.sleep(0.3)
    await client.aclose()
    assert len(stack.mx.messages) == 2
    assert len(stack.mx.connections) == 2


async def test_tls_connections_are_reused_unless_out_of_step(
    relay_stack: RelayStackFactory, mx_tls_context: ssl.SSLContext
) -> None:
    """Under TLS the look for unsolicited bytes must not mistake the MX's TLS 1.3 session
    tickets for a reply (clean connections are reused), and must still see an extra reply."""
    stack = await relay_stack(mxes=[{"tls_context": mx_tls_context}], delivery={"tls": "required"})
    for _ in range(5):
        await deliver(stack)
    assert len(stack.mx.connections) == 1
    assert all(message.tls for message in stack.mx.messages)
    stack.mx.unsolicited_after_end = (0.1, b"250 2.0.0 extra\r\n")
    await deliver(stack)
    await trio.sleep(0.3)
    await deliver(stack)
    assert len(stack.mx.messages) == 7
    assert len(stack.mx.connections) == 2
