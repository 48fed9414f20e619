"""The status view: one snapshot of a ServerContext, rendered as the /status JSON, the
/metrics Prometheus text and the ``sidecar status`` table. No sockets, no clock.

The files in ``golden/`` are the outputs of the code before the view was gathered in one
module (issue 11): the refactor keeps them byte for byte. ``status_busy.prom`` was rewritten
on purpose when /metrics moved to prometheus_client (issue 14: its number format, the
binding label of the transactions, the probes, cache hits and STARTTLS fallbacks); the
/status JSON and the table did not change."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import parse_config
from sidecar.context import ServerContext
from sidecar.limits import DescriptorBudget
from sidecar.server import build_context
from sidecar.status import StatusSource, respond
from sidecar.status_view import (
    StatusSnapshot,
    render_json,
    render_prometheus,
    render_table,
    snapshot_from_json,
    take_snapshot,
)
from testkit.metrics import value

GOLDEN = Path(__file__).parent / "golden"
NOW = 1234.56  # trio clock seconds
STARTED = NOW - 3661.26
BUDGET = DescriptorBudget(1024, 10, 3, 8, 16, 16, 16, 100, 1000, 200)


def context() -> ServerContext:
    config = parse_config(
        {
            "server": {"hostname": "sidecar.test"},
            "listener": [
                {"address": "127.0.0.1:2525", "binding": "b1"},
                {"address": "127.0.0.1:2526", "binding_group": "g"},
            ],
            "binding": {
                "b1": {"ha_proxy_server": "127.0.0.1:9", "ha_proxy_src_addr": "192.0.2.1"},
                "b2": {
                    "ha_proxy_server": ["127.0.0.1:10", "127.0.0.1:11"],
                    "ha_proxy_src_addr": "192.0.2.2",
                    "ha_proxy_ipv6_src_addr": "2001:db8::2",
                },
            },
            "binding_group": {"g": {"bindings": ["b1", "b2"]}},
            "dns": {"static": {"example.test": ["192.0.2.25"]}},
            "delivery": {"allow_private_destinations": True},
        }
    )
    return build_context(config)


def busy(ctx: ServerContext) -> ServerContext:
    """Counters, latencies, health and DNS counts as after some traffic."""
    metrics = ctx.metrics
    metrics.sessions, metrics.active_sessions, metrics.refused_connections = 5, 2, 1
    for binding in ("b1", "b1", "b2"):
        metrics.count_transaction(binding, "delivered")
    metrics.count_transaction(None, "aborted")  # ended before it had a route
    metrics.probes = 4
    metrics.connection_cache_hits = 2
    metrics.count_starttls_fallback("b2")
    for label in ("dane", "opportunistic", "opportunistic"):
        metrics.count_tls_policy(label)
    for code in (250, 452, 550):
        metrics.count_recipient(code)
    metrics.bytes_to_mx, metrics.bytes_from_mx = 12345, 678
    for seconds in (0.002, 0.3, 7.0):
        metrics.upstream_connect_seconds.observe(seconds)
    metrics.upstream_banner_seconds.observe(0.0123456789)
    first, second, third = ctx.health.servers.values()
    first.record(False, NOW - 0.5, "connection refused")
    for _ in range(3):
        second.record(False, NOW - 2.25, 'refused "x"')
    third.record(True, NOW - 13.0)
    ctx.router.resolver.queries = 9
    return ctx


def snapshot(
    ctx: ServerContext, worker: tuple[int, int] | None = None, started: float = STARTED
) -> StatusSnapshot:
    return take_snapshot(ctx, now=NOW, started=started, worker=worker, budget=BUDGET)


def golden(name: str) -> str:
    return (GOLDEN / name).read_text(encoding="utf-8")


def table_of(snap: StatusSnapshot) -> str:
    """What ``sidecar status`` prints: the table of the snapshot read back from /status."""
    return "\n".join(render_table(snapshot_from_json(json.loads(render_json(snap))))) + "\n"


def test_one_snapshot_three_renderings_as_before() -> None:
    snap = snapshot(busy(context()))
    assert render_json(snap) == golden("status_busy.json")
    assert render_prometheus(snap) == golden("status_busy.prom")
    assert table_of(snap) == golden("status_busy.txt")


def test_fresh_process_table() -> None:
    snap = snapshot(context(), started=NOW - 0.04)
    assert table_of(snap) == golden("status_fresh.txt")
    assert snap.uptime_seconds == 0.0
    assert all(state.last_check_seconds_ago is None for state in snap.servers)


def test_the_endpoint_serves_the_view() -> None:
    snap = snapshot(busy(context()))
    source = StatusSource(healthy=lambda: True, snapshot=lambda: snap)
    assert respond(source, b"GET", b"/status")[2] == golden("status_busy.json").encode()
    assert respond(source, b"GET", b"/metrics")[2] == golden("status_busy.prom").encode()


def test_the_table_is_the_same_from_the_snapshot_or_from_its_json() -> None:
    snap = snapshot(busy(context()))
    read_back = snapshot_from_json(json.loads(render_json(snap)))
    assert render_table(read_back) == render_table(snap)
    assert render_json(read_back) == render_json(snap)
    assert read_back.latencies == ()  # /metrics only


def test_headline_says_shutting_down_and_which_worker() -> None:
    ctx = busy(context())
    ctx.shutting_down.set()
    assert table_of(snapshot(ctx)).splitlines()[0] == (
        "sidecar sidecar.test, up 3661s (shutting down)"
    )
    worker = snapshot(busy(context()), worker=(1, 3))
    assert json.loads(render_json(worker))["worker"] == 1
    assert json.loads(render_json(worker))["workers"] == 3
    assert table_of(worker).splitlines()[0] == (
        "sidecar sidecar.test, up 3661s, worker 1 of 3: the others serve their status on the"
        " next ports"
    )


def test_unplumbed_binding_is_down() -> None:
    ctx = busy(context())
    first = next(iter(ctx.health.servers.values()))
    for _ in range(3):
        first.record(False, NOW - 0.05, "timed out")
    lines = table_of(snapshot(ctx)).splitlines()
    assert "127.0.0.1:9     UNPLUMBED  4      0    0.0s ago    timed out" in lines
    assert "b1       127.0.0.1:9                192.0.2.1    -            DOWN" in lines
    assert (
        value(
            render_prometheus(snapshot(ctx)), "sidecar_haproxy_server_plumbed", server="127.0.0.1:9"
        )
        == 0
    )


def test_older_status_documents_still_read() -> None:
    """``sidecar status`` against a sidecar of another version: keys it does not know of yet
    (workers, descriptors, listeners) read as defaults."""
    data: dict[str, Any] = json.loads(golden("status_busy.json"))
    for key in ("worker", "workers", "descriptors", "listeners"):
        del data[key]
    assert "\n".join(render_table(snapshot_from_json(data))) + "\n" == golden("status_busy.txt")


def test_snapshot_is_frozen_and_independent_of_later_counts() -> None:
    ctx = busy(context())
    snap = snapshot(ctx)
    ctx.metrics.sessions += 1
    ctx.metrics.transactions["delivered"] += 1
    ctx.metrics.upstream_connect_seconds.observe(0.001)
    assert render_prometheus(snap) == golden("status_busy.prom")
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.counters.sessions_total = 0  # type: ignore[misc]
