"""``sidecar route``: how mail to one address would go, computed by the same routing code the
server uses, without sending any mail."""

from __future__ import annotations

from sidecar.config import Config, Listener
from sidecar.errors import RouteError
from sidecar.health import registry_for, run_check
from sidecar.resolver import Resolver
from sidecar.routing import Router
from sidecar.smtp.commands import Address


async def explain_route(
    config: Config, listener: Listener, recipient: Address
) -> tuple[list[str], bool]:
    """Readable lines, and whether the address is deliverable now."""
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
    router = Router(config, Resolver(config.dns), health)
    domain = recipient.routing_domain
    if not domain:
        lines.append("error: an address without a domain cannot be routed")
        return lines, False
    try:
        route = await router.route(listener, domain, recipient.literal)
    except RouteError as error:
        # The proxy servers' states often are the reason (all unplumbed): show them too.
        names = (
            [listener.binding]
            if listener.binding is not None
            else list(config.binding_groups[listener.target].bindings)
        )
        for name in names:
            lines.append(f"binding:   {name}")
            for server in config.bindings[name].ha_proxy_server:
                lines.append(f"proxy:     {server} - {states.get(str(server), '?')}")
        lines.append(f"result:    {error.reply.code} {error.reply.text}")
        return lines, False
    lines.append(f"binding:   {route.binding.name}")
    lines.append(f"tls:       {route.tls}")
    if route.bypass:
        lines.append("delivery:  direct (ha_proxy_bypass), not through HAProxy")
    else:
        for server in route.servers:
            lines.append(f"proxy:     {server} - {states.get(str(server), '?')}")
    kind = " (implicit MX: the domain's own addresses)" if route.mx.implicit else ""
    lines.append(f"MX hosts for {domain}{kind}:")
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
    return lines, True
