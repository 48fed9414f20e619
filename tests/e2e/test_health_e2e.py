"""HAProxy health end to end: a stopped HAProxy is unplumbed after the failure threshold (mail
then gets 451 4.4.1 at once, nothing is tried), plumbed again after the success threshold; a
binding_group sends its mail through its plumbed members only."""

from __future__ import annotations

from typing import Any

import trio

from .harness import (
    MESSAGE,
    Endpoint,
    HostRecord,
    Lab,
    MXRecord,
    RelayStackFactory,
    RunningSidecar,
    SendResult,
    TestMX,
    final_status,
    free_port,
    make_config,
    proxied_binding,
    rcpt_reply,
    refusal,
    send,
)

INTERVAL = 0.2
HEALTH = {
    "health_check_interval": INTERVAL,
    "health_check_timeout": INTERVAL,
    "health_check_failure_threshold": 2,
    "health_check_success_threshold": 3,
}
# Long enough for the failure threshold to be reached, with a margin.
FLIP_WAIT = INTERVAL * 2 * 2


async def _mx_and_zone(lab: Lab) -> tuple[TestMX, Endpoint, int]:
    mx_address = lab.addresses.ipv4()
    port = free_port(mx_address)
    mx = await lab.mx(Endpoint(mx_address, port))
    dns = lab.dnsmasq(
        [MXRecord("example.test", "mx.example.test"), HostRecord("mx.example.test", [mx_address])]
    )
    return mx, dns.endpoint, port


async def _deliver(sidecar: RunningSidecar) -> SendResult:
    return await send(sidecar.endpoint, "a@client.test", ["rcpt@example.test"], MESSAGE)


def _group_config(
    lab: Lab,
    bindings: dict[str, dict[str, Any]],
    nameserver: Endpoint,
    port: int,
    health: dict[str, Any],
) -> dict[str, Any]:
    config = make_config(
        listeners=[],
        bindings=bindings,
        nameserver=nameserver,
        port=port,
        # A new connection per delivery: these tests count connections and proxy attempts.
        delivery={"connect_timeout": 2, "banner_timeout": 2, "connection_cache": False},
        ha_proxy_client=health,
    )
    config["listener"] = [{"address": lab.listener(), "binding_group": "g1"}]
    config["binding_group"] = {"g1": {"bindings": list(bindings)}}
    return config


async def test_stopped_haproxy_is_unplumbed_then_plumbed_again(lab: Lab) -> None:
    mx, nameserver, port = await _mx_and_zone(lab)
    haproxy = lab.haproxy()
    source = lab.addresses.ipv4()
    sidecar = await lab.sidecar(
        make_config(
            listeners=[(lab.listener(), "b1")],
            bindings={"b1": proxied_binding(haproxy.bind, source=source)},
            nameserver=nameserver,
            port=port,
            delivery={"connect_timeout": 2, "banner_timeout": 2},
            ha_proxy_client=HEALTH,
        )
    )
    assert final_status(await _deliver(sidecar)) == (250, "2.0.0")

    haproxy.stop()
    await trio.sleep(FLIP_WAIT)
    # Unplumbed: refused at once, without a connection attempt (the reply says why).
    unplumbed = f"451 4.4.1 No HAProxy server of binding b1 is up ({haproxy.bind})\r\n"
    assert await rcpt_reply(sidecar.endpoint, "rcpt@example.test") == unplumbed.encode()
    assert refusal(await _deliver(sidecar), "rcpt@example.test") == (451, "4.4.1")
    assert len(mx.connections) == 1

    started = trio.current_time()
    haproxy.start()
    # Up again, but not plumbed before health_check_success_threshold consecutive checks.
    assert await rcpt_reply(sidecar.endpoint, "rcpt@example.test") == unplumbed.encode()
    with trio.fail_after(5):
        while True:
            result = await _deliver(sidecar)
            if result.final is not None:
                break
            assert refusal(result, "rcpt@example.test") == (451, "4.4.1")
            await trio.sleep(INTERVAL / 4)
    recovered_after = trio.current_time() - started
    assert final_status(result) == (250, "2.0.0")
    assert recovered_after >= INTERVAL * (HEALTH["health_check_success_threshold"] - 1) - 0.02
    messages = await mx.wait_for_messages(2)
    assert [m.peer_host for m in messages] == [source, source]
    assert len(mx.connections) == 2


async def test_binding_group_uses_only_its_plumbed_members(lab: Lab) -> None:
    mx, nameserver, port = await _mx_and_zone(lab)
    dead_proxy = lab.addresses.endpoint()  # nothing listens there
    haproxy = lab.haproxy()
    source1, source2 = lab.addresses.ipv4(), lab.addresses.ipv4()
    sidecar = await lab.sidecar(
        _group_config(
            lab,
            {
                "b1": proxied_binding(dead_proxy, source=source1),
                "b2": proxied_binding(haproxy.bind, source=source2),
            },
            nameserver,
            port,
            HEALTH,
        )
    )
    await trio.sleep(FLIP_WAIT)  # b1's HAProxy is unplumbed by now
    for _ in range(6):
        assert final_status(await _deliver(sidecar)) == (250, "2.0.0")
    messages = await mx.wait_for_messages(6)
    assert [m.peer_host for m in messages] == [source2] * 6

    haproxy.stop()
    await trio.sleep(FLIP_WAIT)
    answer = await rcpt_reply(sidecar.endpoint, "rcpt@example.test")
    assert answer.startswith(b"451 4.4.1 No binding of group g1 has an HAProxy server up")
    assert len(mx.connections) == 6


async def test_binding_group_with_all_members_up_uses_each_in_turn(lab: Lab) -> None:
    mx, nameserver, port = await _mx_and_zone(lab)
    haproxy1, haproxy2 = lab.haproxy(), lab.haproxy()
    source1, source2 = lab.addresses.ipv4(), lab.addresses.ipv4()
    sidecar = await lab.sidecar(
        _group_config(
            lab,
            {
                "b1": proxied_binding(haproxy1.bind, source=source1),
                "b2": proxied_binding(haproxy2.bind, source=source2),
            },
            nameserver,
            port,
            HEALTH,
        )
    )
    for _ in range(4):
        assert final_status(await _deliver(sidecar)) == (250, "2.0.0")
    messages = await mx.wait_for_messages(4)
    assert sorted(m.peer_host for m in messages) == sorted([source1, source2] * 2)


async def test_binding_group_fails_over_to_another_member_before_the_flip(lab: Lab) -> None:
    mx, nameserver, port = await _mx_and_zone(lab)
    dead_proxy = lab.addresses.endpoint()
    haproxy = lab.haproxy()
    source2 = lab.addresses.ipv4()
    slow_health = {
        "health_check_interval": 60,
        "health_check_failure_threshold": 5,
    }  # b1 stays plumbed for the whole test
    sidecar = await lab.sidecar(
        _group_config(
            lab,
            {
                "b1": proxied_binding(dead_proxy, source=lab.addresses.ipv4()),
                "b2": proxied_binding(haproxy.bind, source=source2),
            },
            nameserver,
            port,
            slow_health,
        )
    )
    results = [await _deliver(sidecar) for _ in range(2)]
    assert [final_status(r) for r in results] == [(250, "2.0.0")] * 2
    messages = await mx.wait_for_messages(2)
    assert [m.peer_host for m in messages] == [source2] * 2


async def test_haproxy_with_dontlognull_does_not_log_the_health_checks(
    relay_stack: RelayStackFactory,
) -> None:
    """examples/haproxy.cfg's ``option dontlognull``: HAProxy (logging on) logs no line for
    the sidecar's health checks (a connect and a close before any PROXY header), and still
    logs the connection that relayed a message. Without it each check logs "Connection
    closed while waiting for PROXY protocol header"."""
    quiet = await relay_stack(haproxy={"dontlognull": True})
    noisy = await relay_stack()
    await trio.sleep(2)  # 0.5 s health checks: several of each
    result = await send(quiet.endpoint, "a@client.test", ["rcpt@example.test"], MESSAGE)
    assert final_status(result) == (250, "2.0.0"), result
    await quiet.mx.wait_for(lambda: all(c.closed for c in quiet.mx.connections))
    await trio.sleep(0.5)
    noise = "waiting for PROXY protocol header"
    assert noise in noisy.haproxy.stderr_path.read_text()
    logged = quiet.haproxy.stderr_path.read_text()
    assert noise not in logged, logged
    assert "egress mx/mx" in logged, logged  # the relayed connection is logged
