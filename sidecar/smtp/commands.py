"""Sans-IO parsing of client commands: the command line, and MAIL FROM / RCPT TO envelopes.

Address syntax is RFC 5321 section 4.1.2 with the RFC 6531 (SMTPUTF8) extensions: UTF-8 is
allowed in dot-atom and quoted local parts and in domain labels. Address literals must be
IPv4 or IPv6 (checked with `ipaddress`); general address literals are refused. Source routes
are accepted and ignored (RFC 5321 appendix C).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

import idna

from sidecar.errors import CommandError
from sidecar.smtp.replies import (
    BAD_RECIPIENT_SYNTAX,
    BAD_SENDER_SYNTAX,
    PARAM_SYNTAX,
    SYNTAX_ERROR,
    Reply,
)

__all__ = [
    "Address",
    "Command",
    "CommandError",
    "MailFrom",
    "Params",
    "RcptTo",
    "parse_command",
    "parse_mail_from",
    "parse_rcpt_to",
]

# Local part and path lengths are not bounded here: RFC 5321 section 4.5.3.1's 64 (local part)
# and 256 (path) are sizes every implementation MUST accept, not maxima, and SRS, VERP and
# list-confirmation addresses exceed 64 octets. The command line as a whole stays bounded by
# `server.max_line_length`. What DNS cannot hold is refused: a name of more than 255 octets on
# the wire (253 in text form, without a final dot) or a label of more than 63 (RFC 1035
# section 2.3.4); for an internationalised domain both apply to its A-label form.
MAX_DOMAIN = 253  # octets, text form of a domain name (RFC 1035 section 2.3.4)
MAX_LABEL = 63  # octets, RFC 1035 section 2.3.4


# --- Command lines ---------------------------------------------------------------------

_COMMAND_RE = re.compile(r"([A-Za-z]{1,16})(?: ([^\x00\r\n]*))?")


@dataclass(frozen=True, slots=True)
class Command:
    """One command line: `verb` upper-cased, `argument` the text after "VERB " ("" if none,
    trailing blanks removed)."""

    verb: str
    argument: str


def parse_command(line: bytes) -> Command:
    """Parse a command line given without its CRLF.

    Raises `CommandError` (500 5.5.2) for an empty line, NUL/CR/LF, non-UTF-8 bytes, or a
    verb that is not 1 to 16 ASCII letters followed by end of line or one space.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError(SYNTAX_ERROR) from None
    match = _COMMAND_RE.fullmatch(text)
    if match is None:
        raise CommandError(SYNTAX_ERROR)
    verb, argument = match.groups()
    return Command(verb.upper(), argument.rstrip(" \t") if argument else "")


# --- Addresses -------------------------------------------------------------------------

_UTF8 = "\u0080-\U0010ffff"  # RFC 6531 UTF8-non-ascii
_ATEXT = rf"A-Za-z0-9!#$%&'*+\-/=?^_`{{|}}~{_UTF8}"
_DOT_STRING = rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*"
_QUOTED_STRING = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"'
_DOMAIN = rf"[A-Za-z0-9\-{_UTF8}]+(?:\.[A-Za-z0-9\-{_UTF8}]+)*"
_LITERAL = r"\[(?:[0-9.]+|[Ii][Pp][Vv]6:[0-9A-Fa-f:.]+)\]"
_PATH_RE = re.compile(
    rf"<(?:@{_DOMAIN}(?:,@{_DOMAIN})*:)?"
    rf"(?P<mailbox>(?P<local>{_DOT_STRING}|{_QUOTED_STRING})"
    rf"@(?:(?P<domain>{_DOMAIN})|(?P<literal>{_LITERAL})))>"
)
_PARAM_RE = re.compile(rf"([A-Za-z0-9][A-Za-z0-9\-]*)(?:=([\x21-\x3c\x3e-\x7e{_UTF8}]+))?")


@functools.lru_cache(maxsize=4096)
def _a_label_domain(domain: str) -> str:
    """IDNA (UTS 46, non-transitional) A-label form of a domain; ValueError if invalid."""
    try:
        return idna.encode(domain, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        raise ValueError(f"invalid internationalised domain {domain!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox from a path.

    `local_part` as written (quotes kept); `domain` lower-cased, or for an address literal
    the literal's text without brackets (e.g. "192.0.2.1", "ipv6:2001:db8::1") with the
    parsed address in `literal`; `text` is the mailbox as written between "<" and ">" (a
    source route is left out), used when replaying the envelope. For `<postmaster>` the
    domain is "".
    """

    local_part: str
    domain: str
    literal: IPv4Address | IPv6Address | None
    text: str

    @property
    def needs_smtputf8(self) -> bool:
        """True when the mailbox has no ASCII form: its local part is not ASCII (RFC 6531
        section 3.3). A non-ASCII domain has one, its A-label form."""
        return not self.local_part.isascii()

    def wire_text(self, utf8: bool) -> str:
        """The mailbox to send in MAIL or RCPT: as written when ``utf8`` (SMTPUTF8 is in use
        for the transaction), else with the domain in its A-label form (RFC 5890), the only
        form allowed without SMTPUTF8. Raises ValueError if the local part needs SMTPUTF8."""
        if utf8 or self.text.isascii():
            return self.text
        if self.needs_smtputf8:
            raise ValueError(f"local part {self.local_part!r} needs SMTPUTF8")
        return f"{self.local_part}@{self.routing_domain}"

    @property
    def routing_domain(self) -> str:
        """The domain to resolve: A-label (IDNA) form, lower-case; literals as they are."""
        domain = self.domain
        if self.literal is not None or domain.isascii():
            return domain
        return _a_label_domain(domain)


def _check_domain(domain: str) -> bool:
    """Label rules beyond the regular expression: lengths, hyphens, IDNA validity.

    Lengths are DNS's (RFC 1035 section 2.3.4): at most 253 octets in text form, 63 per
    label. A domain with U-labels is measured in its A-label form (what DNS holds), which
    `idna.encode` checks.
    """
    if domain.isascii():
        if len(domain) > MAX_DOMAIN:
            return False
        for label in domain.split("."):
            if len(label) > MAX_LABEL or label[0] == "-" or label[-1] == "-":
                return False
        return True
    for label in domain.split("."):
        if label[0] == "-" or label[-1] == "-":
            return False
    try:
        _a_label_domain(domain)
    except ValueError:
        return False
    return True


def _parse_path(text: str, error: Reply) -> tuple[Address, str]:
    """Parse "<mailbox>" at the start of `text`; return it and the text after it."""
    match = _PATH_RE.match(text)
    if match is None:
        raise CommandError(error)
    end = match.end()
    local_part = match["local"]
    domain: str | None = match["domain"]
    literal: IPv4Address | IPv6Address | None = None
    if domain is not None:
        domain = domain.lower()
        if not _check_domain(domain):
            raise CommandError(error)
    else:
        domain = match["literal"][1:-1].lower()
        try:
            literal = IPv6Address(domain[5:]) if domain.startswith("ipv6:") else IPv4Address(domain)
        except ValueError:
            raise CommandError(error) from None
    return Address(local_part, domain, literal, match["mailbox"]), text[end:]


# --- ESMTP parameters ------------------------------------------------------------------

Params = tuple[tuple[str, str | None], ...]
"""ESMTP parameters in order: (KEYWORD, value or None)."""


def _parse_params(text: str) -> Params:
    """Parse what follows the path: "" or one or more spaces then esmtp-params."""
    if not text:
        return ()
    if text[0] != " ":
        raise CommandError(PARAM_SYNTAX)
    params: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for token in text.split(" "):
        if not token:
            continue
        match = _PARAM_RE.fullmatch(token)
        if match is None:
            raise CommandError(PARAM_SYNTAX)
        keyword = match[1].upper()
        if keyword in seen:
            raise CommandError(PARAM_SYNTAX)
        seen.add(keyword)
        params.append((keyword, match[2]))
    return tuple(params)


def _keep_all(keyword: str) -> bool:
    return True


def _params_text(params: Params, keep: Callable[[str], bool]) -> str:
    return "".join(
        (f" {keyword}={value}" if value is not None else f" {keyword}")
        for keyword, value in params
        if keep(keyword)
    )


@dataclass(frozen=True, slots=True)
class MailFrom:
    """MAIL FROM: the sender (None for the null reverse-path `<>`) and ESMTP parameters
    (keyword upper-cased, value None when the parameter has no "=value")."""

    sender: Address | None
    params: Params

    def to_line(self, keep: Callable[[str], bool] = _keep_all, utf8: bool = True) -> bytes:
        """`MAIL FROM:<...> PARAMS\\r\\n`, without the parameters whose keyword keep()
        rejects; with ``utf8`` false the sender's domain goes as an A-label (see
        `Address.wire_text`)."""
        path = "" if self.sender is None else self.sender.wire_text(utf8)
        return f"MAIL FROM:<{path}>{_params_text(self.params, keep)}\r\n".encode()


@dataclass(frozen=True, slots=True)
class RcptTo:
    """RCPT TO: the recipient and ESMTP parameters."""

    recipient: Address
    params: Params

    def to_line(self, keep: Callable[[str], bool] = _keep_all, utf8: bool = True) -> bytes:
        """`RCPT TO:<...> PARAMS\\r\\n`, without the parameters whose keyword keep()
        rejects; with ``utf8`` false the domain goes as an A-label (see
        `Address.wire_text`)."""
        params = _params_text(self.params, keep)
        return f"RCPT TO:<{self.recipient.wire_text(utf8)}>{params}\r\n".encode()


def _strip_prefix(argument: str, prefix: str) -> str:
    """Remove a case-insensitive "FROM:"/"TO:" and any spaces after it."""
    size = len(prefix)
    if argument[:size].upper() != prefix:
        raise CommandError(PARAM_SYNTAX)
    return argument[size:].lstrip(" ")


def parse_mail_from(argument: str) -> MailFrom:
    """Parse the argument of MAIL, e.g. "FROM:<a@b.example> SIZE=100".

    Raises `CommandError`: 501 5.5.4 for a missing "FROM:" or bad parameters, 501 5.1.7 for
    a bad sender address.
    """
    rest = _strip_prefix(argument, "FROM:")
    if rest.startswith("<>"):
        return MailFrom(None, _parse_params(rest[2:]))
    sender, rest = _parse_path(rest, BAD_SENDER_SYNTAX)
    return MailFrom(sender, _parse_params(rest))


def parse_rcpt_to(argument: str) -> RcptTo:
    """Parse the argument of RCPT, e.g. "TO:<a@b.example> NOTIFY=NEVER".

    `<postmaster>` (any case, no domain) gives an address with domain "". Raises
    `CommandError`: 501 5.5.4 for a missing "TO:" or bad parameters, 501 5.1.3 for a bad
    recipient address.
    """
    rest = _strip_prefix(argument, "TO:")
    if rest[:12].isascii() and rest[:12].lower() == "<postmaster>":
        local_part = rest[1:11]
        recipient = Address(local_part, "", None, local_part)
        return RcptTo(recipient, _parse_params(rest[12:]))
    recipient, rest = _parse_path(rest, BAD_RECIPIENT_SYNTAX)
    return RcptTo(recipient, _parse_params(rest))
