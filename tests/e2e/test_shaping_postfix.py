"""Traffic shaping does not starve other destinations (issue 12), proven with a real Postfix.

Postfix (Debian 12: 3.7) with the README's recipe (``default_transport = sidecar``,
``sidecar_destination_recipient_limit = 1``) and its defaults otherwise (100 delivery
processes, retries after 300 s) relays everything to one sidecar listener. Two sites: a
throttled one (a named site with ``connection_limit = 1`` and ``max_message_rate = "10/s"``,
``max_wait`` at its default, and an MX that takes 0.5 s to answer each end of data) and an
unthrottled one. 500 messages to the throttled site and 50 to the other are submitted
together, interleaved, over SMTP to the Postfix instance's smtpd.

What it proves:

* every unthrottled message reaches its MX within a few seconds of the injection, not behind
  the throttled ones: a session the sidecar holds for a throttled site holds one of Postfix's
  delivery processes for at most ``max_wait``, and most are refused at once (the expected wait
  is over ``max_wait``), so Postfix's processes keep turning over;
* the throttled MX never sees more than ``connection_limit`` connections at once;
* Postfix defers the throttled mail the sidecar refuses (``451 4.4.5`` in its log, deferred
  queue), and bounces nothing.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest
import trio

from testkit.client import RawSMTPClient
from testkit.net import Endpoint

from .harness import Lab
from .mta import ALICE, MailStack, Postfix, PostfixFactory, make_mail_stack, poll

SLOW, FAST = "slow.test", "fast.test"
SLOW_COUNT, FAST_COUNT = 500, 50
CONNECTION_LIMIT = 1
SLOW_END_DELAY = 0.5  # seconds the throttled MX takes to answer each end of data
SUBMITTERS = 10  # SMTP connections the messages are injected over, in parallel
FAST_BOUND = 10.0  # seconds after the injection began by which every unthrottled one arrived
SIDECAR_TRANSPORT = "sidecar   unix  -       -       n       -       -       smtp"


@pytest.fixture
async def postfix_factory() -> AsyncIterator[PostfixFactory]:
    factory = PostfixFactory()
    try:
        yield factory
    finally:
        await factory.stop_all()


def _messages() -> list[str]:
    """The recipients in injection order: one unthrottled message after every ten throttled."""
    slow = iter(f"user{n}@{SLOW}" for n in range(SLOW_COUNT))
    fast = iter(f"user{n}@{FAST}" for n in range(FAST_COUNT))
    return [next(fast) if i % 11 == 10 else next(slow) for i in range(SLOW_COUNT + FAST_COUNT)]


def _address(rcpt: bytes) -> str:
    match = re.search(rb"<([^>]*)>", rcpt)
    assert match, rcpt
    return match[1].decode()


async def _expect(client: RawSMTPClient, line: bytes, code: bytes) -> None:
    reply = await client.command(line)
    assert reply.startswith(code), (line, reply)


async def _submit(endpoint: Endpoint, recipients: list[str], submitted: dict[str, float]) -> None:
    """Inject one message per recipient over SMTP (``SUBMITTERS`` connections, each taking
    every SUBMITTERS-th message, so the interleaving holds); the time each one was queued
    (Postfix's 250 to its end of data) goes into ``submitted``."""

    async def connection(share: list[str]) -> None:
        async with await RawSMTPClient.connect(endpoint) as client:
            assert (await client.read_reply()).startswith(b"220"), "no Postfix banner"
            await _expect(client, b"EHLO submitter.client.test", b"250")
            for recipient in share:
                await _expect(client, f"MAIL FROM:<{ALICE}>".encode(), b"250")
                await _expect(client, f"RCPT TO:<{recipient}>".encode(), b"250")
                await _expect(client, b"DATA", b"354")
                body = (
                    f"From: {ALICE}\r\nTo: {recipient}\r\nSubject: {recipient}\r\n\r\n"
                    "Sent together with 549 others.\r\n."
                ).encode()
                await _expect(client, body, b"250")
                submitted[recipient] = trio.current_time()
            await client.command(b"QUIT")

    async with trio.open_nursery() as nursery:
        for first in range(SUBMITTERS):
            nursery.start_soon(connection, recipients[first::SUBMITTERS])


async def _recipe_postfix(factory: PostfixFactory, stack: MailStack, smtpd: Endpoint) -> Postfix:
    """The README's recipe, Postfix's defaults otherwise, and an smtpd to inject through."""
    listener = stack.egress["b1"].endpoint
    return await factory(
        main={
            "relayhost": f"[{listener.host}]:{listener.port}",
            "default_transport": "sidecar",
            "sidecar_destination_recipient_limit": "1",
            "mynetworks": "127.0.0.0/8",
            "smtpd_peername_lookup": "no",
        },
        services=[SIDECAR_TRANSPORT, f"{smtpd.host}:{smtpd.port} inet n - n - - smtpd"],
    )


async def test_a_throttled_site_does_not_starve_the_others_in_postfix(
    nursery: trio.Nursery, lab: Lab, postfix_factory: PostfixFactory
) -> None:
    stack = await make_mail_stack(
        nursery,
        lab,
        domains=(SLOW, FAST),
        mx_options={SLOW: {"delays": {"END": SLOW_END_DELAY}}},
        sections={
            "shaping": {
                "site": {
                    "slow": {
                        "mx": [f"mx.{SLOW}"],
                        "connection_limit": CONNECTION_LIMIT,
                        "max_message_rate": "10/s",
                    }
                }
            }
        },
    )
    slow_mx, fast_mx = stack.mx[SLOW], stack.mx[FAST]
    smtpd = lab.addresses.endpoint()
    postfix = await _recipe_postfix(postfix_factory, stack, smtpd)
    recipients = _messages()
    slow_recipients = {r for r in recipients if r.endswith("@" + SLOW)}

    submitted: dict[str, float] = {}
    began = trio.current_time()
    await _submit(smtpd, recipients, submitted)
    injected = trio.current_time() - began

    async def describe() -> str:
        return await postfix.report()

    with trio.move_on_after(30):
        await fast_mx.wait_for_messages(FAST_COUNT, timeout=30)
    assert len(fast_mx.messages) == FAST_COUNT, (
        f"only {len(fast_mx.messages)} of {FAST_COUNT} unthrottled messages arrived "
        f"within 30s: starved behind the throttled site"
    )
    arrived = {_address(m.rcpt_to[0]): m.received_at for m in fast_mx.messages}
    last_fast = max(arrived.values()) - began
    latency = max(arrived[r] - submitted[r] for r in arrived)

    # Every throttled message has been tried once: sent, or deferred by the sidecar's 4xx.
    async def every_slow_tried() -> bool:
        return {d.recipient for d in postfix.deliveries()} >= slow_recipients

    await poll(every_slow_tried, timeout=40, what="every throttled one tried", describe=describe)
    slow_done = trio.current_time() - began
    deliveries = postfix.deliveries()
    slow_statuses = [d for d in deliveries if d.recipient in slow_recipients]
    deferred = [d for d in slow_statuses if d.status == "deferred"]
    print(
        f"injection {injected:.2f}s; last unthrottled arrival {last_fast:.2f}s after it began; "
        f"worst unthrottled latency {latency:.2f}s; throttled: {len(slow_mx.messages)} arrived, "
        f"{len(deferred)} deferred, all tried after {slow_done:.2f}s; "
        f"({sum('said: 451 4.4.1' in d.text for d in deferred)} of them 4.4.1); "
        f"throttled MX peak connections {slow_mx.peak_connections}"
    )

    # Every unthrottled message arrived once, within seconds, never deferred.
    assert sorted(arrived) == sorted(r for r in recipients if r.endswith("@" + FAST))
    assert len(fast_mx.messages) == FAST_COUNT
    assert last_fast < FAST_BOUND, (last_fast, injected)
    fast_statuses = [d.status for d in deliveries if d.recipient.endswith("@" + FAST)]
    assert fast_statuses == ["sent"] * FAST_COUNT, postfix.log()

    # The throttled site: within its limit, the rest deferred by Postfix, nothing bounced.
    assert slow_mx.peak_connections <= CONNECTION_LIMIT, slow_mx.peak_connections
    assert deferred, "no throttled message was deferred"
    # Every deferral is the sidecar's 451: 4.4.5 (a shaping limit), or 4.4.1 after
    # delivery.setup_timeout for a session that waited past max_wait (a known bug: see
    # test_shaping_wait_bound.py); never anything else.
    shaped = [d for d in deferred if "said: 451 4.4.5 " in d.text]
    timed_out = [d for d in deferred if "said: 451 4.4.1 Timed out" in d.text]
    assert len(shaped) + len(timed_out) == len(deferred), deferred
    assert len(shaped) >= 0.9 * len(deferred), (len(shaped), len(timed_out))
    assert {d.status for d in slow_statuses} <= {"sent", "deferred"}, postfix.log()
    assert "status=bounced" not in postfix.log()
    assert len(slow_mx.messages) == sum(d.status == "sent" for d in slow_statuses)
    queue = await postfix.queue()
    assert all(entry["queue_name"] in ("deferred", "active") for entry in queue), queue
