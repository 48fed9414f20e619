"""sidecar.mxtls.tlsrpt (RFC 8460), sans-IO: the ``_smtp._tls`` TXT record (section 3), the
result type of a failed handshake (section 4.3), the aggregate report (section 4.4, checked
against the RFC's JSON schema, Appendix B / section 4.4, written out below as a validator),
its file name (section 5.1) and e-mail (section 5.3)."""

from __future__ import annotations

import gzip
import json
import re
import ssl
from datetime import UTC, date, datetime
from email import message_from_bytes, policy
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from sidecar.mxtls.tlsrpt import (
    X509_V_ERR_CERT_HAS_EXPIRED,
    X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
    X509_V_ERR_HOSTNAME_MISMATCH,
    X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
    RecordError,
    Reporter,
    Tally,
    build_report,
    day_range,
    handshake_failure,
    parse_record,
    report_bytes,
    report_filename,
    report_id,
    select_record,
)
from sidecar.mxtls.tlsrpt_report import report_email

REPORTER = Reporter("Example Sender Inc.", "postmaster@sender.test", "sender.test", "sc1")
DAY = date(2026, 11, 29)

# ---- section 3: the TXT record ---------------------------------------------------------------


def test_a_record_with_mailto_and_https_uris() -> None:
    record = parse_record(
        "v=TLSRPTv1; rua=mailto:tlsrpt@example.test, https://reports.example.test/v1"
    )
    assert record.rua == ("mailto:tlsrpt@example.test", "https://reports.example.test/v1")
    assert record.mailto == ("tlsrpt@example.test",)
    assert record.https == ("https://reports.example.test/v1",)
    assert record.targets == ("mailto:tlsrpt@example.test", "https://reports.example.test/v1")


@pytest.mark.parametrize(
    "text",
    [
        "v=TLSRPTv1;rua=mailto:a@example.test",
        "v=TLSRPTv1; rua=mailto:a@example.test;",
        "v=TLSRPTv1 ;\trua=mailto:a@example.test ; ",
        "v=TLSRPTv1; rua=mailto:a@example.test; ext_1=value",
    ],
)
def test_delimiters_spaces_and_extensions(text: str) -> None:
    assert parse_record(text).mailto == ("a@example.test",)


def test_a_mailto_uri_is_percent_decoded_and_its_query_dropped() -> None:
    record = parse_record("v=TLSRPTv1; rua=mailto:tls%2Brpt@example.test?subject=x")
    assert record.mailto == ("tls+rpt@example.test",)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "v=TLSRPTv2; rua=mailto:a@example.test",
        "rua=mailto:a@example.test; v=TLSRPTv1",
        "v=TLSRPTv1",
        "v=TLSRPTv1; rua=",
        "v=TLSRPTv1; rua=mailto:a@example.test; rua=mailto:b@example.test",
        "v=TLSRPTv1; rua=mailto:a@example.test,,https://x.test",
        "v=TLSRPTv1; rua=mailto:a@example.test!10m",
        "v=TLSRPTv1; rua=mailto:a@example.test; =x",
        "v=TLSRPTv1; rua=mailto:a@example.test; bogus",
        "v=TLSRPTv1; rua=nocolon",
        "v=TLSRPTv1; rua=" + ",".join(f"mailto:a{i}@example.test" for i in range(11)),
    ],
)
def test_records_that_do_not_follow_section_3_are_refused(text: str) -> None:
    with pytest.raises(RecordError):
        parse_record(text)


def test_uris_of_other_schemes_serve_no_report() -> None:
    record = parse_record(
        "v=TLSRPTv1; rua=http://insecure.test/r, mailto:a%20b@x.test, mailto:-oQ@x.test"
    )
    assert record.targets == ()
    assert select_record(["v=TLSRPTv1; rua=http://insecure.test/r"]) is None


def test_exactly_one_tlsrpt_record_is_needed() -> None:
    good = "v=TLSRPTv1; rua=mailto:a@example.test"
    assert select_record([good]) == parse_record(good)
    assert select_record(["v=spf1 -all", good]) == parse_record(good)
    assert select_record([]) is None
    assert select_record([good, "v=TLSRPTv1; rua=mailto:b@example.test"]) is None
    assert select_record(["v=TLSRPTv1; rua=bad"]) is None


_URI_CHARS = st.text(
    st.characters(min_codepoint=0x22, max_codepoint=0x7E, exclude_characters=",;"),
    min_size=1,
    max_size=30,
)
_MAILBOX = st.from_regex(
    r"[a-z0-9][a-z0-9._+=-]{0,11}@[a-z0-9-]{1,10}(\.[a-z0-9-]{1,10}){0,2}", fullmatch=True
)


@given(
    mailboxes=st.lists(_MAILBOX, min_size=0, max_size=4),
    https=st.lists(
        st.from_regex(r"https://[a-z0-9.-]{1,20}/[a-z0-9/]{0,20}", fullmatch=True), max_size=3
    ),
    spaces=st.sampled_from(["", " ", "\t", "  "]),
    trailing=st.booleans(),
)
def test_property_well_formed_records_give_back_their_uris(
    mailboxes: list[str], https: list[str], spaces: str, trailing: bool
) -> None:
    uris = [f"mailto:{box}" for box in mailboxes] + https
    if not uris:
        uris = ["mailto:a@example.test"]
        mailboxes = ["a@example.test"]
    text = f"v=TLSRPTv1{spaces};{spaces}rua={f'{spaces},{spaces}'.join(uris)}"
    if trailing:
        text += f"{spaces};"
    record = parse_record(text)
    assert record.rua == tuple(uris)
    assert record.mailto == tuple(mailboxes)
    assert record.https == tuple(https)
    assert select_record([text]) == record


@given(st.text(max_size=300))
def test_property_any_text_parses_or_is_refused_and_never_crashes(text: str) -> None:
    try:
        record = parse_record(text)
    except RecordError:
        return
    assert text.startswith("v=TLSRPTv1")
    assert record.rua
    for target in record.targets:
        assert target.startswith(("mailto:", "https://"))
        assert not re.search(r"[\s;,]", target)


@given(_URI_CHARS)
def test_property_any_uri_with_a_scheme_is_kept_in_rua(uri: str) -> None:
    text = f"v=TLSRPTv1; rua={uri.strip()}"
    try:
        record = parse_record(text)
    except RecordError:
        assert ":" not in uri or not uri.strip() or "!" in uri
        return
    assert record.rua == (uri.strip(),)


# ---- section 4.3: the result type of a failed handshake -------------------------------------


def _verify_error(code: int, message: str) -> trio.BrokenResourceError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    error.verify_code = code
    error.verify_message = message
    try:
        raise trio.BrokenResourceError from error  # as trio's SSLStream wraps it
    except trio.BrokenResourceError as wrapped:
        return wrapped


@pytest.mark.parametrize(
    ("code", "message", "result"),
    [
        (X509_V_ERR_CERT_HAS_EXPIRED, "certificate has expired", "certificate-expired"),
        (
            X509_V_ERR_HOSTNAME_MISMATCH,
            "Hostname mismatch, certificate is not valid for 'mx.test'.",
            "certificate-host-mismatch",
        ),
        (
            X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
            "unable to get local issuer certificate",
            "certificate-not-trusted",
        ),
        (
            X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
            "self-signed certificate",
            "certificate-not-trusted",
        ),
        (7, "certificate signature failure", "validation-failure"),
    ],
)
def test_certificate_errors_are_told_apart_by_their_openssl_code(
    code: int, message: str, result: str
) -> None:
    assert handshake_failure(_verify_error(code, message)) == (result, message)


def test_other_handshake_failures_are_validation_failures_with_a_reason() -> None:
    assert handshake_failure(trio.TooSlowError()) == ("validation-failure", "timed out")
    try:
        raise trio.BrokenResourceError from ssl.SSLError(1, "[SSL] wrong version number")
    except trio.BrokenResourceError as error:
        result, reason = handshake_failure(error)
    assert result == "validation-failure" and "wrong version number" in reason
    result, reason = handshake_failure(trio.BrokenResourceError())
    assert result == "validation-failure" and reason


# ---- section 4.4: the report, checked against the RFC's schema -------------------------------

DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")
POLICY_TYPES = {"tlsa", "sts", "no-policy-found"}
RESULT_TYPES = {
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
}

# RFC 8460 section 4.4's JSON schema, written as {key: (type, required)} per object; a nested
# dict is an object, a list [schema] an array of such objects.
STRING, INTEGER, STRINGS = "string", "integer", "array of strings"
SCHEMA: dict[str, Any] = {
    "organization-name": (STRING, True),
    "date-range": (
        {"start-datetime": ("date-time", True), "end-datetime": ("date-time", True)},
        True,
    ),
    "contact-info": (STRING, True),
    "report-id": (STRING, True),
    "policies": (
        [
            {
                "policy": (
                    {
                        "policy-type": ("policy-type", True),
                        "policy-string": (STRINGS, False),
                        "policy-domain": (STRING, True),
                        "mx-host": (STRINGS, False),
                    },
                    True,
                ),
                "summary": (
                    {
                        "total-successful-session-count": (INTEGER, True),
                        "total-failure-session-count": (INTEGER, True),
                    },
                    True,
                ),
                "failure-details": (
                    [
                        {
                            "result-type": ("result-type", True),
                            "sending-mta-ip": ("ip", False),
                            "receiving-mx-hostname": (STRING, False),
                            "receiving-mx-helo": (STRING, False),
                            "receiving-ip": ("ip", False),
                            "failed-session-count": (INTEGER, True),
                            "additional-information": (STRING, False),
                            "failure-reason-code": (STRING, False),
                        }
                    ],
                    False,
                ),
            }
        ],
        True,
    ),
}


def _check(value: Any, schema: Any, where: str) -> None:
    if isinstance(schema, dict):
        assert isinstance(value, dict), where
        assert set(value) <= set(schema), f"{where}: unknown keys {set(value) - set(schema)}"
        for key, (kind, required) in schema.items():
            if key in value:
                _check(value[key], kind, f"{where}.{key}")
            else:
                assert not required, f"{where}: {key} missing"
    elif isinstance(schema, list):
        assert isinstance(value, list) and value, where
        for index, item in enumerate(value):
            _check(item, schema[0], f"{where}[{index}]")
    elif schema == STRING:
        assert isinstance(value, str) and value, where
    elif schema == INTEGER:
        assert isinstance(value, int) and not isinstance(value, bool) and value >= 0, where
    elif schema == STRINGS:
        assert isinstance(value, list) and all(isinstance(s, str) for s in value), where
    elif schema == "date-time":
        assert isinstance(value, str) and DATE_TIME.fullmatch(value), where
    elif schema == "policy-type":
        assert value in POLICY_TYPES, where
    elif schema == "result-type":
        assert value in RESULT_TYPES, where
    elif schema == "ip":
        import ipaddress

        ipaddress.ip_address(value)
    else:  # pragma: no cover
        raise AssertionError(schema)


def validate_report(report: dict[str, Any]) -> None:
    """RFC 8460 section 4.4's structure, and the summary adding up to the details."""
    _check(report, SCHEMA, "report")
    for entry in report["policies"]:
        details = entry.get("failure-details", [])
        failed = sum(detail["failed-session-count"] for detail in details)
        assert entry["summary"]["total-failure-session-count"] == failed


def _tally(result: str | None, count: int, **fields: Any) -> Tally:
    values: dict[str, Any] = {
        "policy_type": "no-policy-found",
        "policy_strings": (),
        "mx_hosts": (),
        "result": result,
        "sending_ip": "" if result is None else "192.0.2.1",
        "receiving_mx": "" if result is None else "mx1.example.test",
        "receiving_ip": "" if result is None else "198.51.100.25",
        "reason": "" if result is None else f"{result} reason",
        "count": count,
    }
    values.update(fields)
    return Tally(**values)


MIXED_DAY = [
    _tally(None, 40),
    _tally(None, 2),  # a second row of the same policy (another writer's): added up
    _tally("starttls-not-supported", 3, reason="STARTTLS not offered"),
    _tally("certificate-not-trusted", 2, reason="unable to get local issuer certificate"),
    _tally("certificate-not-trusted", 1, sending_ip="2001:db8::1", reason="self-signed"),
    _tally("certificate-host-mismatch", 1, receiving_mx="mx2.example.test"),
    _tally("certificate-expired", 1),
    _tally("validation-failure", 4, reason="timed out", sending_ip=""),
    _tally(
        None,
        7,
        policy_type="sts",
        policy_strings=("version: STSv1", "mode: enforce", "mx: *.example.test", "max_age: 86400"),
        mx_hosts=("*.example.test",),
    ),
    _tally(
        "sts-webpki-invalid",
        1,
        policy_type="sts",
        policy_strings=("version: STSv1", "mode: enforce", "mx: *.example.test", "max_age: 86400"),
        mx_hosts=("*.example.test",),
    ),
    _tally(
        None, 5, policy_type="tlsa", policy_strings=("3 1 1 ab12",), mx_hosts=("mx1.example.test",)
    ),
    _tally(
        "tlsa-invalid",
        2,
        policy_type="tlsa",
        policy_strings=("3 1 1 ab12",),
        mx_hosts=("mx1.example.test",),
    ),
]


def test_the_report_of_a_day_of_mixed_results_follows_the_rfc_structure() -> None:
    report = build_report(REPORTER, "example.test", DAY, MIXED_DAY)
    validate_report(report)
    assert report["organization-name"] == "Example Sender Inc."
    assert report["contact-info"] == "postmaster@sender.test"
    assert report["date-range"] == {
        "start-datetime": "2026-11-29T00:00:00Z",
        "end-datetime": "2026-11-29T23:59:59Z",
    }
    by_type = {entry["policy"]["policy-type"]: entry for entry in report["policies"]}
    assert set(by_type) == {"no-policy-found", "sts", "tlsa"}
    plain = by_type["no-policy-found"]
    assert plain["policy"] == {"policy-type": "no-policy-found", "policy-domain": "example.test"}
    assert plain["summary"] == {
        "total-successful-session-count": 42,
        "total-failure-session-count": 12,
    }
    details = {
        (d["result-type"], d.get("sending-mta-ip"), d["receiving-mx-hostname"]): d
        for d in plain["failure-details"]
    }
    assert details["starttls-not-supported", "192.0.2.1", "mx1.example.test"] == {
        "result-type": "starttls-not-supported",
        "sending-mta-ip": "192.0.2.1",
        "receiving-mx-hostname": "mx1.example.test",
        "receiving-ip": "198.51.100.25",
        "failed-session-count": 3,
        "failure-reason-code": "STARTTLS not offered",
    }
    assert "sending-mta-ip" not in details["validation-failure", None, "mx1.example.test"]
    sts = by_type["sts"]
    assert sts["policy"]["policy-string"][1] == "mode: enforce"
    assert sts["policy"]["mx-host"] == ["*.example.test"]
    assert sts["summary"] == {"total-successful-session-count": 7, "total-failure-session-count": 1}
    assert by_type["tlsa"]["policy"]["mx-host"] == ["mx1.example.test"]


def test_a_day_without_failures_has_no_failure_details() -> None:
    report = build_report(REPORTER, "example.test", DAY, [_tally(None, 3)])
    validate_report(report)
    (entry,) = report["policies"]
    assert "failure-details" not in entry
    assert entry["summary"]["total-failure-session-count"] == 0


def test_the_report_and_its_bytes_are_the_same_for_the_same_counts() -> None:
    first = build_report(REPORTER, "example.test", DAY, MIXED_DAY)
    second = build_report(REPORTER, "example.test", DAY, list(reversed(MIXED_DAY)))
    assert first == second
    assert report_bytes(first) == report_bytes(second)
    assert json.loads(gzip.decompress(report_bytes(first))) == first


def test_report_ids_differ_per_domain_day_and_host() -> None:
    ids = {
        report_id(REPORTER, "a.test", DAY),
        report_id(REPORTER, "b.test", DAY),
        report_id(REPORTER, "a.test", date(2026, 11, 30)),
        report_id(Reporter("x", "y@z", "sender.test", "sc2"), "a.test", DAY),
    }
    assert len(ids) == 4


def test_the_file_name_follows_section_5_1() -> None:
    start, end = day_range(DAY)
    assert (start, end) == (
        datetime(2026, 11, 29, tzinfo=UTC),
        datetime(2026, 11, 29, 23, 59, 59, tzinfo=UTC),
    )
    assert report_filename("sender.test", "example.test", DAY) == (
        f"sender.test!example.test!{int(start.timestamp())}!{int(end.timestamp())}.json.gz"
    )
    assert int(end.timestamp()) - int(start.timestamp()) == 86399


def test_the_email_follows_section_5_3() -> None:
    report = build_report(REPORTER, "example.test", DAY, MIXED_DAY)
    data = report_bytes(report)
    name = report_filename("sender.test", "example.test", DAY)
    message = report_email(
        REPORTER,
        "example.test",
        report,
        data,
        name,
        "tls-reports@sender.test",
        ["a@example.test", "b@example.test"],
        datetime(2026, 11, 30, 1, 0, tzinfo=UTC),
    )
    parsed = message_from_bytes(message.as_bytes(), policy=policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "tlsrpt"
    assert parsed["TLS-Report-Domain"] == "example.test"
    assert parsed["TLS-Report-Submitter"] == "sender.test"
    assert parsed["Subject"] == (
        f"Report Domain: example.test Submitter: sender.test Report-ID: <{report['report-id']}>"
    )
    assert parsed["To"] == "a@example.test, b@example.test"
    text, attachment = list(parsed.iter_parts())
    assert text.get_content_type() == "text/plain"
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert attachment.get_filename() == name
    assert attachment.get_payload(decode=True) == data


def test_failure_details_are_bounded_and_the_counts_stay_whole() -> None:
    """An MX that words each refusal differently (``454 4.7.0 <random>``) makes each failed
    session a detail of its own: the report keeps the MAX_FAILURE_DETAILS most frequent per
    policy (every outside input bounded), and its summary still counts every session."""
    from sidecar.mxtls.tlsrpt import MAX_FAILURE_DETAILS

    many = [
        _tally("starttls-not-supported", 1, reason=f"STARTTLS refused: 454 {n}")
        for n in range(MAX_FAILURE_DETAILS + 500)
    ]
    frequent = _tally("certificate-expired", 7)
    report = build_report(REPORTER, "example.test", DAY, [*many, frequent, _tally(None, 3)])
    validate_report(report)
    (entry,) = report["policies"]
    assert entry["summary"] == {
        "total-successful-session-count": 3,
        "total-failure-session-count": MAX_FAILURE_DETAILS + 500 + 7,
    }
    details = entry["failure-details"]
    assert len(details) == MAX_FAILURE_DETAILS + 1  # the rest: one entry for their type
    assert details[-1] == {
        "result-type": "starttls-not-supported",
        "failed-session-count": 501,
        "failure-reason-code": "501 more distinct failures, not detailed",
    }
    assert any(d["result-type"] == "certificate-expired" for d in details)  # the most frequent
    assert len(gzip.compress(json.dumps(report).encode())) < 1_000_000
