"""Recipient -> Route: which binding, proxy or bypass, which MX addresses in which order, and the
source address written in the PROXY header for each (DESIGN.md invariants 2 and 3)."""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING

import trio

from sidecar import replies
from sidecar.config import Binding, Config, DomainPolicy, HostPort, Listener, TlsPolicy
from sidecar.errors import RouteError
from sidecar.health import HealthRegistry
from sidecar.mxtls.dane import DanePolicy
from sidecar.mxtls.outcome import PolicyLabel, ResultType, TlsOutcome
from sidecar.mxtls.sts import StsLookup
from sidecar.resolver import MXHost, MXResult, Resolver
from sidecar.smtp.replies import Reply

if TYPE_CHECKING:
    from sidecar.mxtls.sts_cache import MtaSts

IPAddress = IPv4Address | IPv6Address

log = logging.getLogger("sidecar.routing")


@dataclass(frozen=True, slots=True)
class RouteKey:
    """What two recipients must share to share a transaction, and a transaction to reuse a
    connection (DESIGN.md invariant 3): the binding, bypass or not, the destination's site
    (every MX host name of its MX answer, :attr:`MXResult.site`) and the TLS policy: the
    configured one, the MX hosts under DANE (a connection authenticated by DANE is not
    reused for a route without it, nor the other way round) and, under an enforced MTA-STS
    policy, the MX hosts of the site it allows (RFC 8461 section 4.1: a connection opened
    for a policy that allows an MX host never carries mail of a domain whose policy does
    not, nor of a route without a policy)."""

    binding: str
    bypass: bool
    site: frozenset[str]
    tls: TlsPolicy
    dane: tuple[str, ...] = ()  # the MX hosts with a DANE policy (RFC 7672), sorted
    sts: frozenset[str] | None = None  # None: no enforced MTA-STS policy


@dataclass(frozen=True)
class Candidate:
    """One MX address to try, and the source address HAProxy must use for it."""

    mx: str
    address: IPAddress
    source: IPAddress | None  # None: bypass, delivered directly from this host
    # The MX host's DANE policy (its secure TLSA records), which then takes precedence over
    # the route's configured ``tls`` (DESIGN.md section 2); None: no DANE for this host.
    dane: DanePolicy | None = None


@dataclass(frozen=True)
class Route:
    domain: str
    binding: Binding
    bypass: bool
    mx: MXResult
    candidates: tuple[Candidate, ...]
    skipped: tuple[str, ...] = ()  # addresses left out, and why
    tls: TlsPolicy = "opportunistic"  # STARTTLS policy towards this domain's MX
    # The domain's MTA-STS look-up (RFC 8461), when MTA-STS applies to it; with a policy in
    # "enforce" mode, ``tls`` is "verify" and only the policy's MX hosts are candidates.
    sts: StsLookup | None = None
    sts_excluded: tuple[str, ...] = ()  # MX hosts the policy does not allow

    @property
    def sts_enforced(self) -> bool:
        """An MTA-STS policy in "enforce" mode applies (the policy label "mta-sts")."""
        return self.sts is not None and self.sts.mode == "enforce"

    @property
    def sts_label(self) -> PolicyLabel | None:
        """``"mta-sts"`` when an enforced MTA-STS policy authenticates the MX, else ``None``
        (the configured ``tls`` says)."""
        return "mta-sts" if self.sts_enforced else None

    @functools.cached_property
    def key(self) -> RouteKey:
        """Two recipients share a transaction (and a connection) only when their keys are equal.

        The MX part is the whole set of MX names of the answer (:attr:`MXResult.site`), never
        the subset of hosts this look-up happened to keep: a shuffle or a cut must not make
        two recipients of one domain look like two routes (issue 10, item 2)."""
        dane = tuple(sorted(host.name for host in self.mx.hosts if host.dane is not None))
        sts: frozenset[str] | None = None
        if self.sts_enforced and self.sts is not None and self.sts.policy is not None:
            policy = self.sts.policy
            sts = frozenset(name for name in self.mx.site if policy.matches(name))
        return RouteKey(self.binding.name, self.bypass, self.mx.site, self.tls, dane, sts)

    @property
    def servers(self) -> tuple[HostPort, ...]:
        return () if self.bypass else self.binding.ha_proxy_server


@functools.lru_cache(maxsize=4096)
def refused_destination(address: IPAddress) -> str | None:
    """Why an MX address must not be connected to by default, or ``None``."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for reason in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(address, f"is_{reason}"):
            return reason.replace("_", "-")
    return None


def source_for(binding: Binding, address: IPAddress) -> IPAddress | None:
    if isinstance(address, IPv4Address):
        return binding.ha_proxy_src_addr
    return binding.ha_proxy_ipv6_src_addr


def hash_ranking(domain: str, members: Sequence[str]) -> list[str]:
    """``members`` (binding names) in the order a ``selection = "hash"`` group tries them for
    ``domain``: rendezvous (highest random weight) hashing on a stable digest of the domain and
    each member's name, ties broken by configured order.

    The same domain always ranks the members the same way, so it keeps its first member (one
    source address) while that member is usable, and falls to the next one when it is not.
    Adding or removing a member only moves the domains whose first choice it is."""
    key = domain.lower().rstrip(".").encode()

    def weight(item: tuple[int, str]) -> tuple[int, int]:
        index, name = item
        digest = hashlib.blake2b(key + b"\0" + name.encode(), digest_size=8).digest()
        return (-int.from_bytes(digest, "big"), index)

    return [name for _, name in sorted(enumerate(members), key=weight)]


def unplumbed(binding: Binding) -> Reply:
    servers = ", ".join(str(server) for server in binding.ha_proxy_server)
    return replies.binding_unplumbed(binding.name, servers)


def _no_report(outcome: TlsOutcome) -> None:
    pass


class Router:
    def __init__(
        self,
        config: Config,
        resolver: Resolver,
        health: HealthRegistry,
        sts: MtaSts | None = None,
    ) -> None:
        self.config = config
        self.resolver = resolver
        self.health = health
        self._turns = {name: itertools.count() for name in config.binding_groups}
        resolver.tlsa_port = config.delivery.port  # TLSA records: _<port>._tcp.<MX host>
        # MTA-STS look-ups (None: MTA-STS is off for every domain).
        self.sts = sts
        # Where TLS-RPT outcomes of policy look-ups go (ServerContext wires its reporter).
        self.report: Callable[[TlsOutcome], None] = _no_report

    def _policies(self, binding: Binding, group: str | None, domain: str) -> list[DomainPolicy]:
        """The domain's settings, most specific scope first: binding, group, top level."""
        scopes = [binding.domains]
        if group is not None:
            scopes.append(self.config.binding_groups[group].domains)
        scopes.append(self.config.domains)
        return [scope[domain] for scope in scopes if domain in scope]

    def is_bypass(self, binding: Binding, group: str | None, domain: str) -> bool:
        for policy in self._policies(binding, group, domain):
            if policy.ha_proxy_bypass is not None:
                return policy.ha_proxy_bypass
        return False

    def tls_policy(self, binding: Binding, group: str | None, domain: str) -> TlsPolicy:
        for policy in self._policies(binding, group, domain):
            if policy.tls is not None:
                return policy.tls
        return self.config.delivery.tls

    def dane_enabled(self, binding: Binding, group: str | None, domain: str) -> bool:
        """Whether DANE (RFC 7672) applies to ``domain``: its own ``dane`` setting (most
        specific scope first), else ``delivery.dane``."""
        for policy in self._policies(binding, group, domain):
            if policy.dane is not None:
                return policy.dane
        return self.config.delivery.dane

    def mta_sts_on(self, binding: Binding, group: str | None, domain: str) -> bool:
        """Whether MTA-STS applies to ``domain``: its own ``mta_sts`` setting (most specific
        scope first), else ``delivery.mta_sts``. DANE takes precedence over MTA-STS per MX
        host (RFC 8461 section 2): an MX host with usable TLSA records is authenticated by
        DANE whatever the domain's MTA-STS policy (:func:`sidecar.upstream.effective_policy`),
        the others as the policy says; a domain with DANE on and no DNSSEC keeps its
        MTA-STS protection."""
        for policy in self._policies(binding, group, domain):
            if policy.mta_sts is not None:
                return policy.mta_sts
        return self.config.delivery.mta_sts

    async def sts_lookup(self, domain: str) -> StsLookup | None:
        """The MTA-STS policy of ``domain`` (``None`` when MTA-STS is off), found within a
        third of ``delivery.setup_timeout`` (the fetch's own bound is lower still)."""
        if self.sts is None:
            return None
        by = trio.current_time() + self.config.delivery.setup_timeout / 3
        return await self.sts.lookup(domain.lower().rstrip("."), by=by)

    def has_plumbed_server(self, binding: Binding) -> bool:
        return any(self.health.is_plumbed(server) for server in binding.ha_proxy_server)

    def pick_binding(
        self,
        listener: Listener,
        domain: str,
        prefer: str | None = None,
        excluded: Collection[str] = (),
    ) -> Binding:
        """The binding for this listener's mail to ``domain``; in a group, a usable member
        (one with a plumbed HAProxy server, or bypass for ``domain``) not in ``excluded``.

        ``selection = "round-robin"``: ``prefer`` (the transaction's or the open connection's
        binding) when it is usable, else the members in turn. ``selection = "hash"``: the first
        usable member of :func:`hash_ranking` for ``domain``; ``prefer`` is not consulted, so
        that a domain never leaves its member just because a connection to another is open."""
        if listener.binding is not None:
            return self.config.bindings[listener.binding]
        group = listener.target
        by_hash = self.config.binding_groups[group].selection == "hash"
        names = self.config.binding_groups[group].bindings
        if by_hash:
            names = tuple(hash_ranking(domain, names))
        members = [self.config.bindings[name] for name in names]
        usable = [
            member
            for member in members
            if member.name not in excluded
            and (self.is_bypass(member, group, domain) or self.has_plumbed_server(member))
        ]
        if not usable:
            raise RouteError(replies.group_unplumbed(group))
        if by_hash:
            return usable[0]
        for member in usable:
            if member.name == prefer:
                return member
        return usable[next(self._turns[group]) % len(usable)]

    async def route(
        self,
        listener: Listener,
        domain: str,
        literal: IPAddress | None,
        prefer: str | None = None,
        excluded: Collection[str] = (),
    ) -> Route:
        binding = self.pick_binding(listener, domain, prefer, excluded)
        group = listener.binding_group
        bypass = self.is_bypass(binding, group, domain)
        if not bypass and not self.has_plumbed_server(binding):
            raise RouteError(unplumbed(binding))
        if literal is not None:
            mx = MXResult(domain, (MXHost(str(literal), 0, (literal,)),))
        elif self.dane_enabled(binding, group, domain):
            mx = await self.resolver.resolve_mx(domain, dnssec=True)  # RFC 7672 section 2.2
        else:
            mx = await self.resolver.resolve_mx(domain)  # ResolutionError is a RouteError
        tls = self.tls_policy(binding, group, domain)
        if (
            literal is None
            and self.sts is not None
            and domain not in self.config.dns.static  # MX hosts fixed by the operator
            and self.mta_sts_on(binding, group, domain)
        ):
            lookup = await self.sts_lookup(domain)
            if lookup is not None:
                return self.sts_candidates(domain, binding, bypass, mx, tls, lookup)
        return self.candidates(domain, binding, bypass, mx, tls)

    def sts_candidates(
        self,
        domain: str,
        binding: Binding,
        bypass: bool,
        mx: MXResult,
        tls: TlsPolicy,
        lookup: StsLookup,
    ) -> Route:
        """:meth:`candidates` under the MTA-STS look-up ``lookup`` (RFC 8461 section 5):
        "enforce": only the MX hosts the policy allows, with ``tls = "verify"`` (the
        certificate must chain to the trust store and name the MX host), none allowed: a 4xx
        naming the policy; "testing": as before, the hosts it would exclude logged and
        reported; "none" or no policy: as before."""
        policy = lookup.policy
        if lookup.problem is not None and lookup.source == "none":
            self._report_sts(lookup, "", lookup.result, lookup.problem)
        if policy is None or policy.mode == "none":
            return self.candidates(domain, binding, bypass, mx, tls, lookup)
        excluded = tuple(host.name for host in mx.hosts if not policy.matches(host.name))
        if policy.mode == "testing":
            for host in excluded:
                log.warning(
                    "MTA-STS policy of %s (testing, id %s): MX %s does not match %s; "
                    "delivering as before",
                    domain,
                    lookup.id,
                    host,
                    " ".join(policy.mx),
                )
                self._report_sts(lookup, host, "validation-failure", "MX host not in the policy")
            route = self.candidates(domain, binding, bypass, mx, tls)
            return replace(route, sts=lookup, sts_excluded=excluded)
        allowed = tuple(host for host in mx.hosts if host.name not in excluded)
        if not allowed:
            for host in excluded:
                self._report_sts(lookup, host, "validation-failure", "MX host not in the policy")
            names = ", ".join(excluded[:3]) or "none"
            raise RouteError(
                replies.sts_no_mx(domain, lookup.id or "-", f"no MX host matches ({names})")
            )
        kept = MXResult(mx.domain, allowed, mx.implicit, mx.site)
        route = self.candidates(domain, binding, bypass, kept, "verify")
        skipped = tuple(f"{host}: not an MX host of the MTA-STS policy" for host in excluded)
        return replace(route, sts=lookup, sts_excluded=excluded, skipped=skipped + route.skipped)

    def _report_sts(
        self, lookup: StsLookup, mx_host: str, result: ResultType | None, why: str
    ) -> None:
        self.report(
            TlsOutcome(
                lookup.domain,
                "sts",
                mx_host,
                "",
                None,
                result,
                lookup.text,
                why,
            )
        )

    def candidates(
        self,
        domain: str,
        binding: Binding,
        bypass: bool,
        mx: MXResult,
        tls: TlsPolicy,
        sts: StsLookup | None = None,
    ) -> Route:
        """The route to ``domain``'s MX addresses (``sts``: the MTA-STS look-up to attach when
        it changes nothing about the MX hosts, for ``sidecar route`` and TLS-RPT)."""
        delivery = self.config.delivery
        chosen: list[Candidate] = []
        skipped: list[str] = []
        dane_failures: list[str] = []
        for host in mx.hosts:
            if host.dane_failure is not None:
                # RFC 7672 section 2.2: a secure MX host whose TLSA look-up failed is not
                # used (never tried without DANE, nor in the clear). For TLS-RPT (RFC 8460
                # section 4.3.2) that is a failed session of the DANE policy: dnssec-invalid.
                skipped.append(f"{host.name}: {host.dane_failure}")
                dane_failures.append(host.dane_failure)
                first = host.addresses[0] if host.addresses else None
                source = None if bypass or first is None else source_for(binding, first)
                self.report(
                    TlsOutcome(
                        domain,
                        "tlsa",
                        host.name,
                        "",
                        None if source is None else str(source),
                        "dnssec-invalid",
                        (),
                        host.dane_failure,
                    )
                )
                continue
            for address in host.addresses:
                if not delivery.allow_private_destinations:
                    why = refused_destination(address)
                    if why is not None:
                        skipped.append(f"{host.name} {address}: {why} destination refused")
                        continue
                source = None if bypass else source_for(binding, address)
                if not bypass and source is None:
                    option = (
                        "ha_proxy_src_addr"
                        if isinstance(address, IPv4Address)
                        else "ha_proxy_ipv6_src_addr"
                    )
                    skipped.append(f"{host.name} {address}: binding {binding.name} has no {option}")
                    continue
                chosen.append(Candidate(host.name, address, source, host.dane))
        if not chosen and dane_failures:
            raise RouteError(replies.dane_no_usable_mx(domain, "; ".join(dane_failures[:3])))
        if not chosen:
            detail = "; ".join(skipped[:3]) or "no addresses"
            raise RouteError(replies.no_usable_mx_address(domain, binding.name, detail))
        route = Route(
            domain,
            binding,
            bypass,
            mx,
            tuple(chosen[: delivery.max_mx_addresses]),
            tuple(skipped),
            tls,
            sts=sts,
        )
        return route
