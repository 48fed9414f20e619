"""MTA-STS, sans-IO (sidecar/mxtls/sts.py): the TXT record (RFC 8461 section 3.1), the policy
file (section 3.2) and MX host matching (section 4.1), with property tests for both parsers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.mxtls.sts import (
    MAX_AGE_LIMIT,
    MAX_POLICY_BYTES,
    StsError,
    StsPolicy,
    StsRecord,
    excluded_hosts,
    mx_matches,
    parse_policy,
    parse_txt,
    parse_txt_records,
)

# ---- TXT record ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "policy_id"),
    [
        ("v=STSv1; id=20160831085700Z;", "20160831085700Z"),
        ("v=STSv1; id=20160831085700Z", "20160831085700Z"),
        ("v=STSv1;id=abc", "abc"),
        ("v=STSv1;\tid=abc ;", "abc"),
        ("v=STSv1; id=abc; ext_1=value", "abc"),
        ("v=STSv1; ext=x; id=A1", "A1"),
        ("v=STSv1; id=" + "a" * 32, "a" * 32),
    ],
)
def test_valid_txt_records(text: str, policy_id: str) -> None:
    assert parse_txt(text) == StsRecord(policy_id)
    assert parse_txt_records([text]) == StsRecord(policy_id)


@pytest.mark.parametrize(
    "text",
    [
        "v=STSv1;",  # no id
        "v=STSv1; id=",  # empty id
        "v=STSv1; id=" + "a" * 33,  # id too long
        "v=STSv1; id=abc-def",  # id not alphanumeric
        "v=STSv1; id=abc;; ",  # an empty field
        "v=STSv1; id=abc; x",  # not name=value
        "v=STSv1; id=abc; ext=a b",  # space in an extension value
        "v=STSv1; id=abc; -ext=1",  # extension name starts with "-"
        "v=STSv2; id=abc",
        "v=stsv1; id=abc",  # case-sensitive
        " v=STSv1; id=abc",
    ],
)
def test_invalid_txt_records(text: str) -> None:
    with pytest.raises(StsError):
        parse_txt(text)


def test_txt_answers_with_other_records_or_several_policies() -> None:
    # Records that do not begin with "v=STSv1;" are discarded (section 3.1)...
    assert parse_txt_records(["v=spf1 -all", "v=STSv1; id=1"]) == StsRecord("1")
    # ... and anything but exactly one left means no policy.
    assert parse_txt_records(["v=STSv1; id=1", "v=STSv1; id=2"]) is None
    assert parse_txt_records([]) is None
    assert parse_txt_records(["v=spf1 -all"]) is None
    assert parse_txt_records(["v=STSv1; id=bad-id"]) is None
    assert parse_txt_records(["v=STSv1"]) is None  # no ";" after the version: discarded


_ALNUM = st.text(
    alphabet=st.characters(min_codepoint=48, max_codepoint=122).filter(str.isalnum),
    min_size=1,
    max_size=32,
).filter(str.isascii)


@given(_ALNUM, st.sampled_from(["", ";", " ;", "; ext=v"]), st.sampled_from([" ", "", "\t"]))
def test_txt_property_any_valid_id_parses(policy_id: str, tail: str, space: str) -> None:
    assert parse_txt(f"v=STSv1;{space}id={policy_id}{tail}") == StsRecord(policy_id)


@given(st.text(max_size=200))
def test_txt_property_never_crashes(text: str) -> None:
    try:
        record = parse_txt(text)
    except StsError:
        return
    assert 1 <= len(record.id) <= 32 and record.id.isalnum()
    assert text.startswith("v=STSv1;")


# ---- policy file -----------------------------------------------------------------------------

POLICY = (
    b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
    b"max_age: 86400\r\n"
)


def test_the_rfc_example_policy() -> None:
    policy = parse_policy(POLICY)
    assert policy == StsPolicy("enforce", 86400, ("mail.example.com", "*.example.net"))
    assert policy.lines() == (
        "version: STSv1",
        "mode: enforce",
        "mx: mail.example.com",
        "mx: *.example.net",
        "max_age: 86400",
    )


def test_lf_lines_unknown_keys_and_spaces() -> None:
    body = (
        b"version: STSv1\nmode:testing\nfuture_key: whatever it says\n"
        b"mx:  MX.Example.COM. \nmax_age: 60\n\n"
    )
    assert parse_policy(body) == StsPolicy("testing", 60, ("mx.example.com",))


def test_mode_none_needs_no_mx_and_max_age_is_capped() -> None:
    body = b"version: STSv1\nmode: none\nmax_age: 9999999999\n"
    assert parse_policy(body) == StsPolicy("none", MAX_AGE_LIMIT, ())


def test_first_of_a_repeated_field_counts() -> None:
    body = b"version: STSv1\nmode: testing\nmode: enforce\nmx: a.example\nmax_age: 1\n"
    assert parse_policy(body).mode == "testing"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"mode: enforce\nmx: a.example\nmax_age: 1\n", "no version"),
        (b"version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n", "version is not"),
        (b"version: STSv1\nmx: a.example\nmax_age: 1\n", "no mode"),
        (b"version: STSv1\nmode: Enforce\nmx: a.example\nmax_age: 1\n", "mode"),
        (b"version: STSv1\nmode: enforce\nmx: a.example\n", "no max_age"),
        (b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n", "max_age"),
        (b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 12345678901\n", "max_age"),
        (b"version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx"),
        (b"version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1\n", "mx"),
        (b"version: STSv1\nmode: enforce\nmx: a..example\nmax_age: 1\n", "mx"),
        (b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\njunk\n", "not key: value"),
        (b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\n\xff\n", "UTF-8"),
        (b"<html>\n", "not key: value"),
        (b"x" * (MAX_POLICY_BYTES + 1), "larger"),
    ],
)
def test_invalid_policies(body: bytes, why: str) -> None:
    with pytest.raises(StsError, match=why):
        parse_policy(body)


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_HOST = st.lists(_LABEL, min_size=1, max_size=4).map(".".join)
_PATTERN = st.tuples(st.booleans(), _HOST).map(lambda p: ("*." if p[0] else "") + p[1])


@given(
    st.sampled_from(["enforce", "testing"]),
    st.integers(min_value=0, max_value=10**10 - 1),
    st.lists(_PATTERN, min_size=1, max_size=5),
    st.sampled_from(["\n", "\r\n"]),
    st.lists(st.tuples(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True), _HOST), max_size=3),
)
def test_policy_property_round_trip(
    mode: str,
    max_age: int,
    patterns: list[str],
    newline: str,
    extensions: list[tuple[str, str]],
) -> None:
    """Any well-formed policy parses to its fields, whatever the line ends and the unknown
    keys; its own lines() parse back to the same policy."""
    extensions = [(k, v) for k, v in extensions if k not in ("version", "mode", "max_age", "mx")]
    lines = [
        "version: STSv1",
        f"mode: {mode}",
        *(f"{key}: {value}" for key, value in extensions),
        *(f"mx: {pattern}" for pattern in patterns),
        f"max_age: {max_age}",
    ]
    policy = parse_policy((newline.join(lines) + newline).encode())
    assert policy.mode == mode
    assert policy.max_age == min(max_age, MAX_AGE_LIMIT)
    assert policy.mx == tuple(dict.fromkeys(patterns))
    assert parse_policy("\n".join(policy.lines()).encode()) == policy


@given(st.binary(max_size=300))
def test_policy_property_never_crashes(body: bytes) -> None:
    try:
        policy = parse_policy(body)
    except StsError:
        return
    assert policy.mode in ("enforce", "testing", "none")
    assert 0 <= policy.max_age <= MAX_AGE_LIMIT
    assert policy.mode == "none" or policy.mx


# ---- MX matching -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mail.example.com", "mail.example.com", True),
        ("mail.example.com", "MAIL.Example.com.", True),
        ("mail.example.com", "mail2.example.com", False),
        ("*.example.com", "mx.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", ".example.com", False),
        ("*.example.com", "mx.example.com.evil", False),
    ],
)
def test_mx_matching(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


@given(_LABEL, _HOST, _LABEL)
def test_mx_matching_property_wildcard_is_one_label(first: str, domain: str, extra: str) -> None:
    assert mx_matches(f"*.{domain}", f"{first}.{domain}")
    assert not mx_matches(f"*.{domain}", domain)
    assert not mx_matches(f"*.{domain}", f"{extra}.{first}.{domain}")


def test_excluded_hosts() -> None:
    policy = parse_policy(POLICY)
    hosts = ["mail.example.com", "mx1.example.net", "backup.example.org"]
    assert excluded_hosts(policy, hosts) == ["backup.example.org"]
