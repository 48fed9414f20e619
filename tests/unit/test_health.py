from __future__ import annotations

import trio
import trio.testing

from sidecar.config import HealthConfig, HostPort
from sidecar.health import HealthRegistry, ServerHealth, check_server, watch_server

SERVER = HostPort("127.0.0.1", 5000)


def test_flips_only_after_consecutive_failures_and_successes() -> None:
    health = ServerHealth(
        SERVER, HealthConfig(health_check_failure_threshold=3, health_check_success_threshold=2)
    )
    assert health.plumbed
    assert health.record(False, 1, "refused") is None
    assert health.record(False, 2, "refused") is None
    assert health.record(True, 3) is None  # resets the failure count
    assert health.record(False, 4, "refused") is None
    assert health.record(False, 5, "refused") is None
    flip = health.record(False, 6, "refused")
    assert flip is not None and not flip.plumbed and "3 consecutive failures" in flip.reason
    assert not health.plumbed
    assert health.record(False, 7, "refused") is None  # already unplumbed: no second flip
    assert health.record(True, 8) is None
    assert health.record(False, 9, "x") is None  # resets the success count
    assert health.record(True, 10) is None
    flip = health.record(True, 11)
    assert flip is not None and flip.plumbed
    assert health.last_check == 11 and health.last_error == "x"


def test_registry_unknown_server_counts_as_plumbed() -> None:
    registry = HealthRegistry([SERVER], HealthConfig())
    assert registry.is_plumbed(HostPort("127.0.0.9", 1))


async def test_check_server_success_and_refusal() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    assert await check_server(HostPort("127.0.0.1", port), 1) is None
    await listeners[0].aclose()
    error = await check_server(HostPort("127.0.0.1", port), 1)
    assert error is not None and "connect failed" in error


async def test_watch_server_timing_with_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    """Checks run at start-up and every interval; a dead server is unplumbed exactly after
    failure_threshold checks, i.e. at (threshold - 1) * interval seconds."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    server = HostPort("127.0.0.1", port)
    config = HealthConfig(
        health_check_interval=5,
        health_check_timeout=1,
        health_check_failure_threshold=3,
        health_check_success_threshold=3,
    )
    registry = HealthRegistry([server], config)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_server, registry, server)
        while registry.is_plumbed(server):
            await trio.sleep(0.01)
        flipped_at = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert 10 <= flipped_at < 10.02
    assert registry.servers[server].consecutive_failures == 3
