"""sidecar.smtp.server with ``lmtp=True`` (RFC 2033), driven with byte strings (no sockets):
LHLO instead of EHLO/HELO, the same limits and data rules, one reply per accepted recipient
after the end of data."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import replies
from sidecar.smtp.replies import Reply, ReplyParser, reply
from sidecar.smtp.server import (
    LMTP_OUT_OF_SEQUENCE,
    NEED_DATA,
    SEND_REPLIES,
    Close,
    DataChunk,
    DataCommand,
    EndOfData,
    MailOpened,
    Quit,
    RcptRequested,
    SmtpServer,
    State,
    TransactionReset,
)
from tests.unit.test_smtp_server import GO_AHEAD, LIMITS, codes, events, output_replies

OK_RCPT = reply(250, "2.1.5", "Ok")
LMTP_LIMITS = dataclasses.replace(LIMITS, max_recipients=5)


def lhlo() -> SmtpServer:
    server = SmtpServer(LMTP_LIMITS, lmtp=True)
    assert events(server, b"LHLO client.test\r\n") == []
    assert codes(server) == [250]
    return server


def lmtp_transaction(*answers: Reply) -> SmtpServer:
    """An LMTP transaction with one RCPT per answer, each answered so."""
    server = lhlo()
    (opened,) = events(server, b"MAIL FROM:<a@b.test>\r\n")
    assert isinstance(opened, MailOpened)
    for i, answer in enumerate(answers):
        (event,) = events(server, f"RCPT TO:<r{i}@d{i}.test>\r\n".encode())
        assert isinstance(event, RcptRequested)
        server.answer_rcpt(answer)
    server.take_output()
    return server


def test_lhlo_advertises_no_domain_limit_and_no_dsn() -> None:
    server = SmtpServer(LMTP_LIMITS, lmtp=True)
    events(server, b"LHLO client.test\r\n")
    (answer,) = output_replies(server)
    assert answer.lines == (
        "sidecar.test greets client.test",
        "PIPELINING",
        "8BITMIME",
        "SIZE 1000",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "LIMITS RCPTMAX=5",  # recipients of any number of domains in one transaction
    )
    assert "DSN" not in answer.lines  # a sender's NOTIFY=SUCCESS gets "relayed"
    assert server.state is State.READY


@pytest.mark.parametrize("greeting", [b"EHLO client.test", b"HELO client.test"])
def test_ehlo_and_helo_are_refused_on_lmtp(greeting: bytes) -> None:
    server = SmtpServer(LMTP_LIMITS, lmtp=True)
    assert events(server, greeting + b"\r\n") == []
    assert server.take_output() == replies.USE_LHLO.to_bytes()
    assert server.state is State.CONNECTED and server.errors == 1


def test_lhlo_is_unknown_on_smtp() -> None:
    server = SmtpServer(LIMITS)
    events(server, b"LHLO client.test\r\n")
    assert server.take_output() == replies.UNKNOWN_COMMAND.to_bytes()


def test_lhlo_needs_a_domain_and_mail_needs_lhlo() -> None:
    server = SmtpServer(LMTP_LIMITS, lmtp=True)
    events(server, b"LHLO\r\nMAIL FROM:<a@b.test>\r\nHELP\r\n")
    assert server.take_output() == b"".join(
        answer.to_bytes()
        for answer in (
            replies.LHLO_NEEDS_DOMAIN,
            LMTP_OUT_OF_SEQUENCE[("MAIL", State.CONNECTED)],
            replies.HELP_LMTP,
        )
    )
    assert LMTP_OUT_OF_SEQUENCE[("MAIL", State.CONNECTED)] == replies.NEED_LHLO


def test_lhlo_ends_a_transaction() -> None:
    server = lmtp_transaction(OK_RCPT)
    assert events(server, b"LHLO c.test\r\n") == [TransactionReset()]
    assert server.state is State.READY


def test_one_reply_per_accepted_recipient_in_rcpt_order() -> None:
    refused = reply(550, "5.1.1", "no such user")
    server = lmtp_transaction(OK_RCPT, refused, OK_RCPT, OK_RCPT)
    assert events(server, b"DATA\r\n") == [DataCommand()]
    server.answer_data(GO_AHEAD)
    chunk, end = events(server, b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert isinstance(chunk, DataChunk) and chunk.last
    assert end == EndOfData(size=len(b"Subject: x\r\n\r\nbody\r\n"), refusal=None, recipients=3)
    multi = Reply(452, ("4.2.2 mailbox full", "4.2.2 try later"))
    finals = [reply(250, "2.0.0", "queued as A"), multi, reply(250, "2.0.0", "queued as C")]
    with pytest.raises(ValueError, match="2 replies for 3 recipients"):
        server.answer_recipients(finals[:2])
    with pytest.raises(RuntimeError):
        server.answer_final(finals[0])
    server.answer_recipients(finals)
    assert events(server, b"QUIT\r\n") == [Quit()]
    # Byte for byte, multi-line replies too.
    expected = [GO_AHEAD, *finals, replies.GOODBYE]
    assert server.take_output() == b"".join(answer.to_bytes() for answer in expected)


def test_the_count_starts_again_with_each_transaction() -> None:
    server = lmtp_transaction(OK_RCPT, OK_RCPT)
    events(server, b"RSET\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n")
    server.answer_rcpt(OK_RCPT)
    assert events(server, b"DATA\r\n") == [DataCommand()]
    server.answer_data(GO_AHEAD)
    *_, end = events(server, b"\r\n.\r\n")
    assert isinstance(end, EndOfData) and end.recipients == 1


@pytest.mark.parametrize(
    ("data", "refusal"),
    [
        (b"a\nb\r\n.\r\n", replies.BARE_NEWLINE),  # smuggling: a bare LF
        (b"a\r\n.\n\r\n.\r\n", replies.BARE_NEWLINE),  # <CRLF>.<LF>
        (b"a\n.\r\nb\r\n.\r\n", replies.BARE_NEWLINE),  # <LF>.<CRLF>
        (b"a\r.\r\nb\r\n.\r\n", replies.BARE_NEWLINE),  # bare CR
        (b"x" * 1001 + b"\r\n.\r\n", replies.MESSAGE_TOO_BIG),
    ],
)
def test_smuggling_and_limits_are_the_same_on_lmtp(data: bytes, refusal: Reply) -> None:
    server = lmtp_transaction(OK_RCPT, OK_RCPT)
    events(server, b"DATA\r\n")
    server.answer_data(GO_AHEAD)
    found = events(server, data)
    end = found[-1]
    assert isinstance(end, EndOfData) and end.refusal == refusal and end.recipients == 2
    assert not any(isinstance(event, DataChunk) and event.last for event in found)
    server.answer_recipients([refusal, refusal])


def test_a_refused_data_gets_one_reply_only() -> None:
    server = lmtp_transaction(OK_RCPT, OK_RCPT)
    events(server, b"DATA\r\n")
    server.answer_data(reply(451, "4.3.0", "try later"))
    assert server.state is State.READY
    assert codes(server) == [451]


def test_a_non_ascii_header_can_be_left_to_the_session() -> None:
    """LMTP with routes of both kinds: the core flags the header and goes on (the session
    stops only the routes whose MX lacks SMTPUTF8); the data still ends normally."""
    server = lmtp_transaction(OK_RCPT, OK_RCPT)
    events(server, b"DATA\r\n")
    server.answer_data(GO_AHEAD, check_header=True, header_stops=False)
    assert not server.header_not_ascii
    message = "Subject: grüße\r\n\r\nbody\r\n.\r\n".encode()
    chunk, end = events(server, message)
    assert isinstance(chunk, DataChunk) and chunk.last and chunk.data == message
    assert isinstance(end, EndOfData) and end.refusal is None and end.recipients == 2
    assert not server.header_not_ascii  # the transaction is over


def test_the_header_flag_is_set_before_the_chunk_that_holds_it() -> None:
    server = lmtp_transaction(OK_RCPT)
    events(server, b"DATA\r\n")
    server.answer_data(GO_AHEAD, check_header=True, header_stops=False)
    server.receive_data("Subject: grüße\r\n".encode())
    chunk = server.next_event()
    assert isinstance(chunk, DataChunk) and not chunk.last
    assert server.header_not_ascii


# Whole LMTP transactions (1-3 RCPTs, a clean or a smuggling body), and noise between them.
TRANSACTION = st.builds(
    lambda rcpts, body: (
        b"MAIL FROM:<a@b.test>\r\n"
        + b"".join(b"RCPT TO:<r%d@d%d.test>\r\n" % (i, i) for i in range(rcpts))
        + b"DATA\r\n"
        + body
    ),
    st.integers(min_value=1, max_value=3),
    st.sampled_from([b"Subject: x\r\n\r\nbody\r\n.\r\n", b"a\nb\r\n.\r\n", b".\r\n"]),
)
PIECES = st.one_of(
    TRANSACTION,
    st.sampled_from([b"LHLO x\r\n", b"EHLO x\r\n", b"RSET\r\n", b"DATA\r\n"]),
    st.binary(max_size=20),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(PIECES, max_size=40), st.lists(st.booleans(), max_size=30))
def test_any_input_gives_one_reply_per_accepted_recipient(
    chunks: list[bytes], accepts: list[bool]
) -> None:
    """Arbitrary client bytes on LMTP, RCPTs accepted or refused at random: the core never
    raises, every reply is a valid SMTP reply, and each end of data owes exactly as many
    replies as RCPTs were accepted in its transaction."""
    server = SmtpServer(LMTP_LIMITS, lmtp=True)
    verdicts = iter(accepts)
    accepted = 0
    out = bytearray()
    for chunk in [b"LHLO x\r\n", *chunks]:
        server.receive_data(chunk)
        while True:
            event = server.next_event()
            if event is SEND_REPLIES:
                out += server.take_output()
                continue
            if event is NEED_DATA or isinstance(event, (Quit, Close)):
                break
            if isinstance(event, (MailOpened, TransactionReset)):
                accepted = 0
            elif isinstance(event, RcptRequested):
                take = next(verdicts, True)
                accepted += take
                server.answer_rcpt(OK_RCPT if take else reply(550, "5.1.1", "no"))
            elif isinstance(event, DataCommand):
                server.answer_data(GO_AHEAD if accepted else replies.NO_VALID_RECIPIENTS_LMTP)
            elif isinstance(event, EndOfData):
                assert event.recipients == accepted
                server.answer_recipients([reply(250, "2.0.0", "ok")] * accepted)
                accepted = 0
        if server.state is State.CLOSED:
            break
    parser = ReplyParser()
    parser.feed(bytes(out) + server.take_output())
    while parser.next_reply() is not None:
        pass
    assert parser.buffered == 0
