"""sidecar.smtp.server: the sans-IO SMTP server core, driven with byte strings (no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import replies
from sidecar.smtp.replies import Reply, ReplyParser, reply
from sidecar.smtp.server import (
    MAX_QUEUED_REPLIES,
    NEED_DATA,
    OUT_OF_SEQUENCE,
    SEND_REPLIES,
    Close,
    DataChunk,
    DataCommand,
    EndOfData,
    Event,
    Limits,
    MailOpened,
    Quit,
    RcptRefused,
    RcptRequested,
    SmtpServer,
    State,
    TransactionReset,
)

LIMITS = Limits(
    hostname="sidecar.test",
    max_line_length=512,
    max_message_size=1000,
    max_recipients=3,
    max_errors=5,
)
GO_AHEAD = reply(354, None, "go ahead")


def events(server: SmtpServer, data: bytes = b"") -> list[Event]:
    """Feed ``data`` and pull events until the core needs more bytes (or closed)."""
    if data:
        server.receive_data(data)
    found: list[Event] = []
    while True:
        event = server.next_event()
        if event is NEED_DATA or event is SEND_REPLIES:
            if event is NEED_DATA:
                return found
            continue
        found.append(event)
        if isinstance(event, (Quit, Close, RcptRequested, DataCommand)):
            return found  # closed, or the caller's answer is due


def output_replies(server: SmtpServer) -> list[Reply]:
    parser = ReplyParser()
    parser.feed(server.take_output())
    found = []
    while (answer := parser.next_reply()) is not None:
        found.append(answer)
    assert parser.buffered == 0
    return found


def codes(server: SmtpServer) -> list[int]:
    return [answer.code for answer in output_replies(server)]


def greeted() -> SmtpServer:
    server = SmtpServer(LIMITS)
    assert events(server, b"EHLO client.test\r\n") == []
    assert codes(server) == [250]
    return server


def in_transaction(*recipients: bytes) -> SmtpServer:
    server = greeted()
    (opened,) = events(server, b"MAIL FROM:<a@b.test>\r\n")
    assert isinstance(opened, MailOpened)
    for recipient in recipients:
        (event,) = events(server, b"RCPT TO:<" + recipient + b">\r\n")
        assert isinstance(event, RcptRequested)
        server.answer_rcpt(reply(250, "2.1.5", "Ok"))
    server.take_output()
    return server


# -- the dialogue ---------------------------------------------------------------------------


def test_ehlo_advertises_the_limits() -> None:
    server = SmtpServer(LIMITS)
    events(server, b"EHLO " + b"x" * 100 + b"\r\n")
    (answer,) = output_replies(server)
    assert answer.lines == (
        "sidecar.test greets " + "x" * 64,  # cut: a reply line stays within 512 octets
        "PIPELINING",
        "8BITMIME",
        "SIZE 1000",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "LIMITS RCPTMAX=3 RCPTDOMAINMAX=1",
    )
    assert server.state is State.READY


def test_local_commands_are_answered_by_the_core() -> None:
    server = SmtpServer(LIMITS)
    assert events(server, b"NOOP\r\nVRFY x\r\nHELP\r\nRSET\r\nHELO c.test\r\nQUIT\r\n") == [Quit()]
    assert codes(server) == [250, 252, 214, 250, 250, 221]
    assert server.state is State.CLOSED


@pytest.mark.parametrize(("verb", "state"), sorted(OUT_OF_SEQUENCE, key=str))
def test_out_of_sequence_table(verb: str, state: State) -> None:
    server = {
        State.CONNECTED: lambda: SmtpServer(LIMITS),
        State.READY: greeted,
        State.MAIL: in_transaction,
    }[state]()
    argument = {"MAIL": b" FROM:<a@b.test>", "RCPT": b" TO:<c@d.test>", "DATA": b""}[verb]
    assert events(server, verb.encode() + argument + b"\r\n") == []
    assert server.take_output() == OUT_OF_SEQUENCE[(verb, state)].to_bytes()
    assert server.errors == 1


def test_a_transaction_in_events() -> None:
    server = greeted()
    sent = b"MAIL FROM:<a@b.test> SIZE=10\r\nRCPT TO:<c@d.test>\r\nDATA\r\n"
    mail, rcpt = events(server, sent)
    with pytest.raises(RuntimeError, match="answer the RCPT first"):
        server.next_event()
    assert isinstance(mail, MailOpened) and mail.mail.sender is not None
    assert isinstance(rcpt, RcptRequested) and rcpt.rcpt.recipient.domain == "d.test"
    assert server.next_is(b"DATA\r\n")  # the session may pipeline it to the MX
    server.answer_rcpt(reply(250, "2.1.5", "Ok"))
    assert events(server) == [DataCommand()]
    server.answer_data(GO_AHEAD)
    assert server.state is State.DATA
    (chunk, end) = events(server, b"Subject: x\r\n\r\n..stuffed\r\n.\r\nNOOP\r\n")
    assert chunk == DataChunk(b"Subject: x\r\n\r\n..stuffed\r\n.\r\n", last=True)
    assert end == EndOfData(size=len(b"Subject: x\r\n\r\n.stuffed\r\n"), refusal=None)
    assert server.state is State.READY
    server.answer_final(reply(250, "2.0.0", "queued"))
    assert events(server) == []  # the NOOP after the end of data
    assert codes(server) == [250, 250, 354, 250, 250]


def test_data_split_anywhere_comes_out_whole() -> None:
    server = in_transaction(b"c@d.test")
    assert events(server, b"DATA\r\n") == [DataCommand()]
    server.answer_data(GO_AHEAD)
    message = b"Subject: x\r\n\r\nline\r\n.\r\n"
    relayed = b""
    for byte in message:
        for event in events(server, bytes([byte])):
            if isinstance(event, DataChunk):
                relayed += event.data
            else:
                assert isinstance(event, EndOfData) and event.refusal is None
    assert relayed == message


@pytest.mark.parametrize(
    ("data", "refusal", "relayed"),
    [
        (b"a\nb\r\n.\r\n", replies.BARE_NEWLINE, b""),
        (b"x" * 1001 + b"\r\n.\r\n", replies.MESSAGE_TOO_BIG, b""),
    ],
)
def test_data_that_must_not_reach_the_mx_stops_before_its_end(
    data: bytes, refusal: Reply, relayed: bytes
) -> None:
    server = in_transaction(b"c@d.test")
    events(server, b"DATA\r\n")
    server.answer_data(GO_AHEAD)
    found = events(server, data)
    assert found[-1] == EndOfData(found[-1].size, refusal)  # type: ignore[union-attr]
    assert not any(isinstance(event, DataChunk) and event.last for event in found)


def test_a_non_ascii_header_is_refused_only_when_asked() -> None:
    for check, refusal in ((True, replies.NON_ASCII_HEADER), (False, None)):
        server = in_transaction(b"c@d.test")
        events(server, b"DATA\r\n")
        server.answer_data(GO_AHEAD, check_header=check)
        found = events(server, "Subject: grüße\r\n\r\nbody\r\n.\r\n".encode())
        assert isinstance(found[-1], EndOfData) and found[-1].refusal == refusal


def test_rset_ehlo_and_helo_end_a_transaction() -> None:
    for command in (b"RSET", b"EHLO c.test", b"HELO c.test"):
        server = in_transaction(b"c@d.test")
        assert events(server, command + b"\r\n") == [TransactionReset()]
        assert server.state is State.READY
        assert events(server, b"RSET\r\n") == []  # nothing open any more


def test_recipient_limits_are_refusals_not_errors() -> None:
    server = in_transaction(b"a@d.test", b"b@d.test", b"c@d.test")
    (too_many,) = events(server, b"RCPT TO:<e@d.test>\r\n")
    assert too_many == RcptRefused(replies.TOO_MANY_RECIPIENTS)
    assert server.errors == 0
    server = in_transaction()
    (no_domain,) = events(server, b"RCPT TO:<postmaster>\r\n")
    assert no_domain == RcptRefused(replies.RECIPIENT_NEEDS_DOMAIN)


def test_data_without_a_recipient_and_no_valid_recipients() -> None:
    server = in_transaction()
    assert events(server, b"DATA\r\n") == []
    assert server.take_output() == replies.NEED_RCPT_BEFORE_DATA.to_bytes()
    server = in_transaction(b"c@d.test")
    assert events(server, b"DATA\r\n") == [DataCommand()]
    server.answer_data(replies.NO_VALID_RECIPIENTS, ends=False)
    assert server.state is State.MAIL  # the client may still add recipients
    server.answer_data(reply(451, "4.4.2", "lost"))
    assert server.state is State.READY


def test_too_many_errors_close() -> None:
    server = SmtpServer(LIMITS)
    assert events(server, b"BOGUS\r\n" * 10) == [Close()]
    assert codes(server) == [500] * 5 + [421]
    assert server.state is State.CLOSED


def test_closing_refuses_a_new_transaction() -> None:
    server = greeted()
    server.closing = replies.SHUTTING_DOWN
    assert events(server, b"NOOP\r\nMAIL FROM:<a@b.test>\r\n") == [Close()]
    assert server.take_output() == replies.OK.to_bytes() + replies.SHUTTING_DOWN.to_bytes()


def test_a_pipelining_client_gets_its_replies_in_batches() -> None:
    server = SmtpServer(LIMITS)
    server.receive_data(b"NOOP\r\n" * (MAX_QUEUED_REPLIES + 10))
    assert server.next_event() is SEND_REPLIES
    assert len(output_replies(server)) == MAX_QUEUED_REPLIES
    assert server.next_event() is NEED_DATA
    assert len(output_replies(server)) == 10


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=30))
def test_any_input_gives_well_formed_replies_and_no_exception(chunks: list[bytes]) -> None:
    """Arbitrary client bytes: the core never raises, every reply is a valid SMTP reply, and
    a DATA phase always ends with one EndOfData."""
    server = SmtpServer(LIMITS)
    for chunk in chunks:
        server.receive_data(chunk)
        while True:
            event = server.next_event()
            if event is SEND_REPLIES:
                output_replies(server)  # a long pipelined input: send before more are made
                continue
            if event is NEED_DATA or isinstance(event, (Quit, Close)):
                break
            if isinstance(event, RcptRequested):
                server.answer_rcpt(reply(250, "2.1.5", "Ok"))
            elif isinstance(event, DataCommand):
                server.answer_data(GO_AHEAD)
            elif isinstance(event, EndOfData):
                server.answer_final(event.refusal or reply(250, "2.0.0", "queued"))
        if server.state is State.CLOSED:
            break
    output_replies(server)


# -- probes: a connection that says nothing but NOOP or QUIT ---------------------------------


@pytest.mark.parametrize(
    ("lines", "spoke"),
    [
        (b"", False),
        (b"NOOP\r\nQUIT\r\n", False),
        (b"QUIT\r\n", False),
        (b"noop probe\r\n", False),
        (b"EHLO client.test\r\n", True),
        (b"NOOP\r\nHELO client.test\r\n", True),
        (b"RSET\r\n", True),
        (b"GARBAGE\r\n", True),
        (b"MAIL FROM:<a@b.test>\r\n", True),
    ],
)
def test_spoke_tells_a_session_from_a_probe(lines: bytes, spoke: bool) -> None:
    server = SmtpServer(LIMITS)
    events(server, lines)
    assert server.spoke is spoke
