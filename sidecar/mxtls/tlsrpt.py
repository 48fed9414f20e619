"""SMTP TLS Reporting (RFC 8460), sans-IO: the ``_smtp._tls`` TXT record (section 3), the
result type of a failed TLS handshake (section 4.3), the JSON aggregate report (section 4.4)
and its file name (section 5.1). (The e-mail that carries it, section 5.3, is made by
:mod:`sidecar.mxtls.tlsrpt_report`, the command line's part: the running sidecar does not
load the ``email`` package.)

The counts come from :mod:`sidecar.mxtls.tlsrpt_store`; ``sidecar tls-report`` (the command
line) looks the TXT records up and writes what this module builds.
"""

from __future__ import annotations

import gzip
import json
import re
import ssl
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import unquote

from sidecar.errors import describe_error
from sidecar.mxtls.outcome import PolicyType, ResultType

# ---- section 3: the TXT record -----------------------------------------------------------

TLSRPT_PREFIX = "_smtp._tls."
VERSION = "v=TLSRPTv1"

# Bounds on what one TXT record may make us do (DESIGN.md invariant 5).
MAX_RECORD_CHARS = 4096
MAX_RUA_URIS = 10
MAX_URI_CHARS = 1024

# tlsrpt-ext-name = (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}")
# tlsrpt-ext-value = 1*(%x21-3A / %x3C / %x3E-7E): visible characters but "=" and ";"
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
# What a rua URI may hold: visible ASCII ("," and ";" are the record's delimiters; RFC 8460
# section 3: commas, semicolons and exclamation points in a URI MUST be percent-encoded).
_URI = re.compile(r"[\x22-\x7e]+")
# An address of a mailto: URI, after percent-decoding, that the cron recipe can hand to
# sendmail as an argument: a plain local part (no spaces, quotes or shell-special
# characters, no leading "-" that would read as an option), one "@", a domain name. Other
# addresses serve no report.
_MAILBOX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*")


class RecordError(ValueError):
    """A ``v=TLSRPTv1`` TXT record that does not follow RFC 8460 section 3."""


@dataclass(frozen=True, slots=True)
class TlsRptRecord:
    """A domain's TLS-RPT policy: where its reports go. ``rua``: every URI of the record, in
    its order; ``mailto`` and ``https``: the ones this sidecar can serve (the address of each
    ``mailto:`` URI; each ``https:`` URI as it is)."""

    rua: tuple[str, ...]
    mailto: tuple[str, ...]
    https: tuple[str, ...]

    @property
    def targets(self) -> tuple[str, ...]:
        """``mailto:ADDRESS`` and ``https://...`` URIs, in the record's order."""
        return tuple(target for uri in self.rua if (target := _target(uri)) is not None)


def _target(uri: str) -> str | None:
    scheme, _, rest = uri.partition(":")
    if scheme.lower() == "mailto":
        address = unquote(rest.split("?", 1)[0])
        return f"mailto:{address}" if _MAILBOX.fullmatch(address) else None
    if scheme.lower() == "https" and rest.startswith("//") and len(rest) > 2:
        return uri
    return None


def parse_record(text: str) -> TlsRptRecord:
    """One TXT record's text (its strings joined) as RFC 8460 section 3 reads it:
    ``v=TLSRPTv1`` first, then ``;``-separated fields, one ``rua=`` with one or more
    comma-separated URIs; other fields are extensions (ignored when well-formed). Raises
    :class:`RecordError` for anything else. URIs of schemes other than ``mailto:`` and
    ``https:`` are kept in ``rua`` but serve no report (section 3: such URIs are ignored)."""
    if len(text) > MAX_RECORD_CHARS:
        raise RecordError(f"longer than {MAX_RECORD_CHARS} characters")
    fields = [field.strip(" \t") for field in text.split(";")]
    if fields and fields[-1] == "" and len(fields) > 1:
        fields.pop()  # the optional trailing field-delim
    if not fields or fields[0] != VERSION:
        raise RecordError(f"does not start with {VERSION}")
    rua: list[str] | None = None
    for field in fields[1:]:
        name, equals, value = field.partition("=")
        if not equals:
            raise RecordError(f"field without '=': {field[:40]!r}")
        if name == "rua":
            if rua is not None:
                raise RecordError("more than one rua field")
            rua = _parse_rua(value)
        elif not _EXT_NAME.fullmatch(name) or not _EXT_VALUE.fullmatch(value):
            raise RecordError(f"bad field: {field[:40]!r}")
    if rua is None:
        raise RecordError("no rua field")
    targets = [target for uri in rua if (target := _target(uri)) is not None]
    return TlsRptRecord(
        rua=tuple(rua),
        mailto=tuple(t.removeprefix("mailto:") for t in targets if t.startswith("mailto:")),
        https=tuple(t for t in targets if t.startswith("https:")),
    )


def _parse_rua(value: str) -> list[str]:
    uris = [uri.strip(" \t") for uri in value.split(",")]
    if len(uris) > MAX_RUA_URIS:
        raise RecordError(f"more than {MAX_RUA_URIS} rua URIs")
    for uri in uris:
        if not uri or len(uri) > MAX_URI_CHARS or not _URI.fullmatch(uri) or ":" not in uri:
            raise RecordError(f"bad rua URI: {uri[:40]!r}")
    return uris


def select_record(texts: Iterable[str]) -> TlsRptRecord | None:
    """The domain's policy from all its ``_smtp._tls`` TXT records (each one's strings
    joined): records that do not start with ``v=TLSRPTv1`` are not TLS-RPT's; of the rest
    exactly one must parse (RFC 8460 section 3: "If the number of resulting records is not
    one, senders MUST assume the recipient domain does not implement TLSRPT"), else
    ``None``. A record none of whose URIs can be served is ``None`` too."""
    candidates = [text for text in texts if text.startswith(VERSION)]
    if len(candidates) != 1:
        return None
    try:
        record = parse_record(candidates[0])
    except RecordError:
        return None
    return record if record.mailto or record.https else None


# ---- section 4.3: the result type of a failed handshake --------------------------------------

# OpenSSL's X509_V_ERR_* numbers (ssl.SSLCertVerificationError.verify_code).
X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT = 2
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT = 18
X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN = 19
X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE = 21
X509_V_ERR_CERT_UNTRUSTED = 27
X509_V_ERR_CERT_REJECTED = 28
X509_V_ERR_HOSTNAME_MISMATCH = 62
X509_V_ERR_IP_ADDRESS_MISMATCH = 64

_RESULT_OF_VERIFY_CODE: dict[int, ResultType] = {
    X509_V_ERR_CERT_HAS_EXPIRED: "certificate-expired",
    X509_V_ERR_HOSTNAME_MISMATCH: "certificate-host-mismatch",
    X509_V_ERR_IP_ADDRESS_MISMATCH: "certificate-host-mismatch",
    **dict.fromkeys(
        (
            X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT,
            X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
            X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN,
            X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
            X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE,
            X509_V_ERR_CERT_UNTRUSTED,
            X509_V_ERR_CERT_REJECTED,
        ),
        "certificate-not-trusted",
    ),
}


def handshake_failure(error: BaseException) -> tuple[ResultType, str]:
    """(RFC 8460 section 4.3.1 result type, reason) of a TLS handshake that failed with
    ``error`` (trio wraps the ``ssl`` error: the chain is searched). A certificate
    verification error is told apart by its OpenSSL code (expired, host mismatch, not
    trusted); anything else (a protocol error, a timeout, a lost connection) is
    ``validation-failure``, "a general failure for a reason not matching a category above".
    The reason is never empty."""
    current: BaseException | None = error
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            result = _RESULT_OF_VERIFY_CODE.get(current.verify_code, "validation-failure")
            reason = current.verify_message or describe_error(current)
            return result, reason or "certificate verification failed"
        current = current.__cause__ or current.__context__
    return "validation-failure", describe_error(error) or type(error).__name__


# ---- section 4.4: the aggregate report -------------------------------------------------------

SUCCESS = ""  # the result column of a successful session's tally
MAX_REASON_CHARS = 200  # a failure-reason-code longer than this is cut
# At most this many failure-details entries per policy of a report, the most frequent ones
# (an MX that words each refusal differently would make every failed session one); the
# others are folded into one entry per result type, so the details add up to the summary.
MAX_FAILURE_DETAILS = 1000


@dataclass(frozen=True, slots=True)
class Tally:
    """One row of a day's counts for a policy domain: sessions under one policy (type,
    strings, MX host patterns) with one result. A success (``result`` is ``None``) has no
    failure details (empty strings)."""

    policy_type: PolicyType
    policy_strings: tuple[str, ...]
    mx_hosts: tuple[str, ...]
    result: ResultType | None
    sending_ip: str
    receiving_mx: str
    receiving_ip: str
    reason: str
    count: int


@dataclass(frozen=True, slots=True)
class Reporter:
    """Who reports: ``organization`` (organization-name), ``contact`` (contact-info, an
    e-mail address), ``submitter`` (the domain in TLS-Report-Submitter and the file name),
    ``host`` (this sidecar's name: several hosts of one submitter give distinct report-ids)."""

    organization: str
    contact: str
    submitter: str
    host: str


def day_range(day: date) -> tuple[datetime, datetime]:
    """The UTC day's first and last second (RFC 8460 section 4.4's date-range, as the
    RFC's example gives it: ``...T00:00:00Z`` to ``...T23:59:59Z``)."""
    start = datetime.combine(day, time(0, 0, 0), UTC)
    return start, start + timedelta(days=1, seconds=-1)


def _datetime(moment: datetime) -> str:
    """RFC 3339 date-time in UTC with a ``Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def report_id(reporter: Reporter, policy_domain: str, day: date) -> str:
    """A report-id unique per (submitter, host, policy domain, day), the same for a report
    written again (a re-run of ``sidecar tls-report``): a name-based UUID."""
    name = f"tlsrpt:{reporter.submitter}:{reporter.host}:{policy_domain}:{day.isoformat()}"
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


def build_report(
    reporter: Reporter, policy_domain: str, day: date, tallies: Sequence[Tally]
) -> dict[str, Any]:
    """RFC 8460 section 4.4's JSON aggregate report of ``policy_domain`` for the UTC ``day``:
    one ``policies`` entry per applied policy (type, strings, MX host patterns), its summary
    counts and one ``failure-details`` entry per (result type, sending IP, receiving MX host
    and IP, reason), at most :data:`MAX_FAILURE_DETAILS` of them (the most frequent; the rest
    in one entry per result type). Entries and details come in a stable order (the same
    counts give the same bytes)."""
    start, end = day_range(day)
    grouped: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[Tally]] = {}
    for tally in tallies:
        key = (tally.policy_type, tally.policy_strings, tally.mx_hosts)
        grouped.setdefault(key, []).append(tally)
    policies = []
    for (policy_type, strings, mx_hosts), rows in sorted(grouped.items()):
        policy: dict[str, Any] = {"policy-type": policy_type}
        if strings:
            policy["policy-string"] = list(strings)
        policy["policy-domain"] = policy_domain
        if mx_hosts:
            policy["mx-host"] = list(mx_hosts)
        failures: dict[tuple[str, str, str, str, str], int] = {}
        successes = 0
        for row in rows:
            if row.result is None:
                successes += row.count
                continue
            detail = (row.result, row.sending_ip, row.receiving_mx, row.receiving_ip, row.reason)
            failures[detail] = failures.get(detail, 0) + row.count
        entry: dict[str, Any] = {
            "policy": policy,
            "summary": {
                "total-successful-session-count": successes,
                "total-failure-session-count": sum(failures.values()),
            },
        }
        if failures:
            entry["failure-details"] = _bounded_details(failures)
        policies.append(entry)
    return {
        "organization-name": reporter.organization,
        "date-range": {"start-datetime": _datetime(start), "end-datetime": _datetime(end)},
        "contact-info": reporter.contact,
        "report-id": report_id(reporter, policy_domain, day),
        "policies": policies,
    }


def _bounded_details(failures: dict[tuple[str, str, str, str, str], int]) -> list[dict[str, Any]]:
    """The failure-details entries: the :data:`MAX_FAILURE_DETAILS` most frequent failures
    one by one; the rest folded into one entry per result type (its count, and how many
    distinct failures it stands for), so that the details still add up to the summary."""
    ranked = sorted(failures.items(), key=lambda item: (-item[1], item[0]))
    details = [
        _failure_detail(detail, count) for detail, count in sorted(ranked[:MAX_FAILURE_DETAILS])
    ]
    folded: dict[str, tuple[int, int]] = {}
    for (result, *_), count in ranked[MAX_FAILURE_DETAILS:]:
        sessions, distinct = folded.get(result, (0, 0))
        folded[result] = (sessions + count, distinct + 1)
    for result, (sessions, distinct) in sorted(folded.items()):
        details.append(
            {
                "result-type": result,
                "failed-session-count": sessions,
                "failure-reason-code": f"{distinct} more distinct failures, not detailed",
            }
        )
    return details


def _failure_detail(detail: tuple[str, str, str, str, str], count: int) -> dict[str, Any]:
    result, sending_ip, receiving_mx, receiving_ip, reason = detail
    entry: dict[str, Any] = {"result-type": result}
    if sending_ip:
        entry["sending-mta-ip"] = sending_ip
    if receiving_mx:
        entry["receiving-mx-hostname"] = receiving_mx
    if receiving_ip:
        entry["receiving-ip"] = receiving_ip
    entry["failed-session-count"] = count
    if reason:
        entry["failure-reason-code"] = reason[:MAX_REASON_CHARS]
    return entry


def report_bytes(report: dict[str, Any]) -> bytes:
    """The report as gzip-compressed JSON (RFC 8460 section 5.1: ``application/tlsrpt+gzip``);
    no time stamp in the gzip header, so the same report gives the same bytes."""
    text = json.dumps(report, indent=None, separators=(",", ":"), sort_keys=False)
    return gzip.compress(text.encode("utf-8"), mtime=0)


def report_filename(submitter: str, policy_domain: str, day: date) -> str:
    """RFC 8460 section 5.1: ``sender!policy-domain!begin-timestamp!end-timestamp.json.gz``,
    the time stamps in seconds since the epoch (those of the report's date-range)."""
    start, end = day_range(day)
    return f"{submitter}!{policy_domain}!{int(start.timestamp())}!{int(end.timestamp())}.json.gz"
