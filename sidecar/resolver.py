"""MX, A and AAAA look-ups with dnspython's async resolver under trio.

RFC 5321 section 5.1 and RFC 7505 rules: MX hosts by preference with equal preferences shuffled;
no MX records -> the domain itself is the implicit MX; a null MX (``0 .``) means the domain
accepts no mail. dnspython's LRU cache keeps answers for their TTL (negative answers too).

For a domain under DANE (``resolve_mx(..., dnssec=True)``) the queries go to a second resolver
object that asks for DNSSEC (EDNS DO, and AD in the query: RFC 6840 section 5.7) and trusts
the AD bit of the configured resolver, which must be a local validating one (as Postfix and
Exim do). It records whether the MX RRset and each host's address RRsets were secure, and
looks up each secure host's TLSA records (RFC 7672 section 2.2). Other domains are resolved
exactly as before, by the first resolver object and its own cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import trio

from sidecar import replies
from sidecar.config import DnsConfig
from sidecar.errors import LocalResourceError, ResolutionError, describe_error
from sidecar.limits import DNS_IN_FLIGHT, local_resource_errno
from sidecar.mxtls.dane import DanePolicy, TlsaRecord

IPAddress = IPv4Address | IPv6Address

# The longest a whole MX result is reused (each answer's own TTL may be shorter).
MAX_RESULT_TTL = 300

# Bounds on what one answer may make us do.
MAX_MX_HOSTS = 10
MAX_ADDRESSES_PER_HOST = 10
MAX_TXT_RECORDS = 20
MAX_TXT_LENGTH = 4096


# Every query holds one socket while in flight: the descriptor budget (sidecar.limits) sets
# DNS_IN_FLIGHT aside for them, and this limiter, shared by every Resolver of a trio run (a
# reload may make a new one), keeps to it.
_in_flight: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("sidecar_dns")


def _dns_slots() -> trio.CapacityLimiter:
    try:
        return _in_flight.get()
    except LookupError:
        limiter = trio.CapacityLimiter(DNS_IN_FLIGHT)
        _in_flight.set(limiter)
        return limiter


def _local_shortage(error: dns.resolver.NoNameservers) -> LocalResourceError | None:
    """The local resource shortage (EMFILE...) that made every nameserver fail, if any:
    dnspython reports a socket it could not open as that nameserver's failure."""
    for entry in error.kwargs.get("errors") or ():
        failure = entry[3] if len(entry) > 3 else None
        if isinstance(failure, BaseException):
            code = local_resource_errno(failure)
            if code is not None:
                return LocalResourceError(code)
    return None


@dataclass(frozen=True)
class MXHost:
    name: str  # host name without the trailing dot, or the IP literal's text
    preference: int
    addresses: tuple[IPAddress, ...]
    # Under DNSSEC only (``resolve_mx(..., dnssec=True)``): whether every address RRset of
    # the host was secure (AD), its DANE policy when its TLSA RRset was secure, or why its
    # TLSA look-up failed (RFC 7672 section 2.2: the host is then not used); ``insecure``:
    # why DANE does not apply to it, for ``sidecar route``.
    secure: bool = False
    dane: DanePolicy | None = None
    dane_failure: str | None = None
    insecure: str | None = None


@dataclass(frozen=True)
class MXResult:
    """The MX hosts of ``domain`` to try, in order, with their addresses.

    ``exchangers`` is every MX host name the answer named (lower-case, no trailing dot),
    whatever the shuffle of equal preferences, the cut to MAX_MX_HOSTS or a host whose
    addresses could not be looked up left out of ``hosts``: it is what identifies the
    destination (its *site*), so two look-ups of one domain always name the same one.
    Empty means "the names of ``hosts``" (an address literal, or a result built by hand)."""

    domain: str
    hosts: tuple[MXHost, ...]  # in the order to try them
    implicit: bool = False  # no MX records: the domain's own addresses
    exchangers: frozenset[str] = frozenset()
    # Whether the MX RRset (for an implicit MX: the denial of it) was DNSSEC-secure; None:
    # DNSSEC was not asked (the domain is not under DANE).
    secure: bool | None = None

    @property
    def site(self) -> frozenset[str]:
        """The destination's MX host names: equal for every look-up of the same MX set."""
        return self.exchangers or frozenset(host.name for host in self.hosts)


# One generator: seeding a new one per call (from os.urandom) showed up in profiles.
_RANDOM = random.Random()


def order_by_preference(
    records: Sequence[tuple[int, str]], rng: random.Random | None = None
) -> list[tuple[int, str]]:
    """Sort (preference, host) pairs, shuffling hosts of equal preference (RFC 5321 5.1 MUST)."""
    rng = rng or _RANDOM
    shuffled = list(records)
    rng.shuffle(shuffled)
    return sorted(shuffled, key=lambda record: record[0])


def _reshuffled(result: MXResult) -> MXResult:
    """``result`` with hosts of equal preference in a new random order."""
    preferences = [host.preference for host in result.hosts]
    if len(set(preferences)) == len(preferences):
        return result  # no two hosts to swap
    by_name = {host.name: host for host in result.hosts}
    order = order_by_preference([(host.preference, host.name) for host in result.hosts])
    return dataclasses.replace(result, hosts=tuple(by_name[name] for _, name in order))


class Resolver:
    def __init__(self, config: DnsConfig) -> None:
        self._config = config
        if config.nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(ns.host, ns.port) for ns in config.nameservers
            ]
        else:
            resolver = dns.asyncresolver.Resolver()
        resolver.lifetime = config.timeout
        resolver.timeout = min(config.timeout, 2.0)
        self.cache = dns.resolver.LRUCache(config.cache_size)
        resolver.cache = self.cache
        self._resolver = resolver
        self.queries = 0
        self.result_hits = 0
        self._results: dict[str, tuple[float, MXResult]] = {}
        self._dnssec: dns.asyncresolver.Resolver | None = None
        self._dnssec_results: dict[str, tuple[float, MXResult]] = {}
        self.tlsa_port = 25  # the delivery port: TLSA records are _<port>._tcp.<host>

    @property
    def dnssec_resolver(self) -> dns.asyncresolver.Resolver:
        """The resolver object for domains under DANE (made on first use): the same
        nameservers and limits, EDNS with the DO bit, AD asked for (RFC 6840 section 5.7),
        and a cache of its own, so answers without DNSSEC never stand in for these."""
        if self._dnssec is None:
            plain = self._resolver
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = list(plain.nameservers)
            resolver.lifetime = plain.lifetime
            resolver.timeout = plain.timeout
            resolver.use_edns(0, dns.flags.DO, 1232)
            resolver.flags = dns.flags.RD | dns.flags.AD
            resolver.cache = dns.resolver.LRUCache(self._config.cache_size)
            self._dnssec = resolver
        return self._dnssec

    @property
    def cache_hits(self) -> int:
        """Look-ups answered without asking a server: whole MX results, and single answers."""
        return self.result_hits + int(self.cache.hits())

    async def resolve_mx(self, domain: str, *, dnssec: bool = False) -> MXResult:
        """The MX hosts of ``domain`` with their addresses, or :class:`ResolutionError`.
        ``dnssec``: the domain is under DANE (see the module's docstring); the result then
        says what was secure and carries each secure host's TLSA records.

        A whole result is kept for the smallest TTL of the answers it was built from (so a
        busy domain costs no DNS work per message); equal preferences are shuffled anew on
        every call all the same."""
        results = self._dnssec_results if dnssec else self._results
        cached = results.get(domain)
        now = trio.current_time()
        if cached is not None:
            if cached[0] > now:
                self.result_hits += 1
                return _reshuffled(cached[1])
            del results[domain]
        ttls: list[int] = []
        result = await self._resolve_mx(domain, ttls, dnssec)
        # A failed TLSA look-up (a host left out for it) is not kept: it may be transient.
        failed = any(host.dane_failure is not None for host in result.hosts)
        if ttls and min(ttls) > 0 and not failed:
            if len(results) >= self._config.cache_size:
                results.pop(next(iter(results)))  # the oldest entry
            results[domain] = (now + min(*ttls, MAX_RESULT_TTL), result)
        return result

    async def _resolve_mx(self, domain: str, ttls: list[int], dnssec: bool = False) -> MXResult:
        static = self._config.static.get(domain)
        if static is not None:
            return await self._static(domain, static, ttls)
        try:
            answer = await self._query(domain, "MX", ttls, dnssec)
        except dns.resolver.NXDOMAIN:
            raise ResolutionError(replies.no_such_domain(domain)) from None
        except dns.resolver.NoAnswer as error:
            # RFC 7672 section 2.2.2, the non-MX destination: the domain is its own MX
            # host, secure when the denial of its MX RRset and its addresses are.
            secure = dnssec and _authenticated(error.kwargs.get("response"))
            if dnssec:
                host = await self._secure_host(domain, 0, ttls, secure)
            else:
                host = MXHost(domain, 0, await self._host_addresses(domain, ttls))
            if not host.addresses:
                raise ResolutionError(replies.no_mail_domain(domain)) from None
            return MXResult(
                domain,
                (host,),
                implicit=True,
                exchangers=frozenset({domain}),
                secure=secure if dnssec else None,
            )
        records = [
            (int(rdata.preference), rdata.exchange.to_text(omit_final_dot=True).lower())
            for rdata in answer
        ]
        real = [(pref, host) for pref, host in records if host not in ("", ".")]
        if not real:
            raise ResolutionError(replies.null_mx(domain))
        ordered = order_by_preference(real)[:MAX_MX_HOSTS]
        secure = dnssec and _authenticated(answer.response)
        hosts = await self._hosts_with_addresses(
            domain, ordered, ttls, dnssec=dnssec, mx_secure=secure
        )
        return MXResult(
            domain,
            hosts,
            exchangers=frozenset(host for _, host in real),
            secure=secure if dnssec else None,
        )

    async def resolve_txt(self, name: str) -> tuple[str, ...]:
        """The TXT records at ``name``, each one's strings joined without separators (as
        RFC 8460 section 3 and RFC 8461 section 3.1 read them; bytes that are not UTF-8
        replaced), at most MAX_TXT_RECORDS of them, each cut to MAX_TXT_LENGTH bytes (so that
        it fails any parser that expects less); ``()`` for NXDOMAIN or no TXT record. Any
        other failure is :class:`ResolutionError`."""
        try:
            answer = await self._query(name, "TXT", [])
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return ()
        return tuple(
            b"".join(rdata.strings)[:MAX_TXT_LENGTH].decode("utf-8", "replace")
            for rdata in list(answer)[:MAX_TXT_RECORDS]
        )

    async def _static(self, domain: str, entries: Sequence[str], ttls: list[int]) -> MXResult:
        ordered: list[tuple[int, str]] = []
        literal_hosts: dict[str, tuple[IPAddress, ...]] = {}
        for index, entry in enumerate(entries):
            ordered.append((index * 10, entry))
            with contextlib.suppress(ValueError):
                literal_hosts[entry] = (ip_address(entry),)
        hosts = await self._hosts_with_addresses(domain, ordered, ttls, literal_hosts)
        return MXResult(domain, hosts, exchangers=frozenset(entry.lower() for entry in entries))

    async def _hosts_with_addresses(
        self,
        domain: str,
        ordered: list[tuple[int, str]],
        ttls: list[int],
        known: dict[str, tuple[IPAddress, ...]] | None = None,
        *,
        dnssec: bool = False,
        mx_secure: bool = False,
    ) -> tuple[MXHost, ...]:
        results: dict[int, MXHost] = {}
        failures: list[ResolutionError] = []

        async def look_up(index: int, pref: int, host: str) -> None:
            if known and host in known:
                results[index] = MXHost(host, pref, known[host])
                return
            try:
                if dnssec:
                    results[index] = await self._secure_host(host, pref, ttls, mx_secure)
                else:
                    results[index] = MXHost(host, pref, await self._host_addresses(host, ttls))
            except ResolutionError as error:
                failures.append(error)

        async with trio.open_nursery() as nursery:
            for index, (pref, host) in enumerate(ordered):
                nursery.start_soon(look_up, index, pref, host)
        hosts = tuple(
            results[index]
            for index in range(len(ordered))
            if index in results and results[index].addresses
        )
        if not hosts:
            if failures:
                raise failures[0]
            raise ResolutionError(replies.no_mx_address(domain))
        return hosts

    async def host_addresses(self, host: str) -> tuple[IPAddress, ...]:
        """The A then AAAA addresses of ``host`` (each family at most MAX_ADDRESSES_PER_HOST;
        empty when it has none), or :class:`ResolutionError` when neither could be looked up."""
        return await self._host_addresses(host, [])

    async def _secure_host(self, host: str, pref: int, ttls: list[int], mx_secure: bool) -> MXHost:
        """``host`` under DNSSEC: its addresses, whether they were secure, and (when the MX
        RRset and they were) its DANE policy from its TLSA records (RFC 7672 section 2.2)."""
        canonical: list[str] = []
        security: list[bool] = []
        addresses = await self._host_addresses(host, ttls, True, security, canonical)
        secure = bool(security) and all(security)
        result = MXHost(host, pref, addresses, secure=secure)
        if not addresses:
            return result
        if not mx_secure:
            return dataclasses.replace(result, insecure="the MX RRset is not DNSSEC-signed")
        if not secure:
            return dataclasses.replace(result, insecure="its address records are not DNSSEC-signed")
        try:
            dane = await self._tlsa(host, canonical[0] if canonical else host, ttls)
        except ResolutionError as error:
            # The reply's text without its enhanced code: "DANE: TLSA lookup for ... failed".
            why = error.reply.lines[0].split(" ", 1)[-1]
            return dataclasses.replace(result, dane_failure=why)
        if dane is None:
            return dataclasses.replace(result, insecure="no secure TLSA records")
        return dataclasses.replace(result, dane=dane)

    async def _tlsa(self, host: str, expanded: str, ttls: list[int]) -> DanePolicy | None:
        """The DANE policy of ``host`` (whose addresses were secure, found under the
        CNAME-expanded name ``expanded``), or None when it has no secure TLSA records.

        RFC 7672 section 2.2.2: TLSA records are looked up first under the expanded name,
        then (when that has none) under ``host`` itself; the reference identifiers of a
        DANE-TA leaf are ``host`` and, when the records were found there, ``expanded``.
        A failed look-up (SERVFAIL: bogus or unreachable; timeout) is a
        :class:`ResolutionError`: the host must not be used, nor mail sent in the clear."""
        bases = [expanded, host] if expanded != host else [host]
        for base in bases:
            owner = f"_{self.tlsa_port}._tcp.{base}"
            try:
                answer = await self._query(owner, "TLSA", ttls, True)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except ResolutionError:
                raise ResolutionError(replies.dane_tlsa_failed(host, owner)) from None
            if not _authenticated(answer.response):
                return None  # an insecure TLSA RRset (e.g. through an insecure CNAME)
            # The whole RRset (bounded by the DNS message size): DanePolicy keeps at most
            # MAX_TLSA_RECORDS usable ones, never dropping a usable one for an unusable one.
            records = [
                TlsaRecord(int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert))
                for r in answer
            ]
            names = [host, base] if base != host else [host]
            return DanePolicy.from_records(host, records, names, owner)
        return None

    async def _host_addresses(
        self,
        host: str,
        ttls: list[int],
        dnssec: bool = False,
        security: list[bool] | None = None,
        canonical: list[str] | None = None,
    ) -> tuple[IPAddress, ...]:
        """A then AAAA addresses of ``host``; a missing family is not an error. Under
        ``dnssec``, whether each RRset found was secure goes to ``security`` and the name it
        was found under after CNAME expansion to ``canonical``."""
        found: dict[str, list[IPAddress]] = {"A": [], "AAAA": []}
        temporary: list[str] = []

        async def look_up(rdtype: str) -> None:
            try:
                answer = await self._query(host, rdtype, ttls, dnssec)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                return
            except ResolutionError as error:
                temporary.append(error.reply.text)
                return
            found[rdtype] = [ip_address(rdata.address) for rdata in answer][:MAX_ADDRESSES_PER_HOST]
            if security is not None:
                security.append(_authenticated(answer.response))
            if canonical is not None and not canonical:
                canonical.append(answer.canonical_name.to_text(omit_final_dot=True).lower())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(look_up, "A")
            nursery.start_soon(look_up, "AAAA")
        addresses = tuple(found["A"] + found["AAAA"])
        if not addresses and temporary:
            raise ResolutionError(replies.dns_temporary(host, "no answer for its addresses"))
        if temporary and security is not None:
            security.append(False)  # one family unknown: not all of it is known secure
        return addresses

    async def _query(
        self, name: str, rdtype: str, ttls: list[int], dnssec: bool = False
    ) -> dns.resolver.Answer:
        """One query (its TTL goes to ``ttls``); NXDOMAIN and NoAnswer propagate, every other
        failure is temporary. ``dnssec``: through :attr:`dnssec_resolver`."""
        self.queries += 1
        resolver = self.dnssec_resolver if dnssec else self._resolver
        try:
            async with _dns_slots():
                answer = await resolver.resolve(
                    dns.name.from_text(name), rdtype, search=False, lifetime=self._config.timeout
                )
            if answer.rrset is not None:
                # What is left of the TTL (dnspython's cache counts it down).
                ttls.append(max(0, int(answer.expiration - time.time())))
            return answer
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            raise
        except dns.resolver.NoNameservers as error:
            shortage = _local_shortage(error)
            if shortage is not None:
                raise ResolutionError(replies.local_resource_shortage(str(shortage))) from None
            raise ResolutionError(replies.dns_temporary(name, "SERVFAIL or refused")) from None
        except dns.exception.Timeout:
            raise ResolutionError(replies.dns_temporary(name, "timeout")) from None
        except dns.exception.DNSException as error:
            raise ResolutionError(replies.dns_temporary(name, describe_error(error))) from None


def _authenticated(response: object) -> bool:
    """Whether the resolver's ``response`` (a ``dns.message.Message``) had the AD bit: the
    configured (validating) resolver vouches for it (RFC 4035 section 3.2.3)."""
    flags = getattr(response, "flags", 0)
    return bool(flags & dns.flags.AD)
