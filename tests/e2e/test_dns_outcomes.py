"""DNS outcomes end to end (DESIGN.md section 4) with a real dnsmasq: what the client is told for
NXDOMAIN, no MX, null MX, SERVFAIL, REFUSED and timeouts; implicit MX, address literals,
``dns.static``, equal-preference shuffling and the answer cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.rcode
import pytest
import trio

from .harness import (
    MESSAGE,
    Dnsmasq,
    DnsRecord,
    Endpoint,
    ForwardZone,
    HostRecord,
    Lab,
    MXRecord,
    NullMXRecord,
    RawRecord,
    RefusedZone,
    RunningSidecar,
    TestMX,
    final_status,
    free_port,
    make_config,
    proxied_binding,
    rcpt_reply,
    refusal,
    send,
)

TXT = 16


@dataclass
class Stack:
    sidecar: RunningSidecar
    source: str
    mx: TestMX  # mx.example.test (and the implicit MX of implicit.test's sibling)
    other: TestMX  # a second MX on its own address
    dnsmasq: Dnsmasq | None

    async def deliver(self, recipient: str, body: bytes = MESSAGE) -> tuple[int, str]:
        result = await send(self.sidecar.endpoint, "a@client.test", [recipient], body)
        return final_status(result)

    async def refused(self, recipient: str) -> tuple[int, str]:
        result = await send(self.sidecar.endpoint, "a@client.test", [recipient], MESSAGE)
        assert result.final is None
        return refusal(result, recipient)


@pytest.fixture
async def stack_factory(lab: Lab) -> Any:
    """``await stack_factory(records, nameserver=..., dns=..., ttl=...)``: ``records`` and
    ``dns`` (the config's ``[dns]`` additions) are callables given the two MX addresses."""

    async def build(
        records: Callable[[str, str], Sequence[DnsRecord]] | None = None,
        *,
        nameserver: Endpoint | None = None,
        dns: Callable[[str, str], dict[str, Any]] | dict[str, Any] | None = None,
        ttl: int = 1,
    ) -> Stack:
        stack = await lab.build(
            mxes=[{}, {}],
            domains={},
            records=(lambda mxes: records(*mxes)) if records is not None else (),
            nameserver=nameserver,
            ttl=ttl,
            delivery={"connect_timeout": 2, "banner_timeout": 2},
            dns=(lambda mxes: dns(*mxes)) if callable(dns) else dns,
        )
        return Stack(stack.sidecar, stack.source, stack.mxes[0], stack.mxes[1], stack.dns)

    return build


def zone(mx: str, other: str) -> Sequence[DnsRecord]:
    return [
        MXRecord("example.test", "mx.example.test"),
        HostRecord("mx.example.test", [mx]),
        HostRecord("other.example.test", [other]),
        HostRecord("implicit.test", [other]),  # no MX: the domain is its own MX
        RawRecord("noaddress.test", TXT, b"\x0bno mail here"),  # neither MX nor A/AAAA
        NullMXRecord("nullmx.test"),
        MXRecord("dangling.test", "nothere.dangling.test"),  # MX host without an address
    ]


async def test_mx_record_is_followed(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(zone)
    assert await stack.deliver("rcpt@example.test") == (250, "2.0.0")
    (message,) = await stack.mx.wait_for_messages(1)
    assert message.peer_host == stack.source
    assert stack.other.connections == []


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("nothere.test", (550, "5.1.2")),  # NXDOMAIN
        ("deeper.nothere.example.test", (550, "5.1.2")),
        ("noaddress.test", (550, "5.1.2")),  # no MX, no address
        ("nullmx.test", (556, "5.1.10")),  # RFC 7505
        ("dangling.test", (451, "4.4.3")),  # the MX host has no address (yet)
    ],
)
async def test_dns_answer_refusals(
    stack_factory: Any, domain: str, expected: tuple[int, str]
) -> None:
    stack: Stack = await stack_factory(zone)
    assert await stack.refused(f"rcpt@{domain}") == expected
    answer = await rcpt_reply(stack.sidecar.endpoint, f"rcpt@{domain}")
    assert answer.startswith(f"{expected[0]} {expected[1]} ".encode()), answer
    assert domain.encode() in answer
    assert stack.mx.connections == [] and stack.other.connections == []


async def test_no_mx_record_means_the_domain_is_its_own_mx(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(zone)
    assert await stack.deliver("rcpt@implicit.test") == (250, "2.0.0")
    (message,) = await stack.other.wait_for_messages(1)
    assert message.peer_host == stack.source
    assert message.rcpt_to == [b"RCPT TO:<rcpt@implicit.test>"]
    assert stack.mx.connections == []


@pytest.mark.parametrize("failure", ["servfail", "refused", "timeout"])
async def test_dns_failures_are_temporary(stack_factory: Any, lab: Lab, failure: str) -> None:
    servfail = lab.stubs.rcode(dns.rcode.SERVFAIL)
    silent = lab.stubs.silent()

    def records(mx: str, other: str) -> Sequence[DnsRecord]:
        return [
            *zone(mx, other),
            ForwardZone("servfail.test", servfail.endpoint),
            ForwardZone("timeout.test", silent.endpoint),
            RefusedZone("refused.test"),
        ]

    stack: Stack = await stack_factory(records, dns={"timeout": 1})
    started = trio.current_time()
    assert await stack.refused(f"rcpt@x.{failure}.test") == (451, "4.4.3")
    elapsed = trio.current_time() - started
    if failure == "timeout":
        assert 0.9 < elapsed < 2.5  # dns.timeout bounds the whole look-up
    else:
        assert elapsed < 0.9
    if failure == "servfail":
        assert ("udp", "x.servfail.test", "MX") in servfail.queries
    assert stack.mx.connections == [] and stack.other.connections == []
    # Other domains are unaffected.
    assert await stack.deliver("rcpt@example.test") == (250, "2.0.0")


async def test_address_literal_needs_no_dns(stack_factory: Any, lab: Lab) -> None:
    silent = lab.stubs.silent()  # any DNS query would time out
    stack: Stack = await stack_factory(nameserver=silent.endpoint, dns={"timeout": 1})
    started = trio.current_time()
    literal = f"rcpt@[{stack.other.endpoint.host}]"
    assert await stack.deliver(literal) == (250, "2.0.0")
    assert trio.current_time() - started < 0.9
    (message,) = await stack.other.wait_for_messages(1)
    assert message.peer_host == stack.source
    assert message.rcpt_to == [f"RCPT TO:<{literal}>".encode()]
    assert stack.mx.connections == []
    # ...while a domain does go to DNS (and here times out).
    assert await stack.refused("rcpt@example.test") == (451, "4.4.3")


@pytest.mark.parametrize("entry", ["ip", "name"])
async def test_dns_static_overrides_the_mx_records(stack_factory: Any, entry: str) -> None:
    def static(mx: str, other: str) -> dict[str, Any]:
        host = other if entry == "ip" else "other.example.test"
        return {"static": {"example.test": [host], "static-only.test": [host]}}

    stack: Stack = await stack_factory(zone, dns=static)
    for domain in ("example.test", "static-only.test"):
        assert await stack.deliver(f"rcpt@{domain}") == (250, "2.0.0")
    messages = await stack.other.wait_for_messages(2)
    assert [m.peer_host for m in messages] == [stack.source] * 2
    assert stack.mx.connections == []  # example.test's own MX record is not used


async def test_equal_preference_mx_hosts_are_shuffled(lab: Lab) -> None:
    address_a, address_b = lab.addresses.ipv4(), lab.addresses.ipv4()
    port = free_port(address_a)
    mx_a = await lab.mx(Endpoint(address_a, port))
    mx_b = await lab.mx(Endpoint(address_b, port))
    dnsmasq = lab.dnsmasq(
        [
            MXRecord("shuffle.test", "a.shuffle.test", 10),
            MXRecord("shuffle.test", "b.shuffle.test", 10),
            HostRecord("a.shuffle.test", [address_a]),
            HostRecord("b.shuffle.test", [address_b]),
        ],
        ttl=30,  # one cached answer: the order changes per delivery, not per look-up
    )
    haproxy = lab.haproxy()
    source = lab.addresses.ipv4()
    sidecar = await lab.sidecar(
        make_config(
            listeners=[(lab.listener(), "b1")],
            bindings={"b1": proxied_binding(haproxy.bind, source=source)},
            nameserver=dnsmasq.endpoint,
            port=port,
            # A new connection per message, so each one follows the shuffled MX order.
            delivery={"connection_cache": False},
        )
    )
    for _ in range(20):
        result = await send(sidecar.endpoint, "a@client.test", ["rcpt@shuffle.test"], MESSAGE)
        assert final_status(result) == (250, "2.0.0")
    await mx_a.wait_for(lambda: len(mx_a.messages) + len(mx_b.messages) == 20)
    assert mx_a.messages and mx_b.messages, (len(mx_a.messages), len(mx_b.messages))
    assert {m.peer_host for m in mx_a.messages + mx_b.messages} == {source}


async def test_answers_are_cached_for_their_ttl(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(zone, ttl=30, dns={"timeout": 1})
    assert await stack.deliver("rcpt@example.test") == (250, "2.0.0")
    assert stack.dnsmasq is not None
    stack.dnsmasq.stop()
    # Within the TTL the cached answers still route.
    assert await stack.deliver("rcpt@example.test") == (250, "2.0.0")
    messages = await stack.mx.wait_for_messages(2)
    assert [m.peer_host for m in messages] == [stack.source] * 2
    # A name never asked before needs the (now gone) server: a temporary failure.
    assert await stack.refused("rcpt@implicit.test") == (451, "4.4.3")


async def test_cached_answers_expire_after_their_ttl(stack_factory: Any) -> None:
    stack: Stack = await stack_factory(zone, ttl=1, dns={"timeout": 1})
    assert await stack.deliver("rcpt@example.test") == (250, "2.0.0")
    assert stack.dnsmasq is not None
    stack.dnsmasq.stop()
    await trio.sleep(1.2)
    assert await stack.refused("rcpt@example.test") == (451, "4.4.3")
    assert len(stack.mx.connections) == 1
