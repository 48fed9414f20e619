"""What every session of one configuration shares: :class:`ServerContext`.

Built by :mod:`sidecar.server` once per configuration (and again on each reload); the sessions
(:mod:`sidecar.session`) read it and register themselves in it, so that a shutdown can reach
them. This module sits below both: it knows a session only as a type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from sidecar import replies
from sidecar.config import Config
from sidecar.health import HealthRegistry
from sidecar.metrics import Metrics
from sidecar.mxtls.outcome import NullReporter, TlsReporter
from sidecar.pool import UpstreamPool
from sidecar.routing import Router
from sidecar.shaping.shaper import Shaper
from sidecar.smtp.server import Limits
from sidecar.tcp import DeadlineStream

if TYPE_CHECKING:
    from sidecar.session import Session


@dataclass
class ServerContext:
    """What every session shares: built once per configuration."""

    config: Config
    router: Router
    health: HealthRegistry
    metrics: Metrics = field(default_factory=Metrics)
    pool: UpstreamPool | None = None  # idle upstreams shared by sessions (None: no reuse)
    shaper: Shaper | None = None  # traffic shaping (None: nothing is shaped)
    # Where the outcome of each TLS session attempt with an MX goes (TLS-RPT, RFC 8460).
    tls_reporter: TlsReporter = field(default_factory=NullReporter)
    shutting_down: trio.Event = field(default_factory=trio.Event)
    # The streams of sessions waiting for a command between transactions: a shutdown
    # interrupts those waits at once.
    idle_sessions: set[DeadlineStream] = field(default_factory=set)
    # Every running session (shared by the contexts of all configurations, like the above).
    sessions: set[Session] = field(default_factory=set)
    # What the SMTP server core of each session enforces, made once per configuration.
    limits: Limits = field(init=False)

    def __post_init__(self) -> None:
        # The router reports its policy look-ups' outcomes (MTA-STS) to whatever reporter
        # this context holds when they happen.
        self.router.report = lambda outcome: self.tls_reporter.record(outcome)
        server = self.config.server
        self.limits = Limits(
            server.hostname,
            server.max_line_length,
            server.max_message_size,
            server.max_recipients,
            server.max_errors,
        )

    def begin_shutdown(self) -> None:
        """Idle sessions get 421 and close now; a transaction in progress may finish, and no
        new one starts (MAIL gets 421)."""
        self.shutting_down.set()
        for session in self.sessions:
            session.smtp.closing = replies.SHUTTING_DOWN
        for idle in self.idle_sessions:
            idle.interrupt()

    def end_grace(self) -> int:
        """The shutdown grace is over: every session gets 421 and closes now (an open
        transaction is aborted, so its MX sees no end of data), except those whose end of
        data the MX already has: they wait for its reply (within ``data_done_timeout``) and
        pass it on, because the MX may have accepted the message (DESIGN.md invariant 1).
        Returns how many sessions are still owed a final reply."""
        owed = 0
        for session in self.sessions:
            if session.owes_final_reply:
                owed += 1
            else:
                session.stop()
        return owed
