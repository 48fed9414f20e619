"""Running the sidecar itself in e2e tests: in-process (``serve`` in the test's nursery) with a
config built from a dict, plus smtplib-based clients run in a thread."""

from __future__ import annotations

import smtplib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from sidecar.config import Config, parse_config
from sidecar.server import serve

from .harness import (
    Addresses,
    Dnsmasq,
    DnsmasqFactory,
    DnsRecord,
    Endpoint,
    HAProxy,
    HAProxyFactory,
    HostRecord,
    MXFactory,
    MXRecord,
    RawSMTPClient,
    TestMX,
    free_port,
)


@dataclass
class RunningSidecar:
    config: Config
    endpoints: list[Endpoint]
    shutdown: trio.Event

    @property
    def endpoint(self) -> Endpoint:
        return self.endpoints[0]


class SidecarFactory:
    def __init__(self, nursery: trio.Nursery, addresses: Addresses) -> None:
        self.nursery = nursery
        self.addresses = addresses
        self.running: list[RunningSidecar] = []

    async def __call__(self, config: dict[str, Any]) -> RunningSidecar:
        parsed = parse_config(config)
        shutdown = trio.Event()
        bound = await self.nursery.start(serve, parsed, shutdown)
        sidecar = RunningSidecar(parsed, [Endpoint(host, port) for host, port in bound], shutdown)
        self.running.append(sidecar)
        return sidecar

    def listener(self) -> str:
        """A fresh listener address for a config."""
        return str(self.addresses.endpoint())


def make_config(
    *,
    listeners: Sequence[tuple[str, str]],
    bindings: dict[str, dict[str, Any]],
    nameserver: Endpoint | None,
    port: int,
    delivery: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A sidecar config dict: ``listeners`` are (address, binding name) pairs."""
    config: dict[str, Any] = {
        "server": {"hostname": "sidecar.test"},
        "listener": [{"address": address, "binding": name} for address, name in listeners],
        "dns": {"nameservers": [str(nameserver)] if nameserver else [], "timeout": 2},
        "delivery": {
            "port": port,
            "allow_private_destinations": True,
            "tls": "disabled",
            **(delivery or {}),
        },
        "ha_proxy_client": {"health_check_interval": 0.5, "health_check_timeout": 0.5},
        "binding": bindings,
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    return config


@dataclass
class SendResult:
    refused: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    final: tuple[int, bytes] | None = None  # the reply to the end of data
    error: Exception | None = None


def send_message(
    endpoint: Endpoint, sender: str, recipients: Sequence[str], message: bytes
) -> SendResult:
    """Send one message with smtplib (blocking: run it with trio.to_thread.run_sync)."""
    result = SendResult()
    try:
        with smtplib.SMTP(endpoint.host, endpoint.port, timeout=30) as client:
            client.ehlo("client.test")
            code, text = client.mail(sender)
            if code != 250:
                raise smtplib.SMTPSenderRefused(code, text, sender)
            for recipient in recipients:
                code, text = client.rcpt(recipient)
                if code not in (250, 251):
                    result.refused[recipient] = (code, text)
            if len(result.refused) == len(recipients):
                client.rset()
                return result
            result.final = client.data(message)
    except (smtplib.SMTPException, OSError) as error:
        result.error = error
    return result


async def send(
    endpoint: Endpoint, sender: str, recipients: Sequence[str], message: bytes
) -> SendResult:
    return await trio.to_thread.run_sync(send_message, endpoint, sender, recipients, message)


MESSAGE = b"From: sender@client.test\r\nTo: rcpt@example.test\r\nSubject: e2e\r\n\r\nHello.\r\n"


# -- A whole relay stack in one call (session, DATA relay and CLI tests) ----------------------

FAST_SERVER: dict[str, Any] = {
    "client_command_timeout": 10,
    "data_timeout": 10,
    "shutdown_grace": 2,
}
FAST_DELIVERY: dict[str, Any] = {
    "setup_timeout": 10,
    "connect_timeout": 2,
    "banner_timeout": 5,
    "mx_command_timeout": 5,
    "data_init_timeout": 5,
    "data_send_timeout": 5,
    "data_done_timeout": 5,
}


@dataclass
class RelayStack:
    """A running sidecar with its HAProxy, dnsmasq and MXes (``mx_hosts[i]`` names ``mxes[i]``,
    all on their own 127.0.0.x and on the one delivery port)."""

    sidecar: RunningSidecar
    haproxy: HAProxy
    dns: Dnsmasq
    mxes: list[TestMX]
    mx_hosts: list[str]
    source: str
    port: int

    @property
    def endpoint(self) -> Endpoint:
        return self.sidecar.endpoint

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


class RelayStackFactory:
    """``await relay_stack(mxes=[{TestMX options}, ...], domains={"d.test": 0 or [0, 1]},
    server={...}, delivery={...}, haproxy={HAProxy options})``: MX hosts ``mx0.test``,
    ``mx1.test``... one per MX, each domain's MX records name the given hosts (preference 10,
    20, ... in list order)."""

    def __init__(
        self,
        addresses: Addresses,
        haproxy_factory: HAProxyFactory,
        dnsmasq_factory: DnsmasqFactory,
        mx_factory: MXFactory,
        sidecar_factory: SidecarFactory,
    ) -> None:
        self.addresses = addresses
        self.haproxy_factory = haproxy_factory
        self.dnsmasq_factory = dnsmasq_factory
        self.mx_factory = mx_factory
        self.sidecar_factory = sidecar_factory

    async def __call__(
        self,
        *,
        mxes: Sequence[dict[str, Any]] = ({},),
        domains: Mapping[str, int | Sequence[int]] | None = None,
        records: Sequence[DnsRecord] = (),
        server: dict[str, Any] | None = None,
        delivery: dict[str, Any] | None = None,
        haproxy: dict[str, Any] | None = None,
    ) -> RelayStack:
        mx_addresses = [self.addresses.ipv4() for _ in mxes]
        port = free_port(mx_addresses[0])
        servers = [
            await self.mx_factory(Endpoint(address, port), **options)
            for address, options in zip(mx_addresses, mxes, strict=True)
        ]
        hosts = [f"mx{index}.test" for index in range(len(mxes))]
        zone: list[DnsRecord] = [
            HostRecord(host, [address]) for host, address in zip(hosts, mx_addresses, strict=True)
        ]
        for domain, indices in (domains or {"example.test": 0}).items():
            chosen = [indices] if isinstance(indices, int) else list(indices)
            for rank, index in enumerate(chosen):
                zone.append(MXRecord(domain, hosts[index], 10 * (rank + 1)))
        dns = self.dnsmasq_factory([*zone, *records])
        proxy = self.haproxy_factory(**(haproxy or {}))
        source = self.addresses.ipv4()
        sidecar = await self.sidecar_factory(
            make_config(
                listeners=[(self.sidecar_factory.listener(), "b1")],
                bindings={"b1": {"ha_proxy_server": str(proxy.bind), "ha_proxy_src_addr": source}},
                nameserver=dns.endpoint,
                port=port,
                delivery={**FAST_DELIVERY, **(delivery or {})},
                server={**FAST_SERVER, **(server or {})},
            )
        )
        return RelayStack(sidecar, proxy, dns, servers, hosts, source, port)


# -- helpers for the routing / DNS / health / TLS tests ----------------------------------------


def proxied_binding(
    server: object, source: str | None = None, ipv6_source: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A ``[binding.NAME]`` table: ``server`` is an HAProxy endpoint (anything whose ``str()``
    is ``host:port``), ``source``/``ipv6_source`` the PROXY header's source per family."""
    binding: dict[str, Any] = {"ha_proxy_server": str(server), **extra}
    if source is not None:
        binding["ha_proxy_src_addr"] = source
    if ipv6_source is not None:
        binding["ha_proxy_ipv6_src_addr"] = ipv6_source
    return binding


def refusal(result: SendResult, recipient: str) -> tuple[int, str]:
    """``(code, enhanced status code)`` of a recipient the sidecar refused at RCPT."""
    assert result.error is None, result
    assert recipient in result.refused, result
    code, text = result.refused[recipient]
    return code, text.decode("utf-8", "replace").split(" ", 1)[0]


def final_status(result: SendResult) -> tuple[int, str]:
    """``(code, enhanced status code)`` of the reply to the end of data."""
    assert result.error is None and result.final is not None, result
    code, text = result.final
    return code, text.decode("utf-8", "replace").split(" ", 1)[0]


async def rcpt_reply(endpoint: Endpoint, recipient: str, sender: str = "a@client.test") -> bytes:
    """The raw bytes of the sidecar's reply to ``RCPT TO:<recipient>`` (then QUIT)."""
    from .harness import RawSMTPClient

    async with await RawSMTPClient.connect(endpoint) as client:
        assert (await client.read_reply()).startswith(b"220 ")
        assert (await client.command("EHLO client.test")).startswith(b"250")
        assert (await client.command(f"MAIL FROM:<{sender}>")).startswith(b"250")
        answer = await client.command(f"RCPT TO:<{recipient}>")
        await client.command("QUIT")
    return answer
