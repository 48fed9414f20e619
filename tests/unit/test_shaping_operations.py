"""What the operator sees and does of traffic shaping, without sockets: the shaping part of
the status snapshot (/status JSON, /metrics, the ``sidecar status`` table) with bounded
labels; the control requests of the status endpoint (allowed and refused callers, bad
bodies); ``sidecar route``'s limits with their scope."""

from __future__ import annotations

import copy
import json
import logging
from ipaddress import IPv4Network
from typing import Any

import pytest
import trio
import trio.testing

from sidecar.config import ConfigError, parse_config
from sidecar.explain import _running_usage, limit_scopes
from sidecar.limits import DescriptorBudget
from sidecar.server import build_context
from sidecar.shaping.control import control
from sidecar.shaping.model import EgressPath
from sidecar.shaping.shaper import RECENT_PATHS, Grant, Shaper
from sidecar.status import StatusSource, control_allowed, control_request, handle
from sidecar.status_view import (
    StatusSnapshot,
    render_json,
    render_prometheus,
    render_table,
    shaping_state,
    snapshot_from_json,
    take_snapshot,
)
from testkit.metrics import value

BASE: dict[str, Any] = {
    "listener": [{"address": "127.0.0.1:2525", "binding": "b1"}],
    "binding": {
        "b1": {
            "ha_proxy_server": "127.0.0.1:5000",
            "ha_proxy_src_addr": "192.0.2.10",
            "ha_proxy_ipv6_src_addr": "2001:db8::10",
            "shaping": {"connection_limit": 5, "site": {"google": {"max_message_rate": "500/h"}}},
        },
        "b2": {"ha_proxy_server": "127.0.0.1:5000", "ha_proxy_src_addr": "192.0.2.11"},
    },
    "shaping": {
        "connection_limit": 2,
        "max_wait": 0.5,
        "max_connection_rate": "60/min",
        "site": {"google": {"mx": ["*.google.com"], "connection_limit": 20}},
    },
}
BUDGET = DescriptorBudget(1024, 10, 3, 8, 16, 16, 16, 100, 1000, 200)
GOOGLE = ["aspmx.l.google.com"]


def config(**status: Any) -> Any:
    data = copy.deepcopy(BASE)
    if status:
        data["status"] = status
    return parse_config(data)


def shaper_of(cfg: Any) -> Shaper:
    shaper = build_context(cfg).shaper
    assert shaper is not None
    return shaper


async def snapshot_of(shaper: Shaper) -> StatusSnapshot:
    ctx = build_context(config())
    ctx.shaper = shaper
    state = shaping_state(shaper, await shaper.report())
    return take_snapshot(ctx, now=10.0, started=0.0, worker=None, budget=BUDGET, shaping=state)


async def test_the_snapshot_shows_paths_counters_and_bounded_labels(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shaper = shaper_of(config())
    google = shaper.path("192.0.2.10", GOOGLE)
    held = await shaper.open_connection("b1", google)
    assert isinstance(held, Grant)
    await shaper.suspend(google, 3600, "by hand", binding="b1")
    assert (await shaper.start_transaction("b1", google)) is not None  # suspended: a 4xx
    for n in range(3):  # unnamed sites share the "other" label
        other = shaper.path("192.0.2.11", [f"mx.example{n}.org"])
        for _ in range(2):  # b2 takes its two slots; the third refused (max_wait 0.5)
            assert isinstance(await shaper.open_connection("b2", other), Grant)
        assert not isinstance(await shaper.open_connection("b2", other), Grant)
    snap = await snapshot_of(shaper)

    data = json.loads(render_json(snap))["shaping"]
    assert data["backend"] == "memory" and data["degraded"] is False
    newest, *_, oldest = data["paths"]
    assert newest["site"] == "mx.example2.org" and newest["connections"] == 2
    assert oldest == {
        "binding": "b1",
        "source": "192.0.2.10",
        "site": "google",
        "connections": 1,
        "waiting": 0,
        "suspended_for": 3598.5,  # after the three refusals waited max_wait
        "suspension_reason": "by hand",
        "override_for": None,
        "override_reason": None,
        "limits": {
            "connection_limit": "5",
            "max_connection_rate": "60/min",
            "max_message_rate": "500/h",
            "max_deliveries_per_connection": "100",
        },
    }
    assert {(c["binding"], c["site"]) for c in data["counters"]} == {
        ("b1", "google"),
        ("b2", "other"),
    }

    prom = render_prometheus(snap)
    assert value(prom, "sidecar_shaping_enabled") == 1
    assert value(prom, "sidecar_shaping_backend_degraded", backend="memory") == 0
    assert value(prom, "sidecar_shaping_connections", binding="b1", site="google") == 1
    assert value(prom, "sidecar_shaping_connections", binding="b2", site="other") == 6
    assert (
        value(
            prom, "sidecar_shaping_deferrals_total", binding="b1", site="google", limit="suspended"
        )
        == 1
    )
    assert (
        value(
            prom,
            "sidecar_shaping_deferrals_total",
            binding="b2",
            site="other",
            limit="connection_limit",
        )
        == 3
    )
    assert value(prom, "sidecar_shaping_suspensions", binding="b1", site="google") == 1
    assert value(prom, "sidecar_shaping_suspensions", binding="b2", site="other") == 0
    assert "mx.example" not in prom  # unnamed sites never become labels
    for line in prom.splitlines():
        if line.startswith("sidecar_shaping_") and "_total" in line.split("{")[0]:
            assert line.split("{")[0].endswith("_total")

    read_back = snapshot_from_json(json.loads(render_json(snap)))
    assert read_back.shaping is not None
    assert render_table(read_back) == render_table(snap)
    table = "\n".join(render_table(snap))
    assert "traffic shaping: backend memory" in table
    assert "SUSPENDED 3598s: by hand" in table


async def test_waits_are_counted_per_label(autojump_clock: trio.testing.MockClock) -> None:
    shaper = shaper_of(config())
    path = shaper.path("192.0.2.11", ["mx.example.org"])
    first = await shaper.open_connection("b2", path)
    assert isinstance(first, Grant) and isinstance(await shaper.open_connection("b2", path), Grant)

    async def release_later() -> None:
        await trio.sleep(0.25)
        await first.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(release_later)
        assert isinstance(await shaper.open_connection("b2", path), Grant)  # waited 0.25 s
    (label,) = shaping_state(shaper, []).labels
    assert (label.binding, label.site, label.waits, label.wait_seconds) == ("b2", "other", 1, 0.25)
    prom = render_prometheus(await snapshot_of(shaper))
    assert value(prom, "sidecar_shaping_waits_total", binding="b2", site="other") == 1
    assert value(prom, "sidecar_shaping_wait_seconds_total", binding="b2", site="other") == 0.250000


async def test_recent_paths_are_bounded(autojump_clock: trio.testing.MockClock) -> None:
    shaper = shaper_of(config())
    for n in range(RECENT_PATHS + 20):
        await shaper.start_transaction("b2", shaper.path("192.0.2.11", [f"mx{n}.example.org"]))
    reports = await shaper.report()
    assert len(reports) == RECENT_PATHS
    assert reports[0].path.site == f"mx{RECENT_PATHS + 19}.example.org"  # newest first


def test_nothing_shaped_nothing_shown() -> None:
    data = copy.deepcopy(BASE)
    del data["shaping"]
    del data["binding"]["b1"]["shaping"]
    ctx = build_context(parse_config(data))
    assert ctx.shaper is None
    snap = take_snapshot(ctx, now=1.0, started=0.0, worker=None, budget=BUDGET)
    assert "shaping" not in json.loads(render_json(snap))
    assert "shaping" not in render_prometheus(snap)


# -- control requests -------------------------------------------------------------------------


def source_for(cfg: Any, shaper: Shaper | None) -> StatusSource:
    ctx = build_context(cfg)
    return StatusSource(
        healthy=lambda: True,
        snapshot=lambda: take_snapshot(ctx, now=1.0, started=0.0, worker=None, budget=BUDGET),
        control=lambda action, request: control(cfg, shaper, action, request),
        allow_control_from=lambda: cfg.status.allow_control_from,
    )


SUSPEND = json.dumps({"binding": "b1", "site": "aspmx.l.google.com", "duration": "2h"}).encode()


async def test_a_loopback_caller_suspends_and_resumes_both_sources(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config()
    shaper = shaper_of(cfg)
    source = source_for(cfg, shaper)
    with caplog.at_level(logging.WARNING, "sidecar.status"):
        code, kind, body = await control_request(source, b"/shaping/suspend", SUSPEND, "127.0.0.1")
    assert code == 200 and kind == "application/json"
    answer = json.loads(body)
    assert answer["paths"] == [
        {"source": "192.0.2.10", "site": "google"},
        {"source": "2001:db8::10", "site": "google"},
    ]
    assert answer["duration"] == 7200.0
    assert "control request POST /shaping/suspend from 127.0.0.1" in caplog.text
    for source_address in ("192.0.2.10", "2001:db8::10"):
        usage = await shaper.usage(EgressPath(source_address, "google"))
        assert usage.suspended_for == 7200.0 and usage.suspension_reason == "suspended by hand"
    resume = json.dumps({"binding": "b1", "site": "google"}).encode()
    code, _, _ = await control_request(source, b"/shaping/resume", resume, "::1")
    assert code == 200
    assert (await shaper.usage(EgressPath("192.0.2.10", "google"))).suspended_for is None


async def test_other_callers_are_refused_and_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config()
    shaper = shaper_of(cfg)
    source = source_for(cfg, shaper)
    with caplog.at_level(logging.WARNING, "sidecar.status"):
        code, _, body = await control_request(source, b"/shaping/suspend", SUSPEND, "192.0.2.99")
    assert code == 403 and b"192.0.2.99" in body
    assert "refused control request POST /shaping/suspend from 192.0.2.99" in caplog.text
    assert (await shaper.usage(EgressPath("192.0.2.10", "google"))).suspended_for is None
    assert (await control_request(source, b"/shaping/suspend", SUSPEND, None))[0] == 403
    # Configured: a management network may, loopback then may not.
    cfg = config(address="127.0.0.1:9925", allow_control_from=["192.0.2.0/24"])
    source = source_for(cfg, shaper_of(cfg))
    assert (await control_request(source, b"/shaping/suspend", SUSPEND, "192.0.2.99"))[0] == 200
    assert (await control_request(source, b"/shaping/suspend", SUSPEND, "127.0.0.1"))[0] == 403
    cfg = config(address="127.0.0.1:9925", allow_control_from=[])
    source = source_for(cfg, shaper_of(cfg))
    assert (await control_request(source, b"/shaping/suspend", SUSPEND, "127.0.0.1"))[0] == 403


def test_control_allowed() -> None:
    loopback = (IPv4Network("127.0.0.0/8"),)
    assert control_allowed(loopback, "127.0.0.1")
    assert control_allowed(loopback, "::ffff:127.0.0.1")
    assert not control_allowed(loopback, "10.0.0.1")
    assert not control_allowed(loopback, "not an address")
    assert not control_allowed(loopback, None)


@pytest.mark.parametrize(
    ("target", "body", "code", "error"),
    [
        (b"/shaping/suspend", b"{not json", 400, "not JSON"),
        (b"/shaping/suspend", b"[1]", 400, "JSON object"),
        (b"/shaping/suspend", b'{"binding": "b1", "site": "google"}', 400, "duration"),
        (
            b"/shaping/suspend",
            b'{"binding": "b1", "site": "google", "duration": "10/fortnight"}',
            400,
            "duration",
        ),
        (b"/shaping/suspend", b'{"site": "google", "duration": 5}', 400, "binding"),
        (b"/shaping/resume", b'{"binding": "nope", "site": "google"}', 404, "no binding"),
        (b"/shaping/other", b"{}", 404, ""),
    ],
)
async def test_bad_requests(
    autojump_clock: trio.testing.MockClock, target: bytes, body: bytes, code: int, error: str
) -> None:
    cfg = config()
    source = source_for(cfg, shaper_of(cfg))
    got, _, answer = await control_request(source, target, body, "127.0.0.1")
    assert got == code
    assert error.encode() in answer


async def test_shaping_off_is_409(autojump_clock: trio.testing.MockClock) -> None:
    cfg = config()
    body = b'{"binding": "b1", "site": "x"}'
    got, _, answer = await control_request(source_for(cfg, None), b"/shaping/resume", body, "::1")
    assert got == 409 and b"traffic shaping is off" in answer


async def _through_h11(source: StatusSource, request: bytes, peer: str | None) -> bytes:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle, source, server, peer)
        await client.send_all(request)
        response = b""
        while data := await client.receive_some(65536):
            response += data
    return response


async def test_a_post_through_h11(autojump_clock: trio.testing.MockClock) -> None:
    cfg = config()
    source = source_for(cfg, shaper_of(cfg))
    head = b"POST /shaping/suspend HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    response = await _through_h11(source, head % len(SUSPEND) + SUSPEND, "127.0.0.1")
    assert response.startswith(b"HTTP/1.1 200 "), response
    assert b'"action": "suspend"' in response
    response = await _through_h11(source, head % len(SUSPEND) + SUSPEND, "198.51.100.1")
    assert response.startswith(b"HTTP/1.1 403 "), response
    big = b"x" * 20_000
    response = await _through_h11(source, head % len(big) + big, "127.0.0.1")
    assert response.startswith(b"HTTP/1.1 413 "), response
    response = await _through_h11(source, b"POST /status HTTP/1.1\r\nHost: x\r\n\r\n", None)
    assert response.startswith(b"HTTP/1.1 405 "), response


def test_allow_control_from_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"status\.allow_control_from\[0\]"):
        config(address="127.0.0.1:9925", allow_control_from=["10.0.0.1/8"])


# -- sidecar route ----------------------------------------------------------------------------


def test_route_limits_name_their_scope() -> None:
    cfg = config()
    assert limit_scopes(cfg, "b1", "google") == [
        ("connection_limit", "5", "binding.b1.shaping"),
        ("max_connection_rate", "60/min", "shaping"),
        ("max_message_rate", "500/h", 'binding.b1.shaping.site."google"'),
        ("max_deliveries_per_connection", "100", "delivery.connection_reuse_limit"),
    ]
    assert limit_scopes(cfg, "b2", "google")[0] == (
        "connection_limit",
        "20",
        'shaping.site."google"',
    )
    assert limit_scopes(cfg, "b2", "mx.example.org")[0] == ("connection_limit", "2", "shaping")


def test_route_usage_from_the_running_sidecar() -> None:
    document = {
        "worker": None,
        "shaping": {
            "degraded": True,
            "paths": [
                {
                    "binding": "b1",
                    "source": "192.0.2.10",
                    "site": "google",
                    "connections": 3,
                    "waiting": 1,
                    "suspended_for": 60.0,
                    "suspension_reason": "rule",
                    "override_for": None,
                }
            ],
        },
    }
    (line,) = _running_usage([document], "b1", "192.0.2.10", "google")
    assert "3 connections, 1 waiting, SUSPENDED for 60s: rule" in line
    assert "DEGRADED" in line
    (line,) = _running_usage([document], "b2", "192.0.2.10", "google")
    assert "no recent use of this path" in line
    (line,) = _running_usage([{"worker": 1}], "b1", "192.0.2.10", "google")
    assert "worker 1: traffic shaping is off" in line
