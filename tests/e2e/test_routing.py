"""Routing end to end: the source address per MX family, one binding per listener, bypass
domains, MX fallback (DESIGN.md section 5), the bound on MX addresses tried, an unreachable
proxy, and the private-destination policy. Real HAProxy and dnsmasq, TestMX servers on their
own 127.0.0.x (or ::1) addresses, all on one delivery port per test."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from .harness import (
    IPV6_LOOPBACK,
    MESSAGE,
    Endpoint,
    HostRecord,
    Lab,
    MXRecord,
    RelayStackFactory,
    TestMX,
    final_status,
    free_port,
    make_config,
    proxied_binding,
    rcpt_reply,
    refusal,
    send,
    smtp_reply,
)

FAST_DELIVERY = {"connect_timeout": 2, "banner_timeout": 2, "mx_command_timeout": 2}


def _connections(*servers: TestMX) -> int:
    return sum(len(server.connections) for server in servers)


# -- address families -------------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["ipv6-bind", "ipv4-bind"])
async def test_ipv6_mx_sees_the_binding_ipv6_source(lab: Lab, listener: str) -> None:
    port = free_port(IPV6_LOOPBACK)
    mx = await lab.mx(Endpoint(IPV6_LOOPBACK, port))
    dns = lab.dnsmasq(
        [MXRecord("v6.test", "mx.v6.test"), HostRecord("mx.v6.test", [IPV6_LOOPBACK])]
    )
    haproxy = lab.haproxy(ipv6=True)
    proxy = haproxy.bind_ipv6 if listener == "ipv6-bind" else haproxy.bind
    sidecar = await lab.sidecar(
        make_config(
            listeners=[(lab.listener(), "b1")],
            bindings={"b1": proxied_binding(proxy, ipv6_source=IPV6_LOOPBACK)},
            nameserver=dns.endpoint,
            port=port,
            delivery=FAST_DELIVERY,
        )
    )
    result = await send(sidecar.endpoint, "a@client.test", ["rcpt@v6.test"], MESSAGE)
    assert final_status(result) == (250, "2.0.0") and not result.refused
    (message,) = await mx.wait_for_messages(1)
    assert message.peer_host == IPV6_LOOPBACK
    assert mx.connections[0].local == (IPV6_LOOPBACK, port)
    assert message.rcpt_to == [b"RCPT TO:<rcpt@v6.test>"]
    assert message.data == MESSAGE
    assert result.final is not None and result.final[1] in message.reply
    # An IPv6 address literal takes the same path.
    literal = "rcpt@[IPv6:::1]"
    result = await send(sidecar.endpoint, "a@client.test", [literal], MESSAGE)
    assert final_status(result) == (250, "2.0.0")
    messages = await mx.wait_for_messages(2)
    assert messages[1].peer_host == IPV6_LOOPBACK
    assert messages[1].rcpt_to == [f"RCPT TO:<{literal}>".encode()]


async def test_aaaa_only_mx_and_a_binding_without_ipv6_source_is_refused(lab: Lab) -> None:
    port = free_port(IPV6_LOOPBACK)
    mx6 = await lab.mx(Endpoint(IPV6_LOOPBACK, port))
    dns = lab.dnsmasq(
        [MXRecord("v6only.test", "mx.v6only.test"), HostRecord("mx.v6only.test", ["::1"])]
    )
    haproxy = lab.haproxy(ipv6=True)
    sidecar = await lab.sidecar(
        make_config(
            listeners=[(lab.listener(), "b1")],
            bindings={"b1": proxied_binding(haproxy.bind, source=lab.addresses.ipv4())},
            nameserver=dns.endpoint,
            port=port,
            delivery=FAST_DELIVERY,
        )
    )
    result = await send(sidecar.endpoint, "a@client.test", ["rcpt@v6only.test"], MESSAGE)
    assert refusal(result, "rcpt@v6only.test") == (451, "4.4.4")
    assert b"ha_proxy_ipv6_src_addr" in result.refused["rcpt@v6only.test"][1]
    assert result.final is None
    await trio.sleep(0.1)
    assert mx6.connections == []


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
async def test_dual_stack_mx_is_reached_over_the_binding_family_only(lab: Lab, family: str) -> None:
    """An MX host with A and AAAA records: a binding with one family's source uses that
    family's address and never the other (DESIGN.md invariant 2)."""
    port = free_port(IPV6_LOOPBACK)
    mx_address = lab.addresses.ipv4()
    mx4 = await lab.mx(Endpoint(mx_address, port))
    mx6 = await lab.mx(Endpoint(IPV6_LOOPBACK, port))
    dns = lab.dnsmasq(
        [
            MXRecord("dual.test", "mx.dual.test"),
            HostRecord("mx.dual.test", [mx_address, IPV6_LOOPBACK]),
        ]
    )
    haproxy = lab.haproxy()
    source = lab.addresses.ipv4()
    if family == "ipv4":
        binding = proxied_binding(haproxy.bind, source=source)
        used, unused, expected_peer = mx4, mx6, source
    else:
        binding = proxied_binding(haproxy.bind, ipv6_source=IPV6_LOOPBACK)
        used, unused, expected_peer = mx6, mx4, IPV6_LOOPBACK
    sidecar = await lab.sidecar(
        make_config(
            listeners=[(lab.listener(), "b1")],
            bindings={"b1": binding},
            nameserver=dns.endpoint,
            port=port,
            delivery=FAST_DELIVERY,
        )
    )
    for _ in range(3):
        result = await send(sidecar.endpoint, "a@client.test", ["rcpt@dual.test"], MESSAGE)
        assert final_status(result) == (250, "2.0.0")
    messages = await used.wait_for_messages(3)
    assert [m.peer_host for m in messages] == [expected_peer] * 3
    assert unused.connections == []


# -- listeners and bindings -------------------------------------------------------------------


async def test_each_listener_uses_its_own_binding_source(lab: Lab) -> None:
    mx_address = lab.addresses.ipv4()
    port = free_port(mx_address)
    mx = await lab.mx(Endpoint(mx_address, port))
    dns = lab.dnsmasq(
        [MXRecord("example.test", "mx.example.test"), HostRecord("mx.example.test", [mx_address])]
    )
    haproxy1, haproxy2 = lab.haproxy(), lab.haproxy()
    source1, source2 = lab.addresses.ipv4(), lab.addresses.ipv4()
    listener1, listener2 = lab.listener(), lab.listener()
    sidecar = await lab.sidecar(
        make_config(
            listeners=[(listener1, "b1"), (listener2, "b2")],
            bindings={
                "b1": proxied_binding(haproxy1.bind, source=source1, ehlo_hostname="one.test"),
                "b2": proxied_binding(haproxy2.bind, source=source2, ehlo_hostname="two.test"),
            },
            nameserver=dns.endpoint,
            port=port,
            delivery=FAST_DELIVERY,
        )
    )
    endpoint1, endpoint2 = sidecar.endpoints
    assert str(endpoint1) == listener1 and str(endpoint2) == listener2
    body1 = MESSAGE + b"via listener one\r\n"
    body2 = MESSAGE + b"via listener two\r\n"
    results = [
        await send(endpoint2, "a@client.test", ["rcpt@example.test"], body2),
        await send(endpoint1, "a@client.test", ["rcpt@example.test"], body1),
    ]
    assert [final_status(r) for r in results] == [(250, "2.0.0")] * 2
    messages = await mx.wait_for_messages(2)
    seen = {m.data: (m.peer_host, m.ehlo) for m in messages}
    assert seen == {body1: (source1, "one.test"), body2: (source2, "two.test")}


# -- bypass -----------------------------------------------------------------------------------


def _bypass_config(
    scope: str,
    listener: str,
    proxy: Endpoint,
    source: str,
    nameserver: Endpoint,
    port: int,
) -> dict[str, Any]:
    bypass = {"bypass.test": {"ha_proxy_bypass": True}}
    extra: dict[str, Any] = {"domain": bypass} if scope == "binding" else {}
    config = make_config(
        listeners=[(listener, "b1")],
        bindings={"b1": proxied_binding(proxy, source=source, **extra)},
        nameserver=nameserver,
        port=port,
        delivery=FAST_DELIVERY,
    )
    if scope == "top-level":
        config["domain"] = bypass
    if scope == "binding_group":
        config["listener"] = [{"address": listener, "binding_group": "g1"}]
        config["binding_group"] = {"g1": {"bindings": ["b1"], "domain": bypass}}
    return config


@pytest.mark.parametrize("scope", ["binding", "binding_group", "top-level"])
async def test_bypass_domain_is_delivered_directly_past_a_dead_proxy(lab: Lab, scope: str) -> None:
    bypass_address, proxied_address = lab.addresses.ipv4(), lab.addresses.ipv4()
    port = free_port(bypass_address)
    bypass_mx = await lab.mx(Endpoint(bypass_address, port))
    proxied_mx = await lab.mx(Endpoint(proxied_address, port))
    dns = lab.dnsmasq(
        [
            MXRecord("bypass.test", "mx.bypass.test"),
            HostRecord("mx.bypass.test", [bypass_address]),
            MXRecord("proxied.test", "mx.proxied.test"),
            HostRecord("mx.proxied.test", [proxied_address]),
        ]
    )
    dead_proxy = lab.addresses.endpoint()  # nothing listens there
    source = lab.addresses.ipv4()
    sidecar = await lab.sidecar(
        _bypass_config(scope, lab.listener(), dead_proxy, source, dns.endpoint, port)
    )
    delivered = await send(sidecar.endpoint, "a@client.test", ["rcpt@bypass.test"], MESSAGE)
    assert final_status(delivered) == (250, "2.0.0")
    (message,) = await bypass_mx.wait_for_messages(1)
    assert message.peer_host != source
    assert message.peer_host == "127.0.0.1"  # the host's own address: a direct connection
    assert delivered.final is not None and delivered.final[1] in message.reply

    refused = await send(sidecar.endpoint, "a@client.test", ["rcpt@proxied.test"], MESSAGE)
    assert refusal(refused, "rcpt@proxied.test") == (451, "4.4.1")
    assert refused.final is None
    assert proxied_mx.connections == []
    assert len(bypass_mx.connections) == 1


# -- MX fallback ------------------------------------------------------------------------------

FALLBACKS: dict[str, dict[str, Any]] = {
    "nothing-listening": {},
    "close-at-connect": {"close_at": "CONNECT"},
    "421-banner": {"banner": smtp_reply(421, "4.3.2 busy, try later")},
    "451-banner": {"banner": smtp_reply(451, "4.3.0 not now")},
    "hang-before-banner": {"hang_at": "CONNECT"},
    "ehlo-421": {"replies": {"EHLO": smtp_reply(421, "4.3.2 going away")}},
}


@pytest.mark.parametrize("behaviour", list(FALLBACKS))
async def test_failing_first_mx_falls_back_to_the_next_preference(lab: Lab, behaviour: str) -> None:
    mx1_address, mx2_address = lab.addresses.ipv4(), lab.addresses.ipv4()
    port = free_port(mx1_address)
    options = FALLBACKS[behaviour]
    mx1 = await lab.mx(Endpoint(mx1_address, port), **options) if options else None
    mx2 = await lab.mx(Endpoint(mx2_address, port))
    dns = lab.dnsmasq(
        [
            MXRecord("example.test", "mx1.example.test", 10),
            MXRecord("example.test", "mx2.example.test", 20),
            HostRecord("mx1.example.test", [mx1_address]),
            HostRecord("mx2.example.test", [mx2_address]),
        ]
    )
    haproxy = lab.haproxy(retries=0)  # a refused MX port: EOF at once
    source = lab.addresses.ipv4()
    sidecar = await lab.sidecar(
        make_config(
            listeners=[(lab.listener(), "b1")],
            bindings={"b1": proxied_binding(haproxy.bind, source=source)},
            nameserver=dns.endpoint,
            port=port,
            delivery={**FAST_DELIVERY, "banner_timeout": 0.5},
        )
    )
    started = trio.current_time()
    result = await send(sidecar.endpoint, "a@client.test", ["rcpt@example.test"], MESSAGE)
    elapsed = trio.current_time() - started
    assert final_status(result) == (250, "2.0.0")
    (message,) = await mx2.wait_for_messages(1)
    assert message.peer_host == source
    assert result.final is not None and result.final[1] in message.reply
    assert elapsed < 3
    if mx1 is not None:
        (connection,) = mx1.connections
        assert connection.peer_host == source
        assert mx1.messages == []
        assert not any(c.startswith(b"MAIL") for c in connection.commands)


async def test_5xx_banner_skips_to_the_next_mx(relay_stack: RelayStackFactory) -> None:
    """DESIGN.md section 5, Postfix's smtp_skip_5xx_greeting: a 554 greeting is that MX
    refusing us; it gets a polite QUIT (RFC 5321 section 3.1) and the next MX takes the mail."""
    banner = smtp_reply(554, "5.7.1 mx0.test says no", "5.7.1 see https://x.test/")
    stack = await relay_stack(
        mxes=[{"banner": banner}, {}],
        domains={"example.test": [0, 1]},
        delivery=FAST_DELIVERY,
        haproxy={"retries": 0},
    )
    mx1, mx2 = stack.mxes
    result = await send(stack.endpoint, "a@client.test", ["rcpt@example.test"], MESSAGE)
    assert final_status(result) == (250, "2.0.0") and not result.refused
    (message,) = await mx2.wait_for_messages(1)
    assert message.peer_host == stack.source
    assert result.final is not None and result.final[1] in message.reply
    connection = await mx1.wait_closed()
    assert connection.peer_host == stack.source
    assert connection.commands == [b"QUIT"]
    assert mx1.messages == []


async def test_5xx_banner_from_every_mx_is_a_4xx(relay_stack: RelayStackFactory) -> None:
    """When every MX greets with 5xx the client gets 451 4.4.1 naming the greetings (Postfix
    defers too): another time, or another MX, may take the mail; a 5xx would bounce it."""
    stack = await relay_stack(
        mxes=[
            {"banner": smtp_reply(554, "5.7.1 mx0.test says no")},
            {"banner": smtp_reply(554, "5.3.2 mx1.test not accepting mail")},
        ],
        domains={"example.test": [0, 1]},
        delivery=FAST_DELIVERY,
        haproxy={"retries": 0},
    )
    mx1, mx2 = stack.mxes
    answer = await rcpt_reply(stack.endpoint, "rcpt@example.test")
    assert answer.startswith(b"451 4.4.1 No MX of example.test reachable: "), answer
    assert f"mx0.test[{mx1.endpoint.host}]: banner 554 5.7.1 mx0.test says no".encode() in answer
    assert f"mx1.test[{mx2.endpoint.host}]: banner 554 5.3.2 mx1.test".encode() in answer
    result = await send(stack.endpoint, "a@client.test", ["rcpt@example.test"], MESSAGE)
    assert refusal(result, "rcpt@example.test") == (451, "4.4.1")
    assert result.final is None
    for mx in (mx1, mx2):
        await mx.wait_for(lambda mx=mx: len(mx.connections) == 2 and mx.connections[1].closed)
        assert [c.commands for c in mx.connections] == [[b"QUIT"], [b"QUIT"]]
        assert mx.messages == []


async def test_at_most_max_mx_addresses_are_tried(lab: Lab) -> None:
    hosts = [lab.addresses.ipv4() for _ in range(6)]
    port = free_port(hosts[0])
    servers = [await lab.mx(Endpoint(host, port), close_at="CONNECT") for host in hosts]
    records: list[Any] = []
    for index, host in enumerate(hosts, start=1):
        records += [
            MXRecord("many.test", f"mx{index}.many.test", index * 10),
            HostRecord(f"mx{index}.many.test", [host]),
        ]
    dns = lab.dnsmasq(records)
    haproxy = lab.haproxy(retries=0)
    sidecar = await lab.sidecar(
        make_config(
            listeners=[(lab.listener(), "b1")],
            bindings={"b1": proxied_binding(haproxy.bind, source=lab.addresses.ipv4())},
            nameserver=dns.endpoint,
            port=port,
            delivery={**FAST_DELIVERY, "max_mx_addresses": 3},
        )
    )
    result = await send(sidecar.endpoint, "a@client.test", ["rcpt@many.test"], MESSAGE)
    assert refusal(result, "rcpt@many.test") == (451, "4.4.1")
    await trio.sleep(0.2)
    assert [len(server.connections) for server in servers] == [1, 1, 1, 0, 0, 0]


# -- the proxy itself -------------------------------------------------------------------------


@pytest.fixture
def silent_proxy(lab: Lab) -> Iterator[Endpoint]:
    """An address where TCP connects hang: a listener with a full accept queue that never
    accepts (the kernel drops further SYNs), like a proxy host that is down or filtered."""
    host = lab.addresses.ipv4()
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind((host, 0))
        listener.listen(0)
        endpoint = Endpoint(host, listener.getsockname()[1])
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(endpoint.as_tuple())
            fillers.append(filler)
        yield endpoint
    finally:
        for sock in (*fillers, listener):
            sock.close()


@pytest.mark.parametrize("proxy", ["refused", "silent"])
async def test_unreachable_proxy_is_a_prompt_451_and_no_mx_is_tried(
    lab: Lab, silent_proxy: Endpoint, proxy: str
) -> None:
    """DESIGN.md section 5: a proxy that cannot be reached is the proxy's fault; the next MX
    (through the same proxy) is not tried. With a silent proxy one attempt costs
    delivery.connect_timeout, so trying mx2 as well would double the wait."""
    mx1_address, mx2_address = lab.addresses.ipv4(), lab.addresses.ipv4()
    port = free_port(mx1_address)
    mx1 = await lab.mx(Endpoint(mx1_address, port))
    mx2 = await lab.mx(Endpoint(mx2_address, port))
    dns = lab.dnsmasq(
        [
            MXRecord("example.test", "mx1.example.test", 10),
            MXRecord("example.test", "mx2.example.test", 20),
            HostRecord("mx1.example.test", [mx1_address]),
            HostRecord("mx2.example.test", [mx2_address]),
        ]
    )
    # refused: nothing listens there
    dead_proxy = lab.addresses.endpoint() if proxy == "refused" else silent_proxy
    connect_timeout = 0.5
    sidecar = await lab.sidecar(
        make_config(
            listeners=[(lab.listener(), "b1")],
            bindings={"b1": proxied_binding(dead_proxy, source=lab.addresses.ipv4())},
            nameserver=dns.endpoint,
            port=port,
            delivery={**FAST_DELIVERY, "connect_timeout": connect_timeout},
        )
    )
    started = trio.current_time()
    answer = await rcpt_reply(sidecar.endpoint, "rcpt@example.test")
    elapsed = trio.current_time() - started
    assert answer.startswith(b"451 4.4.1 Cannot reach HAProxy for binding b1"), answer
    if proxy == "refused":
        assert elapsed < connect_timeout
    else:
        assert connect_timeout * 0.9 < elapsed < connect_timeout * 1.8
    if proxy == "refused":
        result = await send(sidecar.endpoint, "a@client.test", ["rcpt@example.test"], MESSAGE)
        assert refusal(result, "rcpt@example.test") == (451, "4.4.1")
    assert _connections(mx1, mx2) == 0


# -- destination policy -----------------------------------------------------------------------


async def test_private_mx_address_is_refused_by_default(lab: Lab) -> None:
    mx_address = lab.addresses.ipv4()
    port = free_port(mx_address)
    mx = await lab.mx(Endpoint(mx_address, port))
    dns = lab.dnsmasq(
        [MXRecord("example.test", "mx.example.test"), HostRecord("mx.example.test", [mx_address])]
    )
    haproxy = lab.haproxy()
    sidecar = await lab.sidecar(
        make_config(
            listeners=[(lab.listener(), "b1")],
            bindings={"b1": proxied_binding(haproxy.bind, source=lab.addresses.ipv4())},
            nameserver=dns.endpoint,
            port=port,
            delivery={**FAST_DELIVERY, "allow_private_destinations": False},
        )
    )
    for recipient in ("rcpt@example.test", f"rcpt@[{mx_address}]"):
        answer = await rcpt_reply(sidecar.endpoint, recipient)
        assert answer.startswith(b"451 4.4.4 "), answer
        assert b"loopback destination refused" in answer
    result = await send(sidecar.endpoint, "a@client.test", ["rcpt@example.test"], MESSAGE)
    assert refusal(result, "rcpt@example.test") == (451, "4.4.4")
    await trio.sleep(0.1)
    assert mx.connections == []
    # HAProxy logged no proxied session: nothing was sent through it (its log names the
    # backend of every session that got a PROXY header; health checks send none).
    assert "egress mx/" not in haproxy.logs()


@pytest.mark.parametrize("helo", ["helo-550", "helo-unsupported"])
async def test_permanent_ehlo_refusal_skips_to_the_next_mx(
    relay_stack: RelayStackFactory, helo: str
) -> None:
    """DESIGN.md section 5: a 5xx to EHLO (and to the HELO fallback) is that MX refusing us:
    it gets a QUIT and the next MX is tried; when every MX refuses, the client gets a 4xx."""
    refused = smtp_reply(550, "5.7.1 mx0 does not talk to you")
    replies = {"EHLO": refused}
    replies["HELO"] = refused if helo == "helo-550" else smtp_reply(502, "5.5.1 no HELO")
    stack = await relay_stack(
        mxes=[{"replies": replies}, {}, {"replies": replies}],
        domains={"example.test": [0, 1], "refusing.test": [0, 2]},
        delivery=FAST_DELIVERY,
        haproxy={"retries": 0},
    )
    mx1, mx2, mx3 = stack.mxes
    result = await send(stack.endpoint, "a@client.test", ["rcpt@example.test"], MESSAGE)
    assert final_status(result) == (250, "2.0.0") and not result.refused
    (message,) = await mx2.wait_for_messages(1)
    assert message.peer_host == stack.source
    connection = await mx1.wait_closed()
    assert [c.split(b" ")[0] for c in connection.commands] == [b"EHLO", b"HELO", b"QUIT"]

    answer = await rcpt_reply(stack.endpoint, "rcpt@refusing.test")
    assert answer.startswith(b"451 4.4.1 No MX of refusing.test reachable: "), answer
    assert b"EHLO refused: 550 5.7.1 mx0 does not talk to you" in answer
    for mx in (mx1, mx3):
        connection = await mx.wait_closed()
        assert [c.split(b" ")[0] for c in connection.commands] == [b"EHLO", b"HELO", b"QUIT"]
        assert mx.messages == []
