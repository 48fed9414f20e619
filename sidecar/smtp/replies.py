"""SMTP replies: the `Reply` value, a sans-IO parser for reply streams, and the catalogue
of the sidecar's own replies.

Replies received from an MX keep their exact bytes in `Reply.raw`, so that the client sees
the MX's final reply byte for byte (DESIGN.md, invariant 1). Replies the sidecar makes
itself are built with `reply()` and serialised by `Reply.to_bytes()`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "BAD_BODY",
    "BAD_RECIPIENT_SYNTAX",
    "BAD_SENDER_SYNTAX",
    "BARE_NEWLINE",
    "DATA_TAKES_NO_ARGUMENT",
    "EHLO_NEEDS_DOMAIN",
    "GOODBYE",
    "HELO_NEEDS_DOMAIN",
    "HELP",
    "HELP_LMTP",
    "LHLO_NEEDS_DOMAIN",
    "LINE_TOO_LONG",
    "MAX_REPLY_LINE",
    "MAX_REPLY_LINES",
    "MAX_REPLY_SIZE",
    "MESSAGE_TOO_BIG",
    "NEED_HELLO",
    "NEED_LHLO",
    "NEED_MAIL_BEFORE_DATA",
    "NEED_MAIL_BEFORE_RCPT",
    "NEED_RCPT_BEFORE_DATA",
    "NESTED_MAIL",
    "NON_ASCII_ADDRESS",
    "NON_ASCII_HEADER",
    "NOT_IMPLEMENTED",
    "NO_VALID_RECIPIENTS",
    "NO_VALID_RECIPIENTS_LMTP",
    "OK",
    "PARAM_SYNTAX",
    "RECIPIENT_NEEDS_DOMAIN",
    "SENDER_OK",
    "SIZE_NOT_A_NUMBER",
    "SYNTAX_ERROR",
    "TOO_MANY_ERRORS",
    "TOO_MANY_RECIPIENTS",
    "UNKNOWN_COMMAND",
    "USE_LHLO",
    "VRFY_CANNOT",
    "Reply",
    "ReplyError",
    "ReplyParser",
    "ehlo_reply",
    "helo_reply",
    "parse_ehlo_capabilities",
    "reply",
    "service_ready",
    "unsupported_parameter",
]

_ENHANCED_RE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply, possibly multi-line.

    `lines` holds the text of each line without the code and the separator (at least one
    line, possibly ""). `raw`, when set, is the exact bytes received from a peer and is what
    `to_bytes()` returns, for byte-exact pass-through.
    """

    code: int
    lines: tuple[str, ...]
    raw: bytes | None = None
    _wire: bytes = field(default=b"", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code!r}")
        if not self.lines:
            raise ValueError("a reply has at least one line")
        if self.raw is None:
            for line in self.lines:
                if "\r" in line or "\n" in line:
                    raise ValueError(f"reply line contains CR or LF: {line!r}")
            object.__setattr__(self, "_wire", _serialise(self.code, self.lines))

    def to_bytes(self) -> bytes:
        """The reply on the wire: `raw` if set, else `250-a\\r\\n250 b\\r\\n` style."""
        return self._wire if self.raw is None else self.raw

    @property
    def is_positive(self) -> bool:
        """2xx or 3xx."""
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        """4xx: the client keeps the message and retries."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """5xx."""
        return self.code >= 500

    @property
    def text(self) -> str:
        """All lines joined with a space (for logs and messages)."""
        return " ".join(self.lines)


def _serialise(code: int, lines: tuple[str, ...]) -> bytes:
    last = len(lines) - 1
    parts: list[str] = []
    for index, line in enumerate(lines):
        if index < last:
            parts.append(f"{code}-{line}\r\n")
        elif line:
            parts.append(f"{code} {line}\r\n")
        else:
            parts.append(f"{code}\r\n")
    return "".join(parts).encode("utf-8", "replace")


def reply(code: int, enhanced: str | None, text: str) -> Reply:
    """Build one of the sidecar's own replies.

    `reply(451, "4.4.3", "msg")` gives the line `451 4.4.3 msg`. `text` may contain "\\n" to
    make several lines; each line gets the enhanced status code prefix.
    """
    if enhanced is not None:
        if _ENHANCED_RE.fullmatch(enhanced) is None:
            raise ValueError(f"bad enhanced status code: {enhanced!r}")
        if int(enhanced[0]) != code // 100:
            raise ValueError(f"enhanced status {enhanced} does not match reply code {code}")
        lines = tuple(f"{enhanced} {t}" if t else enhanced for t in text.split("\n"))
    else:
        lines = tuple(text.split("\n"))
    return Reply(code, lines)


class ReplyError(Exception):
    """The peer sent something that is not a valid SMTP reply stream."""


# Bounds on a peer's reply. RFC 5321 section 4.5.3.1.5 allows 512 octets per line; MXes send
# longer text now and then, and Postfix reads lines up to 2048 bytes (line_length_limit). A
# whole reply: Exim reads at most 4096 bytes of one (its response buffer), Postfix keeps
# about 2 KiB of the text; the biggest real ones (EHLO, multi-line policy texts) are a few
# KiB. Anything over these is not an MX worth waiting for, and what a session holds of a
# reply stays small (issue 10: 200 lines of 4 KiB made every session hold 1.2 MiB).
MAX_REPLY_LINE = 2048  # bytes, line end included
MAX_REPLY_LINES = 200
MAX_REPLY_SIZE = 16_384  # bytes, every line of one reply


class ReplyParser:
    """Sans-IO parser of a peer's reply stream.

    `feed()` bytes as they arrive, then call `next_reply()` until it returns None. Lines end
    in CRLF; a bare LF is accepted too (lenient receiving), and `Reply.raw` keeps the bytes
    exactly as received. After a `ReplyError` the parser is unusable: every later call to
    `next_reply()` raises the same error.

    A caller that calls `next_reply()` after each `feed()` holds at most `max_reply_size`
    bytes of an unfinished reply plus the last chunk fed.
    """

    __slots__ = (
        "_code",
        "_data",
        "_error",
        "_lines",
        "_max_line_length",
        "_max_lines",
        "_max_reply_size",
        "_pos",
        "_scan",
        "_start",
    )

    def __init__(
        self,
        max_line_length: int = MAX_REPLY_LINE,
        max_lines: int = MAX_REPLY_LINES,
        max_reply_size: int = MAX_REPLY_SIZE,
    ) -> None:
        if max_line_length < 4 or max_lines < 1 or max_reply_size < max_line_length:
            raise ValueError(
                "max_line_length must be >= 4, max_lines >= 1 and max_reply_size >= max_line_length"
            )
        self._max_line_length = max_line_length
        self._max_lines = max_lines
        self._max_reply_size = max_reply_size
        self._data = b""
        self._start = 0  # start of the reply being parsed
        self._pos = 0  # start of the next unparsed line
        self._scan = 0  # where the search for the next LF resumes
        self._code = 0
        self._lines: list[str] = []
        self._error: ReplyError | None = None

    def feed(self, data: bytes | bytearray) -> None:
        """Add bytes received from the peer."""
        if not data or self._error is not None:
            return
        start = self._start
        if start:
            self._data = self._data[start:] + data
            self._pos -= start
            self._scan -= start
            self._start = 0
        else:
            self._data += data

    @property
    def buffered(self) -> int:
        """Bytes held that are not yet part of a returned reply."""
        return len(self._data) - self._start

    def take_unparsed(self) -> bytes:
        """Remove and return every byte not yet part of a returned reply.

        Used after STARTTLS: whatever arrived before the handshake is discarded.
        """
        rest = self._data[self._start :]
        self._data = b""
        self._start = self._pos = self._scan = 0
        self._lines = []
        return rest

    def _fail(self, message: str) -> ReplyError:
        self._error = ReplyError(message)
        return self._error

    def next_reply(self) -> Reply | None:
        """The next complete reply, or None if more data is needed.

        Raises `ReplyError` on a line that is not `^[2-5][0-9][0-9][ -]`, a change of code
        within a multi-line reply, a line over `max_line_length` bytes (line end included),
        a reply of more than `max_lines` lines or of more than `max_reply_size` bytes.
        """
        if self._error is not None:
            raise self._error
        data = self._data
        max_line = self._max_line_length
        max_size = self._max_reply_size
        while True:
            lf = data.find(b"\n", self._scan)
            pos = self._pos
            if lf < 0:
                self._scan = len(data)
                if len(data) - pos > max_line:
                    raise self._fail(f"reply line longer than {max_line} bytes")
                if len(data) - self._start > max_size:
                    raise self._fail(f"reply longer than {max_size} bytes")
                return None
            if lf + 1 - pos > max_line:
                raise self._fail(f"reply line longer than {max_line} bytes")
            if lf + 1 - self._start > max_size:
                raise self._fail(f"reply longer than {max_size} bytes")
            end = lf - 1 if lf - 1 >= pos + 3 and data[lf - 1] == 13 else lf
            if end < pos + 3:
                raise self._fail(f"malformed reply line {data[pos : lf + 1]!r}")
            c0, c1, c2 = data[pos], data[pos + 1], data[pos + 2]
            if not (50 <= c0 <= 53 and 48 <= c1 <= 57 and 48 <= c2 <= 57):
                raise self._fail(f"malformed reply line {data[pos : lf + 1]!r}")
            code = (c0 - 48) * 100 + (c1 - 48) * 10 + (c2 - 48)
            if end == pos + 3:
                final = True
                text = ""
            else:
                sep = data[pos + 3]
                if sep == 32:
                    final = True
                elif sep == 45:
                    final = False
                else:
                    raise self._fail(f"malformed reply line {data[pos : lf + 1]!r}")
                text = data[pos + 4 : end].decode("utf-8", "replace")
            lines = self._lines
            if lines:
                if code != self._code:
                    raise self._fail(f"reply code changed from {self._code} to {code}")
            else:
                self._code = code
            lines.append(text)
            self._pos = self._scan = lf + 1
            if final:
                result = Reply(code, tuple(lines), data[self._start : lf + 1])
                self._lines = []
                if lf + 1 == len(data):
                    self._data = b""
                    self._start = self._pos = self._scan = 0
                else:
                    self._start = lf + 1
                return result
            if len(lines) >= self._max_lines:
                raise self._fail(f"reply longer than {self._max_lines} lines")


def parse_ehlo_capabilities(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper-case) -> parameters ("" if none), from `reply.lines[1:]`.

    Returns {} for a reply other than 250. When a keyword appears twice the first wins.
    """
    capabilities: dict[str, str] = {}
    if reply.code != 250:
        return capabilities
    for line in reply.lines[1:]:
        parts = line.strip().split(None, 1)
        if not parts:
            continue
        keyword = parts[0].upper()
        if keyword not in capabilities:
            capabilities[keyword] = parts[1].strip() if len(parts) > 1 else ""
    return capabilities


# --- The SMTP server's own replies --------------------------------------------------------
# What the protocol itself answers (syntax, sequence, limits, the DATA rules): made here and
# used by sidecar.smtp. The application's replies (routes, HAProxy, the MX, DNS, shutdown)
# are in sidecar.replies, which also re-exports these (DESIGN.md rule 4).

# Positive
OK = reply(250, "2.0.0", "OK")
SENDER_OK = reply(250, "2.1.0", "Sender OK")
GOODBYE = reply(221, "2.0.0", "Bye")
VRFY_CANNOT = reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = reply(
    214,
    "2.0.0",
    "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY\nSee RFC 5321 for details",
)
HELP_LMTP = reply(
    214,
    "2.0.0",
    "Commands: LHLO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY\nSee RFC 2033 for details",
)

# Command syntax and sequence
SYNTAX_ERROR = reply(500, "5.5.2", "Syntax error")
LINE_TOO_LONG = reply(500, "5.5.6", "Line too long")
UNKNOWN_COMMAND = reply(500, "5.5.1", "Command not recognized")
PARAM_SYNTAX = reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_SENDER_SYNTAX = reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = reply(501, "5.1.3", "Bad recipient address syntax")
NOT_IMPLEMENTED = reply(502, "5.5.1", "Command not implemented")
EHLO_NEEDS_DOMAIN = reply(501, "5.5.4", "EHLO needs a domain or address literal")
HELO_NEEDS_DOMAIN = reply(501, "5.5.4", "HELO needs a domain")
NEED_HELLO = reply(503, "5.5.1", "Send EHLO or HELO first")
# LMTP (RFC 2033 section 4.1): LHLO replaces EHLO and HELO, which an LMTP server refuses.
NEED_LHLO = reply(503, "5.5.1", "Send LHLO first")
LHLO_NEEDS_DOMAIN = reply(501, "5.5.4", "LHLO needs a domain or address literal")
USE_LHLO = reply(500, "5.5.1", "This is an LMTP server: send LHLO, not EHLO or HELO (RFC 2033)")
NESTED_MAIL = reply(503, "5.5.1", "Nested MAIL command")
SIZE_NOT_A_NUMBER = reply(501, "5.5.4", "SIZE needs a number")
BAD_BODY = reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
NEED_MAIL_BEFORE_RCPT = reply(503, "5.5.1", "Need MAIL before RCPT")
NEED_MAIL_BEFORE_DATA = reply(503, "5.5.1", "Need MAIL before DATA")
NEED_RCPT_BEFORE_DATA = reply(503, "5.5.1", "Need RCPT before DATA")
DATA_TAKES_NO_ARGUMENT = reply(501, "5.5.4", "DATA takes no argument")


def unsupported_parameter(command: str, keyword: str) -> Reply:
    """555 for a MAIL or RCPT parameter the sidecar does not relay."""
    return reply(555, "5.5.4", f"Unsupported {command} parameter {keyword}")


# Transaction limits and refusals
NO_VALID_RECIPIENTS = reply(554, "5.5.1", "No valid recipients")
# RFC 2033 section 4.2: LMTP's DATA without a successful RCPT MUST fail with 503.
NO_VALID_RECIPIENTS_LMTP = reply(503, "5.5.1", "No valid recipients")
TOO_MANY_RECIPIENTS = reply(452, "4.5.3", "Too many recipients")
RECIPIENT_NEEDS_DOMAIN = reply(550, "5.1.1", "This relay needs a recipient with a domain")
MESSAGE_TOO_BIG = reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
# SMTPUTF8 (RFC 6531). A non-ASCII local part has no ASCII form; a non-ASCII domain does (its
# A-label), so only local parts and header fields need SMTPUTF8. 553 5.6.7 is RFC 6531
# section 3.5's reply to a non-ASCII address that cannot be taken.
NON_ASCII_ADDRESS = reply(
    553, "5.6.7", "Non-ASCII local part needs the SMTPUTF8 parameter on MAIL (RFC 6531)"
)
# Found at the end of data: the message as a whole fails, hence 554 ("transaction failed",
# RFC 5321 section 4.2.3), and X.6.9, which RFC 6531 registered for exactly this: "UTF-8
# header message cannot be transferred to one or more recipients, so the message must be
# rejected" (after the final "." of DATA). The MX saw no end of data.
NON_ASCII_HEADER = reply(
    554, "5.6.9", "Message header is not ASCII and the MX does not support SMTPUTF8 (RFC 6532)"
)
BARE_NEWLINE = reply(
    554,
    "5.6.0",
    "Message contains a bare CR or LF, refused (RFC 5321 section 2.3.8)",
)


# Connection-level
TOO_MANY_ERRORS = reply(421, "4.7.0", "Too many errors, closing connection")


def service_ready(hostname: str, *, lmtp: bool = False) -> Reply:
    """The 220 banner (no enhanced code before EHLO, RFC 2034); ``lmtp``: an LMTP listener's
    (RFC 2033 section 4)."""
    return reply(220, None, f"{hostname} {'LMTP' if lmtp else 'ESMTP'} sidecar ready")


def helo_reply(hostname: str) -> Reply:
    """The 250 reply to HELO."""
    return reply(250, None, hostname)


def ehlo_reply(hostname: str, capabilities: Iterable[str] = ()) -> Reply:
    """The 250 reply to EHLO: our hostname, then one capability per line."""
    return Reply(250, (hostname, *capabilities))
