"""A DNSSEC world for end-to-end tests and benchmarks: zones signed here with ``ldns-signzone``
(Debian's ldnsutils), served by a real authoritative ``nsd``, and a real validating
``unbound`` that trusts the signed zones' keys (a ``trust-anchor`` per signed zone) and reaches
nsd through ``stub-zone``\\ s. No root look-ups: every zone of the world is a stub of unbound.

* A zone signed with its key and anchored in unbound is *secure*: unbound sets the AD bit.
* An unsigned zone (``signed=False``) is *insecure*: no anchor covers it, answers come
  without AD (RFC 4035 section 4.3).
* :attr:`SignedZone.bogus` names RRsets (owner, type) whose RRSIG is corrupted after signing:
  unbound answers SERVFAIL for them (RFC 4035 section 5.5), whatever else the zone holds.

The system services of nsd and unbound stay stopped (scripts/lib.sh); each test runs its own
pair on its own loopback address and ports (:mod:`testkit.net`).
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode

from .net import Endpoint
from .process import HarnessError, ManagedProcess

__all__ = ["Nsd", "Record", "SignedZone", "Unbound", "sign_zone", "tlsa_digest"]


@dataclass(frozen=True)
class Record:
    """One resource record in presentation format: ``owner`` relative to the zone (``@`` for
    the apex) or absolute (with a final dot), its type and its data."""

    owner: str
    rtype: str
    data: str
    ttl: int = 60

    def line(self) -> str:
        return f"{self.owner}\t{self.ttl}\tIN\t{self.rtype}\t{self.data}"


@dataclass
class SignedZone:
    """A zone for :class:`Nsd` (``signed``: with a key made here, the DS of which is
    :attr:`ds`, once :func:`sign_zone` ran). ``bogus``: (owner, type) pairs, owners relative
    like :class:`Record`'s, whose signature is spoilt after signing."""

    name: str
    records: Sequence[Record]
    signed: bool = True
    bogus: Sequence[tuple[str, str]] = ()
    ds: str = ""  # "<name>. IN DS ..." once signed
    path: Path | None = None  # the zone file nsd serves
    extra: list[str] = field(default_factory=list)

    def fqdn(self, owner: str) -> str:
        if owner == "@":
            return f"{self.name}."
        return owner if owner.endswith(".") else f"{owner}.{self.name}."


def tlsa_digest(der: bytes) -> str:
    """Hex SHA-256 of ``der`` (matching type 1's data for a certificate or an SPKI)."""
    import hashlib

    return hashlib.sha256(der).hexdigest()


def _run(argv: list[str], cwd: Path) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr}")
    return done.stdout


def _spoil(signature: str) -> str:
    """The base64 ``signature`` with its bytes changed (still valid base64)."""
    raw = bytearray(base64.b64decode(signature))
    raw[len(raw) // 2] ^= 0xFF
    raw[-1] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def sign_zone(zone: SignedZone, workdir: Path, nameserver: str) -> Path:
    """Write ``zone`` (SOA and NS ``ns.<zone>`` at ``nameserver`` added), sign it when
    ``zone.signed`` (ECDSA P-256, one key as KSK and ZSK), spoil the RRSIGs of
    ``zone.bogus``; the path of the zone file to serve."""
    workdir.mkdir(parents=True, exist_ok=True)
    apex = f"{zone.name}."
    lines = [
        f"$ORIGIN {apex}",
        "$TTL 60",
        f"@\t60\tIN\tSOA\tns.{apex} hostmaster.{apex} 1 3600 600 86400 60",
        f"@\t60\tIN\tNS\tns.{apex}",
        f"ns\t60\tIN\tA\t{nameserver}",
        *(record.line() for record in zone.records),
    ]
    source = workdir / f"{zone.name}.zone"
    source.write_text("\n".join(lines) + "\n", encoding="ascii")
    zone.path = source
    if not zone.signed:
        return source
    key = _run(["ldns-keygen", "-a", "ECDSAP256SHA256", "-k", zone.name], workdir).strip()
    zone.ds = (workdir / f"{key}.ds").read_text(encoding="ascii").strip()
    signed = workdir / f"{zone.name}.zone.signed"
    _run(["ldns-signzone", "-o", apex, "-f", str(signed), str(source), key], workdir)
    if zone.bogus:
        spoilt = {(zone.fqdn(owner).lower(), rtype.upper()) for owner, rtype in zone.bogus}
        out = []
        found: set[tuple[str, str]] = set()
        for line in signed.read_text(encoding="ascii").splitlines():
            parts = line.split()
            if len(parts) > 5 and parts[3] == "RRSIG" and (parts[0].lower(), parts[4]) in spoilt:
                found.add((parts[0].lower(), parts[4]))
                parts[-1] = _spoil(parts[-1])
                line = "\t".join(parts)
            out.append(line)
        missing = spoilt - found
        if missing:
            raise HarnessError(f"no RRSIG to spoil for {sorted(missing)} in {zone.name}")
        signed.write_text("\n".join(out) + "\n", encoding="ascii")
    zone.path = signed
    return signed


def _ask(endpoint: Endpoint, name: str, rtype: str = "SOA") -> dns.message.Message | None:
    query = dns.message.make_query(name, rtype)
    try:
        return dns.query.udp(query, endpoint.host, port=endpoint.port, timeout=0.3)
    except Exception:
        return None


class Nsd(ManagedProcess):
    """``nsd`` in the foreground on ``listen`` (UDP and TCP), serving ``zones``."""

    name = "nsd"

    def __init__(self, workdir: Path, listen: Endpoint, zones: Sequence[SignedZone]) -> None:
        super().__init__(workdir)
        self.endpoint = listen
        self.zones = list(zones)
        self.config_path = workdir / "nsd.conf"

    def prepare(self) -> None:
        for zone in self.zones:
            if zone.path is None:
                sign_zone(zone, self.workdir / "zones", self.endpoint.host)
        zones = "".join(
            f'zone:\n    name: "{zone.name}"\n    zonefile: "{zone.path}"\n' for zone in self.zones
        )
        self.config_path.write_text(
            "server:\n"
            f"    ip-address: {self.endpoint.host}@{self.endpoint.port}\n"
            f"    port: {self.endpoint.port}\n"
            '    username: ""\n'
            '    chroot: ""\n'
            f'    zonesdir: "{self.workdir}"\n'
            '    database: ""\n'
            f'    zonelistfile: "{self.workdir}/zone.list"\n'
            f'    xfrdfile: "{self.workdir}/xfrd.state"\n'
            f'    xfrdir: "{self.workdir}"\n'
            f'    pidfile: "{self.workdir}/nsd.pid"\n'
            f'    logfile: "{self.workdir}/nsd.log"\n'
            "    server-count: 1\n"
            "    verbosity: 1\n"
            "remote-control:\n"
            "    control-enable: no\n"
            f"{zones}",
            encoding="ascii",
        )

    def argv(self) -> list[str]:
        return ["nsd", "-d", "-c", str(self.config_path)]

    def ready(self) -> bool:
        return all(
            (answer := _ask(self.endpoint, f"{zone.name}.")) is not None and answer.answer
            for zone in self.zones
        )


class Unbound(ManagedProcess):
    """A validating ``unbound`` in the foreground on ``listen``: a ``trust-anchor`` for each
    signed zone of ``nsd``, a ``stub-zone`` to ``nsd`` for every zone, nothing else."""

    name = "unbound"

    def __init__(self, workdir: Path, listen: Endpoint, nsd: Nsd) -> None:
        super().__init__(workdir)
        self.endpoint = listen
        self.nsd = nsd
        self.config_path = workdir / "unbound.conf"

    def prepare(self) -> None:
        anchors = "".join(
            f'    trust-anchor: "{zone.ds}"\n' for zone in self.nsd.zones if zone.signed
        )
        ns = self.nsd.endpoint
        stubs = "".join(
            f'stub-zone:\n    name: "{zone.name}"\n    stub-addr: {ns.host}@{ns.port}\n'
            for zone in self.nsd.zones
        )
        self.config_path.write_text(
            "server:\n"
            f"    interface: {self.endpoint.host}@{self.endpoint.port}\n"
            f"    port: {self.endpoint.port}\n"
            "    access-control: 127.0.0.0/8 allow\n"
            '    username: ""\n'
            '    chroot: ""\n'
            f'    directory: "{self.workdir}"\n'
            '    pidfile: ""\n'
            "    use-syslog: no\n"
            '    logfile: ""\n'
            "    verbosity: 1\n"
            "    num-threads: 1\n"
            "    do-not-query-localhost: no\n"
            "    do-ip6: no\n"
            "    harden-referral-path: no\n"
            "    qname-minimisation: no\n"
            "    val-log-level: 2\n"
            "    so-reuseport: no\n"
            # unbound serves RFC 6761's "test." (and others) as empty local zones by default.
            '    local-zone: "test." nodefault\n'
            '    local-zone: "invalid." nodefault\n'
            f"{anchors}"
            "remote-control:\n"
            "    control-enable: no\n"
            f"{stubs}",
            encoding="ascii",
        )

    def argv(self) -> list[str]:
        return ["unbound", "-d", "-p", "-c", str(self.config_path)]

    def ready(self) -> bool:
        zone = self.nsd.zones[0]
        query = dns.message.make_query(f"{zone.name}.", "SOA", want_dnssec=True)
        try:
            answer = dns.query.udp(query, self.endpoint.host, port=self.endpoint.port, timeout=0.3)
        except Exception:
            return False
        return answer.rcode() == dns.rcode.NOERROR and (
            not zone.signed or bool(answer.flags & dns.flags.AD)
        )
