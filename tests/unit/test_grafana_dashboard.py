"""examples/grafana/sidecar.json queries only what /metrics exports: every metric name in
every panel's PromQL is one a busy sidecar's /metrics (traffic shaping on) really has."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from test_status_view import busy, context, snapshot

from sidecar.status_view import ShapingLabel, ShapingState, render_prometheus
from testkit.metrics import names

DASHBOARD = Path(__file__).parents[2] / "examples" / "grafana" / "sidecar.json"
METRIC = re.compile(r"\bsidecar_[a-z_]+\b")


def exported() -> set[str]:
    label = ShapingLabel("b1", "other", 1, 2, 0.5, (("connection_limit", 1),), 0)
    shaping = ShapingState("memory", False, (), (label,))
    snap = dataclasses.replace(snapshot(busy(context())), shaping=shaping)
    return names(render_prometheus(snap))


def queried() -> dict[str, set[str]]:
    """Panel title -> the sidecar metric names its queries use."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return {
        panel["title"]: {
            name for target in panel["targets"] for name in METRIC.findall(target["expr"])
        }
        for panel in dashboard["panels"]
    }


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    have = exported()
    for title, used in queried().items():
        assert used, f"panel {title!r} queries no sidecar metric"
        assert used <= have, f"panel {title!r} queries {sorted(used - have)}: not in /metrics"


def test_the_dashboard_has_the_panels_an_operator_watches() -> None:
    used = set().union(*queried().values())
    for name in (
        "sidecar_transactions_total",  # deliveries by outcome and binding
        "sidecar_shaping_deferrals_total",  # deferral reasons
        "sidecar_upstream_connect_seconds_bucket",  # upstream latency
        "sidecar_haproxy_server_plumbed",  # health state
        "sidecar_connection_cache_hits_total",  # connection cache hits
        "sidecar_starttls_fallbacks_total",
        "sidecar_probes_total",
    ):
        assert name in used, name
