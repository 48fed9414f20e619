"""The one e2e stack builder: :class:`Lab` (the ``lab`` fixture) starts TestMX servers, dnsmasq
or a stub name server, HAProxy and a sidecar (in this test's nursery, or only its config file
for ``sidecar run``), all on this test's loopback block.

Every ready-made stack of the e2e tests is a call of :meth:`Lab.build`: ``relay_stack``
(session, DATA relay, hardening tests), ``cli_stack`` (a config file for ``sidecar run``),
``mail_stack`` (``mta.py``: the real-MTA tests) and the routing / DNS / health tests' own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from testkit.client import RawSMTPClient
from testkit.dns import Dnsmasq, DnsRecord, HostRecord, MXRecord
from testkit.haproxy import HAProxy
from testkit.mx import TestMX
from testkit.net import Addresses, Endpoint, free_port

from .factories import DnsmasqFactory, DnsStubFactory, HAProxyFactory, MXFactory
from .sidecar import (
    FAST_DELIVERY,
    FAST_SERVER,
    RunningSidecar,
    SidecarFactory,
    make_config,
    proxied_binding,
)

__all__ = ["CliStack", "Lab", "RelayStack", "RelayStackFactory", "Stack"]

Records = Sequence[DnsRecord] | Callable[[list[str]], Sequence[DnsRecord]]


@dataclass
class Stack:
    """What :meth:`Lab.build` started: ``mxes[i]`` is named ``mx_hosts[i]`` at
    ``mx_addresses[i]``, all on ``port``; one listener and PROXY source per binding name."""

    config: dict[str, Any]
    config_path: Path
    haproxy: HAProxy
    dns: Dnsmasq | None
    mxes: list[TestMX]
    mx_hosts: list[str]
    mx_addresses: list[str]
    listeners: dict[str, Endpoint]
    sources: dict[str, str]
    port: int
    running: RunningSidecar | None = None

    @property
    def sidecar(self) -> RunningSidecar:
        assert self.running is not None, "this stack was built with start=False"
        return self.running

    @property
    def endpoint(self) -> Endpoint:
        """The in-process sidecar's (first) listener."""
        return self.sidecar.endpoint

    @property
    def listener(self) -> Endpoint:
        """The configured listener of the first binding (for ``sidecar run``)."""
        return next(iter(self.listeners.values()))

    @property
    def source(self) -> str:
        """The PROXY source address of the first binding."""
        return next(iter(self.sources.values()))

    @property
    def mx(self) -> TestMX:
        return self.mxes[0]

    async def client(self, *, greet: bool = True) -> RawSMTPClient:
        """A raw client that has read the banner (and, with ``greet``, done EHLO)."""
        client = await RawSMTPClient.connect(self.endpoint)
        banner = await client.read_reply()
        assert banner.startswith(b"220 "), banner
        if greet:
            answer = await client.command(b"EHLO client.test")
            assert answer.startswith(b"250"), answer
        return client


RelayStack = Stack
CliStack = Stack
RelayStackFactory = Callable[..., Awaitable[Stack]]


class Lab:
    """The factories of one test in one place, and :meth:`build`, the one stack builder.

    ``lab.addresses`` allocates loopback addresses; ``lab.mx(...)``, ``lab.haproxy(...)``,
    ``lab.dnsmasq(...)``, ``lab.stubs(...)`` and ``await lab.sidecar(config)`` start single
    parts (see :mod:`.factories`); everything stops with the test.
    """

    def __init__(
        self,
        workdir: Path,
        addresses: Addresses,
        haproxy: HAProxyFactory,
        dnsmasq: DnsmasqFactory,
        mx: MXFactory,
        sidecar: SidecarFactory,
        stubs: DnsStubFactory,
    ) -> None:
        self.workdir = workdir
        self.addresses = addresses
        self.haproxy = haproxy
        self.dnsmasq = dnsmasq
        self.mx = mx
        self.sidecar = sidecar
        self.stubs = stubs

    def listener(self) -> str:
        """A fresh listener address for a config."""
        return self.sidecar.listener()

    async def build(
        self,
        *,
        mxes: Sequence[dict[str, Any]] = ({},),
        mx_at: Sequence[Endpoint] = (),
        hosts: Sequence[str] | None = None,
        domains: Mapping[str, int | Sequence[int]] | None = None,
        records: Records = (),
        nameserver: Endpoint | None = None,
        ttl: int = 1,
        haproxy: dict[str, Any] | None = None,
        bindings: Sequence[str] = ("b1",),
        server: dict[str, Any] | None = None,
        delivery: dict[str, Any] | None = None,
        dns: dict[str, Any] | Callable[[list[str]], dict[str, Any]] | None = None,
        sections: dict[str, Any] | None = None,
        protocol: str = "smtp",
        start: bool = True,
    ) -> Stack:
        """One TestMX per ``mxes`` entry (its TestMX options) on its own 127.0.0.x, all on one
        port (or none: ``mx_at``, the endpoints of MX servers the test runs itself), named
        ``hosts`` (default ``mx0.test``, ``mx1.test``...). ``domains`` maps each domain to the
        MX index (or indices, preference 10, 20... in list order) its MX records name (default
        ``{"example.test": 0}``); ``records`` are more records (or a callable given the MX
        addresses). dnsmasq serves them unless ``nameserver`` (a stub) is given and ``records``
        is empty. One HAProxy (``haproxy``: its options), one listener and source address per
        binding name; ``delivery.state_dir`` is ``<workdir>/state`` unless given. ``server``,
        ``delivery``, ``dns`` (or a callable given the MX addresses)
        and ``sections`` (other tables) go into the config, which is also written to
        ``sidecar.toml``; ``protocol``: every listener's (``"lmtp"``: RFC 2033).
        ``start=False``: no sidecar (``sidecar run`` it yourself)."""
        servers: list[TestMX] = []
        if mx_at:  # MX servers the test started itself (all on one port)
            mx_addresses, port = [endpoint.host for endpoint in mx_at], mx_at[0].port
        else:
            mx_addresses = [self.addresses.ipv4() for _ in mxes]
            port = free_port(mx_addresses[0])
            for address, options in zip(mx_addresses, mxes, strict=True):
                servers.append(await self.mx(Endpoint(address, port), **options))
        count = len(mx_addresses)
        names = list(hosts) if hosts is not None else [f"mx{i}.test" for i in range(count)]
        zone: list[DnsRecord] = [
            HostRecord(host, [address]) for host, address in zip(names, mx_addresses, strict=True)
        ]
        for domain, indices in ({"example.test": 0} if domains is None else domains).items():
            chosen = [indices] if isinstance(indices, int) else list(indices)
            zone += [MXRecord(domain, names[i], 10 * (rank + 1)) for rank, i in enumerate(chosen)]
        extra = records(mx_addresses) if callable(records) else records
        dnsmasq = None
        if nameserver is None or extra:
            dnsmasq = self.dnsmasq([*zone, *extra], ttl=ttl)
            nameserver = dnsmasq.endpoint
        proxy = self.haproxy(**(haproxy or {}))
        # The on-disk state (TLS-RPT results, MTA-STS cache) of this test's sidecars.
        delivery = {"state_dir": str(self.workdir / "state"), **(delivery or {})}
        listeners = {name: self.addresses.endpoint() for name in bindings}
        sources = {name: self.addresses.ipv4() for name in bindings}
        config = make_config(
            listeners=[(str(listeners[name]), name) for name in bindings],
            bindings={name: proxied_binding(proxy.bind, source=sources[name]) for name in bindings},
            nameserver=nameserver,
            port=port,
            delivery=delivery,
            state_dir=str(self.workdir / "state"),
            **({"server": server} if server is not None else {}),
            **(sections or {}),
        )
        config["dns"].update((dns(mx_addresses) if callable(dns) else dns) or {})
        if protocol != "smtp":
            for listener in config["listener"]:
                listener["protocol"] = protocol
        path = self.workdir / "sidecar.toml"
        for number in range(2, 100):  # a second stack in one test keeps the first one's file
            if not path.exists():
                break
            path = self.workdir / f"sidecar{number}.toml"
        path.write_text(tomli_w.dumps(config), encoding="utf-8")
        stack = Stack(
            config, path, proxy, dnsmasq, servers, names, mx_addresses, listeners, sources, port
        )
        if start:
            stack.running = await self.sidecar(config)
        return stack

    async def relay(
        self,
        *,
        mxes: Sequence[dict[str, Any]] = ({},),
        domains: Mapping[str, int | Sequence[int]] | None = None,
        records: Sequence[DnsRecord] = (),
        server: dict[str, Any] | None = None,
        delivery: dict[str, Any] | None = None,
        haproxy: dict[str, Any] | None = None,
    ) -> Stack:
        """The ``relay_stack`` fixture: :meth:`build` with short timeouts (``FAST_SERVER``,
        ``FAST_DELIVERY``, overridden by ``server`` / ``delivery``)."""
        return await self.build(
            mxes=mxes,
            domains=domains,
            records=records,
            haproxy=haproxy,
            server={**FAST_SERVER, **(server or {})},
            delivery={**FAST_DELIVERY, **(delivery or {})},
        )

    async def cli(self) -> Stack:
        """The ``cli_stack`` fixture: two MX hosts for example.test (mx0.test pref 10, mx1.test
        pref 20), dnsmasq, HAProxy and a config file naming them; no sidecar yet."""
        return await self.build(
            mxes=[{}, {}],
            domains={"example.test": [0, 1]},
            server=FAST_SERVER,
            delivery=FAST_DELIVERY,
            start=False,
        )
