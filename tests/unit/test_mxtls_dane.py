"""sidecar.mxtls.dane: TLSA records (RFC 6698), which are usable for SMTP (RFC 7672 section
3.1) and matching a peer's chain (DANE-EE, DANE-TA), with certificates made by trustme."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ssl
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st

from sidecar.mxtls.dane import (
    DanePolicy,
    PeerChainUnavailable,
    TlsaError,
    TlsaRecord,
    match_chain,
    peer_chain,
)

UTC = datetime.UTC


def _der_chain(leaf: trustme.LeafCert) -> list[bytes]:
    return [
        x509.load_pem_x509_certificate(blob.bytes()).public_bytes(Encoding.DER)
        for blob in leaf.cert_chain_pems
    ]


def _spki(der: bytes) -> bytes:
    return (
        x509.load_der_x509_certificate(der)
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )


def _record(usage: int, selector: int, mtype: int, der: bytes) -> TlsaRecord:
    selected = der if selector == 0 else _spki(der)
    data = {0: selected, 1: hashlib.sha256(selected).digest(), 2: hashlib.sha512(selected).digest()}
    return TlsaRecord(usage, selector, mtype, data[mtype])


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def intermediate(ca: trustme.CA) -> trustme.CA:
    return ca.create_child_ca()


# ---- the record ----------------------------------------------------------------------------


def test_presentation_format_is_read() -> None:
    record = TlsaRecord.from_text("3 1 1 " + "AB" * 16 + " " + "cd" * 16)
    assert (record.usage, record.selector, record.mtype) == (3, 1, 1)
    assert record.data == bytes.fromhex("ab" * 16 + "cd" * 16)
    assert record.text == "3 1 1 " + "ab" * 16 + "cd" * 16
    assert record.usable


@pytest.mark.parametrize(
    "text",
    [
        "",
        "3 1 1",
        "3 1 x ab",
        "3 1 1 abc",
        "3 1 1 zz",
        "\u0663 1 1 ab",  # an Arabic-Indic 3: int() takes it, a TLSA record must not
        "256 1 1 ab",
        "-1 1 1 ab",
        "3 1 1 " + "a" * 40000,
    ],
)
def test_bad_presentation_format_is_a_tlsa_error(text: str) -> None:
    with pytest.raises(TlsaError):
        TlsaRecord.from_text(text)


@given(
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(min_size=1, max_size=128),
)
def test_presentation_format_round_trips(
    usage: int, selector: int, mtype: int, data: bytes
) -> None:
    record = TlsaRecord(usage, selector, mtype, data)
    assert TlsaRecord.from_text(record.text) == record


@given(st.text(max_size=200))
def test_any_text_is_a_record_or_a_tlsa_error(text: str) -> None:
    with contextlib.suppress(TlsaError):
        TlsaRecord.from_text(text)


@pytest.mark.parametrize(
    ("usage", "selector", "mtype", "size", "usable"),
    [
        (3, 1, 1, 32, True),
        (3, 0, 2, 64, True),
        (2, 1, 0, 91, True),
        (2, 0, 1, 32, True),
        (0, 1, 1, 32, False),  # PKIX-TA: unusable for SMTP (RFC 7672 3.1.3)
        (1, 1, 1, 32, False),  # PKIX-EE: likewise
        (4, 1, 1, 32, False),  # unknown usage
        (3, 2, 1, 32, False),  # unknown selector
        (3, 1, 3, 32, False),  # unknown matching type
        (3, 1, 1, 31, False),  # a SHA2-256 digest of the wrong length
        (3, 1, 2, 32, False),  # a SHA2-512 digest of the wrong length
    ],
)
def test_usable_records(usage: int, selector: int, mtype: int, size: int, usable: bool) -> None:
    assert TlsaRecord(usage, selector, mtype, b"\x01" * size).usable is usable


def test_policy_splits_usable_and_unusable_records() -> None:
    good, pkix = TlsaRecord(3, 1, 1, b"\x01" * 32), TlsaRecord(1, 1, 1, b"\x02" * 32)
    policy = DanePolicy.from_records("MX.Example.", [good, pkix], ["MX.example.", "mx.example"])
    assert policy.usable == (good,) and policy.unusable == (pkix,)
    assert policy.names == ("mx.example",)
    assert policy.authenticates
    only = DanePolicy.from_records("mx.example", [pkix])
    assert not only.authenticates and only.names == ("mx.example",)
    assert "encrypted, not authenticated" in only.describe()
    assert match_chain(only, [b"x"]).result_type == "tlsa-invalid"


# ---- DANE-EE(3) ----------------------------------------------------------------------------


@pytest.mark.parametrize(("selector", "mtype"), [(1, 1), (0, 1), (1, 0), (0, 2), (1, 2)])
def test_dane_ee_matches_the_leaf(ca: trustme.CA, selector: int, mtype: int) -> None:
    chain = _der_chain(ca.issue_cert("mx.example"))
    policy = DanePolicy.from_records("mx.example", [_record(3, selector, mtype, chain[0])])
    check = match_chain(policy, chain)
    assert check.ok, check


def test_dane_ee_ignores_names_and_expiry(ca: trustme.CA) -> None:
    """RFC 7672 3.1.1: neither the name nor the validity dates of a DANE-EE leaf matter."""
    expired = ca.issue_cert(
        "elsewhere.example",
        not_before=datetime.datetime(2001, 1, 1, tzinfo=UTC),
        not_after=datetime.datetime(2002, 1, 1, tzinfo=UTC),
    )
    chain = _der_chain(expired)
    policy = DanePolicy.from_records("mx.example", [_record(3, 1, 1, chain[0])])
    assert match_chain(policy, chain).ok


def test_dane_ee_mismatch_is_named(ca: trustme.CA) -> None:
    chain = _der_chain(ca.issue_cert("mx.example"))
    other = _der_chain(ca.issue_cert("mx.example"))
    policy = DanePolicy.from_records("mx.example", [_record(3, 1, 1, other[0])])
    check = match_chain(policy, chain)
    assert not check.ok
    assert check.problem == "certificate does not match TLSA"
    assert check.result_type == "validation-failure"


def test_an_empty_or_unreadable_chain_never_matches(ca: trustme.CA) -> None:
    chain = _der_chain(ca.issue_cert("mx.example"))
    policy = DanePolicy.from_records("mx.example", [_record(3, 1, 1, chain[0])])
    assert match_chain(policy, []).problem == "the MX sent no certificate"
    check = match_chain(policy, [b"not a certificate"])
    assert not check.ok and "cannot be read" in check.problem
    assert not match_chain(policy, [chain[0]] * 11).ok  # longer than MAX_CHAIN


# ---- DANE-TA(2) ----------------------------------------------------------------------------


def test_dane_ta_matches_an_issuer_in_the_chain(intermediate: trustme.CA) -> None:
    chain = _der_chain(intermediate.issue_cert("mx.example"))
    assert len(chain) == 2
    policy = DanePolicy.from_records("mx.example", [_record(2, 1, 1, chain[1])])
    check = match_chain(policy, chain)
    assert check.ok and check.matched.startswith("DANE-TA 1 1 "), check


def test_dane_ta_names_the_mx_host_or_its_cname_target(intermediate: trustme.CA) -> None:
    """RFC 7672 3.2.2: the reference identifiers are the MX host name and, after CNAME
    expansion, the name the TLSA records were found under; a wildcard matches one label."""
    chain = _der_chain(intermediate.issue_cert("*.hosting.example"))
    record = _record(2, 0, 1, chain[1])
    hosted = DanePolicy.from_records(
        "mx.customer.example", [record], ["mx.customer.example", "mail.hosting.example"]
    )
    assert match_chain(hosted, chain).ok
    wrong = DanePolicy.from_records("mx.customer.example", [record])
    check = match_chain(wrong, chain)
    assert not check.ok
    assert check.result_type == "certificate-host-mismatch"
    assert "does not name mx.customer.example" in check.problem


def test_dane_ta_leaf_must_be_valid_now(intermediate: trustme.CA) -> None:
    leaf = intermediate.issue_cert(
        "mx.example",
        not_before=datetime.datetime(2001, 1, 1, tzinfo=UTC),
        not_after=datetime.datetime(2002, 1, 1, tzinfo=UTC),
    )
    chain = _der_chain(leaf)
    policy = DanePolicy.from_records("mx.example", [_record(2, 1, 1, chain[1])])
    assert not match_chain(policy, chain).ok
    assert match_chain(policy, chain, datetime.datetime(2001, 6, 1, tzinfo=UTC)).ok


def test_dane_ta_needs_its_anchor_in_the_chain(ca: trustme.CA, intermediate: trustme.CA) -> None:
    """The root is not sent (trustme's chain stops at the intermediate): a TA record for the
    root does not match (RFC 7672 3.1.2: the server must send the TA certificate)."""
    chain = _der_chain(intermediate.issue_cert("mx.example"))
    root = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).public_bytes(Encoding.DER)
    policy = DanePolicy.from_records("mx.example", [_record(2, 1, 1, root)])
    assert match_chain(policy, chain).problem == "certificate does not match TLSA"
    assert match_chain(policy, [*chain, root]).ok


def test_dane_ta_does_not_match_a_leaf_signed_by_another_ca(intermediate: trustme.CA) -> None:
    """A chain that shows the TA's certificate but whose leaf another CA signed."""
    rogue = trustme.CA().issue_cert("mx.example")
    rogue_chain = _der_chain(rogue)
    anchor = _der_chain(intermediate.issue_cert("x.example"))[1]
    policy = DanePolicy.from_records("mx.example", [_record(2, 1, 1, anchor)])
    check = match_chain(policy, [rogue_chain[0], anchor])
    assert not check.ok and check.problem.startswith(
        "certificate chain does not verify to the TLSA trust anchor ("
    )
    assert check.problem.endswith(")") and len(check.problem) > 60


# ---- the peer's chain ------------------------------------------------------------------------


def _handshake(server: ssl.SSLContext, hostname: str) -> ssl.SSLObject:
    """A TLS handshake over memory BIOs (no sockets): the client's SSLObject."""
    client_context = ssl.create_default_context()
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(c_in, c_out, server_hostname=hostname)
    peer = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, peer):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if client.version() and peer.version():
            try:
                client.do_handshake()
                peer.do_handshake()
                break
            except ssl.SSLWantReadError:
                continue
    return client


def test_peer_chain_gives_the_chain_the_mx_sent(intermediate: trustme.CA) -> None:
    leaf = intermediate.issue_cert("mx.example")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(server)
    chain = peer_chain(_handshake(server, "mx.example"))
    assert chain == _der_chain(leaf)
    policy = DanePolicy.from_records("mx.example", [_record(2, 1, 1, chain[1])])
    assert match_chain(policy, chain).ok


class _Public:
    def get_unverified_chain(self) -> list[bytes]:
        return [b"public"]

    _sslobj: Any = None


class _Private:
    class _Inner:
        def get_unverified_chain(self) -> list[bytes]:
            return [b"private"]

    _sslobj = _Inner()


def test_peer_chain_prefers_the_public_method_and_fails_loudly_without_one() -> None:
    assert peer_chain(_Public()) == [b"public"]  # type: ignore[arg-type]
    assert peer_chain(_Private()) == [b"private"]  # type: ignore[arg-type]
    with pytest.raises(PeerChainUnavailable):
        peer_chain(object())  # type: ignore[arg-type]


def test_unusable_records_never_crowd_out_a_usable_one() -> None:
    """An RRset with more records than are kept (MAX_TLSA_RECORDS), the usable one last: the
    cut must not drop it and leave only unusable records, which would turn authenticated
    DANE into mandatory unauthenticated TLS (RFC 7672 3.1.3) that any certificate passes."""
    from sidecar.mxtls.dane import MAX_TLSA_RECORDS

    unusable = [TlsaRecord(1, 1, 1, bytes([n]) * 32) for n in range(MAX_TLSA_RECORDS + 5)]
    good = TlsaRecord(3, 1, 1, b"\xee" * 32)
    policy = DanePolicy.from_records("mx.example", [*unusable, good])
    assert policy.authenticates and policy.usable == (good,)
    assert len(policy.unusable) <= MAX_TLSA_RECORDS
