"""MX, A and AAAA look-ups with dnspython's async resolver under trio.

RFC 5321 section 5.1 and RFC 7505 rules: MX hosts by preference with equal preferences shuffled;
no MX records -> the domain itself is the implicit MX; a null MX (``0 .``) means the domain
accepts no mail. dnspython's LRU cache keeps answers for their TTL (negative answers too).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import trio

from sidecar import replies
from sidecar.config import DnsConfig
from sidecar.errors import LocalResourceError, ResolutionError, describe_error
from sidecar.limits import DNS_IN_FLIGHT, local_resource_errno

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
    return MXResult(
        result.domain, tuple(by_name[name] for _, name in order), result.implicit, result.exchangers
    )


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

    @property
    def cache_hits(self) -> int:
        """Look-ups answered without asking a server: whole MX results, and single answers."""
        return self.result_hits + int(self.cache.hits())

    async def resolve_mx(self, domain: str) -> MXResult:
        """The MX hosts of ``domain`` with their addresses, or :class:`ResolutionError`.

        A whole result is kept for the smallest TTL of the answers it was built from (so a
        busy domain costs no DNS work per message); equal preferences are shuffled anew on
        every call all the same."""
        cached = self._results.get(domain)
        now = trio.current_time()
        if cached is not None:
            if cached[0] > now:
                self.result_hits += 1
                return _reshuffled(cached[1])
            del self._results[domain]
        ttls: list[int] = []
        result = await self._resolve_mx(domain, ttls)
        if ttls and min(ttls) > 0:
            if len(self._results) >= self._config.cache_size:
                self._results.pop(next(iter(self._results)))  # the oldest entry
            self._results[domain] = (now + min(*ttls, MAX_RESULT_TTL), result)
        return result

    async def _resolve_mx(self, domain: str, ttls: list[int]) -> MXResult:
        static = self._config.static.get(domain)
        if static is not None:
            return await self._static(domain, static, ttls)
        try:
            answer = await self._query(domain, "MX", ttls)
        except dns.resolver.NXDOMAIN:
            raise ResolutionError(replies.no_such_domain(domain)) from None
        except dns.resolver.NoAnswer:
            addresses = await self._host_addresses(domain, ttls)
            if not addresses:
                raise ResolutionError(replies.no_mail_domain(domain)) from None
            host = MXHost(domain, 0, addresses)
            return MXResult(domain, (host,), implicit=True, exchangers=frozenset({domain}))
        records = [
            (int(rdata.preference), rdata.exchange.to_text(omit_final_dot=True).lower())
            for rdata in answer
        ]
        real = [(pref, host) for pref, host in records if host not in ("", ".")]
        if not real:
            raise ResolutionError(replies.null_mx(domain))
        ordered = order_by_preference(real)[:MAX_MX_HOSTS]
        hosts = await self._hosts_with_addresses(domain, ordered, ttls)
        return MXResult(domain, hosts, exchangers=frozenset(host for _, host in real))

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
    ) -> tuple[MXHost, ...]:
        results: dict[int, tuple[IPAddress, ...]] = {}
        failures: list[ResolutionError] = []

        async def look_up(index: int, host: str) -> None:
            if known and host in known:
                results[index] = known[host]
                return
            try:
                results[index] = await self._host_addresses(host, ttls)
            except ResolutionError as error:
                failures.append(error)

        async with trio.open_nursery() as nursery:
            for index, (_, host) in enumerate(ordered):
                nursery.start_soon(look_up, index, host)
        hosts = tuple(
            MXHost(host, pref, results[index])
            for index, (pref, host) in enumerate(ordered)
            if results.get(index)
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

    async def txt(self, name: str) -> list[str]:
        """The TXT records of ``name``, each record's strings joined (RFC 7208 section 3.3
        style, as RFC 8461 section 3.1 wants), decoded as ASCII (other bytes replaced): at
        most MAX_TXT_RECORDS records of at most MAX_TXT_LENGTH characters (longer ones are
        cut, so they fail any parser that expects less). Empty for NXDOMAIN or no TXT;
        :class:`ResolutionError` for every other failure."""
        try:
            answer = await self._query(name, "TXT", [])
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        records = []
        for rdata in list(answer)[:MAX_TXT_RECORDS]:
            text = b"".join(rdata.strings)[:MAX_TXT_LENGTH]
            records.append(text.decode("ascii", "replace"))
        return records

    async def _host_addresses(self, host: str, ttls: list[int]) -> tuple[IPAddress, ...]:
        """A then AAAA addresses of ``host``; a missing family is not an error."""
        found: dict[str, list[IPAddress]] = {"A": [], "AAAA": []}
        temporary: list[str] = []

        async def look_up(rdtype: str) -> None:
            try:
                answer = await self._query(host, rdtype, ttls)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                return
            except ResolutionError as error:
                temporary.append(error.reply.text)
                return
            found[rdtype] = [ip_address(rdata.address) for rdata in answer][:MAX_ADDRESSES_PER_HOST]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(look_up, "A")
            nursery.start_soon(look_up, "AAAA")
        addresses = tuple(found["A"] + found["AAAA"])
        if not addresses and temporary:
            raise ResolutionError(replies.dns_temporary(host, "no answer for its addresses"))
        return addresses

    async def _query(self, name: str, rdtype: str, ttls: list[int]) -> dns.resolver.Answer:
        """One query (its TTL goes to ``ttls``); NXDOMAIN and NoAnswer propagate, every other
        failure is temporary."""
        self.queries += 1
        try:
            async with _dns_slots():
                answer = await self._resolver.resolve(
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
