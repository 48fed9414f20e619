"""Counters and latency histograms of one running sidecar, counted as it goes. What the
status endpoints and ``sidecar status`` show of them is :mod:`sidecar.status_view`'s."""

from __future__ import annotations

import bisect
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
    # Client sessions: counted once the client says something other than NOOP or QUIT.
    sessions: int = 0
    active_sessions: int = 0
    refused_connections: int = 0
    # Connections that said nothing but NOOP or QUIT (``sidecar probe``, TCP checks):
    # not client sessions (whether refused by allowed_clients or not).
    probes: int = 0
    transactions: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(TRANSACTION_OUTCOMES, 0)
    )
    recipients: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RECIPIENT_OUTCOMES, 0))
    bytes_to_mx: int = 0
    bytes_from_mx: int = 0
    upstream_connect_seconds: Histogram = field(default_factory=Histogram)
    upstream_banner_seconds: Histogram = field(default_factory=Histogram)
    # Transactions by (binding, outcome class); binding "-": ended before it had a route.
    transactions_by_binding: dict[tuple[str, str], int] = field(default_factory=dict)
    # Upstream connections taken from the connection cache instead of opened.
    connection_cache_hits: int = 0
    # Opportunistic STARTTLS that failed (refused, handshake failed) so that the mail went
    # in plaintext to that MX, by binding.
    starttls_fallbacks: dict[str, int] = field(default_factory=dict)
    # Transactions that had an upstream, by the TLS policy it was opened under
    # (sidecar.mxtls.outcome.PolicyLabel: dane, mta-sts, verify, required, opportunistic, none).
    tls_policies: dict[str, int] = field(default_factory=dict)

    def count_transaction(self, binding: str | None, outcome: str) -> None:
        """One transaction ended with ``outcome`` (TRANSACTION_OUTCOMES) on ``binding``."""
        self.transactions[outcome] += 1
        key = (binding or "-", outcome)
        self.transactions_by_binding[key] = self.transactions_by_binding.get(key, 0) + 1

    def count_starttls_fallback(self, binding: str) -> None:
        """An opportunistic STARTTLS failed and the session went on in plaintext."""
        self.starttls_fallbacks[binding] = self.starttls_fallbacks.get(binding, 0) + 1

    def count_tls_policy(self, label: str) -> None:
        """A transaction ended on an upstream opened under TLS policy ``label``."""
        self.tls_policies[label] = self.tls_policies.get(label, 0) + 1

    def count_recipient(self, code: int) -> None:
        self.recipients[recipient_outcome(code)] += 1
