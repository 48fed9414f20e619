"""The status view: what a running sidecar shows about itself, assembled in one place.

:func:`take_snapshot` reads a :class:`~sidecar.context.ServerContext` (and what the server's
runtime adds: start time, worker, descriptor budget) once into a frozen
:class:`StatusSnapshot`; the renderers turn that one snapshot into each form it is shown in:

- :func:`render_json`: the ``/status`` body (JSON, keys sorted);
- :func:`render_prometheus`: the ``/metrics`` body (Prometheus text format 0.0.4, written
  by ``prometheus_client`` from the metric families :class:`SnapshotCollector` yields);
- :func:`render_table`: the ``sidecar status`` tables for a terminal, from a snapshot read
  back from ``/status`` by :func:`snapshot_from_json`.

Pure: no I/O, no clock (the caller passes ``now``, in trio's clock seconds).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sidecar.context import ServerContext
from sidecar.health import HealthRegistry
from sidecar.limits import DescriptorBudget
from sidecar.metrics import TRANSACTION_OUTCOMES, Histogram, Metrics
from sidecar.shaping.model import PathLimits
from sidecar.shaping.shaper import PathReport, Shaper

# (name, value) pairs in a fixed order: a frozen stand-in for a dict of counts.
Counts = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class ServerState:
    """One HAProxy server's health, as the status endpoints show it. ``last_check`` is in
    trio's clock seconds; ``last_check_seconds_ago`` (rounded to 0.1 s) is taken at
    snapshot time."""

    server: str
    plumbed: bool
    consecutive_failures: int
    consecutive_successes: int
    last_check: float | None
    last_error: str | None
    last_check_seconds_ago: float | None = None


@dataclass(frozen=True)
class BindingState:
    """One binding: its HAProxy servers, source addresses, and whether any server is plumbed."""

    name: str
    ha_proxy_server: tuple[str, ...]
    ha_proxy_src_addr: str | None
    ha_proxy_ipv6_src_addr: str | None
    plumbed: bool


@dataclass(frozen=True)
class ListenerState:
    """One listener's address, the binding or binding_group its mail uses, and what it
    speaks (``smtp`` or ``lmtp``)."""

    address: str
    target: str
    protocol: str = "smtp"


@dataclass(frozen=True)
class Counters:
    """The process's counters since start (names as in ``/status``)."""

    sessions_total: int
    sessions_active: int
    connections_refused_total: int
    transactions_total: Counts  # by outcome class (sidecar.metrics.TRANSACTION_OUTCOMES)
    recipients_total: Counts  # by outcome class (sidecar.metrics.RECIPIENT_OUTCOMES)
    bytes_to_mx_total: int
    bytes_from_mx_total: int

    def items(self) -> list[tuple[str, int | Counts]]:
        """(name, value) pairs, in field order."""
        return [
            ("sessions_total", self.sessions_total),
            ("sessions_active", self.sessions_active),
            ("connections_refused_total", self.connections_refused_total),
            ("transactions_total", self.transactions_total),
            ("recipients_total", self.recipients_total),
            ("bytes_to_mx_total", self.bytes_to_mx_total),
            ("bytes_from_mx_total", self.bytes_from_mx_total),
        ]


@dataclass(frozen=True)
class LatencyHistogram:
    """One latency histogram (seconds), for ``/metrics`` only."""

    name: str
    help_text: str
    buckets: tuple[tuple[str, int], ...]  # (le, cumulative count), ending with +Inf
    total: float
    count: int


@dataclass(frozen=True)
class Descriptors:
    """The descriptor budget (:mod:`sidecar.limits`): ``RLIMIT_NOFILE``, what is set aside
    for everything but sessions, and the admission limit."""

    limit: int
    reserved: int
    max_sessions: int


@dataclass(frozen=True)
class DnsCounters:
    """DNS look-ups asked of the resolver, and those answered from its cache."""

    queries: int
    cache_hits: int


@dataclass(frozen=True)
class ShapingPath:
    """One recently used egress path of a binding: its limits in force (name, value as
    written in the configuration; None: no limit) and usage. ``connections`` counts the
    unexpired slots of every sidecar sharing the backend; ``waiting`` this process's
    sessions waiting for one. Seconds rounded to 0.1 s."""

    binding: str
    source: str
    site: str
    connections: int
    waiting: int
    suspended_for: float | None
    suspension_reason: str | None
    override_for: float | None
    override_reason: str | None
    limits: tuple[tuple[str, str | None], ...]


@dataclass(frozen=True)
class ShapingLabel:
    """The /metrics series of one (binding, site label): ``site`` is a named site or
    "other", so there are at most bindings x (named sites + 1) of them. ``connections``:
    slots this process holds; ``suspensions``: suspended paths among the recent ones."""

    binding: str
    site: str
    connections: int
    waits: int
    wait_seconds: float
    deferrals: Counts  # by kind: suspended, connection_limit, max_connection_rate, ...
    suspensions: int


@dataclass(frozen=True)
class ShapingState:
    """Traffic shaping, when it is on: the backend, whether it is degraded (the shared
    backend is unreachable: per-process limits meanwhile), the recent paths (newest first,
    at most sidecar.shaping.shaper.RECENT_PATHS) and the per-label counters."""

    backend: str
    degraded: bool
    paths: tuple[ShapingPath, ...]
    labels: tuple[ShapingLabel, ...]


@dataclass(frozen=True)
class StatusSnapshot:
    """A running sidecar's state at one moment: everything ``/status``, ``/metrics`` and
    ``sidecar status`` show."""

    hostname: str
    uptime_seconds: float  # rounded to 0.1 s
    shutting_down: bool
    worker: int | None  # this worker's index when one of several, else None
    workers: int
    servers: tuple[ServerState, ...]
    bindings: tuple[BindingState, ...]
    listeners: tuple[ListenerState, ...]
    counters: Counters
    descriptors: Descriptors
    dns: DnsCounters
    latencies: tuple[LatencyHistogram, ...] = ()  # not in /status: read back without them
    shaping: ShapingState | None = None  # None: traffic shaping is off
    exposition: Exposition | None = None  # /metrics only: read back without it


@dataclass(frozen=True)
class Exposition:
    """Counters only ``/metrics`` shows (``/status`` keeps its document as it was):
    connections that were health checks, transactions by binding and outcome, upstream
    connections taken from the cache, and opportunistic STARTTLS fallbacks by binding."""

    probes: int
    transactions: tuple[tuple[str, str, int], ...]  # (binding, outcome, count)
    connection_cache_hits: int
    starttls_fallbacks: Counts  # by binding
    tls_policies: Counts = ()  # transactions by the TLS policy of their upstream


# -- assembling --------------------------------------------------------------------------------


def server_states(health: HealthRegistry, now: float) -> tuple[ServerState, ...]:
    """Every HAProxy server's health, in configuration order."""
    return tuple(
        ServerState(
            str(server),
            state.plumbed,
            state.consecutive_failures,
            state.consecutive_successes,
            state.last_check,
            state.last_error,
            None if state.last_check is None else round(now - state.last_check, 1),
        )
        for server, state in health.servers.items()
    )


def counters_of(metrics: Metrics) -> Counters:
    """The counters of ``metrics`` as they are now."""
    return Counters(
        sessions_total=metrics.sessions,
        sessions_active=metrics.active_sessions,
        connections_refused_total=metrics.refused_connections,
        transactions_total=tuple(metrics.transactions.items()),
        recipients_total=tuple(metrics.recipients.items()),
        bytes_to_mx_total=metrics.bytes_to_mx,
        bytes_from_mx_total=metrics.bytes_from_mx,
    )


def exposition_of(metrics: Metrics, bindings: Iterable[str]) -> Exposition:
    """The /metrics-only counters of ``metrics``: every binding of the configuration gets
    its transaction series (zero until used), so a dashboard's queries find them."""
    counts = dict(metrics.transactions_by_binding)
    for binding in bindings:
        for outcome in TRANSACTION_OUTCOMES:
            counts.setdefault((binding, outcome), 0)
    return Exposition(
        probes=metrics.probes,
        transactions=tuple((b, o, n) for (b, o), n in sorted(counts.items())),
        connection_cache_hits=metrics.connection_cache_hits,
        starttls_fallbacks=tuple(
            (binding, metrics.starttls_fallbacks.get(binding, 0))
            for binding in sorted({*bindings, *metrics.starttls_fallbacks})
        ),
        tls_policies=tuple(sorted(metrics.tls_policies.items())),
    )


def _latency(name: str, histogram: Histogram, help_text: str) -> LatencyHistogram:
    return LatencyHistogram(
        name, help_text, tuple(histogram.cumulative()), histogram.total, histogram.count
    )


def latencies_of(metrics: Metrics) -> tuple[LatencyHistogram, ...]:
    """The latency histograms of ``metrics`` as they are now."""
    return (
        _latency(
            "sidecar_upstream_connect_seconds",
            metrics.upstream_connect_seconds,
            "Time to connect to HAProxy (or the MX, for bypass domains).",
        ),
        _latency(
            "sidecar_upstream_banner_seconds",
            metrics.upstream_banner_seconds,
            "Time from connected to the MX's banner.",
        ),
    )


LIMIT_NAMES = (
    "connection_limit",
    "max_connection_rate",
    "max_message_rate",
    "max_deliveries_per_connection",
)


def limit_items(limits: PathLimits) -> tuple[tuple[str, str | None], ...]:
    """(name, value as written: "60/min", "10"; None: no limit) of each limit, in order."""
    return tuple(
        (name, None if (value := getattr(limits, name)) is None else str(value))
        for name in LIMIT_NAMES
    )


def _tenth(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def shaping_state(shaper: Shaper, reports: Iterable[PathReport]) -> ShapingState:
    """The shaping part of a snapshot: ``shaper``'s counters now, and ``reports`` (from
    :meth:`Shaper.report`, which asks the backend) as the recent paths."""
    paths = tuple(
        ShapingPath(
            binding=report.binding,
            source=report.path.source,
            site=report.path.site,
            connections=report.usage.connections,
            waiting=report.usage.waiting,
            suspended_for=_tenth(report.usage.suspended_for),
            suspension_reason=report.usage.suspension_reason,
            override_for=_tenth(report.usage.override_for),
            override_reason=report.usage.override_reason,
            limits=limit_items(report.limits),
        )
        for report in reports
    )
    held = shaper.connections_held()
    suspended: dict[tuple[str, str], int] = {}
    for path in paths:
        key = (path.binding, shaper.site_label(path.site))
        suspended[key] = suspended.get(key, 0) + (path.suspended_for is not None)
    stats = shaper.stats.by_label
    labels = tuple(
        ShapingLabel(
            binding=binding,
            site=site,
            connections=held.get((binding, site), 0),
            waits=stats[(binding, site)].waits if (binding, site) in stats else 0,
            wait_seconds=stats[(binding, site)].wait_seconds if (binding, site) in stats else 0,
            deferrals=tuple(sorted(stats[(binding, site)].deferrals.items()))
            if (binding, site) in stats
            else (),
            suspensions=suspended.get((binding, site), 0),
        )
        for binding, site in sorted({*held, *suspended, *stats})
    )
    return ShapingState(shaper.backend_settings[0], shaper.degraded, paths, labels)


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def take_snapshot(
    context: ServerContext,
    *,
    now: float,
    started: float,
    worker: tuple[int, int] | None,
    budget: DescriptorBudget,
    shaping: ShapingState | None = None,
) -> StatusSnapshot:
    """Read ``context`` once. ``now`` and ``started`` are trio clock seconds; ``worker`` is
    (index, count) when the process is one of several workers; ``budget`` the descriptor
    budget in force; ``shaping`` the traffic shaping state (:func:`shaping_state`; None
    when shaping is off)."""
    resolver = context.router.resolver
    return StatusSnapshot(
        hostname=context.config.server.hostname,
        uptime_seconds=round(now - started, 1),
        shutting_down=context.shutting_down.is_set(),
        worker=None if worker is None else worker[0],
        workers=1 if worker is None else worker[1],
        servers=server_states(context.health, now),
        bindings=tuple(
            BindingState(
                binding.name,
                tuple(str(server) for server in binding.ha_proxy_server),
                _text(binding.ha_proxy_src_addr),
                _text(binding.ha_proxy_ipv6_src_addr),
                context.router.has_plumbed_server(binding),
            )
            for binding in context.config.bindings.values()
        ),
        listeners=tuple(
            ListenerState(str(listener.address), listener.target, listener.protocol)
            for listener in context.config.listeners
        ),
        counters=counters_of(context.metrics),
        descriptors=Descriptors(budget.limit, budget.reserved, budget.sessions),
        dns=DnsCounters(resolver.queries, resolver.cache_hits),
        latencies=latencies_of(context.metrics),
        shaping=shaping,
        exposition=exposition_of(context.metrics, context.config.bindings),
    )


# -- /status (JSON) ----------------------------------------------------------------------------


def _json_value(value: int | Counts) -> object:
    return dict(value) if isinstance(value, tuple) else value


def _status_object(snapshot: StatusSnapshot) -> dict[str, object]:
    """The ``/status`` document as JSON-ready values (built at the edge, for rendering)."""
    return {
        "hostname": snapshot.hostname,
        "uptime_seconds": snapshot.uptime_seconds,
        "shutting_down": snapshot.shutting_down,
        "worker": snapshot.worker,
        "workers": snapshot.workers,
        "servers": [
            {
                "server": state.server,
                "plumbed": state.plumbed,
                "consecutive_failures": state.consecutive_failures,
                "consecutive_successes": state.consecutive_successes,
                "last_check": state.last_check,
                "last_error": state.last_error,
                "last_check_seconds_ago": state.last_check_seconds_ago,
            }
            for state in snapshot.servers
        ],
        "bindings": [
            {
                "name": binding.name,
                "ha_proxy_server": list(binding.ha_proxy_server),
                "ha_proxy_src_addr": binding.ha_proxy_src_addr,
                "ha_proxy_ipv6_src_addr": binding.ha_proxy_ipv6_src_addr,
                "plumbed": binding.plumbed,
            }
            for binding in snapshot.bindings
        ],
        "listeners": [
            {
                "address": listener.address,
                "target": listener.target,
                "protocol": listener.protocol,
            }
            for listener in snapshot.listeners
        ],
        "counters": {name: _json_value(value) for name, value in snapshot.counters.items()},
        "descriptors": {
            "limit": snapshot.descriptors.limit,
            "reserved": snapshot.descriptors.reserved,
            "max_sessions": snapshot.descriptors.max_sessions,
        },
        "dns": {"queries": snapshot.dns.queries, "cache_hits": snapshot.dns.cache_hits},
        **({} if snapshot.shaping is None else {"shaping": _shaping_object(snapshot.shaping)}),
    }


def _shaping_object(shaping: ShapingState) -> dict[str, object]:
    return {
        "backend": shaping.backend,
        "degraded": shaping.degraded,
        "paths": [
            {
                "binding": path.binding,
                "source": path.source,
                "site": path.site,
                "connections": path.connections,
                "waiting": path.waiting,
                "suspended_for": path.suspended_for,
                "suspension_reason": path.suspension_reason,
                "override_for": path.override_for,
                "override_reason": path.override_reason,
                "limits": dict(path.limits),
            }
            for path in shaping.paths
        ],
        "counters": [
            {
                "binding": label.binding,
                "site": label.site,
                "connections": label.connections,
                "waits_total": label.waits,
                "wait_seconds_total": round(label.wait_seconds, 3),
                "deferrals_total": dict(label.deferrals),
                "suspensions": label.suspensions,
            }
            for label in shaping.labels
        ],
    }


def _shaping_from_json(data: Any) -> ShapingState | None:
    if not isinstance(data, Mapping):
        return None
    return ShapingState(
        backend=str(data.get("backend", "?")),
        degraded=bool(data.get("degraded")),
        paths=tuple(
            ShapingPath(
                binding=path["binding"],
                source=path["source"],
                site=path["site"],
                connections=path.get("connections", 0),
                waiting=path.get("waiting", 0),
                suspended_for=path.get("suspended_for"),
                suspension_reason=path.get("suspension_reason"),
                override_for=path.get("override_for"),
                override_reason=path.get("override_reason"),
                limits=tuple((name, path.get("limits", {}).get(name)) for name in LIMIT_NAMES),
            )
            for path in data.get("paths", [])
        ),
        labels=tuple(
            ShapingLabel(
                binding=label["binding"],
                site=label["site"],
                connections=label.get("connections", 0),
                waits=label.get("waits_total", 0),
                wait_seconds=label.get("wait_seconds_total", 0.0),
                deferrals=_counts(label.get("deferrals_total")),
                suspensions=label.get("suspensions", 0),
            )
            for label in data.get("counters", [])
        ),
    )


def render_json(snapshot: StatusSnapshot) -> str:
    """The ``/status`` body: indented JSON with sorted keys, ending with a newline."""
    return json.dumps(_status_object(snapshot), indent=2, sort_keys=True) + "\n"


def _counts(value: object) -> Counts:
    if not isinstance(value, Mapping):
        return ()
    return tuple((str(name), count) for name, count in value.items())


def snapshot_from_json(data: Mapping[str, Any]) -> StatusSnapshot:
    """A snapshot read back from a ``/status`` document (by ``sidecar status``). Lenient:
    what is missing (a sidecar of another version) reads as unknown, empty or zero.
    Raises ``KeyError``, ``TypeError`` or ``ValueError`` when the document is malformed."""
    workers = data.get("workers", 1)
    counters = data.get("counters", {})
    descriptors = data.get("descriptors", {})
    dns = data.get("dns", {})
    return StatusSnapshot(
        hostname=data.get("hostname", "?"),
        uptime_seconds=data.get("uptime_seconds", 0),
        shutting_down=bool(data.get("shutting_down")),
        worker=data.get("worker"),
        workers=workers if isinstance(workers, int) else 1,
        servers=tuple(
            ServerState(
                server["server"],
                server["plumbed"],
                server["consecutive_failures"],
                server["consecutive_successes"],
                server.get("last_check"),
                server.get("last_error"),
                server.get("last_check_seconds_ago"),
            )
            for server in data.get("servers", [])
        ),
        bindings=tuple(
            BindingState(
                binding["name"],
                tuple(binding["ha_proxy_server"]),
                binding.get("ha_proxy_src_addr"),
                binding.get("ha_proxy_ipv6_src_addr"),
                binding["plumbed"],
            )
            for binding in data.get("bindings", [])
        ),
        listeners=tuple(
            ListenerState(listener["address"], listener["target"], listener.get("protocol", "smtp"))
            for listener in data.get("listeners", [])
        ),
        counters=Counters(
            sessions_total=counters.get("sessions_total", 0),
            sessions_active=counters.get("sessions_active", 0),
            connections_refused_total=counters.get("connections_refused_total", 0),
            transactions_total=_counts(counters.get("transactions_total")),
            recipients_total=_counts(counters.get("recipients_total")),
            bytes_to_mx_total=counters.get("bytes_to_mx_total", 0),
            bytes_from_mx_total=counters.get("bytes_from_mx_total", 0),
        ),
        descriptors=Descriptors(
            descriptors.get("limit", 0),
            descriptors.get("reserved", 0),
            descriptors.get("max_sessions", 0),
        ),
        dns=DnsCounters(dns.get("queries", 0), dns.get("cache_hits", 0)),
        shaping=_shaping_from_json(data.get("shaping")),
    )


# -- /metrics (Prometheus text) ----------------------------------------------------------------

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SnapshotCollector(Collector):
    """The metric families of one :class:`StatusSnapshot`, for a ``prometheus_client``
    registry: the counters stay where they are counted (:class:`sidecar.metrics.Metrics`),
    this only says what they are at scrape time. Names follow Prometheus's conventions
    (base units, ``_total`` counters, ``_seconds``); the README lists them."""

    def __init__(self, snapshot: StatusSnapshot) -> None:
        self.snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        return ()  # the families vary with the snapshot (shaping on or off)

    def collect(self) -> Iterable[Metric]:
        snapshot = self.snapshot
        counters = snapshot.counters
        extra = snapshot.exposition
        yield _counter(
            "sidecar_sessions",
            "Client sessions: connections that said more than NOOP or QUIT.",
            counters.sessions_total,
        )
        yield _gauge(
            "sidecar_sessions_active", "Client connections open now.", counters.sessions_active
        )
        if extra is not None:
            yield _counter(
                "sidecar_probes",
                "Connections that said nothing but NOOP or QUIT (health checks such as"
                " sidecar probe): not client sessions.",
                extra.probes,
            )
        yield _counter(
            "sidecar_connections_refused",
            "Connections refused at greeting (allowed_clients, the admission limit).",
            counters.connections_refused_total,
        )
        transactions = CounterMetricFamily(
            "sidecar_transactions",
            "Transactions by binding and outcome class (binding - : ended before a route).",
            labels=["binding", "outcome"],
        )
        if extra is not None:
            for binding, outcome, count in extra.transactions:
                transactions.add_metric([binding, outcome], count)
        yield transactions
        yield _counter_by(
            "sidecar_recipients",
            "RCPT replies by outcome class.",
            "outcome",
            counters.recipients_total,
        )
        relayed = CounterMetricFamily(
            "sidecar_bytes",
            "Message and command bytes relayed, by direction.",
            labels=["direction"],
        )
        relayed.add_metric(["to_mx"], counters.bytes_to_mx_total)
        relayed.add_metric(["from_mx"], counters.bytes_from_mx_total)
        yield relayed
        for histogram in snapshot.latencies:
            yield HistogramMetricFamily(
                histogram.name,
                histogram.help_text,
                buckets=list(histogram.buckets),
                sum_value=histogram.total,
            )
        if extra is not None:
            yield _counter(
                "sidecar_connection_cache_hits",
                "Upstream connections taken from the connection cache instead of opened.",
                extra.connection_cache_hits,
            )
            yield _counter_by(
                "sidecar_starttls_fallbacks",
                "Opportunistic STARTTLS that failed, so that the mail went in plaintext.",
                "binding",
                extra.starttls_fallbacks,
            )
            yield _counter_by(
                "sidecar_transactions_by_tls_policy",
                "Transactions by the TLS policy their MX connection was opened under"
                " (dane, mta-sts, verify, required, opportunistic, none).",
                "tls_policy",
                extra.tls_policies,
            )
        plumbed = GaugeMetricFamily(
            "sidecar_haproxy_server_plumbed",
            "1 when the HAProxy server is plumbed.",
            labels=["server"],
        )
        for state in snapshot.servers:
            plumbed.add_metric([state.server], int(state.plumbed))
        yield plumbed
        yield _counter(
            "sidecar_dns_queries", "DNS look-ups asked of the resolver.", snapshot.dns.queries
        )
        yield _counter(
            "sidecar_dns_cache_hits",
            "DNS look-ups answered from the cache.",
            snapshot.dns.cache_hits,
        )
        if snapshot.shaping is not None:
            yield from _shaping_families(snapshot.shaping)


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    """A counter family of one unlabelled series (``name`` without ``_total``)."""
    return CounterMetricFamily(name, help_text, value=value)


def _counter_by(
    name: str, help_text: str, label: str, counts: Iterable[tuple[str, float]]
) -> CounterMetricFamily:
    """A counter family with one label: a series per (label value, count) of ``counts``."""
    family = CounterMetricFamily(name, help_text, labels=[label])
    for value, count in counts:
        family.add_metric([value], count)
    return family


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


def render_prometheus(snapshot: StatusSnapshot) -> str:
    """The ``/metrics`` body: Prometheus text exposition format 0.0.4, written by
    ``prometheus_client`` from a registry of its own (no global state: one per scrape)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return generate_latest(registry).decode()


def _shaping_families(shaping: ShapingState) -> Iterable[Metric]:
    """The traffic shaping families, labelled by binding and site (a named site or "other":
    at most bindings x (named sites + 1) series per family, times 4 limit kinds for the
    deferrals)."""
    pair = ["binding", "site"]
    yield _gauge("sidecar_shaping_enabled", "1: traffic shaping is on.", 1)
    degraded = GaugeMetricFamily(
        "sidecar_shaping_backend_degraded",
        "1 while the shared shaping backend is unreachable (limits hold per process).",
        labels=["backend"],
    )
    degraded.add_metric([shaping.backend], int(shaping.degraded))
    yield degraded
    connections = GaugeMetricFamily(
        "sidecar_shaping_connections",
        "Upstream connections holding a shaping slot in this process.",
        labels=pair,
    )
    waits = CounterMetricFamily(
        "sidecar_shaping_waits", "Waits for a slot or a rate token that ended.", labels=pair
    )
    waited = CounterMetricFamily(
        "sidecar_shaping_wait_seconds", "Seconds waited for shaping.", labels=pair
    )
    deferrals = CounterMetricFamily(
        "sidecar_shaping_deferrals",
        "Transactions deferred (4xx) by traffic shaping, by limit.",
        labels=[*pair, "limit"],
    )
    suspensions = GaugeMetricFamily(
        "sidecar_shaping_suspensions",
        "Suspended egress paths among those this process used recently.",
        labels=pair,
    )
    for label in shaping.labels:
        values = [label.binding, label.site]
        connections.add_metric(values, label.connections)
        waits.add_metric(values, label.waits)
        waited.add_metric(values, label.wait_seconds)
        for limit, count in label.deferrals:
            deferrals.add_metric([*values, limit], count)
        suspensions.add_metric(values, label.suspensions)
    yield from (connections, waits, waited, deferrals, suspensions)


# -- sidecar status (terminal tables) ----------------------------------------------------------


def _table(rows: Iterable[list[str]]) -> list[str]:
    rows = list(rows)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def render_table(snapshot: StatusSnapshot) -> list[str]:
    """The snapshot as lines for a terminal: a headline, the HAProxy servers, the bindings,
    the counters (sorted by name, as ``/status`` lists them) and the DNS counts."""
    workers = snapshot.workers
    lines = [
        f"sidecar {snapshot.hostname}, up {snapshot.uptime_seconds:.0f}s"
        + (" (shutting down)" if snapshot.shutting_down else "")
        + (
            f", worker {snapshot.worker} of {workers}: the others serve their status on"
            " the next ports"
            if workers > 1
            else ""
        )
    ]
    rows = [["HAPROXY SERVER", "STATE", "FAILS", "OKS", "LAST CHECK", "LAST ERROR"]]
    for server in snapshot.servers:
        ago = server.last_check_seconds_ago
        rows.append(
            [
                str(server.server),
                "plumbed" if server.plumbed else "UNPLUMBED",
                str(server.consecutive_failures),
                str(server.consecutive_successes),
                "never" if ago is None else f"{ago}s ago",
                str(server.last_error or "-"),
            ]
        )
    lines += ["", *_table(rows)]
    rows = [["BINDING", "HAPROXY", "IPV4 SOURCE", "IPV6 SOURCE", "STATE"]]
    for binding in snapshot.bindings:
        rows.append(
            [
                str(binding.name),
                ",".join(binding.ha_proxy_server),
                str(binding.ha_proxy_src_addr or "-"),
                str(binding.ha_proxy_ipv6_src_addr or "-"),
                "up" if binding.plumbed else "DOWN",
            ]
        )
    lines += ["", *_table(rows)]
    lines.append("")
    for key, value in sorted(snapshot.counters.items(), key=lambda item: item[0]):
        if isinstance(value, tuple):
            shown = ", ".join(f"{k} {v}" for k, v in sorted(value))
        else:
            shown = str(value)
        lines.append(f"{key.replace('_', ' ')}: {shown}")
    dns = snapshot.dns
    lines.append(f"dns: {dns.queries} look-ups, {dns.cache_hits} cache hits")
    if snapshot.shaping is not None:
        lines += ["", *shaping_table(snapshot.shaping)]
    return lines


def limits_text(limits: Iterable[tuple[str, str | None]]) -> str:
    """The limits set, as "connection_limit 5, max_message_rate 500/h" ("none")."""
    return ", ".join(f"{name} {value}" for name, value in limits if value is not None) or "none"


def shaping_table(shaping: ShapingState) -> list[str]:
    """The shaping lines of ``sidecar status``: the backend, and the recent paths."""
    state = " DEGRADED: per-process limits until it answers" if shaping.degraded else ""
    lines = [f"traffic shaping: backend {shaping.backend}{state}"]
    if not shaping.paths:
        return [*lines, "no egress path used yet"]
    rows = [["BINDING", "SOURCE", "SITE", "CONNS", "WAITING", "STATE", "LIMITS"]]
    for path in shaping.paths:
        if path.suspended_for is not None:
            what = f"SUSPENDED {path.suspended_for:.0f}s: {path.suspension_reason or '-'}"
        elif path.override_for is not None:
            what = f"limits set {path.override_for:.0f}s: {path.override_reason or '-'}"
        else:
            what = "ok"
        rows.append(
            [
                path.binding,
                path.source,
                path.site,
                str(path.connections),
                str(path.waiting),
                what,
                limits_text(path.limits),
            ]
        )
    return [*lines, *_table(rows)]
