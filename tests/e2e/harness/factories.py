"""Factories behind the e2e fixtures: each starts things for one test and stops them all at the
test's end (``stop_all``), keeping their logs for the failure report."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dns.rcode
import trio

from testkit.dns import Dnsmasq, DnsRecord
from testkit.dns_stub import Handler, StubDns, rcode, silent
from testkit.dnssec import Nsd, SignedZone, Unbound
from testkit.haproxy import HAProxy
from testkit.mx import TestMX
from testkit.net import IPV6_LOOPBACK, Addresses, Endpoint
from testkit.process import ManagedProcess
from testkit.redis import RedisSentinel, RedisServer

__all__ = [
    "DnsStubFactory",
    "DnsmasqFactory",
    "DnssecFactory",
    "HAProxyFactory",
    "MXFactory",
    "RedisFactory",
]


class _ProcessFactory:
    def __init__(self, workdir: Path, addresses: Addresses) -> None:
        self.workdir = workdir
        self.addresses = addresses
        self.processes: list[ManagedProcess] = []
        self._numbers = itertools.count(1)

    def _new_workdir(self, name: str) -> Path:
        return self.workdir / f"{name}{next(self._numbers)}"

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def logs(self) -> str:
        return "\n".join(process.logs() for process in self.processes)


class HAProxyFactory(_ProcessFactory):
    """``haproxy_factory(...)`` -> a started :class:`HAProxy` on fresh loopback addresses.

    ``ipv6=True`` adds a second listener on ``[::1]``. The other keywords are
    :class:`HAProxy`'s. ``start=False`` returns it unstarted.
    """

    def __call__(
        self,
        *,
        bind: Endpoint | None = None,
        ipv6: bool = False,
        bind_ipv6: Endpoint | None = None,
        timeout_connect_ms: int = 1000,
        retries: int = 1,
        allowed_clients: Sequence[str] = (),
        allowed_sources: Sequence[str] = (),
        allowed_destination_ports: Sequence[int] = (),
        reject_local_destinations: bool = False,
        dontlognull: bool = False,
        start: bool = True,
    ) -> HAProxy:
        if ipv6 and bind_ipv6 is None:
            bind_ipv6 = self.addresses.ipv6_endpoint()
        haproxy = HAProxy(
            self._new_workdir("haproxy"),
            bind or self.addresses.endpoint(),
            bind_ipv6,
            timeout_connect_ms=timeout_connect_ms,
            retries=retries,
            allowed_clients=allowed_clients,
            allowed_sources=allowed_sources,
            allowed_destination_ports=allowed_destination_ports,
            reject_local_destinations=reject_local_destinations,
            dontlognull=dontlognull,
        )
        self.processes.append(haproxy)
        if start:
            haproxy.start()
        return haproxy


class DnsmasqFactory(_ProcessFactory):
    """``dnsmasq_factory(records, ...)`` -> a started :class:`Dnsmasq` on a fresh address."""

    def __call__(
        self,
        records: Sequence[DnsRecord] = (),
        *,
        listen: Endpoint | None = None,
        ttl: int = 1,
        local_domains: Sequence[str] = ("test",),
        start: bool = True,
    ) -> Dnsmasq:
        dnsmasq = Dnsmasq(
            self._new_workdir("dnsmasq"),
            listen or self.addresses.endpoint(udp=True),
            records,
            ttl=ttl,
            local_domains=local_domains,
        )
        self.processes.append(dnsmasq)
        if start:
            dnsmasq.start()
        return dnsmasq


class DnssecFactory(_ProcessFactory):
    """``dnssec_factory(zones)`` -> a started validating :class:`Unbound` (its ``endpoint``
    goes in ``dns.nameservers``) in front of a started :class:`Nsd` serving ``zones``
    (signed ones with their keys as unbound's trust anchors), each on a fresh address."""

    def __call__(self, zones: Sequence[SignedZone]) -> Unbound:
        nsd = Nsd(self._new_workdir("nsd"), self.addresses.endpoint(udp=True), zones)
        self.processes.append(nsd)
        nsd.start()
        unbound = Unbound(self._new_workdir("unbound"), self.addresses.endpoint(udp=True), nsd)
        self.processes.append(unbound)
        unbound.start()
        return unbound


class RedisFactory(_ProcessFactory):
    """``redis_factory()`` -> a started :class:`RedisServer` on a fresh address (or ``listen``);
    ``cluster=True``: a one-node Redis Cluster; ``start=False`` returns it unstarted. Stop or
    restart it to make an outage. ``redis_factory.sentinel(primary)``: a started Sentinel."""

    def __call__(
        self, *, listen: Endpoint | None = None, cluster: bool = False, start: bool = True
    ) -> RedisServer:
        redis = RedisServer(
            self._new_workdir("redis"), listen or self.addresses.endpoint(), cluster=cluster
        )
        self.processes.append(redis)
        if start:
            redis.start()
        return redis

    def sentinel(self, primary: RedisServer, *, service: str = "sidecar") -> RedisSentinel:
        """A started :class:`RedisSentinel` monitoring ``primary`` as ``service``."""
        sentinel = RedisSentinel(
            self._new_workdir("sentinel"), self.addresses.endpoint(), primary, service=service
        )
        self.processes.append(sentinel)
        sentinel.start()
        return sentinel


class DnsStubFactory:
    """``dns_stubs(handler)``, ``dns_stubs.silent()``, ``dns_stubs.rcode(dns.rcode.SERVFAIL)``:
    started :class:`StubDns` servers on fresh addresses (or the given endpoint)."""

    def __init__(self, addresses: Addresses) -> None:
        self.addresses = addresses
        self.stubs: list[StubDns] = []

    def __call__(
        self, handler: Handler, *, endpoint: Endpoint | None = None, tcp: bool = True
    ) -> StubDns:
        """A started :class:`StubDns` answering with ``handler`` (UDP, and TCP with ``tcp``)."""
        stub = StubDns(endpoint or self.addresses.endpoint(udp=True), handler, tcp=tcp)
        stub.start()
        self.stubs.append(stub)
        return stub

    def silent(self, endpoint: Endpoint | None = None) -> StubDns:
        """UDP only, never answers."""
        return self(silent(), endpoint=endpoint, tcp=False)

    def rcode(
        self, code: dns.rcode.Rcode = dns.rcode.SERVFAIL, endpoint: Endpoint | None = None
    ) -> StubDns:
        """UDP only, answers every query with ``code``."""
        return self(rcode(code), endpoint=endpoint, tcp=False)

    def stop_all(self) -> None:
        for stub in reversed(self.stubs):
            stub.stop()


class MXFactory:
    """``await mx_factory(**options)`` -> a serving :class:`TestMX` on a fresh ``127.0.0.x``
    (``ipv6=True``: on ``::1``) with a port picked at bind time; the options are TestMX's.
    ``await mx_factory.start(mx)`` serves one built by the test. All stop with the test."""

    def __init__(self, nursery: trio.Nursery, addresses: Addresses) -> None:
        self.nursery = nursery
        self.addresses = addresses
        self.servers: list[TestMX] = []

    async def __call__(
        self, endpoint: Endpoint | None = None, *, ipv6: bool = False, **options: Any
    ) -> TestMX:
        if endpoint is None:
            endpoint = Endpoint(IPV6_LOOPBACK if ipv6 else self.addresses.ipv4(), 0)
        return await self.start(TestMX(endpoint, **options))

    async def start(self, mx: TestMX) -> TestMX:
        await self.nursery.start(mx.serve)
        self.servers.append(mx)
        return mx
