"""HAProxy as the egress proxy of the tests, and a client helper that speaks PROXY v2 to it.

The configuration mirrors ``examples/haproxy.cfg`` minus the protections that cannot hold on
loopback (the test MX *is* local, so ``dst_is_local`` would reject everything); those are
optional keyword arguments here so tests can prove that each rule works.

Verified on HAProxy 2.6 as root (see ``tests/e2e/test_harness.py``):

* ``source 0.0.0.0 usesrc clientip`` in the backend is enough for both families: an IPv6
  PROXY header (``::1`` -> ``[::1]:port``) makes HAProxy connect over IPv6 from ``::1``;
  no per-family ``source`` line is needed. The family of the *listener* does not matter
  either: an IPv6 header sent to the IPv4 bind works too.
* With ``server mx 0.0.0.0:0`` HAProxy connects to the header's destination address and port.
* ``tcp-request connection`` rules run before the PROXY header is read (``src`` is the real
  peer; a reject is a TCP reset), ``tcp-request session`` rules after it (``src``/``dst``/
  ``dst_port`` come from the header; a reject is a plain close).
* A refused MX port reaches the client as EOF before any banner after one retry delay:
  ~1.0 s with ``retries 1`` (HAProxy waits min(timeout connect, 1 s) before a retry).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from ipaddress import ip_address
from pathlib import Path

import trio

from sidecar import proxy_v2

from .net import Endpoint
from .process import ManagedProcess

__all__ = ["HAProxy", "haproxy_config", "open_proxied_stream"]


def _duration(milliseconds: int) -> str:
    return f"{milliseconds // 1000}s" if milliseconds % 1000 == 0 else f"{milliseconds}ms"


def haproxy_config(
    binds: Sequence[Endpoint],
    *,
    timeout_connect_ms: int = 1000,
    retries: int = 1,
    allowed_clients: Sequence[str] = (),
    allowed_sources: Sequence[str] = (),
    allowed_destination_ports: Sequence[int] = (),
    reject_local_destinations: bool = False,
    dontlognull: bool = False,
) -> str:
    """The text of a test HAProxy configuration (see :class:`HAProxy` for the options)."""
    lines = [
        "global",
        "    maxconn 1000",
        "    log stderr format raw local0 info",
        "",
        "defaults",
        "    mode tcp",
        "    log global",
        "    option tcplog",
        *(["    option dontlognull"] if dontlognull else []),
        f"    timeout connect {_duration(timeout_connect_ms)}",
        "    timeout client 11m",
        "    timeout server 11m",
        "    timeout tunnel 11m",
        f"    retries {retries}",
        "",
        "frontend egress",
    ]
    lines += [f"    bind {endpoint} accept-proxy" for endpoint in binds]
    if allowed_clients:
        clients = " ".join(allowed_clients)
        lines.append(f"    tcp-request connection reject unless {{ src {clients} }}")
    if allowed_destination_ports:
        ports = " ".join(str(port) for port in allowed_destination_ports)
        lines.append(f"    tcp-request session reject unless {{ dst_port {ports} }}")
    if reject_local_destinations:
        lines.append("    tcp-request session reject if { dst_is_local }")
    if allowed_sources:
        sources = " ".join(allowed_sources)
        lines.append(f"    tcp-request session reject unless {{ src {sources} }}")
    lines += [
        "    default_backend mx",
        "",
        "backend mx",
        "    # One line covers IPv4 and IPv6 headers alike (verified on 2.6).",
        "    source 0.0.0.0 usesrc clientip",
        "    server mx 0.0.0.0:0",
        "",
    ]
    return "\n".join(lines)


class HAProxy(ManagedProcess):
    """``haproxy -f <cfg> -db`` in the foreground, listening with ``accept-proxy``.

    ``bind`` is the IPv4 (``127.0.0.x``) listener, ``bind_ipv6`` an optional second one (on
    ``::1``). The protection options add the corresponding ``tcp-request`` rules:

    * ``allowed_clients``: ``tcp-request connection reject unless { src ... }`` (real peer);
    * ``allowed_sources``: ``tcp-request session reject unless { src ... }`` (header source);
    * ``allowed_destination_ports``: ``tcp-request session reject unless { dst_port ... }``;
    * ``reject_local_destinations``: ``tcp-request session reject if { dst_is_local }``;
    * ``dontlognull``: ``option dontlognull`` (as examples/haproxy.cfg: the sidecar's health
      checks, which close before a PROXY header, are not logged).

    Readiness is a successful TCP connect to every bind address.
    """

    name = "haproxy"

    def __init__(
        self,
        workdir: Path,
        bind: Endpoint,
        bind_ipv6: Endpoint | None = None,
        *,
        timeout_connect_ms: int = 1000,
        retries: int = 1,
        allowed_clients: Sequence[str] = (),
        allowed_sources: Sequence[str] = (),
        allowed_destination_ports: Sequence[int] = (),
        reject_local_destinations: bool = False,
        dontlognull: bool = False,
        executable: str = "haproxy",
    ) -> None:
        super().__init__(workdir)
        self.bind = bind
        self.bind_ipv6 = bind_ipv6
        self.executable = executable
        self.config_path = workdir / "haproxy.cfg"
        self.config_text = haproxy_config(
            self.binds,
            timeout_connect_ms=timeout_connect_ms,
            retries=retries,
            allowed_clients=allowed_clients,
            allowed_sources=allowed_sources,
            allowed_destination_ports=allowed_destination_ports,
            reject_local_destinations=reject_local_destinations,
            dontlognull=dontlognull,
        )

    @property
    def binds(self) -> list[Endpoint]:
        return [self.bind] if self.bind_ipv6 is None else [self.bind, self.bind_ipv6]

    @property
    def address(self) -> tuple[str, int]:
        """The IPv4 listener as ``(host, port)``."""
        return self.bind.as_tuple()

    @property
    def address_ipv6(self) -> tuple[str, int] | None:
        return None if self.bind_ipv6 is None else self.bind_ipv6.as_tuple()

    def prepare(self) -> None:
        self.config_path.write_text(self.config_text)

    def argv(self) -> list[str]:
        return [self.executable, "-f", str(self.config_path), "-db"]

    def ready(self) -> bool:
        for endpoint in self.binds:
            try:
                socket.create_connection(endpoint.as_tuple(), timeout=0.5).close()
            except ConnectionResetError:
                continue  # listening; `tcp-request connection reject` reset us
            except OSError:
                return False
        return True

    async def open_stream(
        self,
        source: str,
        destination: Endpoint,
        *,
        source_port: int = 0,
        ipv6_listener: bool = False,
        local_address: str | None = None,
    ) -> trio.SocketStream:
        """Connect to this HAProxy and send a PROXY v2 header ``source -> destination``."""
        listener = self.bind_ipv6 if ipv6_listener else self.bind
        if listener is None:
            raise ValueError("this HAProxy has no IPv6 listener")
        return await open_proxied_stream(
            listener,
            source,
            destination,
            source_port=source_port,
            local_address=local_address,
        )


async def open_proxied_stream(
    proxy: Endpoint,
    source: str,
    destination: Endpoint,
    *,
    source_port: int = 0,
    local_address: str | None = None,
) -> trio.SocketStream:
    """TCP connect to ``proxy`` (from ``local_address`` if given) and write, in one send, a
    PROXY v2 header asking for a connection from ``source:source_port`` to ``destination``."""
    stream = await trio.open_tcp_stream(proxy.host, proxy.port, local_address=local_address)
    header = proxy_v2.encode(
        ip_address(source), source_port, ip_address(destination.host), destination.port
    )
    try:
        await stream.send_all(header)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream
