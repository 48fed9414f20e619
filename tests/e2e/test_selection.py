"""Choosing the egress end to end: a binding_group with ``selection = "hash"`` keeps each
recipient domain on one member (one source address, for IP-reputation warm-up) and moves only
an unplumbed member's domains; a binding with a list of HAProxy servers delivers through the
live one, and counts the dead one's connect failures until it is unplumbed."""

from __future__ import annotations

from typing import Any

import trio

from sidecar.routing import hash_ranking

from .harness import (
    MESSAGE,
    DnsRecord,
    Endpoint,
    HostRecord,
    Lab,
    MXRecord,
    RunningSidecar,
    TestMX,
    final_status,
    free_port,
    make_config,
    proxied_binding,
    rcpt_reply,
    send,
)

INTERVAL = 0.2
HEALTH = {
    "health_check_interval": INTERVAL,
    "health_check_timeout": INTERVAL,
    "health_check_failure_threshold": 2,
    "health_check_success_threshold": 2,
}
FAST_DELIVERY = {"connect_timeout": 2, "banner_timeout": 2, "mx_command_timeout": 2}


async def _mx_for_domains(lab: Lab, domains: list[str]) -> tuple[TestMX, Endpoint, int]:
    """One TestMX that is the MX of every domain in ``domains``."""
    mx_address = lab.addresses.ipv4()
    port = free_port(mx_address)
    mx = await lab.mx(Endpoint(mx_address, port))
    zone: list[DnsRecord] = [HostRecord("mx.test", [mx_address])]
    zone += [MXRecord(domain, "mx.test") for domain in domains]
    dns = lab.dnsmasq(zone)
    return mx, dns.endpoint, port


def _hash_group_config(
    lab: Lab, bindings: dict[str, dict[str, Any]], nameserver: Endpoint, port: int
) -> dict[str, Any]:
    config = make_config(
        listeners=[],
        bindings=bindings,
        nameserver=nameserver,
        port=port,
        delivery=FAST_DELIVERY,
        ha_proxy_client=HEALTH,
    )
    config["listener"] = [{"address": lab.listener(), "binding_group": "g1"}]
    config["binding_group"] = {"g1": {"bindings": list(bindings), "selection": "hash"}}
    return config


async def _deliver_each(sidecar: RunningSidecar, mx: TestMX, domains: list[str]) -> dict[str, str]:
    """Deliver one message to ``rcpt@domain`` for each domain, in order, each in its own
    session; the source address the MX saw, per domain."""
    seen: dict[str, str] = {}
    for domain in domains:
        count = len(mx.messages)
        result = await send(sidecar.endpoint, "a@client.test", [f"rcpt@{domain}"], MESSAGE)
        assert final_status(result) == (250, "2.0.0"), (domain, result)
        message = (await mx.wait_for_messages(count + 1))[-1]
        assert message.rcpt_to == [f"RCPT TO:<rcpt@{domain}>".encode()]
        seen[domain] = message.peer_host
    return seen


async def test_hash_selection_keeps_each_domain_on_one_source(lab: Lab) -> None:
    domains = [f"d{i}.test" for i in range(8)]
    mx, nameserver, port = await _mx_for_domains(lab, domains)
    sources = {"b1": lab.addresses.ipv4(), "b2": lab.addresses.ipv4()}
    bindings = {
        name: proxied_binding(lab.haproxy().bind, source=source) for name, source in sources.items()
    }
    sidecar = await lab.sidecar(_hash_group_config(lab, bindings, nameserver, port))

    first = await _deliver_each(sidecar, mx, domains)
    # The same again, in the opposite order, then with two recipients per message.
    assert await _deliver_each(sidecar, mx, domains[::-1]) == first
    for domain in domains[:3]:
        recipients = [f"one@{domain}", f"two@{domain}"]
        count = len(mx.messages)
        result = await send(sidecar.endpoint, "a@client.test", recipients, MESSAGE)
        assert final_status(result) == (250, "2.0.0") and not result.refused
        message = (await mx.wait_for_messages(count + 1))[-1]
        assert len(message.rcpt_to) == 2
        assert message.peer_host == first[domain]

    assert set(first.values()) == set(sources.values())  # both sources are used
    for domain, source in first.items():
        assert source == sources[hash_ranking(domain, list(sources))[0]]


async def test_hash_selection_moves_only_the_unplumbed_members_domains(lab: Lab) -> None:
    domains = [f"d{i}.test" for i in range(9)]
    mx, nameserver, port = await _mx_for_domains(lab, domains)
    names = ["b1", "b2", "b3"]
    sources = {name: lab.addresses.ipv4() for name in names}
    proxies = {name: lab.haproxy() for name in names}
    bindings = {name: proxied_binding(proxies[name].bind, source=sources[name]) for name in names}
    sidecar = await lab.sidecar(_hash_group_config(lab, bindings, nameserver, port))
    by_source = {source: name for name, source in sources.items()}

    before = {d: by_source[s] for d, s in (await _deliver_each(sidecar, mx, domains)).items()}
    gone = max(names, key=lambda name: list(before.values()).count(name))
    assert list(before.values()).count(gone) >= 2

    proxies[gone].stop()
    await trio.sleep(INTERVAL * 2 * 2)  # the failure threshold is reached by now
    after = {d: by_source[s] for d, s in (await _deliver_each(sidecar, mx, domains)).items()}
    for domain in domains:
        if before[domain] == gone:
            assert after[domain] == hash_ranking(domain, names)[1], domain
        else:
            assert after[domain] == before[domain], domain
    moved_to = {after[domain] for domain in domains if before[domain] == gone}
    assert gone not in after.values() and moved_to  # spread according to each domain's ranking


async def test_server_list_dead_then_live_delivers_and_unplumbs_the_dead_one(lab: Lab) -> None:
    mx, nameserver, port = await _mx_for_domains(lab, ["example.test"])
    dead = lab.addresses.endpoint()  # nothing listens there
    live = lab.haproxy()
    source = lab.addresses.ipv4()
    # Checks run at start-up and then only every minute: at most one of the dead server's
    # failures comes from the checker, the others are counted by deliveries.
    health = {**HEALTH, "health_check_interval": 60}
    sidecar = await lab.sidecar(
        make_config(
            listeners=[(lab.listener(), "b1")],
            bindings={
                "b1": {"ha_proxy_server": [str(dead), str(live.bind)], "ha_proxy_src_addr": source}
            },
            nameserver=nameserver,
            port=port,
            # A new connection per message: each delivery attempt meets the dead server.
            delivery={**FAST_DELIVERY, "connection_cache": False},
            ha_proxy_client=health,
        )
    )
    for _ in range(2):
        result = await send(sidecar.endpoint, "a@client.test", ["rcpt@example.test"], MESSAGE)
        assert final_status(result) == (250, "2.0.0")
    messages = await mx.wait_for_messages(2)
    assert [m.peer_host for m in messages] == [source, source]

    # The dead server is unplumbed now, so it is no longer tried: with the live HAProxy gone
    # too, the reply says the dead one was skipped and only the live one was attempted.
    live.stop()
    answer = await rcpt_reply(sidecar.endpoint, "rcpt@example.test")
    assert answer.startswith(b"451 4.4.1 Cannot reach HAProxy for binding b1: "), answer
    assert f"{dead} unplumbed; {live.bind}: ".encode() in answer, answer
    assert len(mx.connections) == 2
