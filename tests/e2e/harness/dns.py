"""DNS for end-to-end tests: dnsmasq serving a small ``.test`` zone, plus two stub servers.

Facts checked by ``tests/e2e/test_harness.py`` against dnsmasq 2.90:

* Every answer from the records below carries the configured TTL (``--local-ttl``, also
  passed per ``--host-record``); the default here is 1 s.
* A name under a local domain (``--local=/test/``) that has no record gives NXDOMAIN (with no
  SOA in the authority section); a name that has some record but not the asked type gives
  NOERROR with an empty answer (dnspython: ``NoAnswer``).
* Null MX (RFC 7505) is served as a raw record, ``--dns-rr=<domain>,15,000000``: preference 0
  and the root name as exchange; dnspython shows it as ``0 .``.
* :class:`RefusedZone` (``--server=/<zone>/#`` with ``--no-resolv``: "use the standard
  servers", of which there are none) gives REFUSED at once.
* Forwarding a zone to a dead port (nobody listening) gives *no answer at all* over UDP --
  dnsmasq ignores the ICMP error and never replies, so it is a timeout, not SERVFAIL -- and
  over TCP the connection is closed without a reply. SERVFAIL therefore comes from
  :class:`ForwardZone` pointing at an :class:`RcodeDns` that answers SERVFAIL; dnsmasq passes
  that rcode through.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Self

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver

from .net import Endpoint
from .process import HarnessError, ManagedProcess

__all__ = [
    "DnsRecord",
    "Dnsmasq",
    "ForwardZone",
    "HostRecord",
    "MXRecord",
    "NullMXRecord",
    "RawRecord",
    "RcodeDns",
    "RefusedZone",
    "SilentDns",
    "make_resolver",
]


def _name(name: str) -> str:
    return name.rstrip(".")


class DnsRecord(Protocol):
    """Anything that turns into dnsmasq command-line options."""

    def dnsmasq_options(self, ttl: int) -> list[str]: ...


@dataclass(frozen=True)
class MXRecord:
    """``domain MX preference host``."""

    domain: str
    host: str
    preference: int = 10

    def dnsmasq_options(self, ttl: int) -> list[str]:
        return [f"--mx-host={_name(self.domain)},{_name(self.host)},{self.preference}"]


@dataclass(frozen=True)
class HostRecord:
    """A/AAAA records for ``name`` (any mix of IPv4 and IPv6 addresses)."""

    name: str
    addresses: Sequence[str]

    def dnsmasq_options(self, ttl: int) -> list[str]:
        return [f"--host-record={_name(self.name)},{address},{ttl}" for address in self.addresses]


@dataclass(frozen=True)
class NullMXRecord:
    """RFC 7505 null MX, ``domain MX 0 .``: RDATA is preference 0 then the root name."""

    domain: str

    def dnsmasq_options(self, ttl: int) -> list[str]:
        return [f"--dns-rr={_name(self.domain)},15,000000"]


@dataclass(frozen=True)
class RawRecord:
    """Any record as its RR type number and wire-format RDATA."""

    name: str
    rrtype: int
    rdata: bytes

    def dnsmasq_options(self, ttl: int) -> list[str]:
        return [f"--dns-rr={_name(self.name)},{self.rrtype},{self.rdata.hex()}"]


@dataclass(frozen=True)
class ForwardZone:
    """Forward every query under ``domain`` to ``server`` (e.g. a SilentDns or RcodeDns)."""

    domain: str
    server: Endpoint

    def dnsmasq_options(self, ttl: int) -> list[str]:
        return [f"--server=/{_name(self.domain)}/{self.server.host}#{self.server.port}"]


@dataclass(frozen=True)
class RefusedZone:
    """Every query under ``domain`` gets REFUSED."""

    domain: str

    def dnsmasq_options(self, ttl: int) -> list[str]:
        return [f"--server=/{_name(self.domain)}/#"]


def make_resolver(server: Endpoint, *, lifetime: float = 2.0) -> dns.resolver.Resolver:
    """A dnspython resolver that asks only ``server`` (no /etc/resolv.conf, no cache)."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port
    resolver.lifetime = lifetime
    resolver.timeout = lifetime
    return resolver


class Dnsmasq(ManagedProcess):
    """``dnsmasq --no-daemon`` answering for ``local_domains`` from ``records`` only.

    It reads no config file, no /etc/hosts and no resolv.conf, listens only on ``listen``
    (UDP and TCP), has no cache (so forwarded answers are never stale) and logs queries to
    its stderr. Readiness is a DNS answer (any rcode) to a probe query.
    """

    name = "dnsmasq"

    def __init__(
        self,
        workdir: Path,
        listen: Endpoint,
        records: Sequence[DnsRecord] = (),
        *,
        ttl: int = 1,
        local_domains: Sequence[str] = ("test",),
        log_queries: bool = True,
        executable: str = "dnsmasq",
    ) -> None:
        super().__init__(workdir)
        self.endpoint = listen
        self.records = list(records)
        self.ttl = ttl
        self.local_domains = [_name(domain) for domain in local_domains]
        self.log_queries = log_queries
        self.executable = executable
        self._probe_timeout = 0.02

    def argv(self) -> list[str]:
        argv = [
            self.executable,
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            f"--listen-address={self.endpoint.host}",
            f"--port={self.endpoint.port}",
            "--pid-file=",
            "--cache-size=0",
            f"--local-ttl={self.ttl}",
            "--log-facility=-",
        ]
        if self.log_queries:
            argv.append("--log-queries")
        argv += [f"--local=/{domain}/" for domain in self.local_domains]
        for record in self.records:
            argv += record.dnsmasq_options(self.ttl)
        return argv

    def prepare(self) -> None:
        self._probe_timeout = 0.02

    def ready(self) -> bool:
        domain = self.local_domains[0] if self.local_domains else "test"
        query = dns.message.make_query(f"harness-ready-probe.{domain}", "A")
        timeout = self._probe_timeout
        self._probe_timeout = min(timeout * 2, 0.5)
        try:
            dns.query.udp(query, self.endpoint.host, port=self.endpoint.port, timeout=timeout)
        except (dns.exception.Timeout, OSError):
            return False
        return True

    def resolver(self, *, lifetime: float = 2.0) -> dns.resolver.Resolver:
        return make_resolver(self.endpoint, lifetime=lifetime)


class SilentDns:
    """A UDP socket bound on ``endpoint`` that never answers: every query times out.

    Nothing reads it; datagrams queue in (and overflow from) the kernel buffer, which looks
    the same to the sender. Usable without an event loop; ``with SilentDns(...)`` or
    :meth:`start`/:meth:`stop`.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._socket: socket.socket | None = None

    def start(self) -> None:
        if self._socket is not None:
            raise HarnessError("SilentDns already started")
        sock = socket.socket(self.endpoint.family, socket.SOCK_DGRAM)
        try:
            sock.bind(self.endpoint.as_tuple())
        except OSError:
            sock.close()
            raise
        self._socket = sock

    def stop(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass
class RcodeDns:
    """A UDP DNS server (in a thread) answering every query with ``rcode`` and no records.

    ``queries`` lists ``(name, type)`` of what it was asked. Typical use: SERVFAIL behind a
    dnsmasq :class:`ForwardZone`, or asked directly.
    """

    endpoint: Endpoint
    rcode: dns.rcode.Rcode = dns.rcode.SERVFAIL
    queries: list[tuple[str, str]] = field(default_factory=list)
    _socket: socket.socket | None = field(default=None, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _wake: tuple[socket.socket, socket.socket] | None = field(default=None, init=False, repr=False)

    def start(self) -> None:
        if self._socket is not None:
            raise HarnessError("RcodeDns already started")
        sock = socket.socket(self.endpoint.family, socket.SOCK_DGRAM)
        try:
            sock.bind(self.endpoint.as_tuple())
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self._wake = socket.socketpair()
        self._thread = threading.Thread(
            target=self._serve, args=(sock, self._wake[1]), name=f"RcodeDns {self.endpoint}"
        )
        self._thread.daemon = True
        self._thread.start()

    def _serve(self, sock: socket.socket, wake: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if wake in ready:
                    return
                try:
                    wire, peer = sock.recvfrom(65535)
                except OSError:
                    continue
                try:
                    query = dns.message.from_wire(wire)
                except dns.exception.DNSException:
                    continue
                question = query.question[0] if query.question else None
                if question is not None:
                    self.queries.append(
                        (question.name.to_text(), dns.rdatatype.to_text(question.rdtype))
                    )
                response = dns.message.make_response(query)
                response.set_rcode(self.rcode)
                with contextlib.suppress(OSError):
                    sock.sendto(response.to_wire(), peer)

    def stop(self) -> None:
        if self._wake is not None:
            self._wake[0].send(b"x")
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for sock in (self._socket, *(self._wake or ())):
            if sock is not None:
                sock.close()
        self._socket = None
        self._wake = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
