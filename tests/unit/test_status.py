from __future__ import annotations

import json

import trio
import trio.testing

from sidecar.metrics import Histogram, Metrics, outcome_of
from sidecar.status import StatusSource, handle, respond
from sidecar.status_view import (
    Descriptors,
    DnsCounters,
    ServerState,
    StatusSnapshot,
    counters_of,
    exposition_of,
    latencies_of,
    render_prometheus,
)
from testkit.metrics import value

NO_DNS = DnsCounters(0, 0)


def snapshot(
    metrics: Metrics, servers: tuple[ServerState, ...] = (), dns: DnsCounters = NO_DNS
) -> StatusSnapshot:
    return StatusSnapshot(
        hostname="sidecar.test",
        uptime_seconds=1.0,
        shutting_down=False,
        worker=None,
        workers=1,
        servers=servers,
        bindings=(),
        listeners=(),
        counters=counters_of(metrics),
        descriptors=Descriptors(1024, 100, 200),
        dns=dns,
        latencies=latencies_of(metrics),
        exposition=exposition_of(metrics, ()),
    )


def source(healthy: bool = True) -> StatusSource:
    metrics = Metrics(sessions=3)
    return StatusSource(healthy=lambda: healthy, snapshot=lambda: snapshot(metrics))


def test_routes() -> None:
    assert respond(source(), b"GET", b"/healthz")[:1] == (200,)
    assert respond(source(healthy=False), b"GET", b"/healthz")[0] == 503
    code, kind, body = respond(source(), b"GET", b"/status?pretty")
    assert code == 200 and kind == "application/json"
    assert json.loads(body)["counters"]["sessions_total"] == 3
    code, kind, body = respond(source(), b"GET", b"/metrics")
    assert code == 200 and kind.startswith("text/plain; version=0.0.4")
    assert respond(source(), b"GET", b"/nope")[0] == 404
    assert respond(source(), b"POST", b"/status")[0] == 405


async def handle_bytes(request: bytes) -> bytes:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle, source(), server)
        await client.send_all(request)
        response = b""
        while data := await client.receive_some(65536):
            response += data
    return response


async def test_http_request_through_h11() -> None:
    response = await handle_bytes(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 200 ")
    assert response.endswith(b"\r\n\r\nok\n")


async def test_garbage_gets_400() -> None:
    response = await handle_bytes(b"\x00\x01 not http\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 400 ")


async def test_silent_client_is_dropped(autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    await handle(source(), server)  # returns after REQUEST_TIMEOUT of mock time
    assert await client.receive_some(10) == b""


def test_histogram_buckets() -> None:
    histogram = Histogram(buckets=(0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(seconds)
    assert histogram.cumulative() == [("0.1", 2), ("1", 3), ("+Inf", 4)]
    assert histogram.count == 4


def test_prometheus_text() -> None:
    metrics = Metrics()
    metrics.sessions = 2
    metrics.count_transaction("b1", "delivered")
    metrics.count_recipient(250)
    metrics.count_recipient(452)
    metrics.count_recipient(550)
    metrics.upstream_connect_seconds.observe(0.002)
    text = render_prometheus(
        snapshot(
            metrics,
            (ServerState("127.0.0.1:5000", False, 3, 0, 1.0, "refused"),),
            DnsCounters(7, 2),
        )
    )
    assert value(text, "sidecar_sessions_total") == 2
    assert value(text, "sidecar_transactions_total", binding="b1", outcome="delivered") == 1
    assert value(text, "sidecar_recipients_total", outcome="deferred") == 1
    assert value(text, "sidecar_upstream_connect_seconds_bucket", le="0.005") == 1
    assert value(text, "sidecar_haproxy_server_plumbed", server="127.0.0.1:5000") == 0
    assert value(text, "sidecar_dns_cache_hits_total") == 2
    assert text.endswith("\n")


def test_outcome_classes() -> None:
    assert [outcome_of(code) for code in (250, 451, 554)] == ["delivered", "deferred", "rejected"]
