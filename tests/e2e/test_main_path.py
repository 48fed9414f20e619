"""The main path end to end: real HAProxy (usesrc clientip), real dnsmasq, test MXes on their own
127.0.0.x addresses, the sidecar in-process, smtplib or a raw client in front."""

from __future__ import annotations

from .harness import (
    Addresses,
    DnsmasqFactory,
    Endpoint,
    HAProxyFactory,
    HostRecord,
    MXFactory,
    MXRecord,
    free_port,
)
from .stack import MESSAGE, SidecarFactory, make_config, send


async def test_mx_sees_the_binding_ipv4_source(
    addresses: Addresses,
    haproxy_factory: HAProxyFactory,
    dnsmasq_factory: DnsmasqFactory,
    mx_factory: MXFactory,
    sidecar_factory: SidecarFactory,
) -> None:
    mx_address = addresses.ipv4()
    port = free_port(mx_address)
    mx = await mx_factory(Endpoint(mx_address, port))
    dns = dnsmasq_factory(
        [MXRecord("example.test", "mx1.example.test"), HostRecord("mx1.example.test", [mx_address])]
    )
    haproxy = haproxy_factory()
    source = addresses.ipv4()
    sidecar = await sidecar_factory(
        make_config(
            listeners=[(sidecar_factory.listener(), "b1")],
            bindings={"b1": {"ha_proxy_server": str(haproxy.bind), "ha_proxy_src_addr": source}},
            nameserver=dns.endpoint,
            port=port,
        )
    )
    result = await send(sidecar.endpoint, "a@client.test", ["rcpt@example.test"], MESSAGE)
    assert result.error is None and not result.refused, result
    (message,) = await mx.wait_for_messages(1)
    assert message.peer_host == source
    assert message.data == MESSAGE
    assert result.final is not None and result.final[0] == 250
