"""The upstream's STARTTLS step records the outcome of each TLS session attempt for TLS-RPT
(RFC 8460): a scripted MX on trio memory streams, TLS from trustme certificates."""

from __future__ import annotations

import contextlib
import ssl
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address

import pytest
import trio
import trio.testing
import trustme

from sidecar.config import DeliveryConfig, TlsPolicy
from sidecar.mxtls.outcome import TlsOutcome
from sidecar.routing import Candidate
from sidecar.tcp import deadline_stream
from sidecar.upstream import Upstream, _CandidateFailed, _start_tls

CANDIDATE = Candidate("mx.example.test", ip_address("192.0.2.25"), ip_address("192.0.2.1"))


class Recorder:
    def __init__(self) -> None:
        self.outcomes: list[TlsOutcome] = []

    def record(self, outcome: TlsOutcome) -> None:
        self.outcomes.append(outcome)


async def starttls(
    server_context: ssl.SSLContext | None,
    trusted: trustme.CA,
    policy: TlsPolicy = "verify",
    starttls_reply: bytes = b"220 2.0.0 go ahead\r\n",
) -> TlsOutcome:
    """One STARTTLS with a scripted MX (its certificate from ``server_context``), the
    sidecar trusting ``trusted``; the one outcome recorded."""
    client_context = ssl.create_default_context()
    trusted.configure_trust(client_context)
    ours, theirs = trio.testing.memory_stream_pair()
    recorder = Recorder()
    upstream = Upstream(
        deadline_stream(ours),
        CANDIDATE,
        None,
        DeliveryConfig(tls_verify_context=client_context, mx_command_timeout=5),
        tls_policy=policy,
        reporter=recorder,
        policy_domain="example.test",
    )

    async def line(stream: trio.abc.Stream) -> bytes:
        data = b""
        while b"\r\n" not in data:
            more = await stream.receive_some(1000)
            if not more:
                break
            data += more
        return data

    async def mx() -> None:
        assert await line(theirs) == b"STARTTLS\r\n"
        await theirs.send_all(starttls_reply)
        if not starttls_reply.startswith(b"220") or server_context is None:
            return
        tls = trio.SSLStream(theirs, server_context, server_side=True)
        with contextlib.suppress(trio.BrokenResourceError):
            await tls.do_handshake()
            if await line(tls):
                await tls.send_all(b"250 mx.example.test\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mx)
        with contextlib.suppress(_CandidateFailed):
            await _start_tls(upstream, "sidecar.test", trio.current_time() + 10)
        await trio.aclose_forcefully(ours)
    (recorded,) = recorder.outcomes
    assert (recorded.policy_domain, recorded.policy_type) == ("example.test", "no-policy-found")
    assert (recorded.mx_host, recorded.receiving_ip) == ("mx.example.test", "192.0.2.25")
    assert recorded.sending_ip == "192.0.2.1"
    return recorded


def server_context(
    ca: trustme.CA, name: str = "mx.example.test", **cert: datetime
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name, **cert).configure_cert(context)
    return context


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_an_established_session_is_a_success(ca: trustme.CA) -> None:
    recorded = await starttls(server_context(ca), ca)
    assert recorded.result is None


async def test_an_opportunistic_session_is_a_success_too(ca: trustme.CA) -> None:
    recorded = await starttls(server_context(trustme.CA()), ca, policy="opportunistic")
    assert recorded.result is None


async def test_a_certificate_of_another_ca_is_not_trusted(ca: trustme.CA) -> None:
    recorded = await starttls(server_context(trustme.CA()), ca)
    assert recorded.result == "certificate-not-trusted"
    assert recorded.detail == "unable to get local issuer certificate"


async def test_a_certificate_for_another_name_is_a_host_mismatch(ca: trustme.CA) -> None:
    recorded = await starttls(server_context(ca, "elsewhere.test"), ca)
    assert recorded.result == "certificate-host-mismatch"
    assert "mx.example.test" in recorded.detail


async def test_an_expired_certificate_is_expired(ca: trustme.CA) -> None:
    now = datetime.now(UTC)
    old = server_context(ca, not_before=now - timedelta(days=30), not_after=now - timedelta(days=1))
    recorded = await starttls(old, ca)
    assert recorded.result == "certificate-expired"


async def test_a_refused_starttls_is_starttls_not_supported(ca: trustme.CA) -> None:
    recorded = await starttls(None, ca, starttls_reply=b"454 4.7.0 TLS not available\r\n")
    assert recorded.result == "starttls-not-supported"
    assert recorded.detail == "STARTTLS refused: 454 4.7.0 TLS not available"


async def sni_under_dane(
    ca: trustme.CA, tlsa_base: str
) -> tuple[list[str | None], list[TlsOutcome]]:
    """STARTTLS to a scripted MX (certificate for mail.hoster.test) under a DANE-EE record
    of that certificate found under ``_25._tcp.<tlsa_base>``: the SNI names the MX saw, and
    the outcomes recorded."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from sidecar.mxtls.dane import DanePolicy, TlsaRecord

    leaf = ca.issue_cert("mail.hoster.test")
    certificate = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    spki = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    record = TlsaRecord(3, 1, 1, hashlib.sha256(spki).digest())
    names = ["mx.example.test", tlsa_base]
    dane = DanePolicy.from_records("mx.example.test", [record], names, f"_25._tcp.{tlsa_base}")
    seen: list[str | None] = []

    def sni(_obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        seen.append(name)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    context.sni_callback = sni  # type: ignore[assignment]
    ours, theirs = trio.testing.memory_stream_pair()
    recorder = Recorder()
    upstream = Upstream(
        deadline_stream(ours),
        Candidate(CANDIDATE.mx, CANDIDATE.address, CANDIDATE.source, dane),
        None,
        DeliveryConfig(mx_command_timeout=5),
        tls_policy="required",
        policy_label="dane",
        dane=dane,
        reporter=recorder,
        policy_domain="example.test",
    )

    async def line(stream: trio.abc.Stream) -> None:
        data = b""
        while b"\r\n" not in data:
            data += await stream.receive_some(1000)

    async def mx() -> None:
        await line(theirs)
        await theirs.send_all(b"220 2.0.0 go ahead\r\n")
        tls = trio.SSLStream(theirs, context, server_side=True)
        with contextlib.suppress(trio.BrokenResourceError):
            await tls.do_handshake()
            await line(tls)
            await tls.send_all(b"250 mail.hoster.test\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mx)
        await _start_tls(upstream, "sidecar.test", trio.current_time() + 10)
        await trio.aclose_forcefully(ours)
    return seen, recorder.outcomes


@pytest.mark.parametrize("tlsa_base", ["mail.hoster.test", "mx.example.test"])
async def test_under_dane_the_sni_is_the_tlsa_base_domain(ca: trustme.CA, tlsa_base: str) -> None:
    """RFC 7672 section 8.1: under DANE the client sends SNI with the TLSA base domain: the
    CNAME-expanded name of the MX host when its TLSA records were found there (a hoster's
    server picks the certificate its TLSA records describe by that name), else the MX name."""
    seen, outcomes = await sni_under_dane(ca, tlsa_base)
    assert seen == [tlsa_base]
    assert [o.result for o in outcomes] == [None]  # DANE-EE matched
