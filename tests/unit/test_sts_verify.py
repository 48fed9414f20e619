"""MTA-STS "testing" mode's certificate check (sidecar/mxtls/sts_verify.py): the chain an MX
sent, checked as "enforce" would (chains to the trust store, names the MX host), without
sockets: certificates from trustme."""

from __future__ import annotations

import datetime

import trustme
from cryptography import x509
from cryptography.x509.verification import Store

from sidecar.mxtls.sts_verify import check_chain, enforce_verdict


def chain_of(cert: trustme.LeafCert) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(blob.bytes()) for blob in cert.cert_chain_pems]


def anchors(ca: trustme.CA) -> Store:
    return Store([x509.load_pem_x509_certificate(ca.cert_pem.bytes())])


def test_a_valid_chain_passes_also_with_an_intermediate() -> None:
    ca = trustme.CA()
    assert (
        check_chain(chain_of(ca.issue_cert("mx.example.test")), "mx.example.test", anchors(ca))
        is None
    )
    intermediate = ca.create_child_ca()
    leaf = intermediate.issue_cert("mx.example.test")
    assert len(chain_of(leaf)) == 2
    assert check_chain(chain_of(leaf), "mx.example.test", anchors(ca)) is None


def test_the_failures_have_their_rfc_8460_result_types() -> None:
    ca, other = trustme.CA(), trustme.CA()
    chain = chain_of(ca.issue_cert("mx.example.test"))
    result, why = check_chain(chain, "mx2.example.test", anchors(ca)) or ("", "")
    assert result == "certificate-host-mismatch" and "mx2.example.test" in why
    assert (check_chain(chain, "mx.example.test", anchors(other)) or ("",))[0] == (
        "certificate-not-trusted"
    )
    past = datetime.datetime(2001, 1, 1, tzinfo=datetime.UTC)
    expired = chain_of(ca.issue_cert("mx.example.test", not_after=past))
    assert (check_chain(expired, "mx.example.test", anchors(ca)) or ("",))[0] in (
        "certificate-expired",
        "certificate-not-trusted",
    )
    assert check_chain([], "mx.example.test", anchors(ca)) == (
        "certificate-not-trusted",
        "the MX sent no certificate",
    )


def test_no_tls_is_starttls_not_supported() -> None:
    assert enforce_verdict(None, None, "mx.example.test", None) == (
        "starttls-not-supported",
        "STARTTLS not offered",
    )
    assert enforce_verdict(None, "TLS handshake failed: x", "mx", None) == (
        "starttls-not-supported",
        "TLS handshake failed: x",
    )
