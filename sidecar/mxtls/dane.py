"""DANE for SMTP (RFC 7672, RFC 7671, RFC 6698), sans-IO: the TLSA record, which records are
usable for SMTP, and whether an MX's certificate chain matches them.

The DNS part (which TLSA records apply to which MX host, and whether they are DNSSEC-secure)
is :mod:`sidecar.resolver`'s; the TLS part (the handshake, and the peer's chain) is
:mod:`sidecar.upstream`'s. Certificates are parsed and chains verified with ``cryptography``,
never by hand.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

# cryptography (~9 MiB of RSS once imported) is loaded on the first certificate checked, not
# at start-up: a sidecar without DANE never pays for it (the 1000-idle-sessions budget).
if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.x509.verification import ExtensionPolicy

__all__ = [
    "DANE_EE",
    "DANE_TA",
    "DaneCheck",
    "DanePolicy",
    "PeerChainUnavailable",
    "TlsaError",
    "TlsaRecord",
    "match_chain",
    "peer_chain",
]

# RFC 6698 section 2.1.1 / RFC 7218 names of the certificate usages.
PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3
# Selectors (RFC 6698 2.1.2): the full certificate, or its SubjectPublicKeyInfo.
SELECTOR_CERT, SELECTOR_SPKI = 0, 1
# Matching types (RFC 6698 2.1.3): exact, SHA2-256, SHA2-512.
MATCH_FULL, MATCH_SHA256, MATCH_SHA512 = 0, 1, 2

# Bounds on what one TLSA record or RRset may hold (DESIGN.md invariant 5): association data
# of a full certificate is at most a few KiB; of an RRset this many usable records are kept
# (each is hashed against the chain per handshake), and this many unusable ones.
MAX_TLSA_DATA = 16_384
MAX_TLSA_RECORDS = 32
# Certificates of a peer chain looked at (a TLS chain longer than this is refused).
MAX_CHAIN = 10

_DIGEST_SIZE = {MATCH_SHA256: 32, MATCH_SHA512: 64}
_USAGE_NAMES = {PKIX_TA: "PKIX-TA", PKIX_EE: "PKIX-EE", DANE_TA: "DANE-TA", DANE_EE: "DANE-EE"}


class TlsaError(ValueError):
    """A TLSA record in presentation format that cannot be read."""


@dataclass(frozen=True, slots=True)
class TlsaRecord:
    """One TLSA record (RFC 6698 section 2.1): certificate usage, selector, matching type and
    the certificate association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @classmethod
    def from_text(cls, text: str) -> TlsaRecord:
        """``"3 1 1 <hex>"`` (RFC 6698 section 2.2, the hex may be split by white space) ->
        the record, or :class:`TlsaError`."""
        fields = text.split()
        if len(fields) < 4:
            raise TlsaError(f"a TLSA record has 4 fields, not {len(fields)}: {text[:80]!r}")
        numbers = []
        for name, field in zip(("usage", "selector", "matching type"), fields[:3], strict=True):
            if not (field.isascii() and field.isdigit()) or len(field) > 3 or int(field) > 255:
                raise TlsaError(f"TLSA {name} is not a number 0-255: {field[:10]!r}")
            numbers.append(int(field))
        hex_text = "".join(fields[3:])
        if len(hex_text) > 2 * MAX_TLSA_DATA:
            raise TlsaError(f"TLSA data longer than {MAX_TLSA_DATA} bytes")
        if not hex_text or any(c not in "0123456789abcdefABCDEF" for c in hex_text):
            raise TlsaError("TLSA data is not hexadecimal")
        if len(hex_text) % 2:
            raise TlsaError("TLSA data has an odd number of hex digits")
        return cls(numbers[0], numbers[1], numbers[2], bytes.fromhex(hex_text))

    @property
    def text(self) -> str:
        """Presentation format (RFC 6698 section 2.2), e.g. ``"3 1 1 ab12..."``."""
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    @property
    def usable(self) -> bool:
        """Usable for SMTP (RFC 7672 section 3.1): DANE-TA(2) or DANE-EE(3), selector
        Cert(0) or SPKI(1), matching type Full(0), SHA2-256(1) or SHA2-512(2) with a digest
        of the right length. PKIX-TA(0) and PKIX-EE(1) are unusable (section 3.1.3)."""
        if self.usage not in (DANE_TA, DANE_EE):
            return False
        if self.selector not in (SELECTOR_CERT, SELECTOR_SPKI):
            return False
        if self.mtype == MATCH_FULL:
            return bool(self.data)
        return _DIGEST_SIZE.get(self.mtype) == len(self.data)

    def matches(self, certificate: x509.Certificate) -> bool:
        """Whether ``certificate`` (its DER, or its SubjectPublicKeyInfo's, per the
        selector) is what this record's data names (RFC 6698 section 2.1.2, 2.1.3)."""
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        if self.selector == SELECTOR_CERT:
            selected = certificate.public_bytes(Encoding.DER)
        elif self.selector == SELECTOR_SPKI:
            selected = certificate.public_key().public_bytes(
                Encoding.DER, PublicFormat.SubjectPublicKeyInfo
            )
        else:
            return False
        if self.mtype == MATCH_FULL:
            return selected == self.data
        if self.mtype == MATCH_SHA256:
            return hashlib.sha256(selected).digest() == self.data
        if self.mtype == MATCH_SHA512:
            return hashlib.sha512(selected).digest() == self.data
        return False

    def __str__(self) -> str:
        name = _USAGE_NAMES.get(self.usage, str(self.usage))
        return f"{name} {self.selector} {self.mtype} {self.data.hex()[:16]}"


@dataclass(frozen=True, slots=True)
class DanePolicy:
    """DANE for one MX host (RFC 7672 section 2.2): its secure TLSA RRset split into usable
    and unusable records, and the reference identifiers a DANE-TA chain's leaf must name
    (section 3.2.2: the MX host name as the MX record gave it, and the name its TLSA records
    were found under after CNAME expansion, when that differs).

    ``usable`` non-empty: STARTTLS is required and the chain must match one of them.
    ``usable`` empty (only unusable records): STARTTLS is required, unauthenticated
    (section 3.1.3: "mandatory unauthenticated TLS")."""

    host: str
    usable: tuple[TlsaRecord, ...]
    unusable: tuple[TlsaRecord, ...] = ()
    names: tuple[str, ...] = ()
    tlsa_name: str = ""  # the owner of the TLSA RRset used, e.g. "_25._tcp.mx.example"

    @classmethod
    def from_records(
        cls,
        host: str,
        records: Sequence[TlsaRecord],
        names: Sequence[str] = (),
        tlsa_name: str = "",
    ) -> DanePolicy:
        """Split ``records`` into usable and unusable ones, at most :data:`MAX_TLSA_RECORDS`
        of each (an RRset's order is arbitrary: a cut of the whole must never leave only
        unusable records where a usable one was published, which would make authenticated
        DANE mere mandatory TLS); ``names`` default to ``host``."""
        usable = tuple(record for record in records if record.usable)[:MAX_TLSA_RECORDS]
        unusable = tuple(record for record in records if not record.usable)[:MAX_TLSA_RECORDS]
        seen: list[str] = []
        for name in names or (host,):
            clean = name.lower().rstrip(".")
            if clean and clean not in seen:
                seen.append(clean)
        return cls(
            host,
            usable,
            unusable,
            tuple(seen),
            tlsa_name,
        )

    @property
    def base_domain(self) -> str:
        """The TLSA base domain (RFC 7672 section 2.2.2): the name the TLSA records were
        found under, without its ``_<port>._tcp.`` prefix (the CNAME-expanded MX host when
        they were found there); the MX host when that is not known. Sent as SNI (section
        8.1)."""
        labels = self.tlsa_name.split(".", 2)
        if len(labels) == 3 and labels[0].startswith("_") and labels[1] == "_tcp" and labels[2]:
            return labels[2]
        return self.host

    @property
    def authenticates(self) -> bool:
        """Whether the MX must be authenticated (some usable record), not just encrypted."""
        return bool(self.usable)

    @property
    def strings(self) -> tuple[str, ...]:
        """Every record in presentation format (TLS-RPT's "policy-string")."""
        return tuple(record.text for record in (*self.usable, *self.unusable))

    def describe(self) -> str:
        """For ``sidecar route`` and the log: the usable records, or why none authenticates."""
        if self.usable:
            return ", ".join(str(record) for record in self.usable)
        return (
            "only unusable TLSA records ("
            + ", ".join(str(record) for record in self.unusable)
            + "): encrypted, not authenticated"
        )


@dataclass(frozen=True, slots=True)
class DaneCheck:
    """The outcome of :func:`match_chain`: ``ok``, the record that matched (its short text),
    else ``problem`` (never empty) and the RFC 8460 result type for TLS-RPT."""

    ok: bool
    matched: str = ""
    problem: str = ""
    result_type: str = ""  # "validation-failure" / "certificate-host-mismatch" / ...


def _load_chain(chain: Sequence[bytes]) -> list[x509.Certificate] | str:
    from cryptography import x509

    if not chain:
        return "the MX sent no certificate"
    if len(chain) > MAX_CHAIN:
        return f"the MX sent a chain of {len(chain)} certificates (at most {MAX_CHAIN})"
    certificates = []
    for index, der in enumerate(chain):
        try:
            certificates.append(x509.load_der_x509_certificate(der))
        except ValueError as error:
            return f"certificate {index} of the MX's chain cannot be read ({error})"
    return certificates


def match_chain(
    policy: DanePolicy, chain: Sequence[bytes], now: datetime.datetime | None = None
) -> DaneCheck:
    """Whether the MX's certificate ``chain`` (DER, leaf first, as the MX sent it) matches
    ``policy``'s usable records (RFC 7672 section 3.1, RFC 7671 section 5):

    * DANE-EE(3): the leaf matches; its names and validity dates are not looked at
      (RFC 7672 section 3.1.1).
    * DANE-TA(2): a certificate of the chain matches (the MX must send it: section 3.1.2),
      the leaf chains up to it, is valid at ``now`` and names one of ``policy.names``
      (section 3.2.3; wildcards as RFC 6125 allows them in the left-most label), verified by
      ``cryptography``'s X.509 path validation with that certificate as the one trust anchor.

    ``now``: aware UTC time (default: the current time)."""
    if not policy.usable:
        return DaneCheck(False, problem="no usable TLSA record", result_type="tlsa-invalid")
    loaded = _load_chain(chain)
    if isinstance(loaded, str):
        return DaneCheck(False, problem=loaded, result_type="validation-failure")
    leaf = loaded[0]
    for record in policy.usable:
        if record.usage == DANE_EE and record.matches(leaf):
            return DaneCheck(True, matched=str(record))
    problems: list[str] = []
    for record in policy.usable:
        if record.usage != DANE_TA:
            continue
        for anchor in loaded[1:]:
            if not record.matches(anchor):
                continue
            problem = _verify_up_to(anchor, leaf, loaded[1:], policy.names, now)
            if problem is None:
                return DaneCheck(True, matched=str(record))
            problems.append(problem)
    if problems:
        kind = (
            "certificate-host-mismatch"
            if problems[0].startswith("the leaf certificate does not name")
            else "validation-failure"
        )
        return DaneCheck(
            False,
            problem=f"certificate chain does not verify to the TLSA trust anchor ({problems[0]})",
            result_type=kind,
        )
    return DaneCheck(
        False, problem="certificate does not match TLSA", result_type="validation-failure"
    )


@functools.cache
def _extension_policies() -> tuple[ExtensionPolicy, ExtensionPolicy]:
    """(CA policy, leaf policy) of DANE-TA path validation.

    DANE-TA is not the Web PKI: its anchor is whatever the domain's TLSA record names, often
    a private CA. The CA/Browser Forum rules on extensions (basic constraints, key usage...)
    stay, but the criticality RFC 5280 leaves to the issuer is accepted either way: a
    critical subjectAltName beside a non-empty subject, a critical extendedKeyUsage (private
    CAs such as trustme issue both)."""
    from cryptography import x509
    from cryptography.x509.verification import Criticality, ExtensionPolicy

    ca_policy = ExtensionPolicy.webpki_defaults_ca().may_be_present(
        x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None
    )
    ee_policy = (
        ExtensionPolicy.webpki_defaults_ee()
        .require_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
        .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None)
    )
    return ca_policy, ee_policy


def _verify_up_to(
    anchor: x509.Certificate,
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    names: Sequence[str],
    now: datetime.datetime | None,
) -> str | None:
    """None when ``leaf`` chains (through ``intermediates``) to ``anchor`` and names one of
    ``names`` at ``now``; else what failed (non-empty)."""
    from cryptography import x509
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    ca_policy, ee_policy = _extension_policies()
    when = now or datetime.datetime.now(datetime.UTC)
    last = "no reference identifier"
    for name in names:
        try:
            verifier = (
                PolicyBuilder()
                .store(Store([anchor]))
                .time(when)
                .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
                .build_server_verifier(x509.DNSName(name))
            )
            verifier.verify(leaf, [c for c in intermediates if c != anchor])
            return None
        except VerificationError as error:
            last = str(error) or type(error).__name__
        except ValueError as error:  # a name cryptography will not take as a DNS name
            last = f"{name}: {error}"
    if "no matching subjectaltname" in last.lower():
        return f"the leaf certificate does not name {' or '.join(names)}"
    return last


class PeerChainUnavailable(RuntimeError):
    """This Python's ssl module gives no way to read the peer's certificate chain."""


def peer_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The certificate chain the peer sent in the handshake (DER, leaf first), unverified.

    Python's ssl gives it publicly from 3.13 (``SSLObject.get_unverified_chain``); 3.10 to
    3.12 have the same OpenSSL call (``SSL_get_peer_cert_chain``) on the C object behind
    the SSLObject (``_sslobj.get_unverified_chain``), returning ``_ssl.Certificate``
    objects. The public method is preferred when present; when neither exists this raises
    :class:`PeerChainUnavailable` (a DANE-TA check must not pass for want of the chain)."""
    method = getattr(ssl_object, "get_unverified_chain", None)
    if method is None:
        inner = getattr(ssl_object, "_sslobj", None)
        method = getattr(inner, "get_unverified_chain", None)
    if method is None:
        raise PeerChainUnavailable(
            "this Python's ssl module cannot give the peer's certificate chain"
        )
    chain = method() or []
    out: list[bytes] = []
    for item in chain:
        if isinstance(item, bytes | bytearray):
            out.append(bytes(item))
        else:  # _ssl.Certificate (3.10 to 3.12)
            out.append(item.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]
    return out
