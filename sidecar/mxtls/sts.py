"""MTA-STS (RFC 8461), sans-IO: the ``_mta-sts`` TXT record (section 3.1), the policy file
(section 3.2), MX host matching (section 4.1) and what a policy makes of a domain's MX hosts.

Nothing here does I/O: :mod:`sidecar.mxtls.sts_fetch` fetches, :mod:`sidecar.mxtls.sts_cache`
keeps policies, :mod:`sidecar.routing` applies them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from sidecar.mxtls.outcome import ResultType

StsMode = Literal["enforce", "testing", "none"]
STS_MODES: tuple[StsMode, ...] = ("enforce", "testing", "none")

# RFC 8461 section 3.2: "max_age ... maximum value of 31557600" (a year). A larger value is
# taken as that year; the grammar allows up to 10 digits.
MAX_AGE_LIMIT = 31_557_600

# The policy body is read up to this many bytes (RFC 8461 section 3.3 lets senders bound it;
# real policies are a few hundred bytes): more is a fetch failure, never a truncated policy.
MAX_POLICY_BYTES = 64 * 1024

# Most "mx" patterns kept from one policy (each costs a comparison per MX host).
MAX_MX_PATTERNS = 100

_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_TXT_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}")
_TXT_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
_POLICY_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}")
_MAX_AGE = re.compile(r"[0-9]{1,10}")
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_WSP = " \t"


class StsError(ValueError):
    """A TXT record or policy that RFC 8461 does not allow (the text says why)."""


@dataclass(frozen=True, slots=True)
class StsRecord:
    """A valid ``_mta-sts`` TXT record: its ``id`` (RFC 8461 section 3.1)."""

    id: str


@dataclass(frozen=True, slots=True)
class StsPolicy:
    """A valid MTA-STS policy (RFC 8461 section 3.2). ``max_age`` in seconds (at most
    :data:`MAX_AGE_LIMIT`); ``mx`` the patterns, lower-case, no trailing dot."""

    mode: StsMode
    max_age: int
    mx: tuple[str, ...]

    def matches(self, host: str) -> bool:
        """Whether the MX host name ``host`` matches one of the policy's patterns
        (RFC 8461 section 4.1)."""
        return any(mx_matches(pattern, host) for pattern in self.mx)

    def lines(self) -> tuple[str, ...]:
        """The policy in its own words, one field a line (TLS-RPT's "policy-string",
        RFC 8460 section 4.4)."""
        return (
            "version: STSv1",
            f"mode: {self.mode}",
            *(f"mx: {pattern}" for pattern in self.mx),
            f"max_age: {self.max_age}",
        )


def parse_txt_records(records: Iterable[str]) -> StsRecord | None:
    """The ``_mta-sts.<domain>`` TXT answer (each record's strings already joined) as a
    record, or ``None`` when the domain has no usable one (RFC 8461 section 3.1: records that
    do not begin with ``v=STSv1;`` are discarded; anything but exactly one left, or one that
    is not valid, means no policy)."""
    candidates = [record for record in records if record.startswith("v=STSv1;")]
    if len(candidates) != 1:
        return None
    try:
        return parse_txt(candidates[0])
    except StsError:
        return None


def parse_txt(text: str) -> StsRecord:
    """One TXT record: ``v=STSv1; id=<1-32 alphanumerics>`` and optional extensions
    (RFC 8461 section 3.1 grammar; a trailing ``;`` and whitespace around ``;`` allowed).
    Raises :class:`StsError`."""
    fields = text.split(";")
    if fields[0] != "v=STSv1":
        raise StsError("the record does not begin with v=STSv1")
    if fields[-1].strip(_WSP) == "" and len(fields) > 1:
        fields = fields[:-1]  # the optional trailing ";"
    found_id: str | None = None
    for raw in fields[1:]:
        field = raw.strip(_WSP)
        name, equals, value = field.partition("=")
        if not equals:
            raise StsError(f"field {field[:40]!r} is not name=value")
        if name == "id":
            if not _TXT_ID.fullmatch(value):
                raise StsError("id must be 1 to 32 letters or digits")
            if found_id is None:
                found_id = value
        elif not _TXT_EXT_NAME.fullmatch(name) or not _TXT_EXT_VALUE.fullmatch(value):
            raise StsError(f"field {field[:40]!r} is not a valid extension")
    if found_id is None:
        raise StsError("no id field")
    return StsRecord(found_id)


def _valid_pattern(pattern: str) -> bool:
    """``["*."] Domain``: a host name, or ``*.`` and a host name."""
    name = pattern[2:] if pattern.startswith("*.") else pattern
    if not name or len(name) > 253:
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))


def parse_policy(body: bytes) -> StsPolicy:
    """The policy file (RFC 8461 section 3.2): ``key: value`` lines ended by LF or CRLF;
    ``version: STSv1``, ``mode``, ``max_age`` and (unless mode is "none") at least one
    ``mx`` are required; unknown keys are ignored; the first of a repeated key other than
    ``mx`` counts. Raises :class:`StsError`."""
    if len(body) > MAX_POLICY_BYTES:
        raise StsError(f"the policy is larger than {MAX_POLICY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise StsError("the policy is not UTF-8") from None
    fields: dict[str, str] = {}
    patterns: list[str] = []
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if not line.strip(_WSP):
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise StsError(f"line {line[:40]!r} is not key: value")
        value = value.strip(_WSP)
        if key == "mx":
            pattern = value.lower().removesuffix(".")
            if not _valid_pattern(pattern):
                raise StsError(f"mx {value[:60]!r} is not a host name pattern")
            if len(patterns) < MAX_MX_PATTERNS and pattern not in patterns:
                patterns.append(pattern)
        elif key in ("version", "mode", "max_age"):
            fields.setdefault(key, value)
        elif not _POLICY_EXT_NAME.fullmatch(key):
            raise StsError(f"key {key[:40]!r} is not a valid field name")
    if fields.get("version") != "STSv1":
        raise StsError("version is not STSv1" if "version" in fields else "no version field")
    mode = fields.get("mode")
    if mode is None:
        raise StsError("no mode field")
    if mode not in STS_MODES:
        raise StsError(f"mode {mode[:20]!r} is not enforce, testing or none")
    max_age = fields.get("max_age")
    if max_age is None:
        raise StsError("no max_age field")
    if not _MAX_AGE.fullmatch(max_age):
        raise StsError("max_age is not a number of seconds")
    if mode != "none" and not patterns:
        raise StsError(f"mode {mode} with no mx pattern")
    return StsPolicy(mode, min(int(max_age), MAX_AGE_LIMIT), tuple(patterns))


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 section 4.1: ``host`` matches ``pattern`` (case-insensitive, a trailing dot
    ignored); a ``*.`` wildcard stands for exactly one left-most label: ``*.example.com``
    matches ``mx.example.com`` but neither ``example.com`` nor ``a.b.example.com``."""
    pattern = pattern.lower().removesuffix(".")
    host = host.lower().removesuffix(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return host == pattern


def excluded_hosts(policy: StsPolicy, hosts: Sequence[str]) -> list[str]:
    """The MX host names of ``hosts`` that ``policy``'s patterns do not allow, in order."""
    return [host for host in hosts if not policy.matches(host)]


StsSource = Literal["fetched", "cache", "none"]


@dataclass(frozen=True, slots=True)
class StsLookup:
    """What the MTA-STS look-up for ``domain`` found (RFC 8461 section 5.1): the policy in
    force (``None``: the domain has none, deliver as before), its ``id``, where it came from
    ("fetched" now, the "cache", or "none"), and ``problem``: why no fresh policy could be
    had when the TXT record announced one (a fetch failure; ``result`` its RFC 8460 result
    type), for the log and TLS-RPT. ``text``: the policy's lines."""

    domain: str
    policy: StsPolicy | None = None
    id: str | None = None
    source: StsSource = "none"
    expires: float | None = None  # Unix time the cached policy expires
    problem: str | None = None
    result: ResultType | None = None
    text: tuple[str, ...] = ()

    @property
    def mode(self) -> StsMode | None:
        """The policy's mode; ``None`` without a policy."""
        return None if self.policy is None else self.policy.mode
