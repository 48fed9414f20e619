"""What one TLS session attempt with an MX came to, in TLS-RPT's words (RFC 8460 section 4.3),
and which policy it was made under.

Producers: the upstream's STARTTLS step (:mod:`sidecar.upstream`) and the policy look-ups
(DANE's TLSA records, MTA-STS's policy fetch). Consumer: the TLS-RPT store, through a
:class:`TlsReporter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

# The policy a delivery was made under: the ``tls_policy=`` of the transaction log line and
# the label of /metrics. "dane" and "mta-sts" authenticate the MX; "verify" is the
# configured PKIX check (delivery.tls = "verify"); "required" encrypts without
# authenticating; "opportunistic" encrypts when offered; "none" is plaintext by
# configuration (tls = "disabled").
PolicyLabel = Literal["dane", "mta-sts", "verify", "required", "opportunistic", "none"]

# RFC 8460 section 4.4: "tlsa" (DANE), "sts" (MTA-STS), "no-policy-found".
PolicyType = Literal["tlsa", "sts", "no-policy-found"]

# RFC 8460 section 4.3 result types (4.3.1 negotiation, 4.3.2 policy, 4.3.3 general).
ResultType = Literal[
    "starttls-not-supported",
    "certificate-host-mismatch",
    "certificate-expired",
    "certificate-not-trusted",
    "validation-failure",
    "tlsa-invalid",
    "dnssec-invalid",
    "dane-required",
    "sts-policy-fetch-error",
    "sts-policy-invalid",
    "sts-webpki-invalid",
]


@dataclass(frozen=True, slots=True)
class TlsOutcome:
    """One TLS session attempt with one MX address, for the TLS-RPT aggregate of
    ``policy_domain`` (the recipient domain; RFC 8460 section 4.4 "policy-domain").

    ``result`` is ``None`` for a successful session (an authenticated one under "tlsa" or
    "sts", an encrypted one under "no-policy-found"), else the RFC 8460 result type.
    ``policy_strings``: the TLSA records (presentation format) or the MTA-STS policy lines,
    as the report's "policy-string". ``detail``: a human-readable reason (the report's
    "failure-reason-code" and the log), never empty for a failure."""

    policy_domain: str
    policy_type: PolicyType
    mx_host: str
    receiving_ip: str
    sending_ip: str | None  # the PROXY header's source address; None: direct (bypass)
    result: ResultType | None = None
    policy_strings: tuple[str, ...] = ()
    detail: str = ""


class TlsReporter(Protocol):
    """Where outcomes go (the TLS-RPT store). ``record`` must not block on I/O for long nor
    raise: a reporting fault never delays or fails a delivery."""

    def record(self, outcome: TlsOutcome) -> None: ...


class NullReporter:
    """Records nothing (TLS-RPT off, unit tests)."""

    def record(self, outcome: TlsOutcome) -> None:
        pass
