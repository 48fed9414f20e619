"""The deeper health check end to end (``ha_proxy_client.health_check_probe``): each check sends
a PROXY v2 header through the real HAProxy, from the binding's source, to a probe TestMX, and
needs its 220 banner. A probe that fails unplumbs the server although HAProxy itself accepts
TCP connections: mail then gets 451 4.4.1 at RCPT, and flows again once the probe succeeds."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from .harness import (
    MESSAGE,
    Endpoint,
    HAProxy,
    Lab,
    RunningSidecar,
    SendResult,
    TestMX,
    final_status,
    rcpt_reply,
    send,
    smtp_reply,
)

INTERVAL = 0.2
HEALTH: dict[str, Any] = {
    "health_check_interval": INTERVAL,
    "health_check_timeout": 0.5,
    "health_check_failure_threshold": 2,
    "health_check_success_threshold": 2,
}
FAST_DELIVERY = {"connect_timeout": 2, "banner_timeout": 2, "mx_command_timeout": 2}


async def _stack(lab: Lab, probe: Endpoint) -> tuple[RunningSidecar, HAProxy, TestMX, str]:
    """A sidecar whose binding b1 (source returned) goes through a real HAProxy, delivering
    example.test to a TestMX, with ``health_check_probe`` at ``probe``."""
    stack = await lab.build(
        hosts=["mx.example.test"],
        delivery=FAST_DELIVERY,
        sections={"ha_proxy_client": {**HEALTH, "health_check_probe": str(probe)}},
    )
    return stack.sidecar, stack.haproxy, stack.mx, stack.source


async def _deliver(sidecar: RunningSidecar) -> SendResult:
    return await send(sidecar.endpoint, "a@client.test", ["rcpt@example.test"], MESSAGE)


UNPLUMBED = b"451 4.4.1 No HAProxy server of binding b1 is up"


async def test_probe_through_a_working_egress_keeps_the_server_plumbed(lab: Lab) -> None:
    probe_mx = await lab.mx(hostname="probe.test")
    sidecar, _, mx, source = await _stack(lab, probe_mx.endpoint)
    await probe_mx.wait_for_connections(3, timeout=5)
    # Every probe came through HAProxy from the binding's source, and said QUIT after the 220.
    assert {c.peer_host for c in probe_mx.connections} == {source}
    await probe_mx.wait_for(lambda: any(c.commands == [b"QUIT"] for c in probe_mx.connections))
    assert probe_mx.messages == []

    assert final_status(await _deliver(sidecar)) == (250, "2.0.0")
    (message,) = await mx.wait_for_messages(1)
    assert message.peer_host == source


@pytest.mark.parametrize("probe_kind", ["554-banner", "nothing-listens"])
async def test_failing_probe_unplumbs_although_haproxy_accepts(lab: Lab, probe_kind: str) -> None:
    probe_mx: TestMX | None = None
    if probe_kind == "554-banner":
        probe_mx = await lab.mx(banner=smtp_reply(554, "5.7.1 probe.test: go away"))
        probe = probe_mx.endpoint
    else:
        probe = lab.addresses.endpoint()
    sidecar, haproxy, mx, source = await _stack(lab, probe)
    with trio.fail_after(5):
        while not (answer := await rcpt_reply(sidecar.endpoint, "rcpt@example.test")).startswith(
            UNPLUMBED
        ):
            # Before the failure threshold the RCPT goes through (the MX itself works).
            assert answer.startswith(b"250"), answer
            await trio.sleep(INTERVAL / 2)
    assert answer == UNPLUMBED + f" ({haproxy.bind})\r\n".encode()
    # HAProxy itself still accepts TCP connections: a plain connect check would pass.
    stream = await trio.open_tcp_stream(*haproxy.address)
    await stream.aclose()
    assert all(m.peer_host == source for m in mx.messages)
    if probe_mx is None:
        return

    # The probe target answers 220 again: plumbed after the success threshold, mail flows.
    probe_mx.banner = smtp_reply(220, "probe.test ESMTP")
    with trio.fail_after(5):
        while (result := await _deliver(sidecar)).final is None:
            assert result.refused["rcpt@example.test"][0] == 451, result
            await trio.sleep(INTERVAL / 2)
    assert final_status(result) == (250, "2.0.0")
    message = (await mx.wait_for_messages(1))[-1]
    assert message.peer_host == source
