"""A session never waits for traffic shaping longer than ``shaping.max_wait`` (issue 12,
README "What the MTA is told"), even while connections of its path are parked and taken
again all the time."""

from __future__ import annotations

import trio

from testkit.client import RawSMTPClient

from .harness import FAST_DELIVERY, FAST_SERVER, Lab

MAX_WAIT = 1.0
END_DELAY = 0.3  # seconds the MX takes to answer each end of data
CLIENTS = 40
RUN_FOR = 6.0  # seconds each client keeps sending, one message after another
SLACK = 0.5  # seconds of connecting and MAIL/RCPT round trips on top of the wait


async def test_no_rcpt_waits_longer_than_max_wait_under_a_steady_stream(lab: Lab) -> None:
    stack = await lab.build(
        mxes=[{"delays": {"END": END_DELAY}}],
        server=FAST_SERVER,
        delivery={**FAST_DELIVERY, "setup_timeout": 10},
        sections={"shaping": {"connection_limit": 1, "max_wait": MAX_WAIT}},
    )
    waits: list[tuple[float, bytes]] = []
    stop_at = trio.current_time() + RUN_FOR

    async def client(number: int) -> None:
        sent = 0
        while trio.current_time() < stop_at:
            async with await RawSMTPClient.connect(stack.endpoint) as smtp:
                await smtp.read_reply()
                await smtp.command(b"EHLO client.test")
                await smtp.command(b"MAIL FROM:<a@client.test>")
                began = trio.current_time()
                reply = await smtp.command(f"RCPT TO:<c{number}m{sent}@example.test>".encode())
                waits.append((trio.current_time() - began, reply.strip()))
                if reply.startswith(b"250"):
                    await smtp.command(b"DATA")
                    await smtp.command(b"Subject: x\r\n\r\nHello.\r\n.")
                await smtp.command(b"QUIT")
            sent += 1

    async with trio.open_nursery() as nursery:
        for number in range(CLIENTS):
            nursery.start_soon(client, number)
    longest, reply = max(waits)
    over = [w for w in waits if w[0] > MAX_WAIT + SLACK]
    print(f"{len(waits)} RCPTs; longest {longest:.2f}s ({reply!r}); {len(over)} over the bound")
    assert stack.mx.peak_connections <= 1
    assert not over, over[:5]
