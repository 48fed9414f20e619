"""Traffic shaping end to end (issue 12), memory backend: a connection_limit holds while the
waiting sessions take the connections others park; a wait over max_wait is a 451 4.4.5 at
once; a throttle reply from the MX suspends the path by rule; a binding_group then sends
through another member. Real HAProxy, dnsmasq and test MX."""

from __future__ import annotations

from typing import Any

import trio

from sidecar.routing import hash_ranking

from .harness import (
    FAST_DELIVERY,
    FAST_SERVER,
    MESSAGE,
    Lab,
    SendResult,
    TestMX,
    final_status,
    send,
)


async def _peak_connections(mx: TestMX, peak: list[int]) -> None:
    """Sample the MX's open connections until cancelled; the highest count goes to peak[0]."""
    while True:
        peak[0] = max(peak[0], sum(not c.closed for c in mx.connections))
        await trio.sleep(0.005)


async def _send_together(endpoint: Any, count: int) -> list[SendResult]:
    results: list[SendResult] = []

    async def one(index: int) -> None:
        results.append(await send(endpoint, "a@client.test", [f"r{index}@example.test"], MESSAGE))

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(one, index)
    return results


async def test_connection_limit_holds_and_waiters_take_parked_connections(lab: Lab) -> None:
    stack = await lab.build(
        mxes=[{"delays": {"END": 0.3}}],
        server=FAST_SERVER,
        delivery=FAST_DELIVERY,
        sections={"shaping": {"connection_limit": 2, "max_wait": 10}},
    )
    mx = stack.mxes[0]
    peak = [0]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_peak_connections, mx, peak)
        results = await _send_together(stack.endpoint, 8)
        nursery.cancel_scope.cancel()
    assert all(final_status(result) == (250, "2.0.0") for result in results), results
    assert len(mx.messages) == 8
    assert peak[0] <= 2, peak
    assert len(mx.connections) <= 2  # the waiters took the connections the others parked


async def test_a_wait_over_max_wait_is_451_4_4_5_at_once(lab: Lab) -> None:
    stack = await lab.build(
        mxes=[{"delays": {"END": 3}}],
        server=FAST_SERVER,
        delivery={**FAST_DELIVERY, "data_done_timeout": 10},
        sections={"shaping": {"connection_limit": 1, "max_wait": 0.5}},
    )
    async with trio.open_nursery() as nursery:
        first: list[SendResult] = []

        async def hold() -> None:
            first.append(await send(stack.endpoint, "a@client.test", ["r@example.test"], MESSAGE))

        nursery.start_soon(hold)
        await stack.mxes[0].wait_for(lambda: bool(stack.mxes[0].connections))
        began = trio.current_time()
        second = await send(stack.endpoint, "a@client.test", ["s@example.test"], MESSAGE)
        waited = trio.current_time() - began
    code, text = second.refused["s@example.test"]
    assert code == 451 and text.startswith(b"4.4.5 "), text
    assert b"connection_limit 1" in text, text
    assert waited < 3, waited  # after max_wait, not after the first message's 3 s
    assert final_status(first[0]) == (250, "2.0.0")
    assert len(stack.mxes[0].connections) == 1


THROTTLE = "421 4.7.28 [192.0.2.1] Our system has detected an unusual rate of mail, try later"
RULE = {"match": r"^421[ -]4\.7\.28 ", "action": "suspend", "duration": "1h"}


def _throttling_rcpt(line: bytes) -> bytes:
    if b"throttle@" in line:
        return THROTTLE.encode() + b"\r\n"
    return b"250 2.1.5 Ok\r\n"


async def test_a_throttle_reply_suspends_the_path_by_rule(lab: Lab) -> None:
    stack = await lab.build(
        mxes=[{"replies": {"RCPT": _throttling_rcpt}}],
        server=FAST_SERVER,
        delivery=FAST_DELIVERY,
        sections={"shaping": {"rule": [RULE]}},
    )
    mx = stack.mxes[0]
    throttled = await send(stack.endpoint, "a@client.test", ["throttle@example.test"], MESSAGE)
    assert throttled.refused["throttle@example.test"][0] == 421  # the MX's own reply
    commands = sum(len(connection.commands) for connection in mx.connections)
    later = await send(stack.endpoint, "a@client.test", ["ok@example.test"], MESSAGE)
    code, text = later.refused["ok@example.test"]
    assert code == 451 and text.startswith(b"4.4.5 ") and b"suspended" in text, text
    assert sum(len(connection.commands) for connection in mx.connections) == commands
    assert mx.messages == []


async def test_a_group_sends_through_another_member_when_one_path_is_suspended(
    lab: Lab,
) -> None:
    stack = await lab.build(
        mxes=[{"replies": {"RCPT": _throttling_rcpt}}],
        bindings=("b1", "b2"),
        server=FAST_SERVER,
        delivery=FAST_DELIVERY,
        sections={"shaping": {"rule": [RULE]}},
        start=False,
    )
    config = dict(stack.config)
    config["listener"] = [{"address": lab.listener(), "binding_group": "g1"}]
    config["binding_group"] = {"g1": {"bindings": ["b1", "b2"], "selection": "hash"}}
    sidecar = await lab.sidecar(config)
    first, second = hash_ranking("example.test", ["b1", "b2"])
    mx = stack.mxes[0]
    throttled = await send(sidecar.endpoint, "a@client.test", ["throttle@example.test"], MESSAGE)
    assert throttled.refused["throttle@example.test"][0] == 421
    result = await send(sidecar.endpoint, "a@client.test", ["ok@example.test"], MESSAGE)
    assert final_status(result) == (250, "2.0.0"), result
    (message,) = await mx.wait_for_messages(1)
    assert message.peer_host == stack.sources[second] != stack.sources[first]
