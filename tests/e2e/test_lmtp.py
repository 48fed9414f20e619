"""The LMTP listener (issue 16) end to end with a raw client: one transaction with recipients
in several domains fans out to one upstream per route, each recipient gets its own MX's final
reply (byte for byte), and a route that fails costs only its own recipients. Real HAProxy and
dnsmasq, one TestMX per domain on its own 127.0.0.x."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from .harness import (
    DEFAULT_CAPABILITIES,
    FAST_DELIVERY,
    FAST_SERVER,
    Lab,
    Processes,
    RawSMTPClient,
    Stack,
    smtp_reply,
    wait_exit,
    wait_listening,
)

BODY = b"Subject: lmtp fan-out\r\n\r\nHello.\r\n"
# Recipients in three domains, two in the first: a.test -> mx0, b.test -> mx1, c.test -> mx2.
RECIPIENTS = [b"x@a.test", b"z@b.test", b"y@a.test", b"w@c.test"]
DOMAINS = {"a.test": 0, "b.test": 1, "c.test": 2}


async def lmtp_stack(
    lab: Lab,
    mxes: list[dict[str, Any]] | None = None,
    *,
    server: dict[str, Any] | None = None,
    delivery: dict[str, Any] | None = None,
    domains: dict[str, int] | None = None,
    max_routes: int | None = None,
) -> Stack:
    """A sidecar with one LMTP listener, three TestMXes (one per domain of DOMAINS)."""
    stack = await lab.build(
        mxes=mxes or [{}, {}, {}],
        domains=domains or DOMAINS,
        server={**FAST_SERVER, **(server or {})},
        delivery={**FAST_DELIVERY, **(delivery or {})},
        protocol="lmtp",
        start=max_routes is None,
    )
    if max_routes is not None:
        stack.config["listener"][0]["max_routes"] = max_routes
        stack.running = await lab.sidecar(stack.config)
    return stack


async def lmtp_client(stack: Stack) -> RawSMTPClient:
    client = await RawSMTPClient.connect(stack.endpoint)
    banner = await client.read_reply()
    assert banner.startswith(b"220 ") and b" LMTP " in banner, banner
    answer = await client.command(b"LHLO client.test")
    assert answer.startswith(b"250"), answer
    return client


async def open_transaction(client: RawSMTPClient, recipients: list[bytes]) -> list[bytes]:
    """MAIL and the RCPTs; returns the RCPT replies."""
    assert (await client.command(b"MAIL FROM:<sender@client.test>")).startswith(b"250 ")
    return [await client.command(b"RCPT TO:<" + rcpt + b">") for rcpt in recipients]


async def deliver(
    client: RawSMTPClient, recipients: list[bytes], body: bytes = BODY
) -> list[bytes]:
    """One transaction with every recipient accepted; the replies after the end of data."""
    for rcpt, answer in zip(recipients, await open_transaction(client, recipients), strict=True):
        assert answer.startswith(b"250 "), (rcpt, answer)
    assert (await client.command(b"DATA")).startswith(b"354 ")
    await client.send(body + b".\r\n")
    return [await client.read_reply() for _ in recipients]


async def test_one_transaction_fans_out_one_copy_per_route(lab: Lab) -> None:
    stack = await lmtp_stack(lab, [{}, {"multiline_final_reply": True}, {}])
    async with await lmtp_client(stack) as client:
        finals = await deliver(client, RECIPIENTS)
        assert (await client.command(b"QUIT")).startswith(b"221 ")
    mx0, mx1, mx2 = stack.mxes
    for mx in stack.mxes:
        await mx.wait_for_messages(1)
    # Each route's MX got exactly one transaction with exactly its own recipients, from the
    # binding's source address.
    assert [m.rcpt_to for m in mx0.messages] == [[b"RCPT TO:<x@a.test>", b"RCPT TO:<y@a.test>"]]
    assert [m.rcpt_to for m in mx1.messages] == [[b"RCPT TO:<z@b.test>"]]
    assert [m.rcpt_to for m in mx2.messages] == [[b"RCPT TO:<w@c.test>"]]
    for mx in stack.mxes:
        (message,) = mx.messages
        assert message.data == BODY
        assert message.peer_host == stack.source
        assert len(mx.connections) == 1
    # One reply per recipient, in RCPT order, each its own MX's final reply byte for byte.
    assert finals == [
        mx0.messages[0].reply,
        mx1.messages[0].reply,  # multi-line
        mx0.messages[0].reply,
        mx2.messages[0].reply,
    ]
    assert finals[1].count(b"\r\n") == 2


async def test_a_recipient_refused_at_end_of_data_only_bounces_itself(lab: Lab) -> None:
    refused = smtp_reply(554, "5.7.1 rejected by content filter")
    stack = await lmtp_stack(lab, [{}, {}, {"replies": {"END": refused}}])
    async with await lmtp_client(stack) as client:
        finals = await deliver(client, RECIPIENTS)
    assert [final[:3] for final in finals] == [b"250", b"250", b"250", b"554"]
    assert finals[3] == refused


async def test_an_mx_refusing_data_gets_its_recipients_refused_at_the_end(lab: Lab) -> None:
    refused = smtp_reply(451, "4.3.0 DATA not now")
    stack = await lmtp_stack(lab, [{}, {"replies": {"DATA": refused}}, {}])
    async with await lmtp_client(stack) as client:
        finals = await deliver(client, RECIPIENTS)
    assert finals == [
        stack.mxes[0].messages[0].reply,
        refused,
        stack.mxes[0].messages[0].reply,
        stack.mxes[2].messages[0].reply,
    ]
    assert stack.mxes[1].messages == []


async def test_every_route_refusing_data_gets_one_reply(lab: Lab) -> None:
    stack = await lmtp_stack(
        lab,
        [
            {"replies": {"DATA": smtp_reply(554, "5.3.0 no")}},
            {"replies": {"DATA": smtp_reply(451, "4.3.0 later")}},
            {},
        ],
    )
    async with await lmtp_client(stack) as client:
        for answer in await open_transaction(client, RECIPIENTS[:3]):
            assert answer.startswith(b"250 ")
        # RFC 2033 section 4.2: a failed DATA has one reply, no per-recipient replies; the
        # temporary refusal wins, so no recipient bounces while its MX may still take it.
        assert await client.command(b"DATA") == smtp_reply(451, "4.3.0 later")
        assert (await client.command(b"NOOP")).startswith(b"250 ")


async def test_an_unreachable_route_only_defers_its_recipients(lab: Lab) -> None:
    stack = await lmtp_stack(lab, [{}, {"close_at": "CONNECT"}, {}])
    async with await lmtp_client(stack) as client:
        answers = await open_transaction(client, RECIPIENTS)
        assert [answer[:4] for answer in answers] == [b"250 ", b"451 ", b"250 ", b"250 "]
        assert (await client.command(b"DATA")).startswith(b"354 ")
        await client.send(BODY + b".\r\n")
        finals = [await client.read_reply() for _ in range(3)]
    assert [final[:3] for final in finals] == [b"250", b"250", b"250"]
    assert len(stack.mxes[0].messages) == 1 and len(stack.mxes[2].messages) == 1


async def test_an_mx_lost_mid_data_costs_only_its_recipients(lab: Lab) -> None:
    stack = await lmtp_stack(lab, [{}, {"close_at": "END"}, {}])
    async with await lmtp_client(stack) as client:
        finals = await deliver(client, RECIPIENTS)
    assert finals[1].startswith(b"451 4.4.2 "), finals[1]
    assert [final[:3] for i, final in enumerate(finals) if i != 1] == [b"250"] * 3


async def test_a_route_that_times_out_gets_a_4xx_the_others_complete(lab: Lab) -> None:
    stack = await lmtp_stack(lab, [{}, {}, {"hang_at": "END"}], delivery={"data_done_timeout": 2})
    async with await lmtp_client(stack) as client:
        with trio.fail_after(10):
            finals = await deliver(client, RECIPIENTS)
    assert finals[3].startswith(b"451 4.4.2 Timed out"), finals[3]
    assert [final[:3] for final in finals[:3]] == [b"250"] * 3


async def test_client_vanishing_mid_data_no_mx_sees_an_end(lab: Lab) -> None:
    stack = await lmtp_stack(lab)
    client = await lmtp_client(stack)
    await open_transaction(client, RECIPIENTS)
    assert (await client.command(b"DATA")).startswith(b"354 ")
    await client.send(b"Subject: cut\r\n\r\npartial line\r\n")
    await trio.sleep(0.3)
    await client.aclose()
    for mx in stack.mxes:
        await mx.wait_closed(0)
        assert mx.messages == []


async def test_smuggling_variants_reach_no_mx(lab: Lab) -> None:
    stack = await lmtp_stack(lab, [{"accept_bare_lf": True}] * 3)
    for smuggled in (
        b"a\r\n.\nMAIL FROM:<evil@x>\r\n",
        b"a\n.\r\nMAIL FROM:<evil@x>\r\n",
        b"a\r\n\n.\n\r\n",
        b"a\r.\r\nb\r\n",
    ):
        async with await lmtp_client(stack) as client:
            await open_transaction(client, RECIPIENTS)
            assert (await client.command(b"DATA")).startswith(b"354 ")
            await client.send(b"Subject: s\r\n\r\n" + smuggled + b"\r\n.\r\n")
            finals = [await client.read_reply() for _ in RECIPIENTS]
            assert all(final.startswith(b"554 5.6.0 ") for final in finals), finals
            assert (await client.command(b"NOOP")).startswith(b"250 ")
    for mx in stack.mxes:
        assert mx.messages == []


async def test_ehlo_is_refused_and_lhlo_offers_no_domain_limit(lab: Lab) -> None:
    stack = await lmtp_stack(lab)
    async with await RawSMTPClient.connect(stack.endpoint) as client:
        await client.read_reply()
        assert (await client.command(b"EHLO client.test")).startswith(b"500 5.5.1 ")
        lhlo = await client.command(b"LHLO client.test")
        assert b"RCPTDOMAINMAX" not in lhlo and b"DSN" not in lhlo and b"PIPELINING" in lhlo


async def test_one_log_line_per_route_with_the_transaction_id(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    refused = smtp_reply(554, "5.7.1 no")
    stack = await lmtp_stack(lab, [{}, {}, {"replies": {"END": refused}}])
    with caplog.at_level(logging.INFO, logger="sidecar.transaction"):
        async with await lmtp_client(stack) as client:
            await deliver(client, RECIPIENTS)
            await deliver(client, RECIPIENTS[:1])
            await client.command(b"QUIT")
    lines = [r.fields for r in caplog.records if r.name == "sidecar.transaction"]  # type: ignore[attr-defined]
    first, second = sorted({line["transaction"] for line in lines})
    by_mx = {line["mx"]: line for line in lines if line["transaction"] == first}
    assert sorted(by_mx) == ["mx0.test", "mx1.test", "mx2.test"]
    assert by_mx["mx0.test"]["rcpt"] == "2/0/0" and by_mx["mx0.test"]["outcome"] == "delivered"
    assert by_mx["mx1.test"]["rcpt"] == "1/0/0"
    assert by_mx["mx2.test"]["outcome"] == "rejected"
    assert by_mx["mx2.test"]["reply"] == "554 5.7.1 no"
    assert all(line["source"] == stack.source for line in lines)
    assert [line["mx"] for line in lines if line["transaction"] == second] == ["mx0.test"]
    assert first.split(".")[0] == second.split(".")[0]  # the session's id, then a number


async def test_routes_per_transaction_are_bounded(lab: Lab) -> None:
    stack = await lmtp_stack(lab, max_routes=2)
    async with await lmtp_client(stack) as client:
        answers = await open_transaction(client, RECIPIENTS)
        # a.test and b.test take the two routes; a.test's second recipient rides along;
        # c.test would be a third: 452, retried by the MTA in another transaction.
        assert [answer[:9] for answer in answers] == [b"250 2.1.5"] * 3 + [b"452 4.5.3"]
        assert (await client.command(b"DATA")).startswith(b"354 ")
        await client.send(BODY + b".\r\n")
        finals = [await client.read_reply() for _ in range(3)]
        assert all(final.startswith(b"250 ") for final in finals), finals
    assert stack.mxes[2].connections == []


def vm_kib(pid: int, field: str) -> int:
    """``VmRSS`` / ``VmHWM`` (peak RSS) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


async def test_a_slow_mx_sets_the_pace_and_memory_stays_bounded(
    lab: Lab, processes: Processes
) -> None:
    """A 24 MiB message to three routes, one MX taking the data at ~6 MiB/s: every route gets
    the whole message, every recipient its MX's 250, and ``sidecar run`` grows by far less
    than one copy of the message (each chunk goes to every route before the next is read)."""
    stack = await lab.build(
        mxes=[{}, {}, {"slow_data": (64 * 1024, 0.01)}],
        domains=DOMAINS,
        server={**FAST_SERVER, "max_message_size": 64 * 1024 * 1024},
        delivery={**FAST_DELIVERY, "data_send_timeout": 30, "data_done_timeout": 30},
        protocol="lmtp",
        start=False,
    )
    started = await processes.start(["run", "-c", str(stack.config_path)])
    await wait_listening(stack.listener, started)
    pid = started.process.pid
    line = b"x" * 1022 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (24 * 1024)
    client = await RawSMTPClient.connect(stack.listener)
    async with client:
        assert (await client.read_reply()).startswith(b"220 ")
        assert (await client.command(b"LHLO client.test")).startswith(b"250")
        baseline = vm_kib(pid, "VmRSS")
        began = trio.current_time()
        with trio.fail_after(60):
            finals = await deliver(client, RECIPIENTS, body)
        elapsed = trio.current_time() - began
    assert all(final.startswith(b"250 ") for final in finals), finals
    for mx in stack.mxes:
        (message,) = mx.messages
        assert message.data == body
    assert elapsed > 2, elapsed  # the slow MX set the pace: 24 MiB at 6 MiB/s at most
    growth = vm_kib(pid, "VmHWM") - baseline
    assert growth < 8 * 1024, f"grew by {growth} KiB for a 24 MiB message"


async def test_an_mx_vanishing_mid_data_costs_only_its_recipient(lab: Lab) -> None:
    """b.test's MX goes away while a 16 MiB message is still being written to it (it takes
    the data at ~300 KiB/s, so after 1 s most of it is still to come): z@b.test gets
    451 4.4.2, the others their 250 (the rest of the data goes on to them)."""
    stack = await lmtp_stack(
        lab,
        [{}, {"slow_data": (16 * 1024, 0.05)}, {}],
        server={"max_message_size": 64 * 1024 * 1024},
        delivery={"data_send_timeout": 30, "data_done_timeout": 30},
    )
    body = b"Subject: big\r\n\r\n" + (b"y" * 1022 + b"\r\n") * (16 * 1024)
    vanishing = stack.mxes[1]

    async def vanish() -> None:
        await vanishing.wait_for_connections(1)
        await trio.sleep(1)
        vanishing.close()

    async with await lmtp_client(stack) as client, trio.open_nursery() as nursery:
        nursery.start_soon(vanish)
        with trio.fail_after(60):
            finals = await deliver(client, RECIPIENTS, body)
    assert finals[1].startswith(b"451 4.4.2 Connection to the MX lost during DATA"), finals[1]
    assert [finals[0][:4], finals[2][:4], finals[3][:4]] == [b"250 "] * 3, finals
    assert vanishing.messages == []
    assert stack.mxes[2].messages[0].data == body


async def test_a_252_to_rcpt_is_an_accepted_recipient(lab: Lab) -> None:
    """An MX that answers RCPT with 252 (RFC 5321 lists it among RCPT's positive replies)
    took the recipient: it gets the message and the client its final reply (before: the
    recipient was passed on as accepted, but DATA left it out: LMTP owed one reply more
    than it gave)."""
    took = smtp_reply(252, "2.1.5 cannot verify, will take it")
    stack = await lmtp_stack(lab, [{}, {"replies": {"RCPT": took}}, {}])
    async with await lmtp_client(stack) as client:
        answers = await open_transaction(client, RECIPIENTS[:2])
        assert answers == [answers[0], took] and answers[0].startswith(b"250 ")
        assert (await client.command(b"DATA")).startswith(b"354 ")
        await client.send(BODY + b".\r\n")
        finals = [await client.read_reply() for _ in range(2)]
        assert (await client.command(b"NOOP")).startswith(b"250 ")
    assert finals == [stack.mxes[0].messages[0].reply, stack.mxes[1].messages[0].reply]


async def test_a_stop_after_the_end_of_data_still_gives_every_reply(
    lab: Lab, processes: Processes
) -> None:
    """SIGTERM while c.test's MX holds the end of data and answers only after the shutdown
    grace (2 s) is over: the session still waits for it and gives all four replies, each
    its MX's own, then the process exits 0."""
    stack = await lab.build(
        mxes=[{}, {}, {"delays": {"END": 3}}],
        domains=DOMAINS,
        server=FAST_SERVER,
        delivery=FAST_DELIVERY,
        protocol="lmtp",
        start=False,
    )
    started = await processes.start(["run", "-c", str(stack.config_path)])
    await wait_listening(stack.listener, started)
    client = await RawSMTPClient.connect(stack.listener)
    async with client:
        assert (await client.read_reply()).startswith(b"220 ")
        assert (await client.command(b"LHLO client.test")).startswith(b"250")
        await open_transaction(client, RECIPIENTS)
        assert (await client.command(b"DATA")).startswith(b"354 ")
        await client.send(BODY + b".\r\n")
        slow = stack.mxes[2]
        await slow.wait_for(lambda: len(slow.connections[0].commands) >= 4)  # MAIL RCPT DATA
        await trio.sleep(0.3)
        started.process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            finals = [await client.read_reply() for _ in RECIPIENTS]
    assert all(final.startswith(b"250 ") for final in finals), (finals, started.stderr)
    assert finals[3] == slow.messages[0].reply
    assert await wait_exit(started, timeout=15) == 0, started.stderr


async def test_a_non_ascii_header_stops_only_the_routes_without_smtputf8(lab: Lab) -> None:
    """SMTPUTF8 on MAIL and a UTF-8 Subject: b.test's MX does not offer SMTPUTF8, so only
    z@b.test gets 554 5.6.9 (its MX sees no end of data); the others get the message."""
    no_utf8 = [c for c in DEFAULT_CAPABILITIES if c != "SMTPUTF8"]
    stack = await lmtp_stack(lab, [{}, {"capabilities": no_utf8}, {}])
    body = "Subject: grüße\r\n\r\nHallo.\r\n".encode()
    async with await lmtp_client(stack) as client:
        mail = b"MAIL FROM:<sender@client.test> SMTPUTF8"
        assert (await client.command(mail)).startswith(b"250 ")
        for rcpt in RECIPIENTS:
            assert (await client.command(b"RCPT TO:<" + rcpt + b">")).startswith(b"250 ")
        assert (await client.command(b"DATA")).startswith(b"354 ")
        await client.send(body + b".\r\n")
        finals = [await client.read_reply() for _ in RECIPIENTS]
    assert finals[1].startswith(b"554 5.6.9 "), finals
    assert [finals[i][:4] for i in (0, 2, 3)] == [b"250 "] * 3, finals
    assert stack.mxes[1].messages == []
    assert stack.mxes[0].messages[0].data == body


async def test_the_replies_do_not_wait_for_a_route_s_rset(lab: Lab) -> None:
    """b.test's MX refuses DATA and then never answers RSET: the client has all its replies
    at once, not after the sidecar's RSET wait (10 s) for that route."""
    refused = smtp_reply(451, "4.3.0 DATA not now")
    stack = await lmtp_stack(lab, [{}, {"replies": {"DATA": refused}, "hang_at": "RSET"}, {}])
    async with await lmtp_client(stack) as client:
        with trio.fail_after(4):
            finals = await deliver(client, RECIPIENTS)
    assert finals[1] == refused
