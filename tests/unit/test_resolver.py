"""sidecar.resolver against an in-process DNS stub (no sockets): dnspython's resolver is replaced
by :class:`ZoneStub`, which answers from a table with real ``dns.resolver.Answer`` objects (or
raises what dnspython raises for NXDOMAIN, no answer, SERVFAIL and timeouts). RFC 5321 5.1
(MX order, equal preferences shuffled, implicit MX) and RFC 7505 (null MX)."""

from __future__ import annotations

import random
from ipaddress import ip_address

import dns.exception
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest
import trio

from sidecar.config import DnsConfig, HostPort
from sidecar.resolver import (
    MAX_MX_HOSTS,
    MXResult,
    ResolutionError,
    Resolver,
    order_by_preference,
)

Zone = dict[tuple[str, str], list[str] | BaseException]


class ZoneStub:
    """Stands in for ``dns.asyncresolver.Resolver``: ``zone[(name, type)]`` is a list of rdata
    texts (answered with ``ttl``) or an exception to raise; a name with no entry for the type
    gives NoAnswer when it has other entries, NXDOMAIN otherwise."""

    def __init__(self, zone: Zone, ttl: int = 60) -> None:
        self.zone = zone
        self.ttl = ttl
        self.asked: list[tuple[str, str]] = []

    async def resolve(
        self, qname: dns.name.Name, rdtype: str, search: bool = False, lifetime: float = 0
    ) -> dns.resolver.Answer:
        name = qname.to_text(omit_final_dot=True).lower()
        self.asked.append((name, rdtype))
        await trio.lowlevel.checkpoint()
        entry = self.zone.get((name, rdtype))
        if isinstance(entry, BaseException):
            raise entry
        if entry is None:
            if any(known == name for known, _ in self.zone):
                raise dns.resolver.NoAnswer()
            raise dns.resolver.NXDOMAIN()
        response = dns.message.make_response(dns.message.make_query(qname, rdtype))
        response.answer.append(dns.rrset.from_text_list(qname, self.ttl, "IN", rdtype, entry))
        wire = dns.message.from_wire(response.to_wire())  # as a server's answer arrives
        return dns.resolver.Answer(qname, dns.rdatatype.from_text(rdtype), dns.rdataclass.IN, wire)


def make_resolver(zone: Zone, *, ttl: int = 60, **config: object) -> tuple[Resolver, ZoneStub]:
    resolver = Resolver(
        DnsConfig(nameservers=(HostPort("127.0.0.1", 53),), timeout=2, **config)  # type: ignore[arg-type]
    )
    stub = ZoneStub(zone, ttl)
    resolver._resolver = stub  # type: ignore[assignment]
    return resolver, stub


def names(result: MXResult) -> list[str]:
    return [host.name for host in result.hosts]


async def refusal(resolver: Resolver, domain: str) -> tuple[int, str]:
    with pytest.raises(ResolutionError) as caught:
        await resolver.resolve_mx(domain)
    return caught.value.reply.code, caught.value.reply.text


async def test_mx_hosts_in_preference_order_with_their_addresses() -> None:
    resolver, _ = make_resolver(
        {
            ("d.test", "MX"): ["20 b.d.test.", "10 a.d.test."],
            ("a.d.test", "A"): ["192.0.2.1"],
            ("a.d.test", "AAAA"): ["2001:db8::1"],
            ("b.d.test", "A"): ["192.0.2.2"],
        }
    )
    result = await resolver.resolve_mx("d.test")
    assert names(result) == ["a.d.test", "b.d.test"]
    assert [host.preference for host in result.hosts] == [10, 20]
    assert result.hosts[0].addresses == (ip_address("192.0.2.1"), ip_address("2001:db8::1"))
    assert result.hosts[1].addresses == (ip_address("192.0.2.2"),)
    assert not result.implicit
    assert result.site == frozenset({"a.d.test", "b.d.test"})


def test_order_by_preference_shuffles_equal_preferences_only() -> None:
    records = [(10, "a"), (10, "b"), (10, "c"), (5, "first"), (20, "last")]
    orders = set()
    for seed in range(40):
        ordered = order_by_preference(records, random.Random(seed))
        assert ordered[0] == (5, "first") and ordered[-1] == (20, "last")
        orders.add(tuple(host for _, host in ordered[1:4]))
    assert len(orders) == 6  # every order of a, b, c turns up


async def test_equal_preferences_are_reshuffled_even_from_the_result_cache() -> None:
    zone: Zone = {("d.test", "MX"): [f"10 {h}.d.test." for h in "abc"]}
    zone.update({(f"{h}.d.test", "A"): ["192.0.2.9"] for h in "abc"})
    resolver, stub = make_resolver(zone)
    orders = {tuple(names(await resolver.resolve_mx("d.test"))) for _ in range(40)}
    assert len(orders) > 1
    assert stub.asked.count(("d.test", "MX")) == 1  # the rest came from the result cache
    assert resolver.result_hits == 39


async def test_no_mx_records_means_the_domain_is_its_own_mx() -> None:
    resolver, _ = make_resolver({("d.test", "A"): ["192.0.2.7"]})
    result = await resolver.resolve_mx("d.test")
    assert result.implicit
    assert names(result) == ["d.test"]
    assert result.hosts[0].addresses == (ip_address("192.0.2.7"),)
    assert result.site == frozenset({"d.test"})


async def test_no_mx_and_no_address_is_550() -> None:
    resolver, _ = make_resolver({("d.test", "TXT"): ['"no mail"']})
    code, text = await refusal(resolver, "d.test")
    assert code == 550 and text.startswith("5.1.2 ")


async def test_null_mx_is_556() -> None:
    resolver, _ = make_resolver({("d.test", "MX"): ["0 ."]})
    code, text = await refusal(resolver, "d.test")
    assert code == 556 and text.startswith("5.1.10 ")


async def test_nxdomain_is_550() -> None:
    resolver, _ = make_resolver({})
    code, text = await refusal(resolver, "nowhere.test")
    assert code == 550 and text.startswith("5.1.2 ") and "nowhere.test" in text


@pytest.mark.parametrize(
    ("failure", "why"),
    [
        (dns.resolver.NoNameservers(), "SERVFAIL or refused"),
        (dns.exception.Timeout(), "timeout"),
    ],
)
async def test_servfail_and_timeout_are_451_4_4_3(failure: BaseException, why: str) -> None:
    resolver, _ = make_resolver({("d.test", "MX"): failure})
    code, text = await refusal(resolver, "d.test")
    assert code == 451 and text.startswith("4.4.3 ") and why in text


async def test_an_mx_host_without_address_is_skipped_and_none_at_all_is_451() -> None:
    resolver, _ = make_resolver(
        {
            ("d.test", "MX"): ["10 gone.d.test.", "20 b.d.test."],
            ("b.d.test", "A"): ["192.0.2.2"],
            ("e.test", "MX"): ["10 gone.e.test."],
        }
    )
    result = await resolver.resolve_mx("d.test")
    assert names(result) == ["b.d.test"]
    assert result.site == frozenset({"gone.d.test", "b.d.test"})  # the answer, not the survivors
    code, text = await refusal(resolver, "e.test")
    assert code == 451 and text.startswith("4.4.3 ")


async def test_a_temporary_address_failure_of_every_host_is_451() -> None:
    resolver, _ = make_resolver(
        {
            ("d.test", "MX"): ["10 a.d.test."],
            ("a.d.test", "A"): dns.exception.Timeout(),
            ("a.d.test", "AAAA"): dns.exception.Timeout(),
        }
    )
    code, text = await refusal(resolver, "d.test")
    assert code == 451 and text.startswith("4.4.3 ") and "a.d.test" in text


async def test_at_most_max_mx_hosts_are_tried_but_the_site_names_them_all() -> None:
    count = MAX_MX_HOSTS + 5
    zone: Zone = {("d.test", "MX"): [f"{i} h{i}.d.test." for i in range(count)]}
    zone.update({(f"h{i}.d.test", "A"): [f"192.0.2.{i + 1}"] for i in range(count)})
    resolver, stub = make_resolver(zone)
    result = await resolver.resolve_mx("d.test")
    assert names(result) == [f"h{i}.d.test" for i in range(MAX_MX_HOSTS)]
    assert result.site == frozenset(f"h{i}.d.test" for i in range(count))
    asked_hosts = {name for name, rdtype in stub.asked if rdtype == "A"}
    assert len(asked_hosts) == MAX_MX_HOSTS  # the cut comes before the address look-ups


async def test_results_are_cached_for_their_ttl(autojump_clock: trio.testing.MockClock) -> None:
    zone: Zone = {("d.test", "MX"): ["10 a.d.test."], ("a.d.test", "A"): ["192.0.2.1"]}
    resolver, stub = make_resolver(zone, ttl=30)
    await resolver.resolve_mx("d.test")
    await trio.sleep(20)
    await resolver.resolve_mx("d.test")
    assert stub.asked.count(("d.test", "MX")) == 1 and resolver.result_hits == 1
    await trio.sleep(15)  # past the 30 s TTL
    await resolver.resolve_mx("d.test")
    assert stub.asked.count(("d.test", "MX")) == 2


async def test_a_zero_ttl_answer_is_not_cached() -> None:
    zone: Zone = {("d.test", "MX"): ["10 a.d.test."], ("a.d.test", "A"): ["192.0.2.1"]}
    resolver, stub = make_resolver(zone, ttl=0)
    await resolver.resolve_mx("d.test")
    await resolver.resolve_mx("d.test")
    assert stub.asked.count(("d.test", "MX")) == 2 and resolver.result_hits == 0


async def test_the_result_cache_is_bounded_by_cache_size() -> None:
    zone: Zone = {(f"d{i}.test", "A"): ["192.0.2.1"] for i in range(5)}
    resolver, _ = make_resolver(zone, cache_size=3)
    for i in range(5):
        await resolver.resolve_mx(f"d{i}.test")
    assert len(resolver._results) == 3
    assert set(resolver._results) == {"d2.test", "d3.test", "d4.test"}  # the oldest went


async def test_static_entries_need_no_mx_query_and_literals_no_query_at_all() -> None:
    resolver, stub = make_resolver({("mx.other.test", "A"): ["192.0.2.5"]}, static={})
    resolver._config.static["s.test"] = ("192.0.2.50", "mx.other.test")
    result = await resolver.resolve_mx("s.test")
    assert names(result) == ["192.0.2.50", "mx.other.test"]
    assert [host.preference for host in result.hosts] == [0, 10]
    assert result.hosts[0].addresses == (ip_address("192.0.2.50"),)
    assert ("s.test", "MX") not in stub.asked
    assert not any(name == "192.0.2.50" for name, _ in stub.asked)
    assert result.site == frozenset({"192.0.2.50", "mx.other.test"})
