"""The DATA relay end to end: the client's bytes reach the MX unchanged (dot-stuffing
included), SMTP smuggling never gets a second message to the MX (DESIGN.md invariant 4), and
every fault between client and MX ends in a 4xx for the client, never a 250 (invariant 1)."""

from __future__ import annotations

import pytest
import trio

from .harness import (
    RawSMTPClient,
    RelayStack,
    RelayStackFactory,
)

MAIL = b"MAIL FROM:<sender@client.test>"
RCPT = b"RCPT TO:<rcpt@example.test>"


async def start_data(client: RawSMTPClient, rcpt: bytes = RCPT) -> None:
    assert (await client.command(MAIL)).startswith(b"250 2.1.0 ")
    assert (await client.command(rcpt)).startswith(b"250 ")
    assert (await client.command(b"DATA")).startswith(b"354 ")


async def deliver_clean(stack: RelayStack, client: RawSMTPClient, body: bytes) -> bytes:
    await start_data(client)
    await client.send(body + b".\r\n")
    return await client.read_reply()


# -- 5. byte for byte --------------------------------------------------------------------------

BODIES = {
    "dot-stuffed": b"Subject: dots\r\n\r\n..leading dot\r\nmiddle\r\n...two dots\r\n",
    "only-dot-dot": b"Subject: dots\r\n\r\n..\r\n..\r\nend\r\n..\r\n",
    "starts-with-dot-dot": b"..\r\nfirst line was a lone dot\r\n",
    "empty": b"",
    "blank-lines": b"\r\n\r\n\r\n",
    "utf-8": "Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\nGrüße, ünïcødé — 日本語 ✓\r\n".encode(),
    "8-bit-latin1": b"Subject: x\r\n\r\nna\xefve caf\xe9 \xff\xfe\x80\r\n",
    "long-lines": b"Subject: x\r\n\r\n" + b"y" * 998 + b"\r\n" + b"z" * 5000 + b"\r\n",
    "almost-markers": b"a\r\n.a\r\n. \r\n.\t\r\n .\r\n",
}


@pytest.mark.parametrize("body", list(BODIES.values()), ids=list(BODIES))
async def test_data_reaches_the_mx_byte_for_byte(
    relay_stack: RelayStackFactory, body: bytes
) -> None:
    stack = await relay_stack()
    async with await stack.client() as client:
        final = await deliver_clean(stack, client, body)
    (message,) = await stack.mx.wait_for_messages(1)
    assert message.data == body
    assert final == message.reply and final.startswith(b"250 ")


async def test_data_split_in_odd_places(relay_stack: RelayStackFactory) -> None:
    """The end marker and dot-stuffed lines split across writes still come out exactly."""
    stack = await relay_stack()
    body = b"Subject: split\r\n\r\n..dot\r\nline\r\n"
    async with await stack.client() as client:
        await start_data(client)
        for piece in (body[:20], body[20:21], body[21:-1], body[-1:], b".", b"\r", b"\n"):
            await client.send(piece)
            await trio.sleep(0.01)
        final = await client.read_reply()
    (message,) = await stack.mx.wait_for_messages(1)
    assert message.data == body and final == message.reply


async def test_ten_megabytes(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack()
    line = b"0123456789abcdefghijklmnopqrstuvwxyz\xc3\xa9" * 2 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (10 * 1024 * 1024 // len(line)) + b"..end\r\n"
    assert len(body) > 10 * 1024 * 1024 - 200
    async with await stack.client() as client:
        await start_data(client)
        with trio.fail_after(20):
            await client.send(body + b".\r\n")
            final = await client.read_reply()
    (message,) = await stack.mx.wait_for_messages(1)
    assert len(message.data) == len(body)
    assert message.data == body
    assert final == message.reply and final.startswith(b"250 ")


async def test_message_over_max_size_is_552_and_never_ends_at_the_mx(
    relay_stack: RelayStackFactory,
) -> None:
    stack = await relay_stack(server={"max_message_size": 10_000})
    async with await stack.client() as client:
        await start_data(client)
        await client.send(b"x" * 20_000 + b"\r\n.\r\n")
        assert (await client.read_reply()).startswith(b"552 5.3.4 ")
        final = await deliver_clean(stack, client, b"small\r\n")
    (message,) = await stack.mx.wait_for_messages(1)
    assert message.data == b"small\r\n" and final == message.reply
    await trio.sleep(0.1)
    assert len(stack.mx.messages) == 1


async def test_size_limit_counts_as_rfc_1870(relay_stack: RelayStackFactory) -> None:
    """RFC 1870 section 3: the size excludes the final ".CRLF" and the stuffing dots. A
    message of exactly max_message_size octets, announced with SIZE=max_message_size, goes
    through; so does a smaller one whose many dot-stuffed lines make it longer on the wire;
    one octet more is refused, and the MX never sees its end."""
    stack = await relay_stack(server={"max_message_size": 100_000})
    exact = (b"x" * 98 + b"\r\n") * 1000
    dotted = b"..line\r\n" * 12_000 + b"y" * 5_998 + b"\r\n"  # 90 000 octets unstuffed
    assert len(exact) == 100_000 and len(dotted) == 102_000
    async with await stack.client() as client:
        assert (await client.command(MAIL + b" SIZE=100000")).startswith(b"250 ")
        assert (await client.command(RCPT)).startswith(b"250 ")
        assert (await client.command(b"DATA")).startswith(b"354 ")
        await client.send(exact + b".\r\n")
        assert (await client.read_reply()).startswith(b"250 ")
        assert (await deliver_clean(stack, client, dotted)).startswith(b"250 ")
        await start_data(client)
        await client.send(exact + b"z\r\n.\r\n")
        assert (await client.read_reply()).startswith(b"552 5.3.4 ")
    messages = await stack.mx.wait_for_messages(2)
    assert [m.data for m in messages] == [exact, dotted]
    await trio.sleep(0.1)
    assert len(stack.mx.messages) == 2


async def test_max_line_length_does_not_bound_data_lines(relay_stack: RelayStackFactory) -> None:
    """max_line_length bounds command lines only. Data is relayed unchanged: a relay that
    refused or split a long line would bounce or alter mail (RFC 5321 section 4.5.3.1.6's
    1000 octets is the sender's duty and the MX's call), and the data never sits in a line
    buffer (it is bounded by max_message_size and scanned chunk by chunk)."""
    stack = await relay_stack(server={"max_line_length": 512})
    body = b"Subject: long\r\n\r\n" + b"w" * 1_000_000 + b"\r\n"
    async with await stack.client() as client:
        assert (await client.command(b"NOOP " + b"n" * 600)).startswith(b"500 5.5.6 ")
        final = await deliver_clean(stack, client, body)
    (message,) = await stack.mx.wait_for_messages(1)
    assert message.data == body
    assert final == message.reply and final.startswith(b"250 ")


# -- 6. SMTP smuggling -------------------------------------------------------------------------

SMUGGLED = (
    b"MAIL FROM:<evil@client.test>\r\n"
    b"RCPT TO:<victim@example.test>\r\n"
    b"DATA\r\n"
    b"From: ceo@example.test\r\nSubject: smuggled\r\n\r\nSmuggled!\r\n"
)
HEAD = b"From: sender@client.test\r\nSubject: innocent\r\n\r\nHello"
# Each is: the data (without the final ".\r\n"), the client's real end being "\r\n.\r\n".
SMUGGLING = {
    "lf-dot-lf": HEAD + b"\n.\n" + SMUGGLED,
    "lf-dot-crlf": HEAD + b"\n.\r\n" + SMUGGLED,
    "crlf-dot-lf": HEAD + b"\r\n.\n" + SMUGGLED,
    "cr-dot-cr": HEAD + b"\r.\r" + SMUGGLED,
    "crlf-dot-cr": HEAD + b"\r\n.\r" + SMUGGLED,
    "cr-dot-crlf": HEAD + b"\r.\r\n" + SMUGGLED,
    "crlf-nul-dot-crlf": HEAD + b"\r\n\x00.\r\n" + SMUGGLED,
    "dot-lf-at-start": b".\n" + SMUGGLED,
    "bare-lf-in-header": b"Subject: a\nb\r\n\r\nbody\r\n",
    "bare-cr-in-body": b"Subject: a\r\n\r\nbo\rdy\r\n",
    "bare-lf-last": b"Subject: a\r\n\r\nbody\n\r\n",
    "bare-cr-before-end": b"Subject: a\r\n\r\nbody\r",
}


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "byte-writes"])
@pytest.mark.parametrize("data", list(SMUGGLING.values()), ids=list(SMUGGLING))
async def test_smuggling_is_refused_and_the_mx_sees_no_message(
    relay_stack: RelayStackFactory, data: bytes, split: bool
) -> None:
    stack = await relay_stack(mxes=[{"accept_bare_lf": True}])
    mx = stack.mx
    payload = data + b"\r\n.\r\n" if not data.endswith(b"\r\n") else data + b".\r\n"
    async with await stack.client() as client:
        await start_data(client)
        if split:
            # The suspicious bytes each in their own write, so they straddle the sidecar's reads.
            cut = max(0, len(HEAD) - 2) if payload.startswith(HEAD) else 0
            await client.send(payload[:cut])
            for index in range(cut, min(cut + 12, len(payload))):
                await client.send(payload[index : index + 1])
                await trio.sleep(0.005)
            await client.send(payload[cut + 12 :])
        else:
            await client.send(payload)
        answer = await client.read_reply()
        assert answer.startswith(b"554 5.6.0 "), answer
        # Nothing else comes back: the smuggled commands were data, not commands.
        with trio.move_on_after(0.2):
            extra = await client.read_reply()
            pytest.fail(f"unexpected reply after the refusal: {extra!r}")
        # The MX's connection was closed without an end of data: no message at all.
        await mx.wait_closed(0)
        assert mx.messages == []
        # A clean message in the same session still works (on a new upstream).
        final = await deliver_clean(stack, client, b"Subject: clean\r\n\r\nclean\r\n")
        assert (await client.command(b"QUIT")).startswith(b"221 ")
    (message,) = await mx.wait_for_messages(1)
    assert final == message.reply and final.startswith(b"250 ")
    assert message.data == b"Subject: clean\r\n\r\nclean\r\n"
    assert message.rcpt_to == [RCPT]
    await trio.sleep(0.1)
    assert len(mx.messages) == 1
    assert not any(b"evil@" in command for c in mx.connections for command in c.commands)


# -- 7. faults ---------------------------------------------------------------------------------


async def test_client_vanishing_mid_data_leaves_no_message(
    relay_stack: RelayStackFactory,
) -> None:
    stack = await relay_stack()
    mx = stack.mx
    async with await stack.client() as client:
        await start_data(client)
        await client.send(b"Subject: partial\r\n\r\n" + b"line\r\n" * 1000)
        await trio.sleep(0.1)  # let the sidecar forward what it has
    closed = await mx.wait_closed(0)
    assert mx.messages == []
    assert closed.commands[-1] == b"DATA"  # no QUIT either: the MX must drop the partial data


async def test_client_vanishing_after_partial_end_marker(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack()
    mx = stack.mx
    async with await stack.client() as client:
        await start_data(client)
        await client.send(b"almost done\r\n.")
        await trio.sleep(0.1)
    await mx.wait_closed(0)
    assert mx.messages == []


async def test_mx_closing_at_end_of_data_is_451(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack(mxes=[{"close_at": "END"}])
    async with await stack.client() as client:
        answer = await deliver_clean(stack, client, b"Subject: x\r\n\r\nbody\r\n")
        assert answer.startswith(b"451 4.4.2 "), answer
        assert (await client.command(b"NOOP")).startswith(b"250 ")
    (message,) = await stack.mx.wait_for_messages(1)
    assert message.reply == b""  # the MX got the data but never answered


async def test_mx_vanishing_mid_data_is_451(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack()
    mx = stack.mx
    async with await stack.client() as client:
        await start_data(client)
        await client.send(b"Subject: x\r\n\r\n" + b"first half\r\n" * 100)
        await trio.sleep(0.1)
        mx.close()  # the MX goes away (every connection dropped) in the middle of the data
        with trio.fail_after(5):
            # (polled: a cancelled TestMX records ``closed`` but does not notify wait_for)
            while not mx.connections[0].closed:
                await trio.sleep(0.01)
        await client.send(b"second half\r\n" * 100 + b".\r\n")
        with trio.fail_after(10):
            answer = await client.read_reply()
        assert answer.startswith(b"451 4.4.2 "), answer
        assert (await client.command(b"QUIT")).startswith(b"221 ")
    assert mx.messages == []


async def test_mx_hanging_before_final_reply_is_451(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack(mxes=[{"hang_at": "END"}], delivery={"data_done_timeout": 0.5})
    async with await stack.client() as client:
        await start_data(client)
        await client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        with trio.fail_after(5):
            answer = await client.read_reply()
        assert answer.startswith(b"451 4.4.2 "), answer
        # The next transaction gets a fresh upstream (the hung one was dropped).
        stack.mx.hang_at = None
        final = await deliver_clean(stack, client, b"retry\r\n")
        assert final.startswith(b"250 ")
    first, second = await stack.mx.wait_for_messages(2)
    assert first.reply == b"" and second.reply == final
    assert first.connection_index != second.connection_index
    assert stack.mx.connections[0].closed


async def test_mx_hanging_at_data_command_is_451(relay_stack: RelayStackFactory) -> None:
    stack = await relay_stack(mxes=[{"hang_at": "DATA"}], delivery={"data_init_timeout": 0.5})
    async with await stack.client() as client:
        assert (await client.command(MAIL)).startswith(b"250 ")
        assert (await client.command(RCPT)).startswith(b"250 ")
        with trio.fail_after(5):
            answer = await client.command(b"DATA")
        assert answer.startswith(b"451 4.4.2 Timed out waiting for the MX at DATA"), answer
        assert (await client.command(b"NOOP")).startswith(b"250 ")
    assert stack.mx.messages == []


async def test_a_refused_data_is_answered_before_the_mx_s_rset(
    relay_stack: RelayStackFactory,
) -> None:
    """The MX refuses DATA and then never answers RSET: the client has the MX's refusal at
    once, not after the sidecar's RSET wait (10 s). Failed before: the reply was queued
    behind the RSET."""
    refused = b"451 4.3.0 DATA not now\r\n"
    stack = await relay_stack(mxes=[{"replies": {"DATA": refused}, "hang_at": "RSET"}])
    async with await stack.client() as client:
        assert (await client.command(MAIL)).startswith(b"250 ")
        assert (await client.command(RCPT)).startswith(b"250 ")
        with trio.fail_after(4):
            assert await client.command(b"DATA") == refused


async def test_the_client_s_rset_is_answered_before_the_mx_s(
    relay_stack: RelayStackFactory,
) -> None:
    """RSET after an accepted RCPT, the MX never answers RSET: the client has its 250 at
    once (the upstream is dropped after the sidecar's RSET wait, 10 s)."""
    stack = await relay_stack(mxes=[{"hang_at": "RSET"}])
    async with await stack.client() as client:
        assert (await client.command(MAIL)).startswith(b"250 ")
        assert (await client.command(RCPT)).startswith(b"250 ")
        with trio.fail_after(4):
            assert (await client.command(b"RSET")).startswith(b"250 ")
