"""Counters and latency histograms of one running sidecar, rendered as Prometheus text (for
``/metrics``) or as a plain dict (for ``/status`` and ``sidecar status``)."""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Outcome classes of a transaction, and of a recipient.
TRANSACTION_OUTCOMES = ("delivered", "deferred", "rejected", "aborted")
RECIPIENT_OUTCOMES = ("accepted", "deferred", "rejected")


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs, ending with +Inf."""
        running = 0
        out = []
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else f"{bound:g}", running))
        return out


def outcome_of(code: int) -> str:
    """The outcome class of a final reply code."""
    if 200 <= code < 400:
        return "delivered"
    if 400 <= code < 500:
        return "deferred"
    return "rejected"


def recipient_outcome(code: int) -> str:
    """The outcome class of a RCPT reply: only 250/251 accept a recipient."""
    if code in (250, 251):
        return "accepted"
    if 400 <= code < 500:
        return "deferred"
    return "rejected"


@dataclass
class Metrics:
    sessions: int = 0
    active_sessions: int = 0
    refused_connections: int = 0
    transactions: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(TRANSACTION_OUTCOMES, 0)
    )
    recipients: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RECIPIENT_OUTCOMES, 0))
    bytes_to_mx: int = 0
    bytes_from_mx: int = 0
    upstream_connect_seconds: Histogram = field(default_factory=Histogram)
    upstream_banner_seconds: Histogram = field(default_factory=Histogram)

    def count_recipient(self, code: int) -> None:
        self.recipients[recipient_outcome(code)] += 1

    def snapshot(self) -> dict[str, object]:
        return {
            "sessions_total": self.sessions,
            "sessions_active": self.active_sessions,
            "connections_refused_total": self.refused_connections,
            "transactions_total": dict(self.transactions),
            "recipients_total": dict(self.recipients),
            "bytes_to_mx_total": self.bytes_to_mx,
            "bytes_from_mx_total": self.bytes_from_mx,
        }


@dataclass(frozen=True)
class ServerState:
    """One HAProxy server's health, as the status endpoints show it."""

    server: str
    plumbed: bool
    consecutive_failures: int
    consecutive_successes: int
    last_check: float | None
    last_error: str | None


def render_prometheus(
    metrics: Metrics,
    servers: Iterable[ServerState],
    dns_queries: int,
    dns_cache_hits: int,
) -> str:
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    family("sidecar_sessions_total", "counter", "Client sessions accepted.")
    lines.append(f"sidecar_sessions_total {metrics.sessions}")
    family("sidecar_sessions_active", "gauge", "Client sessions open now.")
    lines.append(f"sidecar_sessions_active {metrics.active_sessions}")
    family("sidecar_connections_refused_total", "counter", "Connections refused at greeting.")
    lines.append(f"sidecar_connections_refused_total {metrics.refused_connections}")
    family("sidecar_transactions_total", "counter", "Transactions by outcome class.")
    for outcome, count in metrics.transactions.items():
        lines.append(f'sidecar_transactions_total{{outcome="{outcome}"}} {count}')
    family("sidecar_recipients_total", "counter", "RCPT replies by outcome class.")
    for outcome, count in metrics.recipients.items():
        lines.append(f'sidecar_recipients_total{{outcome="{outcome}"}} {count}')
    family("sidecar_bytes_total", "counter", "Message and command bytes relayed, by direction.")
    lines.append(f'sidecar_bytes_total{{direction="to_mx"}} {metrics.bytes_to_mx}')
    lines.append(f'sidecar_bytes_total{{direction="from_mx"}} {metrics.bytes_from_mx}')
    for name, histogram, help_text in (
        (
            "sidecar_upstream_connect_seconds",
            metrics.upstream_connect_seconds,
            "Time to connect to HAProxy (or the MX, for bypass domains).",
        ),
        (
            "sidecar_upstream_banner_seconds",
            metrics.upstream_banner_seconds,
            "Time from connected to the MX's banner.",
        ),
    ):
        family(name, "histogram", help_text)
        for bound, count in histogram.cumulative():
            lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
        lines.append(f"{name}_sum {histogram.total:.6f}")
        lines.append(f"{name}_count {histogram.count}")
    family("sidecar_haproxy_server_plumbed", "gauge", "1 when the HAProxy server is plumbed.")
    for state in servers:
        lines.append(
            f'sidecar_haproxy_server_plumbed{{server="{state.server}"}} {int(state.plumbed)}'
        )
    family("sidecar_dns_queries_total", "counter", "DNS look-ups asked of the resolver.")
    lines.append(f"sidecar_dns_queries_total {dns_queries}")
    family("sidecar_dns_cache_hits_total", "counter", "DNS look-ups answered from the cache.")
    lines.append(f"sidecar_dns_cache_hits_total {dns_cache_hits}")
    return "\n".join(lines) + "\n"
