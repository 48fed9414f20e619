"""The process's own resources (DESIGN.md invariant 5): its descriptor budget, planned against
``RLIMIT_NOFILE``, and telling a local resource shortage (EMFILE and the like) from a fault of
HAProxy or the MX.

Sans-IO apart from :func:`raise_nofile_limit` and :func:`open_descriptors`, which only ask the
kernel. The budget is a plain calculation from numbers, so it is unit-tested without sockets.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
from collections.abc import Iterator
from dataclasses import dataclass, replace

from sidecar.config import Config
from sidecar.errors import LocalResourceError

__all__ = [
    "DNS_IN_FLIGHT",
    "LOCAL_RESOURCE_ERRNOS",
    "STATUS_CONNECTIONS",
    "DescriptorBudget",
    "LocalResourceError",
    "expected_budget",
    "local_resource_errno",
    "nofile_limit",
    "open_descriptors",
    "per_session",
    "plan_descriptors",
    "raise_nofile_limit",
]

log = logging.getLogger("sidecar.limits")

# errno values that mean "this host is out of a resource", not "the peer failed": too many
# open files (process, system), no memory or socket buffers, no free local port.
LOCAL_RESOURCE_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EADDRNOTAVAIL}
)

# What the budget sets aside besides sessions (descriptors):
DNS_IN_FLIGHT = 32  # DNS queries in flight at once, process-wide (sidecar.resolver holds to it)
STATUS_CONNECTIONS = 8  # status endpoint requests served at once (sidecar.status holds to it)
# Connections accepted only to be refused: 421 (closed at once), and 554 to a client not in
# allowed_clients (heard for its first command, REFUSALS // 2 at once: sidecar.server).
REFUSALS = 16
SLACK = 16  # files opened briefly: a reloaded config, a CA bundle, /proc reads, log files
PER_SESSION = 2  # the client's connection and its upstream (MX via HAProxy, or direct)


def per_session(config: Config) -> int:
    """Descriptors one client session may hold: :data:`PER_SESSION` on SMTP listeners; on an
    LMTP listener the client's connection and one upstream per route (``max_routes``)."""
    lmtp = [1 + listener.max_routes for listener in config.listeners if listener.protocol == "lmtp"]
    return max([PER_SESSION, *lmtp])


def _oserrors(error: BaseException, seen: set[int]) -> Iterator[OSError]:
    if id(error) in seen:
        return
    seen.add(id(error))
    if isinstance(error, OSError):
        yield error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _oserrors(inner, seen)
    for linked in (error.__cause__, error.__context__):
        if linked is not None:
            yield from _oserrors(linked, seen)


def local_resource_errno(error: BaseException) -> int | None:
    """The errno of a local resource shortage behind ``error``, or ``None``.

    Looks through causes and exception groups: ``trio.open_tcp_stream`` reports a failed
    ``socket()`` as ``OSError("all attempts to connect ... failed")`` whose cause is an
    ExceptionGroup holding the real ``OSError(EMFILE)``."""
    for found in _oserrors(error, set()):
        if found.errno in LOCAL_RESOURCE_ERRNOS:
            return found.errno
    return None


@dataclass(frozen=True)
class DescriptorBudget:
    """How the process's descriptors (``limit``, the soft ``RLIMIT_NOFILE``) are shared out.

    Everything but client sessions gets a fixed share; what is left, divided by
    ``per_session`` (:func:`per_session`), is how many client sessions the process can hold.
    ``sessions`` is the admission limit: ``max_connections`` or fewer when the descriptors do
    not go that far."""

    limit: int
    open_at_start: int  # stdio, listeners, status socket, the event loop's own
    health_checks: int  # one connect at a time per distinct HAProxy server
    status: int  # status endpoint connections (0 when it is off)
    dns: int  # DNS queries in flight
    refusals: int  # connections being refused
    slack: int
    connection_cache: int  # idle upstreams kept for reuse (delivery.connection_cache_size)
    max_connections: int
    sessions: int
    per_session: int = PER_SESSION  # descriptors one session may hold (per_session)

    @property
    def reserved(self) -> int:
        """Descriptors set aside for everything but client sessions."""
        return (
            self.open_at_start
            + self.health_checks
            + self.status
            + self.dns
            + self.refusals
            + self.slack
            + self.connection_cache
        )

    @property
    def reduced(self) -> bool:
        """Whether the descriptors admit fewer sessions than ``max_connections``."""
        return self.sessions < self.max_connections

    def describe(self) -> str:
        """One line for the log: the admission limit and where the descriptors go."""
        return (
            f"RLIMIT_NOFILE {self.limit}: {self.sessions} client sessions "
            f"({self.per_session} descriptors each) after {self.reserved} reserved "
            f"(open at start {self.open_at_start}, connection cache {self.connection_cache}, "
            f"DNS {self.dns}, health checks {self.health_checks}, status {self.status}, "
            f"refusals {self.refusals}, slack {self.slack})"
        )


def plan_descriptors(limit: int, open_at_start: int, config: Config) -> DescriptorBudget:
    """The descriptor budget of a process whose soft ``RLIMIT_NOFILE`` is ``limit`` (a
    number of descriptors; ``resource.RLIM_INFINITY`` counts as unlimited) and which has
    ``open_at_start`` descriptors open when it starts serving (listeners included)."""
    servers = {server for binding in config.bindings.values() for server in binding.ha_proxy_server}
    delivery = config.delivery
    budget = DescriptorBudget(
        limit=limit,
        open_at_start=open_at_start,
        health_checks=len(servers),
        status=STATUS_CONNECTIONS if config.status.address is not None else 0,
        dns=DNS_IN_FLIGHT,
        refusals=REFUSALS,
        slack=SLACK,
        connection_cache=delivery.connection_cache_size if delivery.connection_cache else 0,
        max_connections=config.server.max_connections,
        sessions=0,
        per_session=per_session(config),
    )
    if limit == resource.RLIM_INFINITY or limit < 0:
        allowed = config.server.max_connections
    else:
        allowed = max(0, (limit - budget.reserved) // budget.per_session)
    return replace(budget, sessions=min(config.server.max_connections, allowed))


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one (as far as the kernel lets: an
    unlimited hard limit is capped by ``fs.nr_open``); returns (soft, hard) afterwards and logs
    what it got. Called once at start, before workers are forked (they inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _reachable(hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        log.debug("RLIMIT_NOFILE is %d (hard limit %d)", soft, hard)  # the budget logs it
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as error:
        log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, target, error)
        return soft, hard
    log.info("RLIMIT_NOFILE raised from %d to %d (the hard limit)", soft, target)
    return target, hard


def _reachable(hard: int) -> int:
    """The soft limit that can be set under ``hard`` (an unlimited one: ``fs.nr_open``)."""
    return _nr_open() if hard == resource.RLIM_INFINITY else hard


def expected_budget(config: Config) -> DescriptorBudget:
    """The budget ``sidecar run`` would plan here (soft limit raised to the hard one), with
    the descriptors open at start estimated: stdio, the event loop's, and the listening
    sockets (each worker inherits every worker's). For ``sidecar check``."""
    listening = len(config.listeners) + (1 if config.status.address is not None else 0)
    estimate = 8 + listening * config.server.worker_count
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return plan_descriptors(_reachable(hard), estimate, config)


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20  # Linux's default fs.nr_open


def open_descriptors() -> int:
    """How many descriptors this process has open now."""
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            return max(0, len(os.listdir(directory)) - 1)  # minus listdir's own
        except OSError:
            continue
    return SLACK  # pragma: no cover - no way to count them here: a guess


def nofile_limit() -> int:
    """The current soft ``RLIMIT_NOFILE``."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
