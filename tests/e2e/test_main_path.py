"""The main path end to end: real HAProxy (usesrc clientip), real dnsmasq, test MXes on their own
127.0.0.x addresses, the sidecar in-process, smtplib or a raw client in front."""

from __future__ import annotations

from .harness import (
    MESSAGE,
    Endpoint,
    HostRecord,
    Lab,
    MXRecord,
    free_port,
    make_config,
    send,
)


async def test_mx_sees_the_binding_ipv4_source(lab: Lab) -> None:
    mx_address = lab.addresses.ipv4()
    port = free_port(mx_address)
    mx = await lab.mx(Endpoint(mx_address, port))
    dns = lab.dnsmasq(
        [MXRecord("example.test", "mx1.example.test"), HostRecord("mx1.example.test", [mx_address])]
    )
    haproxy = lab.haproxy()
    source = lab.addresses.ipv4()
    sidecar = await lab.sidecar(
        make_config(
            listeners=[(lab.listener(), "b1")],
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
