"""The process's own resources (DESIGN.md invariant 5): the descriptor budget planned against
RLIMIT_NOFILE, and local resource errors (EMFILE...) told apart from HAProxy's and the MX's
faults: never counted against health, never "Cannot reach HAProxy", never a next MX."""

from __future__ import annotations

import errno
import logging
import resource
from typing import Any, NoReturn

import dns.message
import dns.resolver
import pytest
import trio
import trio.testing

from sidecar import limits
from sidecar.config import HealthConfig, HostPort, parse_config
from sidecar.health import HealthRegistry, check_server, probe_server, watch_server
from sidecar.limits import (
    DNS_IN_FLIGHT,
    PER_SESSION,
    REFUSALS,
    SLACK,
    STATUS_CONNECTIONS,
    LocalResourceError,
    local_resource_errno,
    plan_descriptors,
)
from sidecar.resolver import ResolutionError, Resolver
from sidecar.server import build_context
from sidecar.upstream import UpstreamError, open_upstream

PROXY = HostPort("127.0.0.1", 9)


def config(**sections: dict[str, Any]) -> Any:
    base: dict[str, Any] = {
        "server": {"hostname": "sidecar.test"},
        "listener": [{"address": "127.0.0.1:2525", "binding": "b1"}],
        "binding": {"b1": {"ha_proxy_server": str(PROXY), "ha_proxy_src_addr": "192.0.2.1"}},
        "dns": {"static": {"example.test": ["192.0.2.25"]}},
        "delivery": {"allow_private_destinations": True},
        "ha_proxy_client": {"health_check_failure_threshold": 1},
    }
    for name, values in sections.items():
        if name == "binding":
            values = {"b1": {**base["binding"]["b1"], **values["b1"]}}
        base[name] = {**base.get(name, {}), **values}
    return parse_config(base)


# -- the budget ---------------------------------------------------------------------------------


def test_budget_shares_out_the_descriptors() -> None:
    budget = plan_descriptors(256, 10, config())
    fixed = 10 + 1 + DNS_IN_FLIGHT + REFUSALS + SLACK  # open, one HAProxy server, ...
    assert budget.reserved == fixed + 100  # the default connection_cache_size
    assert budget.sessions == (256 - fixed - 100) // PER_SESSION
    assert budget.reduced and budget.max_connections == 1000
    text = budget.describe()
    assert f"RLIMIT_NOFILE 256: {budget.sessions} client sessions" in text


def test_an_lmtp_listener_counts_one_upstream_per_route() -> None:
    listener = {"address": "127.0.0.1:2424", "binding": "b1", "protocol": "lmtp", "max_routes": 5}
    raw: dict[str, Any] = {
        "server": {"hostname": "sidecar.test"},
        "listener": [{"address": "127.0.0.1:2525", "binding": "b1"}, listener],
        "binding": {"b1": {"ha_proxy_server": str(PROXY), "ha_proxy_src_addr": "192.0.2.1"}},
    }
    lmtp = parse_config(raw)
    budget = plan_descriptors(4096, 10, lmtp)
    assert budget.per_session == 6  # the client's connection and 5 routes
    assert budget.sessions == (4096 - budget.reserved) // 6
    assert "(6 descriptors each)" in budget.describe()
    assert plan_descriptors(4096, 10, config()).per_session == PER_SESSION


def test_budget_counts_status_and_cache_and_servers() -> None:
    with_status = config(status={"address": "127.0.0.1:9925"})
    assert plan_descriptors(4096, 10, with_status).status == STATUS_CONNECTIONS
    no_cache = config(delivery={"connection_cache": False})
    assert plan_descriptors(4096, 10, no_cache).connection_cache == 0
    two = config(binding={"b1": {"ha_proxy_server": ["127.0.0.1:9", "127.0.0.1:10"]}})
    assert plan_descriptors(4096, 10, two).health_checks == 2


def test_budget_never_above_max_connections_nor_below_zero() -> None:
    assert plan_descriptors(1 << 20, 10, config()).sessions == 1000
    assert not plan_descriptors(1 << 20, 10, config()).reduced
    assert plan_descriptors(resource.RLIM_INFINITY, 10, config()).sessions == 1000
    assert plan_descriptors(64, 10, config()).sessions == 0
    small = config(server={"max_connections": 5})
    assert plan_descriptors(256, 10, small).sessions == 5


def test_raise_nofile_limit_raises_soft_to_hard(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 524288))
    monkeypatch.setattr(resource, "setrlimit", lambda _, limits: calls.append(limits))
    assert limits.raise_nofile_limit() == (524288, 524288)
    assert calls == [(524288, 524288)]


def test_raise_nofile_limit_keeps_soft_when_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(_: int, __: tuple[int, int]) -> NoReturn:
        raise ValueError("not allowed")

    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, 4096))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    with caplog.at_level(logging.WARNING):
        assert limits.raise_nofile_limit() == (256, 4096)
    assert "cannot raise RLIMIT_NOFILE" in caplog.text


# -- telling a local shortage apart -------------------------------------------------------------


def emfile_like_trio(host: str, port: int) -> OSError:
    """What trio.open_tcp_stream raises when socket() fails with EMFILE."""
    message = f"all attempts to connect to {host}:{port} failed"
    error = OSError(message)
    error.__cause__ = ExceptionGroup(message, [OSError(errno.EMFILE, "Too many open files")])
    return error


def test_local_resource_errno_looks_through_causes_and_groups() -> None:
    assert local_resource_errno(OSError(errno.EMFILE, "x")) == errno.EMFILE
    assert local_resource_errno(emfile_like_trio("127.0.0.1", 9)) == errno.EMFILE
    assert local_resource_errno(OSError(errno.ENOBUFS, "x")) == errno.ENOBUFS
    assert local_resource_errno(OSError(errno.ECONNREFUSED, "refused")) is None
    assert local_resource_errno(OSError("all attempts failed")) is None
    assert str(LocalResourceError(errno.EMFILE)) == "EMFILE: Too many open files"


async def fail_with_emfile(host: str, port: int, **_: object) -> NoReturn:
    raise emfile_like_trio(host, port)


async def test_emfile_connecting_to_haproxy_is_not_a_proxy_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    context = build_context(config())
    route = await context.router.route(context.config.listeners[0], "example.test", None)
    monkeypatch.setattr(trio, "open_tcp_stream", fail_with_emfile)
    with pytest.raises(UpstreamError) as caught:
        await open_upstream(route, "sidecar.test", context.config.delivery, context.health)
    reply = caught.value.reply
    assert reply.code == 451 and reply.lines[0].startswith("4.3.0 Local resource shortage")
    assert "EMFILE" in reply.text and "HAProxy" not in reply.text
    assert not caught.value.proxy_fault  # no other binding tried: it would fail alike
    health = context.health.servers[PROXY]
    assert health.plumbed and health.consecutive_failures == 0 and health.last_error is None


async def test_emfile_connecting_directly_is_not_an_mx_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bypass = {"b1": {"domain": {"example.test": {"ha_proxy_bypass": True}}}}
    context = build_context(config(binding=bypass))
    route = await context.router.route(context.config.listeners[0], "example.test", None)
    assert route.bypass
    monkeypatch.setattr(trio, "open_tcp_stream", fail_with_emfile)
    with pytest.raises(UpstreamError) as caught:
        await open_upstream(route, "sidecar.test", context.config.delivery, context.health)
    assert caught.value.reply.code == 451 and "EMFILE" in caught.value.reply.text
    assert "No MX" not in caught.value.reply.text


async def test_health_check_without_descriptors_counts_nothing(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setattr(trio, "open_tcp_stream", fail_with_emfile)
    with pytest.raises(LocalResourceError):
        await check_server(PROXY, 1)
    with pytest.raises(LocalResourceError):
        await probe_server(PROXY, _probe(), 1, connect=fail_with_emfile)
    registry = HealthRegistry([PROXY], HealthConfig(health_check_failure_threshold=1))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_server, registry, PROXY)
        await trio.sleep(30)  # several checks
        nursery.cancel_scope.cancel()
    health = registry.servers[PROXY]
    assert health.plumbed and health.consecutive_failures == 0 and health.last_check is None


def _probe() -> Any:
    from ipaddress import IPv4Address

    from sidecar.health import Probe

    return Probe(IPv4Address("192.0.2.1"), IPv4Address("192.0.2.25"), 25)


async def test_dns_without_descriptors_says_local_shortage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    resolver = Resolver(config(dns={"nameservers": ["127.0.0.1:53"]}).dns)

    async def no_sockets(*_: object, **__: object) -> NoReturn:
        errors = [("127.0.0.1", False, 53, OSError(errno.EMFILE, "Too many open files"), None)]
        request = dns.message.make_query("elsewhere.test", "MX")
        raise dns.resolver.NoNameservers(request=request, errors=errors)

    monkeypatch.setattr(resolver._resolver, "resolve", no_sockets)
    with pytest.raises(ResolutionError) as caught:
        await resolver.resolve_mx("elsewhere.test")
    assert caught.value.reply.code == 451 and "EMFILE" in caught.value.reply.text
