"""atheris fuzz target: arbitrary client bytes, in arbitrary chunks, into the sans-IO SMTP
server core (:class:`sidecar.smtp.server.SmtpServer`), with the session's answers (to RCPT,
DATA and the end of data) chosen by the fuzzer too. No I/O, no network.

Checked for every input: the core never raises; everything it wrote is a sequence of
well-formed SMTP replies starting with the banner; the relayed data of a DATA phase whose
last chunk went out ends with exactly one ``<CRLF>.<CRLF>`` and has no bare CR or LF; a data
phase that is refused never lets its end marker out.

    .venv/bin/python fuzz/fuzz_smtp_server.py -runs=100000 fuzz/corpus     # longer local runs
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from sidecar.smtp.replies import ReplyParser, reply
    from sidecar.smtp.server import (
        NEED_DATA,
        Close,
        DataChunk,
        DataCommand,
        EndOfData,
        Limits,
        Quit,
        RcptRequested,
        SmtpServer,
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
    server = SmtpServer(LIMITS)
    server.send(reply(220, None, "fuzz.test ESMTP"))
    relayed = bytearray()
    ended = False
    while provider.remaining_bytes() and not ended:
        server.receive_data(provider.ConsumeBytes(provider.ConsumeIntInRange(1, 64)))
        while True:
            event = server.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, (Quit, Close)):
                ended = True
                break
            if isinstance(event, RcptRequested):
                server.answer_rcpt(RCPT_ANSWERS[provider.ConsumeIntInRange(0, 2)])
            elif isinstance(event, DataCommand):
                server.answer_data(DATA_ANSWERS[provider.ConsumeIntInRange(0, 2)])
                relayed.clear()
            elif isinstance(event, DataChunk):
                relayed += event.data
                if event.last:
                    check_relayed(bytes(relayed))
            elif isinstance(event, EndOfData):
                if event.refusal is not None:
                    assert not relayed.endswith(b"\r\n.\r\n"), relayed[-40:]
                server.answer_final(event.refusal or FINAL)
                relayed.clear()
    output = server.take_output()
    parser = ReplyParser()
    parser.feed(output)
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
