"""The front side's SMTP server, sans-IO: fed the client's bytes, it answers what SMTP itself
decides and hands the session an event for everything else.

Modelled on h11's ``Connection``: :meth:`SmtpServer.receive_data` takes bytes,
:meth:`SmtpServer.next_event` returns the next :data:`Event` (or :data:`NEED_DATA`), and
:meth:`SmtpServer.take_output` gives the replies to send. The core answers by itself the
greeting commands, NOOP, VRFY, HELP, QUIT and every syntax, sequence, parameter and limit
error (RFC 5321 sections 4.1.1, 4.1.4, 4.5.3), and counts errors against ``max_errors``. What
needs the outside world (a route, the MX's replies) comes out as an event that the session
answers with :meth:`~SmtpServer.answer_rcpt`, :meth:`~SmtpServer.answer_data` and
:meth:`~SmtpServer.answer_final`. In the DATA phase the client's bytes come out as
:class:`DataChunk` events, scanned once by :class:`~sidecar.smtp.data.DataScanner`, up to
``<CRLF>.<CRLF>``; the bytes after it are the next commands.

With ``lmtp=True`` the same core speaks LMTP (RFC 2033): LHLO instead of EHLO and HELO (which
get 500), the same limits and data rules, and after the end of data one reply per accepted
recipient, in RCPT order (:meth:`~SmtpServer.answer_recipients`).

Which command is accepted in which state is the table :data:`OUT_OF_SEQUENCE`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from sidecar.smtp import replies
from sidecar.smtp.commands import (
    Command,
    CommandError,
    MailFrom,
    RcptTo,
    parse_command,
    parse_mail_from,
    parse_rcpt_to,
)
from sidecar.smtp.data import DataScanner
from sidecar.smtp.lines import LineReader, LineTooLong
from sidecar.smtp.replies import Reply

__all__ = [
    "MAIL_PARAMETERS",
    "NEED_DATA",
    "SEND_REPLIES",
    "Close",
    "DataChunk",
    "DataCommand",
    "EndOfData",
    "Event",
    "Limits",
    "MailOpened",
    "Quit",
    "RcptRefused",
    "RcptRequested",
    "SmtpServer",
    "State",
    "TransactionReset",
]

# MAIL parameters accepted from the client (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8).
MAIL_PARAMETERS: Final = frozenset({"SIZE", "BODY", "SMTPUTF8"})
BODY_VALUES: Final = ("7BIT", "8BITMIME")
# A SIZE value longer than this is over any max_message_size (and never reaches int()).
MAX_SIZE_DIGITS: Final = 20
# Replies made before the session must send them: a client pipelining far ahead gets its
# replies (or a timeout) before more are made (RFC 2920 lets the server flush when it likes).
MAX_QUEUED_REPLIES: Final = 64
NOT_IMPLEMENTED: Final = frozenset({"EXPN", "TURN", "ETRN", "BDAT", "STARTTLS", "AUTH", "ATRN"})


class State(enum.Enum):
    """Where the dialogue is (RFC 5321 section 4.1.4)."""

    CONNECTED = "connected"  # no EHLO or HELO yet
    READY = "ready"  # greeted, no transaction
    MAIL = "mail"  # MAIL accepted: RCPT, DATA
    DATA = "data"  # after the 354: message data up to <CRLF>.<CRLF>
    CLOSED = "closed"  # QUIT, or closed by the server


# A command in a state listed here gets that reply (counted as an error); in any other state
# it is accepted. DATA-phase bytes are never commands.
OUT_OF_SEQUENCE: Final[dict[tuple[str, State], Reply]] = {
    ("MAIL", State.CONNECTED): replies.NEED_HELLO,
    ("MAIL", State.MAIL): replies.NESTED_MAIL,
    ("RCPT", State.CONNECTED): replies.NEED_MAIL_BEFORE_RCPT,
    ("RCPT", State.READY): replies.NEED_MAIL_BEFORE_RCPT,
    ("DATA", State.CONNECTED): replies.NEED_MAIL_BEFORE_DATA,
    ("DATA", State.READY): replies.NEED_MAIL_BEFORE_DATA,
}
# LMTP's (RFC 2033 section 4.1): the same table, the greeting named LHLO.
LMTP_OUT_OF_SEQUENCE: Final[dict[tuple[str, State], Reply]] = {
    **OUT_OF_SEQUENCE,
    ("MAIL", State.CONNECTED): replies.NEED_LHLO,
}


# ---- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransactionReset:
    """RSET, EHLO or HELO ended an open transaction (the reply is queued already)."""


@dataclass(frozen=True, slots=True)
class MailOpened:
    """MAIL was accepted (``250`` queued): a transaction is open."""

    mail: MailFrom


@dataclass(frozen=True, slots=True)
class RcptRequested:
    """A well-formed RCPT within the limits: answer it with :meth:`SmtpServer.answer_rcpt`."""

    rcpt: RcptTo


@dataclass(frozen=True, slots=True)
class RcptRefused:
    """A RCPT refused by a limit of the core (its reply is queued), counted as a recipient
    outcome: too many recipients, or no domain."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class DataCommand:
    """DATA after at least one RCPT: answer it with :meth:`SmtpServer.answer_data`."""


@dataclass(frozen=True, slots=True)
class DataChunk:
    """Message data to relay as it is (dot-stuffing included). ``last``: it ends with the
    ``<CRLF>.<CRLF>`` marker. Once the data cannot be relayed (bare CR or LF, too big, a
    non-ASCII header that must not be sent), no more chunks come: the MX must see no end."""

    data: bytes | bytearray
    last: bool


@dataclass(frozen=True, slots=True)
class EndOfData:
    """The client's end of data. ``size`` in octets as RFC 1870 counts it; ``refusal`` is the
    reply when the data must not reach the MX (the chunks stopped before its end), else
    ``None``: answer with :meth:`SmtpServer.answer_final` (LMTP: with
    :meth:`SmtpServer.answer_recipients`, one reply for each of the ``recipients`` accepted)."""

    size: int
    refusal: Reply | None
    recipients: int = 1


@dataclass(frozen=True, slots=True)
class Quit:
    """QUIT (``221`` queued): send the replies and close."""


@dataclass(frozen=True, slots=True)
class Close:
    """The server closes the connection (too many errors, or no new transaction accepted:
    the replies are queued): send them and close."""


class _Marker:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA: Final = _Marker("NEED_DATA")  # feed more client bytes (after sending the replies)
SEND_REPLIES: Final = _Marker("SEND_REPLIES")  # send the queued replies before more are made

Event = (
    TransactionReset
    | MailOpened
    | RcptRequested
    | RcptRefused
    | DataCommand
    | DataChunk
    | EndOfData
    | Quit
    | Close
    | _Marker
)


@dataclass(frozen=True, slots=True)
class Limits:
    """What the core enforces: ``max_line_length`` in octets for a command line (its CRLF
    included), ``max_message_size`` in octets (RFC 1870), ``max_recipients`` per
    transaction, ``max_errors`` per connection. ``hostname`` is the name in EHLO/HELO replies."""

    hostname: str
    max_line_length: int
    max_message_size: int
    max_recipients: int
    max_errors: int


# What a health check says (``sidecar probe``: the banner, NOOP, QUIT): a connection that
# says nothing else is a probe, not a client session (SmtpServer.spoke).
PROBE_VERBS = frozenset({"NOOP", "QUIT"})


class SmtpServer:
    """One client connection's SMTP dialogue, without I/O. See the module docstring."""

    __slots__ = (
        "_accepted",
        "_end",
        "_finals_owed",
        "_handlers",
        "_header_stops",
        "_limits",
        "_mail",
        "_out",
        "_out_of_sequence",
        "_owed",
        "_pending",
        "_reader",
        "_recipients",
        "_scanner",
        "_stopped",
        "closing",
        "errors",
        "lmtp",
        "spoke",
        "state",
    )

    def __init__(self, limits: Limits, *, lmtp: bool = False) -> None:
        self._limits = limits
        # RFC 2033: LHLO, and one reply per accepted recipient after the end of data.
        self.lmtp = lmtp
        self._handlers = _LMTP_HANDLERS if lmtp else _HANDLERS
        self._out_of_sequence = LMTP_OUT_OF_SEQUENCE if lmtp else OUT_OF_SEQUENCE
        self._accepted = 0  # RCPTs answered 2xx in this transaction
        self._finals_owed = 0  # LMTP: replies owed after the end of data
        self._header_stops = True  # a non-ASCII header (when checked) stops the data
        self._reader = LineReader(limits.max_line_length)
        self._out: list[bytes] = []
        self.state = State.CONNECTED
        self.errors = 0
        # The client sent a line other than NOOP or QUIT: a client session, not a probe.
        self.spoke = False
        self._mail: MailFrom | None = None
        self._recipients = 0  # RCPTs answered in this transaction (any outcome)
        self._scanner: DataScanner | None = None
        self._pending: bytes | bytearray = b""  # DATA-phase bytes not scanned yet
        self._stopped = False  # DATA phase: the data may not reach the MX any more
        self._end: EndOfData | None = None  # DATA phase: the end, once the last chunk went
        self._owed: str | None = None  # "RCPT" or "DATA": the session's answer is due first
        # When set, MAIL gets this reply and the connection closes (a shutdown has begun).
        self.closing: Reply | None = None

    # ---- bytes in, replies out -------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add bytes received from the client (call after :data:`NEED_DATA`)."""
        if self.state is State.DATA:
            self._pending = self._pending + data if self._pending else data
        else:
            self._reader.feed(data)

    def send(self, reply: Reply) -> None:
        """Queue a reply of the session's own that answers no command (a 421 on timeout or
        shutdown, or after a local error)."""
        self._out.append(reply.to_bytes())

    def take_output(self) -> bytes:
        """The queued replies, as bytes to send (``b""`` if none)."""
        out = self._out
        if not out:
            return b""
        data = b"".join(out) if len(out) > 1 else out[0]
        out.clear()
        return data

    @property
    def buffered(self) -> int:
        """Client bytes held that are not part of a command handled yet."""
        return self._reader.buffered

    def next_is(self, line: bytes) -> bool:
        """Whether the client already sent ``line`` (upper case, CRLF included) as its next
        command: lets the session pipeline it to the MX (RFC 2920)."""
        return self._reader.next_is(line)

    # ---- events ----------------------------------------------------------------------------

    def next_event(self) -> Event:
        """The next thing the session must act on; :data:`NEED_DATA` when every buffered byte
        is handled, :data:`SEND_REPLIES` when enough replies are queued to send first.

        Raises RuntimeError while a :class:`RcptRequested` or :class:`DataCommand` is not
        answered yet: replies must go out in the order of the commands (RFC 2920)."""
        if self._owed is not None:
            raise RuntimeError(f"answer the {self._owed} first")
        if self.state is State.DATA:
            return self._next_data_event()
        while self.state is not State.CLOSED:
            if len(self._out) >= MAX_QUEUED_REPLIES:
                return SEND_REPLIES
            line = self._reader.next_line()
            if line is None:
                return NEED_DATA
            event = self._handle_line(line)
            if event is not None:
                return event
        return Close()

    def _handle_line(self, line: bytes | LineTooLong) -> Event | None:
        if isinstance(line, LineTooLong):
            self.spoke = True
            return self._error(replies.LINE_TOO_LONG)
        try:
            command = parse_command(line)
        except CommandError as error:
            self.spoke = True
            return self._error(error.reply)
        if command.verb not in PROBE_VERBS:
            self.spoke = True
        handler = self._handlers.get(command.verb)
        if handler is None:
            known = command.verb in NOT_IMPLEMENTED
            return self._error(replies.NOT_IMPLEMENTED if known else replies.UNKNOWN_COMMAND)
        out_of_sequence = self._out_of_sequence.get((command.verb, self.state))
        if out_of_sequence is not None and not (command.verb == "MAIL" and self.closing):
            return self._error(out_of_sequence)
        return handler(self, command)

    def _error(self, reply: Reply) -> Close | None:
        """Queue ``reply`` to a command that failed; past ``max_errors`` close."""
        self._out.append(reply.to_bytes())
        self.errors += 1
        if self.errors >= self._limits.max_errors:
            self._out.append(replies.TOO_MANY_ERRORS.to_bytes())
            self.state = State.CLOSED
            return Close()
        return None

    def _end_transaction(self) -> bool:
        """Forget the open transaction, if any; whether there was one."""
        open_ = self._mail is not None
        self._mail = None
        self._recipients = 0
        self._accepted = 0
        if self.state is State.MAIL:
            self.state = State.READY
        return open_

    # ---- commands --------------------------------------------------------------------------

    def _hello(self, command: Command, reply: Reply, missing: Reply) -> Event | None:
        if not command.argument.strip():
            return self._error(missing)
        ended = self._end_transaction()
        self.state = State.READY
        self._out.append(reply.to_bytes())
        return TransactionReset() if ended else None

    def _capabilities(self) -> tuple[str, ...]:
        """The EHLO (LHLO) keywords. SMTP: one domain per transaction (RFC 9422
        RCPTDOMAINMAX=1), since one end-of-data reply must stand for every recipient; LMTP
        has no such limit. DSN is not offered: the sidecar relays, so a client asked for
        NOTIFY=SUCCESS reports "relayed" (RFC 3461 section 4.1), never "delivered"."""
        limits = self._limits
        domains = "" if self.lmtp else " RCPTDOMAINMAX=1"
        return (
            "PIPELINING",
            "8BITMIME",
            f"SIZE {limits.max_message_size}",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            f"LIMITS RCPTMAX={limits.max_recipients}{domains}",
        )

    def _ehlo(self, command: Command) -> Event | None:
        # The client's name, cut short: a reply line stays within RFC 5321's 512 octets.
        name = command.argument.split()[0][:64] if command.argument.strip() else ""
        reply = replies.ehlo_reply(f"{self._limits.hostname} greets {name}", self._capabilities())
        missing = replies.LHLO_NEEDS_DOMAIN if self.lmtp else replies.EHLO_NEEDS_DOMAIN
        return self._hello(command, reply, missing)

    def _not_lmtp(self, command: Command) -> Event | None:
        """EHLO or HELO on LMTP (RFC 2033 section 4.1: LHLO replaces them)."""
        return self._error(replies.USE_LHLO)

    def _helo(self, command: Command) -> Event | None:
        reply = replies.helo_reply(self._limits.hostname)
        return self._hello(command, reply, replies.HELO_NEEDS_DOMAIN)

    def _mail_from(self, command: Command) -> Event | None:
        if self.closing is not None:
            self._out.append(self.closing.to_bytes())
            self.state = State.CLOSED
            return Close()
        try:
            mail = parse_mail_from(command.argument)
        except CommandError as error:
            return self._error(error.reply)
        utf8 = any(name == "SMTPUTF8" for name, _ in mail.params)
        if mail.sender is not None and mail.sender.needs_smtputf8 and not utf8:
            return self._error(replies.NON_ASCII_ADDRESS)  # RFC 6531 section 3.5
        for keyword, value in mail.params:
            if keyword not in MAIL_PARAMETERS:
                return self._error(replies.unsupported_parameter("MAIL", keyword))
            if keyword == "SIZE":
                # ASCII digits only: str.isdigit() also accepts "²" and other Unicode digits
                # that int() refuses, and int() refuses more than 4300 digits; either used to
                # raise out of the session and take the whole process down.
                if value is None or not (value.isascii() and value.isdigit()):
                    return self._error(replies.SIZE_NOT_A_NUMBER)
                digits = value.lstrip("0") or "0"
                too_big = len(digits) > MAX_SIZE_DIGITS
                if too_big or int(digits) > self._limits.max_message_size:
                    self._out.append(replies.MESSAGE_TOO_BIG.to_bytes())  # not an error
                    return None
            if keyword == "BODY" and (value or "").upper() not in BODY_VALUES:
                return self._error(replies.BAD_BODY)
        self._mail = mail
        self._recipients = 0
        self.state = State.MAIL
        self._out.append(replies.SENDER_OK.to_bytes())
        return MailOpened(mail)

    def _rcpt_to(self, command: Command) -> Event | None:
        assert self._mail is not None
        try:
            rcpt = parse_rcpt_to(command.argument)
        except CommandError as error:
            return self._error(error.reply)
        if rcpt.params:
            return self._error(replies.unsupported_parameter("RCPT", rcpt.params[0][0]))
        utf8 = any(name == "SMTPUTF8" for name, _ in self._mail.params)
        if rcpt.recipient.needs_smtputf8 and not utf8:
            return self._error(replies.NON_ASCII_ADDRESS)  # RFC 6531 section 3.5
        if self._recipients >= self._limits.max_recipients:
            return self._refuse_rcpt(replies.TOO_MANY_RECIPIENTS)
        self._recipients += 1
        if not rcpt.recipient.domain:
            return self._refuse_rcpt(replies.RECIPIENT_NEEDS_DOMAIN)
        self._owed = "RCPT"
        return RcptRequested(rcpt)

    def _refuse_rcpt(self, reply: Reply) -> RcptRefused:
        self._out.append(reply.to_bytes())
        return RcptRefused(reply)

    def _data(self, command: Command) -> Event | None:
        if command.argument:
            return self._error(replies.DATA_TAKES_NO_ARGUMENT)
        if not self._recipients:
            return self._error(replies.NEED_RCPT_BEFORE_DATA)
        self._owed = "DATA"
        return DataCommand()

    def _rset(self, command: Command) -> Event | None:
        ended = self._end_transaction()
        self._out.append(replies.OK.to_bytes())
        return TransactionReset() if ended else None

    def _noop(self, command: Command) -> None:
        self._out.append(replies.OK.to_bytes())

    def _vrfy(self, command: Command) -> None:
        self._out.append(replies.VRFY_CANNOT.to_bytes())

    def _help(self, command: Command) -> None:
        self._out.append((replies.HELP_LMTP if self.lmtp else replies.HELP).to_bytes())

    def _quit(self, command: Command) -> Quit:
        self._out.append(replies.GOODBYE.to_bytes())
        self.state = State.CLOSED
        return Quit()

    # ---- the session's answers -------------------------------------------------------------

    def answer_rcpt(self, reply: Reply) -> None:
        """The reply to the RCPT of the last :class:`RcptRequested`."""
        self._owed = None
        if 200 <= reply.code < 300:  # a recipient accepted (250, 251; 252 as well)
            self._accepted += 1
        self._out.append(reply.to_bytes())

    def answer_data(
        self,
        reply: Reply,
        *,
        check_header: bool = False,
        ends: bool = True,
        header_stops: bool = True,
    ) -> None:
        """The reply to the last :class:`DataCommand`. A ``354`` starts the DATA phase
        (``check_header``: look for a non-ASCII header section, which an MX without SMTPUTF8
        must not get: with ``header_stops`` the data stops there and the message is refused;
        without, the session reads :attr:`header_not_ascii` and stops only the routes that
        cannot take it); any other reply ends the transaction, unless ``ends`` is false (the
        client may still add recipients, as after ``554 No valid recipients``)."""
        self._owed = None
        self._out.append(reply.to_bytes())
        if reply.code == 354:
            self.state = State.DATA
            self._header_stops = header_stops
            self._scanner = DataScanner(check_header=check_header)
            self._pending = self._reader.take_buffer()
            self._stopped = False
            self._end = None
        elif ends:
            self._end_transaction()

    @property
    def header_not_ascii(self) -> bool:
        """DATA phase, with ``check_header``: the header section seen so far holds a byte that
        is not ASCII (RFC 6532: the message needs SMTPUTF8). Set before the chunk that holds
        the offending byte comes out."""
        return self._scanner is not None and self._scanner.non_ascii_header

    def answer_final(self, reply: Reply) -> None:
        """The reply to the end of data (after :class:`EndOfData`; SMTP only)."""
        if self.lmtp:
            raise RuntimeError("LMTP answers the end of data with answer_recipients")
        self._out.append(reply.to_bytes())

    def answer_recipients(self, answers: list[Reply]) -> None:
        """LMTP's replies to the end of data (RFC 2033 section 4.2): one for each recipient
        whose RCPT was accepted, in the order of those RCPTs. Raises ValueError for another
        count: a client would take the wrong reply for a recipient."""
        if not self.lmtp:
            raise RuntimeError("SMTP answers the end of data with answer_final")
        if len(answers) != self._finals_owed:
            raise ValueError(f"{len(answers)} replies for {self._finals_owed} recipients")
        self._finals_owed = 0
        self._out.extend(answer.to_bytes() for answer in answers)

    def end_transaction(self) -> None:
        """The session ended the transaction itself (its MX connection was lost)."""
        self._end_transaction()

    # ---- the DATA phase --------------------------------------------------------------------

    def _next_data_event(self) -> Event:
        if self._end is not None:
            end, self._end = self._end, None
            self._scanner = None
            self._end_transaction()
            self.state = State.READY
            return end
        chunk = self._pending
        if not chunk:
            return NEED_DATA
        self._pending = b""
        scanner = self._scanner
        assert scanner is not None
        at = scanner.feed(chunk)
        part = chunk if at is None else chunk[:at]
        too_big = scanner.size > self._limits.max_message_size
        header = scanner.non_ascii_header and self._header_stops
        if scanner.bad_byte or header or too_big:
            self._stopped = True
        if at is not None:
            self._reader.feed(chunk[at:])
            accepted = self._accepted if self.lmtp else 1
            self._finals_owed = accepted if self.lmtp else 0
            self._end = EndOfData(scanner.size, self._refusal(scanner), accepted)
        if self._stopped:
            return self._next_data_event()
        return DataChunk(part, last=at is not None)

    def _refusal(self, scanner: DataScanner) -> Reply | None:
        if scanner.bad_byte:
            return replies.BARE_NEWLINE
        if scanner.size > self._limits.max_message_size:
            return replies.MESSAGE_TOO_BIG
        if scanner.non_ascii_header and self._header_stops:
            return replies.NON_ASCII_HEADER
        return None


_HANDLERS = {
    "EHLO": SmtpServer._ehlo,
    "HELO": SmtpServer._helo,
    "MAIL": SmtpServer._mail_from,
    "RCPT": SmtpServer._rcpt_to,
    "DATA": SmtpServer._data,
    "RSET": SmtpServer._rset,
    "NOOP": SmtpServer._noop,
    "VRFY": SmtpServer._vrfy,
    "HELP": SmtpServer._help,
    "QUIT": SmtpServer._quit,
}
_LMTP_HANDLERS = {
    **_HANDLERS,
    "LHLO": SmtpServer._ehlo,
    "EHLO": SmtpServer._not_lmtp,
    "HELO": SmtpServer._not_lmtp,
}
