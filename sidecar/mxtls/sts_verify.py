"""MTA-STS "testing" mode (RFC 8461 section 5): mail goes out as it would without the policy,
but what "enforce" would have checked is checked and reported (RFC 8460). The MX patterns are
checked by the router; this module checks the TLS session of a connection made under the
configured (opportunistic) policy: STARTTLS used, and the certificate chain the MX sent
valid for the MX host name under the trust store of ``tls = "verify"``.

The chain comes from the handshake that was made without verification (the peer's unverified
chain: ``SSLObject.get_unverified_chain`` from Python 3.13, the same method of the C object
on 3.10-3.12), and is verified with ``cryptography``'s X.509 path validation (RFC 5280 with
RFC 6125 host names) against the CA bundle ``delivery.tls_ca_file`` or the system's. Only
reports depend on it: a delivery never does. The end-entity extension rules are relaxed to
"subjectAltName present" (cryptography's web PKI defaults refuse certificates OpenSSL
accepts), so the verdict follows what OpenSSL's check in "enforce" mode would say.
"""

from __future__ import annotations

import functools
import logging
import ssl
from typing import TYPE_CHECKING, Any

from sidecar.errors import describe_error
from sidecar.mxtls.dane import PeerChainUnavailable
from sidecar.mxtls.dane import peer_chain as peer_chain_der
from sidecar.mxtls.outcome import ResultType, TlsOutcome, TlsReporter

# cryptography is imported on the first check (a sidecar that meets no MTA-STS "testing"
# policy never loads it: ~9 MiB of RSS).
if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.x509.verification import Store

    from sidecar.routing import Route
    from sidecar.upstream import Upstream

log = logging.getLogger("sidecar.mta_sts")

# Most certificates of a chain looked at.
MAX_CHAIN = 10


@functools.cache
def trust_store(ca_file: str | None) -> Store | None:
    """The trust anchors of ``ca_file`` (PEM), else of the system's default CA file; ``None``
    when none can be read (then nothing is checked: logged once)."""
    from cryptography import x509
    from cryptography.x509.verification import Store

    path = ca_file or ssl.get_default_verify_paths().cafile
    if path is None:
        log.warning("MTA-STS testing: no CA file to check certificates with")
        return None
    try:
        with open(path, "rb") as f:
            anchors = x509.load_pem_x509_certificates(f.read())
    except (OSError, ValueError) as error:
        log.warning("MTA-STS testing: cannot read %s: %s", path, describe_error(error))
        return None
    return Store(anchors)


def peer_chain(ssl_object: Any) -> list[x509.Certificate] | None:
    """The certificates the peer sent (leaf first, at most MAX_CHAIN) on the stdlib
    ``ssl.SSLObject`` ``ssl_object``, or ``None`` when they cannot be had or read."""
    from cryptography import x509

    try:
        return [
            x509.load_der_x509_certificate(der) for der in peer_chain_der(ssl_object)[:MAX_CHAIN]
        ]
    except (PeerChainUnavailable, ValueError, TypeError, ssl.SSLError):
        return None


def check_chain(
    chain: list[x509.Certificate], host: str, anchors: Store
) -> tuple[ResultType, str] | None:
    """Why ``chain`` (leaf first) is not valid for the MX host name ``host`` under
    ``anchors`` (RFC 8461 section 4.2: chains to a trusted root, names the host), as an
    RFC 8460 result type and a reason; ``None`` when it is valid."""
    from cryptography import x509
    from cryptography.x509 import DNSName
    from cryptography.x509.verification import (
        Criticality,
        ExtensionPolicy,
        PolicyBuilder,
        VerificationError,
    )

    if not chain:
        return "certificate-not-trusted", "the MX sent no certificate"
    ee_policy = ExtensionPolicy.permit_all().require_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )
    try:
        name = DNSName(host)
        verifier = (
            PolicyBuilder()
            .store(anchors)
            .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy)
            .build_server_verifier(name)
        )
        verifier.verify(chain[0], chain[1:])
    except VerificationError as error:
        text = str(error).split(" (encountered processing", 1)[0]
        if "subjectAltName" in text:
            return "certificate-host-mismatch", f"certificate does not name {host}: {text}"
        if "expired" in text or "not valid" in text:
            return "certificate-expired", text
        return "certificate-not-trusted", text
    except ValueError as error:
        return "validation-failure", describe_error(error)
    return None


def enforce_verdict(
    tls_stream: Any, tls_fallback: str | None, host: str, ca_file: str | None
) -> tuple[ResultType, str] | None:
    """What "enforce" would have refused on a connection to ``host``: no TLS
    (``tls_stream`` None; ``tls_fallback``: why), or a certificate that does not chain to
    the trust store or name ``host``. ``None``: it would have passed (or cannot be told)."""
    if tls_stream is None:
        return "starttls-not-supported", tls_fallback or "STARTTLS not offered"
    anchors = trust_store(ca_file)
    chain = peer_chain(getattr(tls_stream, "_ssl_object", None))
    if anchors is None or chain is None:
        return None
    return check_chain(chain, host, anchors)


def check_testing(route: Route, upstream: Upstream, reporter: TlsReporter) -> None:
    """Under an MTA-STS policy in "testing" mode, what "enforce" would have refused on the
    new connection ``upstream`` is logged and reported (RFC 8460 policy type "sts"); the
    delivery goes on as before."""
    lookup = route.sts
    if lookup is None or lookup.mode != "testing":
        return
    stream = upstream.stream
    inner = getattr(stream, "inner", stream)
    tls_stream = inner if upstream.tls is not None else None
    candidate = upstream.candidate
    failure = enforce_verdict(
        tls_stream, upstream.tls_fallback, candidate.mx, upstream.delivery.tls_ca_file
    )
    result: ResultType | None = None
    why = ""
    if failure is not None:
        result, why = failure
        log.warning(
            "MTA-STS policy of %s (testing, id %s): %s[%s] would fail under enforce (%s): %s; "
            "delivering as before",
            route.domain,
            lookup.id,
            candidate.mx,
            candidate.address,
            result,
            why,
        )
    reporter.record(  # a failure, or a success of the "sts" policy: it would have passed
        TlsOutcome(
            lookup.domain,
            "sts",
            candidate.mx,
            str(candidate.address),
            None if candidate.source is None else str(candidate.source),
            result,
            lookup.text,
            why,
        )
    )
