"""Health of each HAProxy server: plumbed or unplumbed (Momentum's ha_proxy_client semantics).

The state of one server flips plumbed -> unplumbed only after ``health_check_failure_threshold``
consecutive failures, and back only after ``health_check_success_threshold`` consecutive
successes. :class:`ServerHealth` is the sans-IO state machine; :func:`run_health_checks` is the
trio task (one per distinct server, hosted in the server's nursery) that drives it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from sidecar.config import HealthConfig, HostPort

log = logging.getLogger("sidecar.health")


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
    """Every distinct HAProxy server's health, shared by routing and the checker tasks."""

    def __init__(self, servers: Iterable[HostPort], config: HealthConfig) -> None:
        self.config = config
        self.servers: dict[HostPort, ServerHealth] = {}
        for server in servers:
            self.servers.setdefault(server, ServerHealth(server, config))

    def is_plumbed(self, server: HostPort) -> bool:
        health = self.servers.get(server)
        return health is None or health.plumbed

    def record(self, server: HostPort, ok: bool, error: str | None = None) -> None:
        health = self.servers.get(server)
        if health is None:
            return
        transition = health.record(ok, trio.current_time(), error)
        if transition is not None:
            state = "plumbed" if transition.plumbed else "unplumbed"
            log.warning("HAProxy server %s is now %s (%s)", server, state, transition.reason)


async def check_server(server: HostPort, timeout: float) -> str | None:
    """One check: a plain TCP connect within ``timeout`` (never a PROXY LOCAL header: DESIGN.md
    section 3). Returns ``None`` on success, else why it failed."""
    with trio.move_on_after(timeout) as scope:
        try:
            stream = await trio.open_tcp_stream(server.host, server.port)
        except OSError as error:
            return f"connect failed: {error.strerror or error}"
        await stream.aclose()
        return None
    assert scope.cancelled_caught
    return f"no connection within {timeout:g}s"


async def watch_server(registry: HealthRegistry, server: HostPort) -> None:
    """Check ``server`` now, then every ``health_check_interval`` seconds, forever."""
    config = registry.config
    while True:
        started = trio.current_time()
        error = await check_server(server, config.health_check_timeout)
        registry.record(server, error is None, error)
        await trio.sleep_until(started + config.health_check_interval)


async def run_health_checks(registry: HealthRegistry) -> None:
    async with trio.open_nursery() as nursery:
        for server in registry.servers:
            nursery.start_soon(watch_server, registry, server)
