"""sidecar.resolver under DANE (``resolve_mx(..., dnssec=True)``), against an in-process zone
stub whose answers carry the AD bit for the names it calls secure: which MX RRsets and hosts
are secure, TLSA look-ups (RFC 7672 section 2.2, with its CNAME rule), and that domains not
under DANE never use the DNSSEC resolver."""

from __future__ import annotations

import time

import dns.flags
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import trio

from sidecar.config import DnsConfig, HostPort
from sidecar.mxtls.dane import TlsaRecord
from sidecar.resolver import Resolver

Zone = dict[tuple[str, str], list[str] | BaseException]
HASH = "ab" * 32


class SecureZoneStub:
    """``zone[(name, type)]``: rdata texts or an exception; ``cnames[name]``: the name an
    answer for ``name`` is found under; answers for names in ``secure`` have the AD bit."""

    def __init__(self, zone: Zone, secure: set[str], cnames: dict[str, str] | None = None) -> None:
        self.zone = zone
        self.secure = secure
        self.cnames = cnames or {}
        self.asked: list[tuple[str, str]] = []

    async def resolve(
        self, qname: dns.name.Name, rdtype: str, search: bool = False, lifetime: float = 0
    ) -> dns.resolver.Answer:
        name = qname.to_text(omit_final_dot=True).lower()
        self.asked.append((name, rdtype))
        await trio.lowlevel.checkpoint()
        target = self.cnames.get(name, name)
        entry = self.zone.get((target, rdtype))
        if isinstance(entry, BaseException):
            raise entry
        if entry is None:
            if any(known == target for known, _ in self.zone):
                raise dns.resolver.NoAnswer()
            raise dns.resolver.NXDOMAIN()
        response = dns.message.make_response(dns.message.make_query(qname, rdtype))
        if target != name:
            response.answer.append(dns.rrset.from_text(qname, 60, "IN", "CNAME", target + "."))
        owner = dns.name.from_text(target)
        response.answer.append(dns.rrset.from_text_list(owner, 60, "IN", rdtype, entry))
        if name in self.secure:
            response.flags |= dns.flags.AD
        wire = dns.message.from_wire(response.to_wire())
        return dns.resolver.Answer(qname, dns.rdatatype.from_text(rdtype), dns.rdataclass.IN, wire)


def make(
    zone: Zone, secure: set[str], cnames: dict[str, str] | None = None
) -> tuple[Resolver, SecureZoneStub, SecureZoneStub]:
    resolver = Resolver(DnsConfig(nameservers=(HostPort("127.0.0.1", 53),), timeout=2))
    plain = SecureZoneStub(zone, set(), cnames)
    secure_stub = SecureZoneStub(zone, secure, cnames)
    resolver._resolver = plain  # type: ignore[assignment]
    resolver._dnssec = secure_stub  # type: ignore[assignment]
    return resolver, plain, secure_stub


ZONE: Zone = {
    ("d.test", "MX"): ["10 mx.d.test.", "20 mx2.d.test."],
    ("mx.d.test", "A"): ["192.0.2.1"],
    ("mx2.d.test", "A"): ["192.0.2.2"],
    ("_25._tcp.mx.d.test", "TLSA"): [f"3 1 1 {HASH}", f"1 1 1 {HASH}"],
}


async def test_secure_mx_and_host_get_their_tlsa_records() -> None:
    secure = {"d.test", "mx.d.test", "mx2.d.test", "_25._tcp.mx.d.test"}
    resolver, plain, _stub = make(ZONE, secure)
    result = await resolver.resolve_mx("d.test", dnssec=True)
    assert result.secure is True
    by_name = {host.name: host for host in result.hosts}
    dane = by_name["mx.d.test"].dane
    assert dane is not None and by_name["mx.d.test"].secure
    assert dane.usable == (TlsaRecord.from_text(f"3 1 1 {HASH}"),)
    assert dane.unusable == (TlsaRecord.from_text(f"1 1 1 {HASH}"),)
    assert dane.names == ("mx.d.test",) and dane.tlsa_name == "_25._tcp.mx.d.test"
    # mx2 has no TLSA records: no DANE for it, and why.
    assert by_name["mx2.d.test"].dane is None
    assert by_name["mx2.d.test"].insecure == "no secure TLSA records"
    assert plain.asked == []  # every query went through the DNSSEC resolver


async def test_domains_not_under_dane_never_use_the_dnssec_resolver() -> None:
    resolver, plain, stub = make(ZONE, {"d.test", "mx.d.test"})
    result = await resolver.resolve_mx("d.test")
    assert result.secure is None
    assert all(host.dane is None for host in result.hosts)
    assert stub.asked == [] and resolver._dnssec is stub
    assert not any(rdtype == "TLSA" for _, rdtype in plain.asked)


async def test_insecure_mx_rrset_means_no_dane_and_no_tlsa_lookup() -> None:
    """RFC 7672 2.2.1: an insecure MX RRset (its host names may be forged): no DANE."""
    resolver, _, stub = make(ZONE, {"mx.d.test", "_25._tcp.mx.d.test"})
    result = await resolver.resolve_mx("d.test", dnssec=True)
    assert result.secure is False
    assert all(host.dane is None for host in result.hosts)
    assert result.hosts[0].insecure == "the MX RRset is not DNSSEC-signed"
    assert not any(rdtype == "TLSA" for _, rdtype in stub.asked)


async def test_insecure_host_address_means_no_dane_for_that_host() -> None:
    resolver, _, stub = make(ZONE, {"d.test", "_25._tcp.mx.d.test"})
    result = await resolver.resolve_mx("d.test", dnssec=True)
    assert result.secure is True
    mx = next(host for host in result.hosts if host.name == "mx.d.test")
    assert mx.dane is None and not mx.secure
    assert mx.insecure == "its address records are not DNSSEC-signed"
    assert not any(rdtype == "TLSA" for _, rdtype in stub.asked)


async def test_a_failed_tlsa_lookup_marks_the_host_unusable() -> None:
    zone = dict(ZONE)
    zone[("_25._tcp.mx.d.test", "TLSA")] = dns.resolver.NoNameservers()  # SERVFAIL: bogus
    resolver, _, _ = make(zone, {"d.test", "mx.d.test", "mx2.d.test"})
    result = await resolver.resolve_mx("d.test", dnssec=True)
    mx = next(host for host in result.hosts if host.name == "mx.d.test")
    assert mx.dane is None
    assert mx.dane_failure is not None
    assert mx.dane_failure.startswith("DANE: TLSA lookup for _25._tcp.mx.d.test failed")


async def test_an_insecure_tlsa_rrset_is_no_dane() -> None:
    resolver, _, _ = make(ZONE, {"d.test", "mx.d.test"})
    result = await resolver.resolve_mx("d.test", dnssec=True)
    assert all(host.dane is None for host in result.hosts)


async def test_cname_expanded_tlsa_first_then_the_mx_name() -> None:
    """RFC 7672 2.2.2: the MX host is a CNAME; TLSA records are looked for under the
    expanded name first, and the reference identifiers are both names."""
    zone: Zone = {
        ("d.test", "MX"): ["10 mx.d.test."],
        ("mail.hoster.test", "A"): ["192.0.2.9"],
        ("_25._tcp.mail.hoster.test", "TLSA"): [f"2 1 1 {HASH}"],
    }
    cnames = {"mx.d.test": "mail.hoster.test"}
    secure = {"d.test", "mx.d.test", "_25._tcp.mail.hoster.test"}
    resolver, _, stub = make(zone, secure, cnames)
    result = await resolver.resolve_mx("d.test", dnssec=True)
    dane = result.hosts[0].dane
    assert dane is not None
    assert dane.names == ("mx.d.test", "mail.hoster.test")
    assert ("_25._tcp.mx.d.test", "TLSA") not in stub.asked
    # No records under the expanded name: the MX name's own are used, with its name only.
    zone[("_25._tcp.mx.d.test", "TLSA")] = zone.pop(("_25._tcp.mail.hoster.test", "TLSA"))
    resolver, _, stub = make(zone, {"d.test", "mx.d.test", "_25._tcp.mx.d.test"}, cnames)
    dane = (await resolver.resolve_mx("d.test", dnssec=True)).hosts[0].dane
    assert dane is not None and dane.names == ("mx.d.test",)
    assert stub.asked.index(("_25._tcp.mail.hoster.test", "TLSA")) < stub.asked.index(
        ("_25._tcp.mx.d.test", "TLSA")
    )


async def test_tlsa_port_follows_the_delivery_port() -> None:
    zone: Zone = {
        ("d.test", "MX"): ["10 mx.d.test."],
        ("mx.d.test", "A"): ["192.0.2.1"],
        ("_2525._tcp.mx.d.test", "TLSA"): [f"3 1 1 {HASH}"],
    }
    resolver, _, _ = make(zone, {"d.test", "mx.d.test", "_2525._tcp.mx.d.test"})
    resolver.tlsa_port = 2525
    assert (await resolver.resolve_mx("d.test", dnssec=True)).hosts[0].dane is not None


async def test_bogus_mx_is_a_temporary_dns_failure() -> None:
    zone = dict(ZONE)
    zone[("d.test", "MX")] = dns.resolver.NoNameservers()
    resolver, _, _ = make(zone, set())
    try:
        await resolver.resolve_mx("d.test", dnssec=True)
    except Exception as error:  # ResolutionError
        reply = error.reply  # type: ignore[attr-defined]
        assert reply.code == 451 and reply.text.startswith("4.4.3 ")
    else:
        raise AssertionError("a bogus MX RRset must not resolve")


async def test_dnssec_results_are_cached_apart() -> None:
    resolver, plain, stub = make(ZONE, {"d.test", "mx.d.test", "_25._tcp.mx.d.test"})
    await resolver.resolve_mx("d.test")
    assert (await resolver.resolve_mx("d.test", dnssec=True)).secure is True
    assert (await resolver.resolve_mx("d.test")).secure is None
    assert stub.asked.count(("d.test", "MX")) == 1 and plain.asked.count(("d.test", "MX")) == 1


async def test_dnssec_resolver_asks_for_dnssec() -> None:
    resolver = Resolver(DnsConfig(nameservers=(HostPort("127.0.0.1", 5353),), timeout=3))
    secure = resolver.dnssec_resolver
    assert secure.ednsflags & dns.flags.DO
    assert secure.flags is not None and secure.flags & dns.flags.AD
    assert secure.cache is not resolver.cache
    assert [str(ns) for ns in secure.nameservers] == [
        str(ns) for ns in resolver._resolver.nameservers
    ]
    assert not resolver._resolver.ednsflags & dns.flags.DO  # the plain one is unchanged


async def test_a_result_with_a_failed_tlsa_lookup_is_not_kept() -> None:
    """A SERVFAIL may be transient: the next message asks again (a good answer is kept)."""
    zone = dict(ZONE)
    zone[("_25._tcp.mx.d.test", "TLSA")] = dns.resolver.NoNameservers()
    resolver, _, stub = make(zone, {"d.test", "mx.d.test", "mx2.d.test"})
    await resolver.resolve_mx("d.test", dnssec=True)
    zone[("_25._tcp.mx.d.test", "TLSA")] = [f"3 1 1 {HASH}"]
    stub.secure.add("_25._tcp.mx.d.test")
    result = await resolver.resolve_mx("d.test", dnssec=True)
    assert next(h for h in result.hosts if h.name == "mx.d.test").dane is not None
    assert stub.asked.count(("d.test", "MX")) == 2
    await resolver.resolve_mx("d.test", dnssec=True)
    assert stub.asked.count(("d.test", "MX")) == 2  # now from the result cache


class _InOrder(list[object]):
    """A TLSA answer in a given order (a real RRset's order is arbitrary, dnspython's too)."""

    def __init__(self, records: list[object], response: dns.message.Message) -> None:
        super().__init__(records)
        self.response = response
        self.rrset = response.answer[0]
        self.expiration = time.time() + 60


class OrderedTlsaStub(SecureZoneStub):
    async def resolve(
        self, qname: dns.name.Name, rdtype: str, search: bool = False, lifetime: float = 0
    ) -> dns.resolver.Answer:
        answer = await super().resolve(qname, rdtype, search, lifetime)
        if rdtype != "TLSA":
            return answer
        records = sorted(answer, key=lambda r: int(r.usage))  # the usable (3) ones last
        return _InOrder(records, answer.response)  # type: ignore[return-value]


async def test_a_large_tlsa_rrset_keeps_its_usable_records() -> None:
    """More TLSA records than a policy keeps, the usable one last in the answer: it is kept
    (the host stays authenticated by DANE), not cut off with the answer's tail."""
    from sidecar.mxtls.dane import MAX_TLSA_RECORDS

    zone = dict(ZONE)
    unusable = [f"1 1 1 {n:02x}" + HASH[2:] for n in range(MAX_TLSA_RECORDS + 3)]
    zone[("_25._tcp.mx.d.test", "TLSA")] = [*unusable, f"3 1 1 {HASH}"]
    secure = {"d.test", "mx.d.test", "mx2.d.test", "_25._tcp.mx.d.test"}
    resolver, _plain, _stub = make(zone, secure)
    resolver._dnssec = OrderedTlsaStub(zone, secure)  # type: ignore[assignment]
    result = await resolver.resolve_mx("d.test", dnssec=True)
    dane = {host.name: host for host in result.hosts}["mx.d.test"].dane
    assert dane is not None and dane.authenticates
    assert dane.usable == (TlsaRecord.from_text(f"3 1 1 {HASH}"),)
