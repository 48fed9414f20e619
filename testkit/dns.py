"""DNS for end-to-end tests: dnsmasq serving a small ``.test`` zone (this module) and the one
scripted stub server, :class:`~.dns_stub.StubDns` (silent, fixed rcode, zone, garbage...).

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
  :class:`ForwardZone` pointing at a stub answering SERVFAIL (``dns_stub.rcode``); dnsmasq
  passes that rcode through.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import dns.exception
import dns.message
import dns.query
import dns.resolver

from .net import Endpoint
from .process import ManagedProcess

__all__ = [
    "DnsRecord",
    "Dnsmasq",
    "ForwardZone",
    "HostRecord",
    "MXRecord",
    "NullMXRecord",
    "RawRecord",
    "RefusedZone",
    "TxtRecord",
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
class TxtRecord:
    """A TXT record of one or more strings (each at most 255 bytes; a single ``str`` is one
    string), given to dnsmasq as wire-format RDATA: ``--txt-record`` would split a text at
    its commas."""

    name: str
    strings: tuple[str, ...] | str

    def dnsmasq_options(self, ttl: int) -> list[str]:
        rdata = b"".join(
            len(data).to_bytes(1, "big") + data for data in (s.encode() for s in self.texts)
        )
        return RawRecord(self.name, 16, rdata).dnsmasq_options(ttl)

    @property
    def texts(self) -> tuple[str, ...]:
        return (self.strings,) if isinstance(self.strings, str) else self.strings


@dataclass(frozen=True)
class ForwardZone:
    """Forward every query under ``domain`` to ``server`` (e.g. a silent or SERVFAIL stub)."""

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
