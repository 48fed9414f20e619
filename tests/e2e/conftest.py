"""Fixtures for end-to-end tests: real HAProxy and dnsmasq processes, trio TestMX servers.

Every test gets its own loopback addresses and ports; everything a test starts is stopped when
the test ends, and the process logs are printed at teardown (pytest shows them for failed
tests only). All tests in this directory are marked ``e2e`` and need root.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import trio
import trustme

from .harness import (
    Addresses,
    CliStack,
    DnsmasqFactory,
    DnssecFactory,
    DnsStubFactory,
    HAProxyFactory,
    Lab,
    MXFactory,
    Processes,
    RedisFactory,
    RelayStackFactory,
    SidecarFactory,
    TestMX,
    client_tls_context,
    server_tls_context,
)
from .mta import MailStack, make_mail_stack

ROOT_REQUIRED = "e2e tests need root: HAProxy's usesrc clientip requires CAP_NET_ADMIN"
_HERE = Path(__file__).parent
_F = TypeVar("_F", HAProxyFactory, DnsmasqFactory, RedisFactory, DnssecFactory)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def require_root() -> None:
    """Fail (not skip) every e2e test when not running as root."""
    if os.geteuid() != 0:
        pytest.fail(ROOT_REQUIRED, pytrace=False)


@pytest.fixture
def addresses() -> Addresses:
    """Allocator of fresh ``127.0.0.x`` addresses / endpoints for this test."""
    return Addresses()


def _stopped_after(factory: _F) -> Iterator[_F]:
    """Yield a process factory; at teardown stop every process it started and print their
    logs (pytest shows them for failed tests only)."""
    try:
        yield factory
    finally:
        factory.stop_all()
        if factory.processes:
            print(factory.logs())


@pytest.fixture
def haproxy_factory(tmp_path: Path, addresses: Addresses) -> Iterator[HAProxyFactory]:
    """``haproxy_factory(ipv6=..., retries=..., allowed_...=...)`` -> started HAProxy."""
    yield from _stopped_after(HAProxyFactory(tmp_path, addresses))


@pytest.fixture
def dnsmasq_factory(tmp_path: Path, addresses: Addresses) -> Iterator[DnsmasqFactory]:
    """``dnsmasq_factory([MXRecord(...), HostRecord(...), ...], ttl=...)`` -> started dnsmasq."""
    yield from _stopped_after(DnsmasqFactory(tmp_path, addresses))


@pytest.fixture
def redis_factory(tmp_path: Path, addresses: Addresses) -> Iterator[RedisFactory]:
    """``redis_factory()`` -> a started private redis-server (``.url``, ``.stop()``, ...)."""
    yield from _stopped_after(RedisFactory(tmp_path, addresses))


@pytest.fixture
def dnssec_factory(tmp_path: Path, addresses: Addresses) -> Iterator[DnssecFactory]:
    """``dnssec_factory([SignedZone(...), ...])`` -> a started validating unbound in front of
    a started nsd serving those zones (testkit/dnssec.py)."""
    yield from _stopped_after(DnssecFactory(tmp_path, addresses))


@pytest.fixture
def dns_stubs(addresses: Addresses) -> Iterator[DnsStubFactory]:
    """``dns_stubs.silent()`` (never answers) / ``dns_stubs.rcode(SERVFAIL)`` stub servers."""
    factory = DnsStubFactory(addresses)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """A throw-away CA for the whole run."""
    return trustme.CA()


@pytest.fixture
def mx_tls_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    """Server context for a TestMX: certificate for mx.test, localhost, 127.0.0.1, ::1."""
    return server_tls_context(tls_ca)


@pytest.fixture
def client_tls(tls_ca: trustme.CA) -> ssl.SSLContext:
    """Verifying client context that trusts ``tls_ca``."""
    return client_tls_context(tls_ca)


@pytest.fixture
async def mx_factory(nursery: trio.Nursery, addresses: Addresses) -> AsyncIterator[MXFactory]:
    """``await mx_factory(**TestMX options)`` -> a serving TestMX (stopped with the test)."""
    factory = MXFactory(nursery, addresses)
    yield factory
    for mx in factory.servers:
        mx.close()


@pytest.fixture
async def mx(mx_factory: MXFactory) -> TestMX:
    """A serving TestMX with default behaviour on a fresh ``127.0.0.x``."""
    return await mx_factory()


@pytest.fixture
async def sidecar_factory(
    nursery: trio.Nursery, addresses: Addresses
) -> AsyncIterator[SidecarFactory]:
    """``await sidecar_factory(config_dict)`` -> a sidecar serving in this test's nursery."""
    factory = SidecarFactory(nursery, addresses)
    yield factory
    for sidecar in factory.running:
        sidecar.shutdown.set()


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[Processes]:
    """Starts ``sidecar`` processes; kills whatever still runs at the test's end."""
    manager = Processes(tmp_path)
    try:
        yield manager
    finally:
        await manager.stop_all()


@pytest.fixture
def lab(
    tmp_path: Path,
    addresses: Addresses,
    haproxy_factory: HAProxyFactory,
    dnsmasq_factory: DnsmasqFactory,
    mx_factory: MXFactory,
    sidecar_factory: SidecarFactory,
    dns_stubs: DnsStubFactory,
) -> Lab:
    """This test's factories in one place and ``await lab.build(...)``, the one stack builder."""
    return Lab(
        tmp_path,
        addresses,
        haproxy_factory,
        dnsmasq_factory,
        mx_factory,
        sidecar_factory,
        dns_stubs,
    )


@pytest.fixture
async def cli_stack(lab: Lab) -> CliStack:
    """HAProxy, dnsmasq, two MX hosts for example.test and a config file; no sidecar yet."""
    return await lab.cli()


@pytest.fixture
def relay_stack(lab: Lab) -> RelayStackFactory:
    """``await relay_stack(mxes=[...], domains={...})``: sidecar + HAProxy + dnsmasq + MXes."""
    return lab.relay


@pytest.fixture
async def mail_stack(nursery: trio.Nursery, lab: Lab) -> MailStack:
    """The stack the real-MTA tests (Postfix, Exim) send through: see mta.make_mail_stack."""
    return await make_mail_stack(nursery, lab)
