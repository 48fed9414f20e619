"""Health of each HAProxy server: plumbed or unplumbed (Momentum's ha_proxy_client semantics).

The state of one server flips plumbed -> unplumbed only after ``health_check_failure_threshold``
consecutive failures, and back only after ``health_check_success_threshold`` consecutive
successes. :class:`ServerHealth` is the sans-IO state machine; :func:`run_health_checks` is the
trio task (one per distinct server, hosted in the server's nursery) that drives it.

A check is a TCP connect to the server, or, with ``ha_proxy_client.health_check_probe`` set, a
:class:`Probe`: a PROXY v2 header through the server to the probe address, which must answer
with an SMTP 220 banner (so the egress itself is tested, not only HAProxy's listener).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

import trio

from sidecar import proxy_v2
from sidecar.config import Config, HealthConfig, HostPort
from sidecar.errors import LocalResourceError, describe_error
from sidecar.limits import local_resource_errno
from sidecar.smtp.replies import ReplyError, ReplyParser

log = logging.getLogger("sidecar.health")

IPAddress = IPv4Address | IPv6Address
Connect = Callable[[str, int], Awaitable[trio.abc.Stream]]

RECEIVE_SIZE = 4096


@dataclass(frozen=True)
class Probe:
    """The deeper check of one HAProxy server: through it, from ``source`` (a binding's source
    address that uses the server) to ``target``:``port``, which must greet with 220."""

    source: IPAddress
    target: IPAddress
    port: int

    @property
    def header(self) -> bytes:
        """The PROXY v2 header the probe writes (source port 0, like deliveries)."""
        return proxy_v2.encode(self.source, 0, self.target, self.port)


@dataclass(frozen=True)
class Transition:
    server: HostPort
    plumbed: bool
    reason: str


class ServerHealth:
    """Consecutive-count state machine for one server. Servers start plumbed, so mail flows
    while the first checks run."""

    def __init__(self, server: HostPort, config: HealthConfig) -> None:
        self.server = server
        self.config = config
        self.plumbed = True
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.last_check: float | None = None
        self.last_error: str | None = None

    def record(self, ok: bool, now: float, error: str | None = None) -> Transition | None:
        """Count one check (or delivery attempt); returns the transition it caused, if any."""
        self.last_check = now
        if ok:
            self.consecutive_successes += 1
            self.consecutive_failures = 0
            if (
                not self.plumbed
                and self.consecutive_successes >= self.config.health_check_success_threshold
            ):
                self.plumbed = True
                return Transition(
                    self.server, True, f"{self.consecutive_successes} consecutive successes"
                )
            return None
        self.last_error = error
        self.consecutive_failures += 1
        self.consecutive_successes = 0
        if self.plumbed and self.consecutive_failures >= self.config.health_check_failure_threshold:
            self.plumbed = False
            return Transition(
                self.server,
                False,
                f"{self.consecutive_failures} consecutive failures, last: {error}",
            )
        return None


class HealthRegistry:
    """Every distinct HAProxy server's health, shared by routing and the checker tasks.

    ``probes``: the servers checked with a :class:`Probe` (see :func:`registry_for`); the
    others are checked with a TCP connect."""

    def __init__(
        self,
        servers: Iterable[HostPort],
        config: HealthConfig,
        *,
        probes: Mapping[HostPort, Probe] | None = None,
    ) -> None:
        self.config = config
        self.servers: dict[HostPort, ServerHealth] = {}
        for server in servers:
            self.servers.setdefault(server, ServerHealth(server, config))
        self.probes: dict[HostPort, Probe] = dict(probes or {})

    def is_plumbed(self, server: HostPort) -> bool:
        health = self.servers.get(server)
        return health is None or health.plumbed

    def record(self, server: HostPort, ok: bool, error: str | None = None) -> None:
        """Count what a delivery saw connecting to ``server`` (a passive check). For a probed
        server a successful connect does not count: it proves less than the probe, and must
        not reset the failures of probes that found the egress broken."""
        if ok and server in self.probes:
            return
        self._count(server, ok, error)

    def record_check(self, server: HostPort, error: str | None) -> None:
        """Count one health check of ``server``; ``error`` is ``None`` on success."""
        self._count(server, error is None, error)

    def _count(self, server: HostPort, ok: bool, error: str | None) -> None:
        health = self.servers.get(server)
        if health is None:
            return
        transition = health.record(ok, trio.current_time(), error)
        if transition is not None:
            state = "plumbed" if transition.plumbed else "unplumbed"
            log.warning("HAProxy server %s is now %s (%s)", server, state, transition.reason)


def probes_for(config: Config) -> dict[HostPort, Probe]:
    """The :class:`Probe` of each HAProxy server when ``health_check_probe`` is set: its source
    is that of the first binding (in config order) that uses the server and has a source
    address of the probe's family. Servers without one are left out (TCP connect check)."""
    target = config.ha_proxy_client.health_check_probe
    if target is None:
        return {}
    address = ip_address(target.host)
    probes: dict[HostPort, Probe] = {}
    for binding in config.bindings.values():
        source: IPAddress | None = (
            binding.ha_proxy_src_addr
            if isinstance(address, IPv4Address)
            else binding.ha_proxy_ipv6_src_addr
        )
        if source is None:
            continue
        for server in binding.ha_proxy_server:
            probes.setdefault(server, Probe(source, address, target.port))
    return probes


def registry_for(config: Config) -> HealthRegistry:
    """The registry of every HAProxy server of ``config``'s bindings, with their probes."""
    servers = [server for binding in config.bindings.values() for server in binding.ha_proxy_server]
    probes = probes_for(config)
    target = config.ha_proxy_client.health_check_probe
    if target is not None:
        family = "IPv4" if isinstance(ip_address(target.host), IPv4Address) else "IPv6"
        for server in dict.fromkeys(servers):
            if server not in probes:
                log.warning(
                    "HAProxy server %s: no binding using it has an %s source address, so "
                    "health_check_probe %s cannot be used; checking it with a TCP connect",
                    server,
                    family,
                    target,
                )
    return HealthRegistry(servers, config.ha_proxy_client, probes=probes)


def _connect_failed(error: OSError) -> str:
    """Why a check's connect failed; :class:`LocalResourceError` when it was for want of a
    local resource (EMFILE...): that says nothing about the server (DESIGN.md invariant 5)."""
    code = local_resource_errno(error)
    if code is not None:
        raise LocalResourceError(code) from None
    return f"connect failed: {describe_error(error)}"


async def check_server(server: HostPort, timeout: float) -> str | None:
    """One check: a plain TCP connect within ``timeout`` (never a PROXY LOCAL header: DESIGN.md
    section 3). Returns ``None`` on success, else why it failed; raises
    :class:`LocalResourceError` when the check could not be made for want of a local resource."""
    with trio.move_on_after(timeout) as scope:
        try:
            stream = await trio.open_tcp_stream(server.host, server.port)
        except OSError as error:
            return _connect_failed(error)
        await stream.aclose()
        return None
    assert scope.cancelled_caught
    return f"no connection within {timeout:g}s"


async def probe_server(
    server: HostPort,
    probe: Probe,
    timeout: float,
    *,
    connect: Connect = trio.open_tcp_stream,
) -> str | None:
    """One deep check within ``timeout``: connect to ``server``, write ``probe.header`` in one
    write, require a 220 banner, then QUIT and close. Returns ``None`` on success, else why it
    failed; raises :class:`LocalResourceError` as :func:`check_server` does. (Never a PROXY
    LOCAL header: DESIGN.md section 3.)"""
    connected = False
    with trio.move_on_after(timeout):
        try:
            stream = await connect(server.host, server.port)
        except OSError as error:
            return _connect_failed(error)
        connected = True
        try:
            return await _probe_banner(stream, probe, timeout)
        finally:
            await trio.aclose_forcefully(stream)
    if not connected:
        return f"no connection within {timeout:g}s"
    return f"probe: no 220 banner within {timeout:g}s"


async def _probe_banner(stream: trio.abc.Stream, probe: Probe, timeout: float) -> str | None:
    try:
        await stream.send_all(probe.header)
        parser = ReplyParser()
        while (banner := parser.next_reply()) is None:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                return "probe: connection closed"
            parser.feed(data)
    except ReplyError as error:
        return f"probe: not an SMTP banner ({describe_error(error)})"
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        return "probe: connection closed"
    if banner.code != 220:
        first = f"{banner.code} {banner.lines[0]}".rstrip()
        return f"probe: got {first[:100]!r}"
    # The banner came in time, so the check has succeeded whatever happens to the QUIT: shield
    # it from the check's deadline (it has its own).
    with trio.move_on_after(timeout, shield=True):
        with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(b"QUIT\r\n")
    return None


async def run_check(registry: HealthRegistry, server: HostPort) -> str | None:
    """One check of ``server``: its probe when it has one, else a TCP connect."""
    timeout = registry.config.health_check_timeout
    probe = registry.probes.get(server)
    if probe is None:
        return await check_server(server, timeout)
    return await probe_server(server, probe, timeout)


async def watch_server(registry: HealthRegistry, server: HostPort) -> None:
    """Check ``server`` now, then every ``health_check_interval`` seconds, forever. A check
    that could not be made for want of a local resource is not counted either way."""
    config = registry.config
    while True:
        started = trio.current_time()
        try:
            error = await run_check(registry, server)
        except LocalResourceError as shortage:
            log.warning(
                "health check of %s skipped: local resource shortage (%s)", server, shortage
            )
        else:
            registry.record_check(server, error)
        await trio.sleep_until(started + config.health_check_interval)


async def run_health_checks(registry: HealthRegistry) -> None:
    async with trio.open_nursery() as nursery:
        for server in registry.servers:
            nursery.start_soon(watch_server, registry, server)
