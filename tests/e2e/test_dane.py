"""DANE for SMTP (RFC 7672) end to end: a zone signed here (ldns-signzone), served by a real
nsd, resolved by a real validating unbound that has the zone's trust anchor (the sidecar's
``dns.nameservers``), TestMX servers with trustme certificates on loopback, through HAProxy.

``dane.test`` is signed (secure); ``insecure.test`` is not (no trust anchor covers it);
RRsets named in ``bogus`` get a spoilt signature (unbound answers SERVFAIL)."""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sidecar.explain import explain_route
from sidecar.smtp.commands import parse_rcpt_to

from .harness import (
    FAST_DELIVERY,
    FAST_SERVER,
    MESSAGE,
    DnssecFactory,
    Endpoint,
    Lab,
    Record,
    SendResult,
    SignedZone,
    TestMX,
    final_status,
    free_port,
    refusal,
    send,
)


@dataclass
class Host:
    """One MX host of the test zone: its TestMX, its name, its certificate chain (DER)."""

    name: str
    mx: TestMX
    chain: list[bytes]

    @property
    def spki_sha256(self) -> str:
        key = x509.load_der_x509_certificate(self.chain[0]).public_key()
        spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(spki).hexdigest()

    def issuer_spki_sha256(self) -> str:
        key = x509.load_der_x509_certificate(self.chain[1]).public_key()
        spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(spki).hexdigest()

    @property
    def mail_commands(self) -> list[bytes]:
        return [c for conn in self.mx.connections for c in conn.commands if c.startswith(b"MAIL")]


class DaneWorld:
    """MX hosts (``mxN.dane.test``), the zones, nsd + unbound, HAProxy and the sidecar."""

    def __init__(self, lab: Lab, dnssec: DnssecFactory) -> None:
        self.lab = lab
        self.dnssec = dnssec
        self.hosts: list[Host] = []
        self.port = 0

    async def mxes(self, *certificates: trustme.LeafCert | None) -> list[Host]:
        """One TestMX per entry: with STARTTLS and that certificate, or without STARTTLS."""
        addresses = [self.lab.addresses.ipv4() for _ in certificates]
        self.port = free_port(addresses[0])
        for index, (address, leaf) in enumerate(zip(addresses, certificates, strict=True)):
            options: dict[str, Any] = {}
            chain: list[bytes] = []
            if leaf is not None:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                leaf.configure_cert(context)
                options["tls_context"] = context
                chain = [
                    x509.load_pem_x509_certificate(b.bytes()).public_bytes(Encoding.DER)
                    for b in leaf.cert_chain_pems
                ]
            mx = await self.lab.mx(Endpoint(address, self.port), **options)
            self.hosts.append(Host(f"mx{index}.dane.test", mx, chain))
        return self.hosts

    def tlsa(self, host: Host) -> str:
        """The owner of ``host``'s TLSA records in dane.test (delivery port)."""
        return f"_{self.port}._tcp.{host.name.removesuffix('.dane.test')}"

    async def start(
        self,
        records: Sequence[Record],
        *,
        insecure: Sequence[Record] = (),
        bogus: Sequence[tuple[str, str]] = (),
        delivery: dict[str, Any] | None = None,
    ) -> Endpoint:
        """Serve ``records`` (dane.test, signed, with an A record per MX host) and
        ``insecure`` (insecure.test, unsigned); start the sidecar with DANE on."""
        addresses = [
            Record(host.name.removesuffix(".dane.test"), "A", host.mx.endpoint.host)
            for host in self.hosts
        ]
        zones = [SignedZone("dane.test", [*addresses, *records], bogus=bogus)]
        zones.append(SignedZone("insecure.test", list(insecure), signed=False))
        unbound = self.dnssec(zones)
        stack = await self.lab.build(
            mx_at=[host.mx.endpoint for host in self.hosts],
            hosts=[host.name for host in self.hosts],
            nameserver=unbound.endpoint,
            server=FAST_SERVER,
            delivery={**FAST_DELIVERY, "dane": True, "tls": "opportunistic", **(delivery or {})},
        )
        return stack.endpoint


@pytest.fixture
def world(lab: Lab, dnssec_factory: DnssecFactory) -> DaneWorld:
    return DaneWorld(lab, dnssec_factory)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def _one(endpoint: Endpoint, domain: str) -> SendResult:
    return await send(endpoint, "a@client.test", [f"rcpt@{domain}"], MESSAGE)


def _transaction_fields(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        r.fields  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "sidecar.transaction"
    ]


def _refusal_text(result: SendResult, domain: str) -> str:
    return result.refused[f"rcpt@{domain}"][1].decode()


async def test_dane_ee_match_delivers_and_mismatch_skips_the_mx(
    caplog: pytest.LogCaptureFixture, world: DaneWorld, ca: trustme.CA
) -> None:
    """3 1 1 records: the leaf's key matches (its names do not matter: RFC 7672 3.1.1), or it
    does not and that MX is skipped; with no MX left, 451 4.7.5 naming DANE."""
    good, bad, backup = await world.mxes(
        ca.issue_cert("unrelated.example"), ca.issue_cert("mx1.dane.test"), ca.issue_cert("x")
    )
    wrong = "00" * 32
    endpoint = await world.start(
        [
            Record("ee", "MX", f"10 {good.name}."),
            Record("bad", "MX", f"10 {bad.name}."),
            Record("failover", "MX", f"10 {bad.name}."),
            Record("failover", "MX", f"20 {backup.name}."),
            Record(world.tlsa(good), "TLSA", f"3 1 1 {good.spki_sha256}"),
            Record(world.tlsa(bad), "TLSA", f"3 1 1 {wrong}"),
            Record(world.tlsa(backup), "TLSA", f"3 1 1 {backup.spki_sha256}"),
        ]
    )
    with caplog.at_level(logging.INFO, logger="sidecar.transaction"):
        result = await _one(endpoint, "ee.dane.test")
    assert final_status(result) == (250, "2.0.0")
    (message,) = good.mx.messages
    assert message.tls
    (fields,) = _transaction_fields(caplog)
    assert fields["tls_policy"] == "dane" and fields["tls"].startswith("TLSv1.")

    result = await _one(endpoint, "bad.dane.test")
    assert refusal(result, "rcpt@bad.dane.test") == (451, "4.7.5")
    text = _refusal_text(result, "bad.dane.test")
    assert "DANE: certificate does not match TLSA" in text, text
    assert bad.mx.messages == [] and bad.mail_commands == []
    assert any(conn.tls for conn in bad.mx.connections)  # the handshake happened, then no mail

    # The failing MX is skipped for the next one, which matches its own records.
    assert final_status(await _one(endpoint, "failover.dane.test")) == (250, "2.0.0")
    assert len(backup.mx.messages) == 1 and bad.mail_commands == []


async def test_dane_ta_with_a_private_ca(world: DaneWorld, ca: trustme.CA) -> None:
    """2 1 1: the issuing CA's key (sent in the chain) is the trust anchor; the leaf must
    chain to it and name the MX host (RFC 7672 3.2.3)."""
    intermediate = ca.create_child_ca()
    named, misnamed = await world.mxes(
        intermediate.issue_cert("mx0.dane.test"), intermediate.issue_cert("elsewhere.example")
    )
    anchor = named.issuer_spki_sha256()
    endpoint = await world.start(
        [
            Record("ta", "MX", f"10 {named.name}."),
            Record("misnamed", "MX", f"10 {misnamed.name}."),
            Record(world.tlsa(named), "TLSA", f"2 1 1 {anchor}"),
            Record(world.tlsa(misnamed), "TLSA", f"2 1 1 {anchor}"),
        ]
    )
    assert final_status(await _one(endpoint, "ta.dane.test")) == (250, "2.0.0")
    assert named.mx.messages[0].tls
    result = await _one(endpoint, "misnamed.dane.test")
    assert refusal(result, "rcpt@misnamed.dane.test") == (451, "4.7.5")
    text = _refusal_text(result, "misnamed.dane.test")
    assert "DANE: certificate chain does not verify to the TLSA trust anchor" in text, text
    assert "does not name mx1.dane.test" in text, text
    assert misnamed.mail_commands == []


async def test_insecure_mx_rrset_is_delivered_as_before(
    caplog: pytest.LogCaptureFixture, world: DaneWorld, ca: trustme.CA
) -> None:
    """RFC 7672 2.2.1: the MX RRset of insecure.test is not signed, so DANE does not apply,
    even though the (secure) MX host has TLSA records that would not match."""
    (host,) = await world.mxes(ca.issue_cert("mx0.dane.test"))
    endpoint = await world.start(
        [Record(world.tlsa(host), "TLSA", f"3 1 1 {'00' * 32}")],
        insecure=[Record("@", "MX", f"10 {host.name}.")],
    )
    with caplog.at_level(logging.INFO, logger="sidecar.transaction"):
        result = await _one(endpoint, "insecure.test")
    assert final_status(result) == (250, "2.0.0")
    assert host.mx.messages[0].tls  # opportunistic TLS, as configured
    (fields,) = _transaction_fields(caplog)
    assert fields["tls_policy"] == "opportunistic"


async def test_bogus_mx_signature_is_4xx_and_nothing_is_sent(
    world: DaneWorld, ca: trustme.CA
) -> None:
    (host,) = await world.mxes(ca.issue_cert("mx0.dane.test"))
    endpoint = await world.start(
        [
            Record("bogus", "MX", f"10 {host.name}."),
            Record(world.tlsa(host), "TLSA", f"3 1 1 {host.spki_sha256}"),
        ],
        bogus=[("bogus", "MX")],
    )
    result = await _one(endpoint, "bogus.dane.test")
    code, enhanced = refusal(result, "rcpt@bogus.dane.test")
    assert (code, enhanced) == (451, "4.4.3"), result
    assert "SERVFAIL" in _refusal_text(result, "bogus.dane.test")
    assert host.mx.connections == []


async def test_tlsa_lookup_failure_skips_the_mx_and_never_sends_in_the_clear(
    world: DaneWorld, ca: trustme.CA
) -> None:
    """RFC 7672 2.2: the TLSA RRset of a secure MX host is bogus (SERVFAIL): that host is
    not used at all; the domain's other MX still is; none left: 451 4.7.5."""
    broken, other = await world.mxes(ca.issue_cert("mx0.dane.test"), ca.issue_cert("mx1"))
    endpoint = await world.start(
        [
            Record("tlsafail", "MX", f"10 {broken.name}."),
            Record("partly", "MX", f"10 {broken.name}."),
            Record("partly", "MX", f"20 {other.name}."),
            Record(world.tlsa(broken), "TLSA", f"3 1 1 {broken.spki_sha256}"),
        ],
        bogus=[(world.tlsa(broken), "TLSA")],
    )
    result = await _one(endpoint, "tlsafail.dane.test")
    assert refusal(result, "rcpt@tlsafail.dane.test") == (451, "4.7.5")
    text = _refusal_text(result, "tlsafail.dane.test")
    assert f"DANE: TLSA lookup for {world.tlsa(broken)}.dane.test failed" in text, text
    assert final_status(await _one(endpoint, "partly.dane.test")) == (250, "2.0.0")
    assert len(other.mx.messages) == 1
    assert broken.mx.connections == []


async def test_only_unusable_tlsa_records_mean_mandatory_unauthenticated_tls(
    caplog: pytest.LogCaptureFixture, world: DaneWorld, ca: trustme.CA
) -> None:
    """RFC 7672 3.1.3: PKIX-EE(1) records are unusable; the MX is still not sent mail in the
    clear: STARTTLS is required, the certificate not checked."""
    encrypting, plaintext = await world.mxes(ca.issue_cert("whatever.example"), None)
    unusable = f"1 1 1 {'00' * 32}"
    endpoint = await world.start(
        [
            Record("pkix", "MX", f"10 {encrypting.name}."),
            Record("pkixplain", "MX", f"10 {plaintext.name}."),
            Record(world.tlsa(encrypting), "TLSA", unusable),
            Record(world.tlsa(plaintext), "TLSA", unusable),
        ]
    )
    with caplog.at_level(logging.INFO, logger="sidecar.transaction"):
        assert final_status(await _one(endpoint, "pkix.dane.test")) == (250, "2.0.0")
    assert encrypting.mx.messages[0].tls
    (fields,) = _transaction_fields(caplog)
    assert fields["tls_policy"] == "required"
    result = await _one(endpoint, "pkixplain.dane.test")
    assert refusal(result, "rcpt@pkixplain.dane.test") == (451, "4.7.4")
    assert plaintext.mail_commands == []


async def test_a_dane_mx_without_starttls_gets_no_mail(world: DaneWorld) -> None:
    (host,) = await world.mxes(None)
    endpoint = await world.start(
        [
            Record("nostarttls", "MX", f"10 {host.name}."),
            Record(world.tlsa(host), "TLSA", f"3 1 1 {'ab' * 32}"),
        ]
    )
    result = await _one(endpoint, "nostarttls.dane.test")
    assert refusal(result, "rcpt@nostarttls.dane.test") == (451, "4.7.4")
    text = _refusal_text(result, "nostarttls.dane.test")
    assert "STARTTLS not offered and the TLS policy is DANE" in text, text
    assert host.mx.connections and host.mail_commands == []


async def test_route_shows_the_tls_policy_of_each_mx(world: DaneWorld, ca: trustme.CA) -> None:
    """``sidecar route`` (explain_route) against the real validating resolver: the DANE host
    with its usable TLSA record, the other MX host and why DANE does not apply to it, and an
    insecure domain."""
    secure, plain = await world.mxes(ca.issue_cert("mx0.dane.test"), ca.issue_cert("mx1"))
    endpoint = await world.start(
        [
            Record("route", "MX", f"10 {secure.name}."),
            Record("route", "MX", f"20 {plain.name}."),
            Record(world.tlsa(secure), "TLSA", f"3 1 1 {secure.spki_sha256}"),
        ],
        insecure=[Record("@", "MX", f"10 {secure.name}.")],
    )
    del endpoint
    config = world.lab.sidecar.running[0].config
    listener = config.listeners[0]
    lines, ok = await explain_route(
        config, listener, parse_rcpt_to("TO:<a@route.dane.test>").recipient
    )
    assert ok, lines
    text = "\n".join(lines)
    assert (
        "tls policy per MX (DANE is on for route.dane.test; its MX RRset is DNSSEC-secure):" in text
    )
    assert f"  {secure.name}: dane (TLSA {world.tlsa(secure)}.dane.test: DANE-EE 1 1 " in text
    assert f"  {plain.name}: opportunistic (no DANE: no secure TLSA records)" in text
    lines, ok = await explain_route(
        config, listener, parse_rcpt_to("TO:<a@insecure.test>").recipient
    )
    assert "its MX RRset is NOT DNSSEC-secure: DANE does not apply" in "\n".join(lines), lines


async def test_a_cached_connection_is_reused_only_under_the_same_policy(
    world: DaneWorld, ca: trustme.CA
) -> None:
    """Two domains with the same MX host (one site): mail to the DANE one and to the
    insecure one (no DANE: its MX RRset is not signed) never share a connection; mail to
    the DANE domain again reuses the DANE-checked one."""
    (host,) = await world.mxes(ca.issue_cert("mx0.dane.test"))
    endpoint = await world.start(
        [
            Record("cached", "MX", f"10 {host.name}."),
            Record(world.tlsa(host), "TLSA", f"3 1 1 {host.spki_sha256}"),
        ],
        insecure=[Record("@", "MX", f"10 {host.name}.")],
        delivery={"connection_cache": True, "connection_cache_idle": 30},
    )
    for domain in ("cached.dane.test", "insecure.test", "cached.dane.test", "insecure.test"):
        assert final_status(await _one(endpoint, domain)) == (250, "2.0.0")
    assert len(host.mx.messages) == 4
    assert len(host.mx.connections) == 2  # one per policy, each used twice
    first, second = host.mx.connections
    assert [m.connection_index for m in host.mx.messages] == [
        first.index,
        second.index,
        first.index,
        second.index,
    ]
