"""atheris fuzz target: arbitrary client bytes, in arbitrary chunks, into the sans-IO SMTP
server core (:class:`sidecar.smtp.server.SmtpServer`), with the session's answers (to RCPT,
DATA and the end of data) chosen by the fuzzer too, in SMTP or LMTP mode (RFC 2033: the
first input byte chooses). No I/O, no network.

Checked for every input: the core never raises; everything it wrote is a sequence of
well-formed SMTP replies starting with the banner; the relayed data of a DATA phase whose
last chunk went out ends with exactly one ``<CRLF>.<CRLF>`` and has no bare CR or LF; a data
phase that is refused never lets its end marker out; in LMTP mode each end of data owes one
reply per RCPT accepted in its transaction.

    .venv/bin/python fuzz/fuzz_smtp_server.py -runs=100000 fuzz/corpus     # longer local runs
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from sidecar.smtp.replies import ReplyParser, reply
    from sidecar.smtp.server import (
        NEED_DATA,
        SEND_REPLIES,
        Close,
        DataChunk,
        DataCommand,
        EndOfData,
        Limits,
        MailOpened,
        Quit,
        RcptRequested,
        SmtpServer,
        TransactionReset,
    )

LIMITS = Limits(
    "fuzz.test", max_line_length=512, max_message_size=4096, max_recipients=50, max_errors=20
)
RCPT_ANSWERS = (reply(250, "2.1.5", "Ok"), reply(550, "5.1.1", "no"), reply(451, "4.4.1", "later"))
DATA_ANSWERS = (
    reply(354, None, "go ahead"),
    reply(451, "4.4.2", "lost"),
    reply(554, "5.5.1", "no"),
)
FINAL = reply(250, "2.0.0", "queued")


def check_relayed(relayed: bytes) -> None:
    assert relayed.endswith(b"\r\n.\r\n") or relayed == b".\r\n", relayed[-20:]
    body = b"\r\n" + relayed
    assert body.count(b"\r\n.\r\n") == 1, relayed[-200:]
    assert body.count(b"\r") == body.count(b"\r\n") == body.count(b"\n"), relayed[-200:]


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    lmtp = provider.ConsumeBool()
    server = SmtpServer(LIMITS, lmtp=lmtp)
    server.send(reply(220, None, "fuzz.test ESMTP"))
    relayed = bytearray()
    output = bytearray()
    accepted = 0  # RCPTs answered 2xx in the open transaction
    ended = False
    while provider.remaining_bytes() and not ended:
        server.receive_data(provider.ConsumeBytes(provider.ConsumeIntInRange(1, 64)))
        while True:
            event = server.next_event()
            if event is SEND_REPLIES:  # replies to send before more are made
                output += server.take_output()
                continue
            if event is NEED_DATA:
                break
            if isinstance(event, (Quit, Close)):
                ended = True
                break
            if isinstance(event, (MailOpened, TransactionReset)):
                accepted = 0
            elif isinstance(event, RcptRequested):
                answer = RCPT_ANSWERS[provider.ConsumeIntInRange(0, 2)]
                accepted += answer.code == 250
                server.answer_rcpt(answer)
            elif isinstance(event, DataCommand):
                answer = DATA_ANSWERS[provider.ConsumeIntInRange(0, 2)]
                server.answer_data(answer)
                if answer.code != 354:
                    accepted = 0
                relayed.clear()
            elif isinstance(event, DataChunk):
                relayed += event.data
                if event.last:
                    check_relayed(bytes(relayed))
            elif isinstance(event, EndOfData):
                if event.refusal is not None:
                    assert not relayed.endswith(b"\r\n.\r\n"), relayed[-40:]
                if lmtp:
                    assert event.recipients == accepted, (event, accepted)
                    server.answer_recipients([event.refusal or FINAL] * accepted)
                else:
                    server.answer_final(event.refusal or FINAL)
                accepted = 0
                relayed.clear()
    output += server.take_output()
    parser = ReplyParser()
    parser.feed(bytes(output))
    count = 0
    while (answer := parser.next_reply()) is not None:
        assert 200 <= answer.code <= 599, answer
        count += 1
    assert parser.buffered == 0, output[-200:]
    assert count >= 1 and output.startswith(b"220 "), output[:200]


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
