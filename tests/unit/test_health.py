from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest
import trio
import trio.testing

from sidecar import proxy_v2
from sidecar.config import Config, HealthConfig, HostPort, parse_config
from sidecar.health import (
    HealthRegistry,
    Probe,
    ServerHealth,
    check_server,
    probe_server,
    probes_for,
    registry_for,
    watch_server,
)

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


# -- the PROXY probe (ha_proxy_client.health_check_probe) ---------------------------------------

PROBE = Probe(IPv4Address("192.0.2.10"), IPv4Address("198.51.100.25"), 25)
PROBE6 = Probe(IPv6Address("2001:db8::10"), IPv6Address("2001:db8::25"), 2525)


class RecordingStream(trio.abc.Stream):
    """The probe's end of a memory stream pair, keeping every ``send_all`` separately."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class FakeTarget:
    """The far end of a probe (what HAProxy + the probe MX look like to the sidecar): reads
    the PROXY header with proxy_v2.decode, then answers ``answer`` (``None``: stays silent
    until the probe is over), closes when ``close``, else records what follows until EOF."""

    def __init__(self, answer: bytes | None, *, close: bool = False) -> None:
        self.answer = answer
        self.close = close
        self.probe_over = trio.Event()
        self.header: proxy_v2.ProxyHeader | None = None
        self.header_bytes = b""
        self.after = b""
        self.connects: list[tuple[str, int]] = []
        self.client: RecordingStream | None = None

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        self.connects.append((host, port))
        client, server = trio.testing.memory_stream_pair()
        self.client = RecordingStream(client)
        self._nursery.start_soon(self._serve, server)
        return self.client

    async def run(self, probe: Probe, timeout: float = 1) -> str | None:
        async with trio.open_nursery() as self._nursery:
            result = await probe_server(SERVER, probe, timeout, connect=self.connect)
            self.probe_over.set()
        return result

    async def _serve(self, stream: trio.abc.Stream) -> None:
        data = b""
        while (parsed := proxy_v2.decode(data)) is None:
            chunk = await stream.receive_some()
            if not chunk:
                return
            data += chunk
        self.header, used = parsed
        self.header_bytes, rest = data[:used], data[used:]
        if self.answer is None:
            await self.probe_over.wait()
        else:
            await stream.send_all(self.answer)
        if self.close:
            await stream.aclose()
            return
        while chunk := await stream.receive_some():
            rest += chunk
        self.after = rest
        await stream.aclose()


@pytest.mark.parametrize("probe", [PROBE, PROBE6], ids=["ipv4", "ipv6"])
async def test_probe_success_writes_the_header_in_one_write_then_quits(probe: Probe) -> None:
    target = FakeTarget(b"220 probe.test ESMTP\r\n")
    assert await target.run(probe) is None
    assert target.connects == [(SERVER.host, SERVER.port)]
    expected = proxy_v2.encode(probe.source, 0, probe.target, probe.port)
    assert probe.header == expected
    assert target.client is not None and target.client.writes[0] == expected
    assert target.header_bytes == expected
    assert target.header == proxy_v2.ProxyHeader(probe.source, 0, probe.target, probe.port)
    assert expected[12] == proxy_v2.VERSION_COMMAND_PROXY  # never LOCAL
    assert target.after == b"QUIT\r\n"


async def test_probe_accepts_a_multiline_220_banner() -> None:
    target = FakeTarget(b"220-probe.test ESMTP\r\n220 welcome\r\n")
    assert await target.run(PROBE) is None


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"554 5.7.1 go away\r\n", "probe: got '554 5.7.1 go away'"),
        (b"421 4.3.2 busy\r\n", "probe: got '421 4.3.2 busy'"),
        (b"", "probe: connection closed"),
        (b"220 half a line", "probe: connection closed"),
        (b"HTTP/1.0 400 Bad request\r\n", "probe: not an SMTP banner"),
    ],
)
async def test_probe_failures(answer: bytes, error: str) -> None:
    # A partial answer is followed by the far end closing; otherwise it waits for the probe.
    target = FakeTarget(answer, close=not answer.endswith(b"\n"))
    result = await target.run(PROBE)
    assert result is not None and result.startswith(error), result
    assert target.after == b""  # closed without a QUIT


async def test_probe_silence_times_out(autojump_clock: trio.testing.MockClock) -> None:
    target = FakeTarget(None)
    start = trio.current_time()
    assert await target.run(PROBE, timeout=1) == "probe: no 220 banner within 1s"
    assert trio.current_time() - start == pytest.approx(1)
    assert target.header_bytes == PROBE.header


async def test_probe_connect_failure_and_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async def refused(host: str, port: int) -> trio.abc.Stream:
        raise ConnectionRefusedError(111, "Connection refused")

    async def hangs(host: str, port: int) -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    error = await probe_server(SERVER, PROBE, 1, connect=refused)
    assert error == "connect failed: Connection refused"
    assert await probe_server(SERVER, PROBE, 0.5, connect=hangs) == "no connection within 0.5s"


# -- which servers are probed, and from which source -------------------------------------------


def probe_config(probe: str | None, bindings: dict[str, dict[str, Any]]) -> Config:
    health: dict[str, Any] = {} if probe is None else {"health_check_probe": probe}
    return parse_config(
        {
            "listener": [{"address": "127.0.0.1:2525", "binding": next(iter(bindings))}],
            "ha_proxy_client": health,
            "binding": bindings,
        }
    )


BINDINGS: dict[str, dict[str, Any]] = {
    "v6only": {"ha_proxy_server": "127.0.0.1:5001", "ha_proxy_ipv6_src_addr": "2001:db8::1"},
    "first": {
        "ha_proxy_server": ["127.0.0.1:5001", "127.0.0.1:5002"],
        "ha_proxy_src_addr": "192.0.2.1",
    },
    "second": {
        "ha_proxy_server": ["127.0.0.1:5002", "127.0.0.1:5003"],
        "ha_proxy_src_addr": "192.0.2.2",
        "ha_proxy_ipv6_src_addr": "2001:db8::2",
    },
    "v4only": {"ha_proxy_server": "127.0.0.1:5004", "ha_proxy_src_addr": "192.0.2.4"},
}


def hp(port: int) -> HostPort:
    return HostPort("127.0.0.1", port)


def test_registry_for_without_probe_checks_every_server_by_tcp() -> None:
    registry = registry_for(probe_config(None, BINDINGS))
    assert list(registry.servers) == [hp(5001), hp(5002), hp(5003), hp(5004)]
    assert registry.probes == {}
    assert probes_for(probe_config(None, BINDINGS)) == {}


def test_registry_for_ipv4_probe_uses_the_first_binding_with_an_ipv4_source() -> None:
    registry = registry_for(probe_config("198.51.100.25:25", BINDINGS))
    target = IPv4Address("198.51.100.25")
    assert registry.probes == {
        hp(5001): Probe(IPv4Address("192.0.2.1"), target, 25),  # not v6only: no IPv4 source
        hp(5002): Probe(IPv4Address("192.0.2.1"), target, 25),  # "first" comes before "second"
        hp(5003): Probe(IPv4Address("192.0.2.2"), target, 25),
        hp(5004): Probe(IPv4Address("192.0.2.4"), target, 25),
    }
    assert registry.config.health_check_probe == HostPort("198.51.100.25", 25)


def test_registry_for_ipv6_probe_falls_back_to_tcp_without_an_ipv6_source(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="sidecar.health"):
        registry = registry_for(probe_config("[2001:db8::25]:25", BINDINGS))
    target = IPv6Address("2001:db8::25")
    assert registry.probes == {
        hp(5001): Probe(IPv6Address("2001:db8::1"), target, 25),
        hp(5002): Probe(IPv6Address("2001:db8::2"), target, 25),
        hp(5003): Probe(IPv6Address("2001:db8::2"), target, 25),
    }
    assert hp(5004) in registry.servers  # checked with a TCP connect
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "127.0.0.1:5004" in warnings[0] and "IPv6" in warnings[0]


async def test_delivery_successes_do_not_reset_a_probed_server() -> None:
    """A TCP connect during delivery proves less than the probe: for a probed server only the
    probe's successes count, while failures of any kind do."""
    config = HealthConfig(health_check_failure_threshold=3)
    probed, plain = hp(5001), hp(5002)
    registry = HealthRegistry([probed, plain], config, probes={probed: PROBE})
    for server in (probed, plain):
        registry.record_check(server, "probe: got '554 no'")
        registry.record(server, True)  # a delivery connected
        registry.record_check(server, "probe: got '554 no'")
        registry.record(server, False, "delivery connect failed: refused")
    assert registry.servers[probed].consecutive_failures == 3
    assert not registry.is_plumbed(probed)
    assert registry.servers[plain].consecutive_failures == 2
    registry.record_check(probed, None)
    assert registry.servers[probed].consecutive_successes == 1


async def test_watch_server_probes_through_a_loopback_listener() -> None:
    """watch_server uses the registry's probe: a target answering 554 to the PROXY header is
    unplumbed after the failure threshold, although it accepts TCP connections."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server = HostPort("127.0.0.1", listeners[0].socket.getsockname()[1])
    headers: list[proxy_v2.ProxyHeader] = []

    async def target(stream: trio.SocketStream) -> None:
        # A peer that resets or closes early costs this connection only.
        async with stream:
            data = b""
            try:
                while (parsed := proxy_v2.decode(data)) is None:
                    if not (chunk := await stream.receive_some()):
                        return
                    data += chunk
                headers.append(parsed[0])
                await stream.send_all(b"554 5.7.1 no\r\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    config = HealthConfig(
        health_check_interval=0.05,
        health_check_timeout=1,
        health_check_failure_threshold=2,
    )
    registry = HealthRegistry([server], config, probes={server: PROBE})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, target, listeners)
        nursery.start_soon(watch_server, registry, server)
        with trio.fail_after(5):
            while registry.is_plumbed(server):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert registry.servers[server].last_error == "probe: got '554 5.7.1 no'"
    assert headers[0] == proxy_v2.ProxyHeader(PROBE.source, 0, PROBE.target, PROBE.port)
