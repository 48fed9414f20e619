"""Loopback addresses and ports for end-to-end tests.

Every test gets its own ``127.0.0.x`` addresses (a process-wide counter starting at
``127.0.0.10``; ``.1``-``.9`` stay free for fixed uses) and its own free ports, so tests never
see each other's traffic even when a port is reused. Under pytest-xdist each worker ``gwN``
takes its own ``127.(N+1).0.0/16`` block.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
from dataclasses import dataclass

__all__ = [
    "IPV6_LOOPBACK",
    "Addresses",
    "Endpoint",
    "allocate_ipv4",
    "fixed_ipv4",
    "free_port",
]

IPV6_LOOPBACK = "::1"
_FIRST_INDEX = 10
_counter = itertools.count(_FIRST_INDEX)
_counter_lock = threading.Lock()


@dataclass(frozen=True)
class Endpoint:
    """A TCP/UDP address: host (IPv4 or IPv6 literal, no brackets) and port."""

    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if self.is_ipv6 else socket.AF_INET

    def as_tuple(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


def _worker_octet() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and worker[2:].isdigit():
        return int(worker[2:]) + 1
    return 0


def fixed_ipv4(last: int) -> str:
    """``127.N.0.<last>`` for ``last`` in 1..9: this worker's addresses for fixed uses (the
    counter never hands them out), e.g. scripts/demo.sh's DEMO_NET."""
    if not 1 <= last < _FIRST_INDEX:
        raise ValueError(f"fixed addresses are .1 to .{_FIRST_INDEX - 1}, not .{last}")
    return f"127.{_worker_octet()}.0.{last}"


def allocate_ipv4() -> str:
    """A loopback address no other test of this process has had (thread-safe)."""
    while True:
        with _counter_lock:
            index = next(_counter)
        third, fourth = divmod(index, 256)
        if third > 255:
            raise RuntimeError("ran out of 127.x.y.z test addresses")
        if 0 < fourth < 255:
            return f"127.{_worker_octet()}.{third}.{fourth}"


def free_port(host: str, *, udp: bool = False) -> int:
    """A port that is free on ``host`` right now (TCP, and UDP too when ``udp``).

    Found by binding port 0; the socket is closed before returning, so there is a small window
    in which another process could take it. Each test has its own addresses, so in practice
    only ``::1`` is shared.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port: int = tcp.getsockname()[1]
            if not udp:
                return port
            with socket.socket(family, socket.SOCK_DGRAM) as datagram:
                try:
                    datagram.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError(f"no free TCP+UDP port found on {host}")


class Addresses:
    """Per-test allocator: fresh loopback addresses and endpoints (see module docstring)."""

    def __init__(self) -> None:
        self.allocated: list[str] = []

    def ipv4(self) -> str:
        """A fresh ``127.0.0.x`` address for this test."""
        address = allocate_ipv4()
        self.allocated.append(address)
        return address

    def endpoint(self, host: str | None = None, *, udp: bool = False) -> Endpoint:
        """``host`` (default: a fresh ``127.0.0.x``) with a free port."""
        if host is None:
            host = self.ipv4()
        return Endpoint(host, free_port(host, udp=udp))

    def ipv6_endpoint(self, *, udp: bool = False) -> Endpoint:
        """``[::1]`` with a free port (there is only one IPv6 loopback address)."""
        return self.endpoint(IPV6_LOOPBACK, udp=udp)
