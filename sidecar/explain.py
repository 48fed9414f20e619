"""``sidecar route``: how mail to one address would go, computed by the same routing code the
server uses, without sending any mail."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from ipaddress import ip_address
from typing import Any

import trio

from sidecar.config import Config, Listener
from sidecar.errors import RouteError, describe_error
from sidecar.health import registry_for, run_check
from sidecar.mxtls.sts import StsLookup
from sidecar.mxtls.sts_cache import StsStore, build_mta_sts, sts_configured
from sidecar.resolver import MXHost, MXResult, Resolver
from sidecar.routing import Route, Router
from sidecar.shaping.model import DIRECT
from sidecar.shaping.policy import ShapingPolicy
from sidecar.shaping.shaper import shaping_configured
from sidecar.smtp.commands import Address
from sidecar.upstream import effective_policy

LIMIT_NAMES = (
    "connection_limit",
    "max_connection_rate",
    "max_message_rate",
    "max_deliveries_per_connection",
)

# Reads a running sidecar's /status documents (one per worker), or says why it cannot: the
# CLI passes one that asks the status endpoint; None: none is asked.
StatusReader = Callable[[], tuple[list[Mapping[str, Any]], str | None]]


def limit_scopes(config: Config, binding: str, site: str) -> list[tuple[str, str, str]]:
    """(limit, value, the scope that sets it) of each configured limit of ``binding``'s
    path to ``site``: the most specific scope wins (binding x site, binding, site,
    [shaping]; max_deliveries_per_connection falls back to delivery.connection_reuse_limit),
    as :meth:`ShapingPolicy.limits` merges them."""
    shaping = config.shaping
    own = config.bindings[binding].shaping
    scopes: list[tuple[str, object]] = []
    if site in shaping.sites:
        if site in own.sites:
            scopes.append((f'binding.{binding}.shaping.site."{site}"', own.sites[site]))
        scopes.append((f"binding.{binding}.shaping", own))
        scopes.append((f'shaping.site."{site}"', shaping.sites[site]))
    else:
        scopes.append((f"binding.{binding}.shaping", own))
    scopes.append(("shaping", shaping))
    found = []
    for name in LIMIT_NAMES:
        for scope, table in scopes:
            value = getattr(table, name)
            if value is not None:
                found.append((name, str(value), scope))
                break
        else:
            if name == "max_deliveries_per_connection":
                reuse = config.delivery.connection_reuse_limit
                found.append((name, str(reuse), "delivery.connection_reuse_limit"))
    return found


def _running_usage(
    documents: list[Mapping[str, Any]], binding: str, source: str, site: str
) -> list[str]:
    """What the running sidecar's workers say of the path, as lines."""
    lines = []
    for document in documents:
        worker = document.get("worker")
        who = "" if worker is None else f"worker {worker}: "
        shaping = document.get("shaping")
        if not isinstance(shaping, Mapping):
            lines.append(f"      {who}traffic shaping is off in the running sidecar")
            continue
        degraded = " (backend DEGRADED: per-process limits)" if shaping.get("degraded") else ""
        match = [
            p
            for p in shaping.get("paths", [])
            if p.get("binding") == binding and p.get("source") == source and p.get("site") == site
        ]
        if not match:
            lines.append(f"      {who}no recent use of this path{degraded}")
            continue
        path = match[0]
        state = f"{path.get('connections', 0)} connections, {path.get('waiting', 0)} waiting"
        if path.get("suspended_for") is not None:
            state += (
                f", SUSPENDED for {path['suspended_for']:.0f}s: {path.get('suspension_reason')}"
            )
        if path.get("override_for") is not None:
            limits = ", ".join(
                f"{k} {v}" for k, v in (path.get("limits") or {}).items() if v is not None
            )
            state += (
                f", limits set for {path['override_for']:.0f}s ({path.get('override_reason')}):"
                f" {limits}"
            )
        lines.append(f"      {who}{state}{degraded}")
    return lines


def explain_shaping(config: Config, route: Route, read_status: StatusReader | None) -> list[str]:
    """The shaping lines of ``sidecar route``: the site, each egress path (source x site)
    with its configured limits and their scope, and its usage now as the running sidecar
    reports it (or why it cannot be asked)."""
    policy = ShapingPolicy(config)
    site = policy.site_of(route.mx.site)
    kind = "named site" if site in policy.sites else "MX host set"
    lines = [f"shaping:   site {site} ({kind}), backend {config.shaping.backend}"]
    sources = sorted({DIRECT if c.source is None else str(c.source) for c in route.candidates})
    documents: list[Mapping[str, Any]] = []
    problem: str | None = "not asked"
    if read_status is not None:
        documents, problem = read_status()
    binding = route.binding.name
    for source in sources:
        lines.append(f"  egress {source} -> {site}:")
        scopes = limit_scopes(config, binding, site)
        for name in LIMIT_NAMES:
            found = [(v, s) for n, v, s in scopes if n == name]
            shown = f"{found[0][0]} ({found[0][1]})" if found else "no limit"
            lines.append(f"    {name}: {shown}")
        if documents:
            lines.append("    now:")
            lines += _running_usage(documents, binding, source, site)
        else:
            lines.append(f"    now: {problem} (configured values only)")
    return lines


def status_reader(urls: list[str], fetch: Callable[[str], bytes]) -> StatusReader:
    """A :data:`StatusReader` over ``urls`` (each worker's /status) with ``fetch``."""

    def read() -> tuple[list[Mapping[str, Any]], str | None]:
        if not urls:
            return [], "status.address is not set, so the running sidecar cannot be asked"
        documents = []
        for url in urls:
            try:
                documents.append(json.loads(fetch(url)))
            except (OSError, ValueError) as error:
                return [], f"not running (no answer from {url}: {describe_error(error)})"
        return documents, None

    return read


def sts_lines(lookup: StsLookup | None, excluded: tuple[str, ...], why_off: str = "") -> list[str]:
    """The MTA-STS lines of ``sidecar route``: the policy's mode, id, max_age and mx
    patterns, where it came from, and the MX hosts it excludes (RFC 8461)."""
    if lookup is None:
        return [f"mta-sts:   off{why_off}"]
    lines: list[str] = []
    policy = lookup.policy
    if policy is None:
        lines.append(f"mta-sts:   no policy for {lookup.domain} (deliver as before)")
    else:
        where = {"fetched": "fetched now", "cache": "cached", "none": ""}[lookup.source]
        if lookup.expires is not None:
            expiry = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(lookup.expires))
            where += f", valid until {expiry}"
        lines.append(
            f"mta-sts:   mode {policy.mode}, id {lookup.id}, max_age {policy.max_age} ({where})"
        )
        lines.append(f"  mx patterns: {' '.join(policy.mx) or '-'}")
        if excluded:
            effect = "skipped" if policy.mode == "enforce" else "would be skipped (testing)"
            lines.append(f"  MX hosts not in the policy, {effect}: {', '.join(excluded)}")
        elif policy.mode != "none":
            lines.append("  every MX host matches the policy")
        if policy.mode == "enforce":
            lines.append("  certificate must chain to the trust store and name the MX host")
    if lookup.problem is not None:
        lines.append(f"  policy fetch failed: {lookup.problem}")
    return lines


async def _sts_lines_anyway(
    router: Router, listener: Listener, domain: str, mx: MXResult
) -> list[str]:
    """The MTA-STS lines for a recipient that cannot be routed now."""
    binding = (
        router.config.bindings[listener.binding]
        if listener.binding is not None
        else router.config.bindings[router.config.binding_groups[listener.target].bindings[0]]
    )
    if router.sts is None or not router.mta_sts_on(binding, listener.binding_group, domain):
        return sts_lines(None, (), " for this domain")
    lookup = await router.sts_lookup(domain)
    excluded: tuple[str, ...] = ()
    if lookup is not None and lookup.policy is not None:
        excluded = tuple(host.name for host in mx.hosts if not lookup.policy.matches(host.name))
    return sts_lines(lookup, excluded)


def _mx_lines(config: Config, route: Route) -> list[str]:
    """The MX hosts of ``route`` with their addresses, and each candidate with its source."""
    kind = " (implicit MX: the domain's own addresses)" if route.mx.implicit else ""
    lines = [f"MX hosts for {route.domain}{kind}:"]
    for host in route.mx.hosts:
        addresses = ", ".join(str(address) for address in host.addresses) or "no address"
        lines.append(f"  {host.preference:>5} {host.name}: {addresses}")
    lines.append(f"tried in this order (at most {config.delivery.max_mx_addresses}):")
    for candidate in route.candidates:
        source = (
            "from this host's own address"
            if candidate.source is None
            else f"PROXY source {candidate.source} -> {candidate.address}:{config.delivery.port}"
        )
        lines.append(f"  {candidate.mx} [{candidate.address}]: {source}")
    for reason in route.skipped:
        lines.append(f"  skipped {reason}")
    return lines


def dane_resolver_warning(config: Config) -> str | None:
    """What ``sidecar check`` warns about when DANE is on (``delivery.dane``, or ``dane`` in
    any domain table) and the sidecar cannot tell that its resolver validates DNSSEC: DANE
    trusts the AD bit of ``dns.nameservers`` (RFC 7672 section 2.1 asks for a validating
    resolver the client trusts; as Postfix and Exim do, one on this host), so they must be
    on loopback. None: nothing to say."""
    tables = [config.domains, *(b.domains for b in config.bindings.values())]
    tables += [g.domains for g in config.binding_groups.values()]
    on = config.delivery.dane or any(p.dane for table in tables for p in table.values())
    if not on:
        return None
    advice = (
        "DANE trusts the AD bit of the resolver, so dns.nameservers must be a local "
        "DNSSEC-validating resolver (e.g. unbound on 127.0.0.1; see the README)"
    )
    servers = config.dns.nameservers
    if not servers:
        return f"dane is on and dns.nameservers is empty (the system's resolver): {advice}"
    remote = []
    for server in servers:
        try:
            loopback = ip_address(server.host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            remote.append(str(server))
    if remote:
        return f"dane is on and dns.nameservers {', '.join(remote)} is not on loopback: {advice}"
    return None


def explain_tls(router: Router, route: Route, group: str | None) -> list[str]:
    """The TLS lines of ``sidecar route`` for a domain under DANE (none otherwise: the
    configured ``tls`` applies to every MX): per MX host, the policy its connections use
    and why (DANE with its usable TLSA records, or why not: an insecure MX RRset or address
    records, no TLSA records, a failed TLSA look-up)."""
    domain = route.domain
    if not router.dane_enabled(route.binding, group, domain):
        return []  # the "tls:" line (the configured policy) is all there is to say
    mx = route.mx
    if mx.secure is None:
        return [f"tls policy: {route.tls} for every MX (DANE: no DNS look-up for this address)"]
    state = "DNSSEC-secure" if mx.secure else "NOT DNSSEC-secure: DANE does not apply"
    lines = [f"tls policy per MX (DANE is on for {domain}; its MX RRset is {state}):"]
    by_host = {candidate.mx: candidate for candidate in route.candidates}
    for host in mx.hosts:
        if host.dane_failure is not None:
            lines.append(f"  {host.name}: not used ({host.dane_failure})")
            continue
        candidate = by_host.get(host.name)
        if candidate is None:
            lines.append(f"  {host.name}: no usable address")
            continue
        _, label = effective_policy(route, candidate)
        if host.dane is not None:
            lines.append(
                f"  {host.name}: {label} (TLSA {host.dane.tlsa_name}: {host.dane.describe()})"
            )
            if host.dane.authenticates and host.dane.names:
                lines.append(f"    DANE-TA names: {', '.join(host.dane.names)}")
        else:
            lines.append(f"  {host.name}: {label} (no DANE: {host.insecure or 'not looked up'})")
    return lines


async def _path_anyway(
    config: Config,
    router: Router,
    listener: Listener,
    recipient: Address,
    states: Mapping[str, str],
    error: RouteError,
) -> list[str]:
    """The path of a recipient that cannot be routed now: each binding with its proxies
    (DOWN when none answers), the MX hosts with their addresses and the source of each
    candidate (of the first binding), and a ``down:`` line naming the part that fails."""
    names = (
        [listener.binding]
        if listener.binding is not None
        else list(config.binding_groups[listener.target].bindings)
    )
    group = listener.binding_group
    domain = recipient.routing_domain
    lines: list[str] = []
    down: list[str] = []
    for name in names:
        binding = config.bindings[name]
        bypass = router.is_bypass(binding, group, domain)
        plumbed = bypass or router.has_plumbed_server(binding)
        lines.append(f"binding:   {name}" + ("" if plumbed else " - DOWN (no proxy answers)"))
        if bypass:
            lines.append("delivery:  direct (ha_proxy_bypass), not through HAProxy")
        for server in () if bypass else binding.ha_proxy_server:
            lines.append(f"proxy:     {server} - {states.get(str(server), '?')}")
        if not plumbed:
            down.append(f"HAProxy of binding {name}")
    first = config.bindings[names[0]]
    try:
        if recipient.literal is not None:
            mx = MXResult(domain, (MXHost(str(recipient.literal), 0, (recipient.literal,)),))
        else:
            dane = router.dane_enabled(first, group, domain)
            mx = await router.resolver.resolve_mx(domain, dnssec=dane)
    except RouteError as failed:
        lines.append(f"MX hosts for {domain}: none ({failed.reply.code} {failed.reply.text})")
        down.append(f"DNS of {domain}")
    else:
        try:
            route = router.candidates(
                domain,
                first,
                router.is_bypass(first, group, domain),
                mx,
                router.tls_policy(first, group, domain),
            )
        except RouteError as unusable:
            # No MX host is usable (e.g. every TLSA look-up of a DANE domain failed).
            for host in mx.hosts:
                addresses = ", ".join(str(a) for a in host.addresses) or "no address"
                why = f" - not used ({host.dane_failure})" if host.dane_failure else ""
                lines.append(f"  {host.preference:>5} {host.name}: {addresses}{why}")
            lines.append(f"MX hosts for {domain}: none usable ({unusable.reply.text})")
            down.append("no usable MX")
        else:
            lines.append(f"tls:       {route.tls}")
            if recipient.literal is None:
                lines += await _sts_lines_anyway(router, listener, domain, mx)
            lines += _mx_lines(config, route)
            lines += explain_tls(router, route, group)
            if not route.candidates:
                down.append("no usable MX address")
    lines.append(f"down:      {'; '.join(down) or describe_error(error)}")
    return lines


async def explain_route(
    config: Config,
    listener: Listener,
    recipient: Address,
    read_status: StatusReader | None = None,
) -> tuple[list[str], bool]:
    """Readable lines, and whether the address is deliverable now. With traffic shaping on,
    ``read_status`` (run in a thread) gives the running sidecar's /status documents for the
    paths' usage now."""
    health = registry_for(config)
    lines = [f"recipient: {recipient.text}"]
    target = "binding" if listener.binding is not None else "binding_group"
    lines.append(f"listener:  {listener.address} -> {target} {listener.target}")
    # One live check of each HAProxy server stands in for the running server's health state.
    states: dict[str, str] = {}
    for server in health.servers:
        error = await run_check(health, server)
        health.record(server, error is None, error)
        if error is not None:  # count as unplumbed at once for this explanation
            health.servers[server].plumbed = False
        states[str(server)] = "answers (plumbed)" if error is None else f"unplumbed: {error}"
    resolver = Resolver(config.dns)
    # MTA-STS: the policies the sidecar has cached (read only: this command may run as
    # another user), a fetch for the others.
    sts = None
    if sts_configured(config):
        sts = build_mta_sts(config, resolver, StsStore.read_only(config.delivery.state_dir))
    router = Router(config, resolver, health, sts)
    domain = recipient.routing_domain
    if not domain:
        lines.append("error: an address without a domain cannot be routed")
        return lines, False
    try:
        route = await router.route(listener, domain, recipient.literal)
    except RouteError as error:
        # The rest of the path is shown all the same (the MX hosts, their addresses and the
        # source for each), with the part that is down marked: what the operator needs.
        lines += await _path_anyway(config, router, listener, recipient, states, error)
        lines.append(f"result:    {error.reply.code} {error.reply.text}")
        return lines, False
    lines.append(f"binding:   {route.binding.name}")
    lines.append(f"tls:       {route.tls}")
    if recipient.literal is None:
        why = " for this domain" if sts is not None else ""
        lines += sts_lines(route.sts, route.sts_excluded, why)
    if route.bypass:
        lines.append("delivery:  direct (ha_proxy_bypass), not through HAProxy")
    else:
        for server in route.servers:
            lines.append(f"proxy:     {server} - {states.get(str(server), '?')}")
    lines += _mx_lines(config, route)
    lines += explain_tls(router, route, listener.binding_group)
    if shaping_configured(config) and route.candidates:
        reader = read_status
        if reader is not None:
            documents = await trio.to_thread.run_sync(reader)
            reader = lambda: documents  # noqa: E731
        lines += explain_shaping(config, route, reader)
    return lines, True
