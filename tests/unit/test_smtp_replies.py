"""Reply values, the reply-stream parser and the catalogue of the sidecar's own replies."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar import replies
from sidecar.smtp import replies as smtp_replies
from sidecar.smtp.replies import (
    Reply,
    ReplyError,
    ReplyParser,
    ehlo_reply,
    helo_reply,
    parse_ehlo_capabilities,
    reply,
    service_ready,
)


def parse_all(data: bytes, **limits: int) -> list[Reply]:
    parser = ReplyParser(**limits)
    parser.feed(data)
    out: list[Reply] = []
    while (r := parser.next_reply()) is not None:
        out.append(r)
    return out


# --- Reply and reply() -----------------------------------------------------------------


def test_reply_with_enhanced_code() -> None:
    r = reply(451, "4.4.3", "Temporary DNS failure")
    assert r.code == 451
    assert r.lines == ("4.4.3 Temporary DNS failure",)
    assert r.to_bytes() == b"451 4.4.3 Temporary DNS failure\r\n"
    assert r.raw is None


def test_reply_several_lines_each_get_the_enhanced_code() -> None:
    r = reply(250, "2.0.0", "first\nsecond\nthird")
    assert r.to_bytes() == b"250-2.0.0 first\r\n250-2.0.0 second\r\n250 2.0.0 third\r\n"
    assert r.text == "2.0.0 first 2.0.0 second 2.0.0 third"


def test_reply_without_enhanced_code() -> None:
    assert reply(354, None, "Go ahead").to_bytes() == b"354 Go ahead\r\n"


def test_reply_with_empty_text() -> None:
    assert reply(250, None, "").to_bytes() == b"250\r\n"
    assert Reply(250, ("a", "")).to_bytes() == b"250-a\r\n250\r\n"
    assert Reply(250, ("", "b")).to_bytes() == b"250-\r\n250 b\r\n"
    assert reply(250, "2.0.0", "").lines == ("2.0.0",)


def test_reply_utf8_text() -> None:
    assert reply(250, None, "héllo").to_bytes() == "250 héllo\r\n".encode()


def test_raw_is_what_goes_on_the_wire() -> None:
    r = Reply(250, ("ok",), raw=b"250 ok\n")
    assert r.to_bytes() == b"250 ok\n"


@pytest.mark.parametrize(
    ("code", "enhanced", "text"),
    [
        (199, None, "x"),
        (600, None, "x"),
        (451, "5.4.3", "class differs from the code"),
        (451, "4.4", "too short"),
        (451, "4.4.3.1", "too long"),
        (451, "x.4.3", "not digits"),
        (250, None, "injected\r\n250 line"),
        (250, None, "bare\rCR"),
    ],
)
def test_reply_rejects_bad_values(code: int, enhanced: str | None, text: str) -> None:
    with pytest.raises(ValueError):
        reply(code, enhanced, text)


def test_reply_needs_a_line() -> None:
    with pytest.raises(ValueError):
        Reply(250, ())


@pytest.mark.parametrize(
    ("code", "positive", "transient", "permanent"),
    [
        (250, True, False, False),
        (354, True, False, False),
        (421, False, True, False),
        (452, False, True, False),
        (554, False, False, True),
    ],
)
def test_reply_classes(code: int, positive: bool, transient: bool, permanent: bool) -> None:
    r = Reply(code, ("x",))
    assert (r.is_positive, r.is_transient, r.is_permanent) == (positive, transient, permanent)


# --- Catalogue -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("OK", "250 2.0.0 OK"),
        ("GOODBYE", "221 2.0.0 Bye"),
        ("LINE_TOO_LONG", "500 5.5.6 Line too long"),
        ("NEED_HELLO", "503 5.5.1 Send EHLO or HELO first"),
        (
            "VRFY_CANNOT",
            "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
        ),
        ("NO_VALID_RECIPIENTS", "554 5.5.1 No valid recipients"),
        ("TOO_MANY_RECIPIENTS", "452 4.5.3 Too many recipients"),
        ("TOO_MANY_ERRORS", "421 4.7.0 Too many errors, closing connection"),
        ("TIMEOUT", "421 4.4.2 Timeout, closing connection"),
        ("SHUTTING_DOWN", "421 4.3.0 Service shutting down"),
        ("ACCESS_DENIED", "554 5.7.1 Access denied"),
        ("TOO_MANY_CONNECTIONS", "421 4.3.2 Too many connections, try again later"),
        (
            "BARE_NEWLINE",
            "554 5.6.0 Message contains a bare CR or LF, refused (RFC 5321 section 2.3.8)",
        ),
        (
            "OTHER_ROUTE",
            "452 4.5.3 Recipient on another route, send it in a new transaction",
        ),
    ],
)
def test_catalogue_exact_text(name: str, wire: str) -> None:
    assert getattr(replies, name).to_bytes() == wire.encode() + b"\r\n"


def test_timeouts_say_timed_out() -> None:
    """Issue 10, item 8: a wait that ran out says "timed out", never "connection lost"."""
    assert replies.setup_timed_out(240).to_bytes() == (
        b"451 4.4.1 Timed out after 240s setting up delivery to the MX, try later\r\n"
    )
    timed_out = replies.mx_timed_out("while sending the envelope", "no reply within 300s")
    assert timed_out.to_bytes() == (
        b"451 4.4.2 Timed out waiting for the MX while sending the envelope (no reply within"
        b" 300s); message not delivered, try later\r\n"
    )
    assert b"lost" not in timed_out.to_bytes()


@pytest.mark.parametrize(
    ("name", "code", "enhanced"),
    [
        ("SYNTAX_ERROR", 500, "5.5.2"),
        ("UNKNOWN_COMMAND", 500, "5.5.1"),
        ("PARAM_SYNTAX", 501, "5.5.4"),
        ("BAD_SENDER_SYNTAX", 501, "5.1.7"),
        ("BAD_RECIPIENT_SYNTAX", 501, "5.1.3"),
        ("NOT_IMPLEMENTED", 502, "5.5.1"),
        ("MESSAGE_TOO_BIG", 552, "5.3.4"),
        ("HELP", 214, "2.0.0"),
        ("RECIPIENT_NEEDS_DOMAIN", 550, "5.1.1"),
        ("NON_ASCII_ADDRESS", 553, "5.6.7"),
        ("SMTPUTF8_NOT_SUPPORTED_SENDER", 553, "5.6.7"),
        ("SMTPUTF8_NOT_SUPPORTED_RECIPIENT", 553, "5.6.7"),
        ("NON_ASCII_HEADER", 554, "5.6.9"),
    ],
)
def test_catalogue_codes(name: str, code: int, enhanced: str) -> None:
    r = getattr(replies, name)
    assert r.code == code
    assert all(line.startswith(enhanced + " ") for line in r.lines)


def test_every_catalogue_reply_parses_back() -> None:
    for name in replies.__all__:
        value = getattr(replies, name)
        if isinstance(value, Reply):
            (parsed,) = parse_all(value.to_bytes())
            assert (parsed.code, parsed.lines) == (value.code, value.lines), name


@pytest.mark.parametrize(
    ("made", "code", "enhanced", "text"),
    [
        (replies.no_such_domain("x.test"), 550, "5.1.2", "Domain x.test does not exist"),
        (replies.null_mx("x.test"), 556, "5.1.10", "Domain x.test does not accept mail (null MX)"),
        (replies.dns_temporary("x.test", "timeout"), 451, "4.4.3", "(timeout), try later"),
        (replies.binding_unplumbed("b1", "10.0.0.5:5000"), 451, "4.4.1", "binding b1 is up"),
        (replies.proxy_unreachable("b1", "refused"), 451, "4.4.1", "for binding b1: refused"),
        (replies.no_mx_reachable("x.test", "a; b"), 451, "4.4.1", "x.test reachable: a; b"),
        (replies.mx_connection_lost("at DATA"), 451, "4.4.2", "lost at DATA; message not"),
        (replies.unsupported_parameter("RCPT", "NOTIFY"), 555, "5.5.4", "RCPT parameter NOTIFY"),
    ],
)
def test_catalogue_functions(made: Reply, code: int, enhanced: str, text: str) -> None:
    """Replies that name the domain, binding or problem: a temporary failure stays 4xx."""
    assert made.code == code
    assert made.lines[0].startswith(enhanced + " ") and text in made.lines[0]


def test_banner_and_greetings() -> None:
    assert service_ready("mx.example").to_bytes() == b"220 mx.example ESMTP sidecar ready\r\n"
    assert helo_reply("mx.example").to_bytes() == b"250 mx.example\r\n"
    assert (
        ehlo_reply("mx.example", ["PIPELINING", "SIZE 1000"]).to_bytes()
        == b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
    )
    assert ehlo_reply("mx.example").to_bytes() == b"250 mx.example\r\n"


# --- ReplyParser examples --------------------------------------------------------------


def test_parse_single_line() -> None:
    (r,) = parse_all(b"250 2.1.0 Ok\r\n")
    assert r == Reply(250, ("2.1.0 Ok",), raw=b"250 2.1.0 Ok\r\n")


def test_parse_multi_line_keeps_raw() -> None:
    data = b"250-mx.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
    (r,) = parse_all(data)
    assert r.code == 250
    assert r.lines == ("mx.example", "PIPELINING", "8BITMIME")
    assert r.raw == data
    assert r.to_bytes() == data


def test_parse_bare_lf_kept_in_raw() -> None:
    data = b"250-a\n250 b\r\n"
    (r,) = parse_all(data)
    assert r.lines == ("a", "b")
    assert r.raw == data


def test_parse_code_only_line() -> None:
    assert parse_all(b"250\r\n")[0].lines == ("",)
    assert parse_all(b"250\n")[0].lines == ("",)
    assert parse_all(b"250-\r\n250\r\n")[0].lines == ("", "")
    assert parse_all(b"250 \r\n")[0].lines == ("",)


def test_parse_non_utf8_text_is_replaced_but_raw_is_exact() -> None:
    (r,) = parse_all(b"550 bad \xff byte\r\n")
    assert r.lines == ("bad \ufffd byte",)
    assert r.raw == b"550 bad \xff byte\r\n"


def test_parse_pipelined_replies() -> None:
    data = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 No such user\r\n354 go\r\n"
    out = parse_all(data)
    assert [r.code for r in out] == [250, 250, 550, 354]
    assert b"".join(r.to_bytes() for r in out) == data


def test_parse_incremental() -> None:
    parser = ReplyParser()
    parser.feed(b"250-a\r")
    assert parser.next_reply() is None
    parser.feed(b"\n250")
    assert parser.next_reply() is None
    assert parser.buffered == 10
    parser.feed(b" b\r\n2")
    r = parser.next_reply()
    assert r is not None
    assert r.lines == ("a", "b")
    assert parser.next_reply() is None
    assert parser.buffered == 1


def test_take_unparsed_returns_partial_reply_and_trailing_bytes() -> None:
    parser = ReplyParser()
    parser.feed(b"220 2.0.0 Ready to start TLS\r\n250-injected\r\n250 x")
    r = parser.next_reply()
    assert r is not None
    assert r.code == 220
    assert parser.next_reply() is None
    assert parser.take_unparsed() == b"250-injected\r\n250 x"
    assert parser.buffered == 0
    parser.feed(b"250 fresh\r\n")
    r = parser.next_reply()
    assert r is not None
    assert r.lines == ("fresh",)
    assert r.raw == b"250 fresh\r\n"


@pytest.mark.parametrize(
    "data",
    [
        b"hello\r\n",
        b"25\r\n",
        b"\r\n",
        b"150 too low\r\n",
        b"650 too high\r\n",
        b"2x0 letters\r\n",
        b"250x no separator\r\n",
        b"250\tfoo\r\n",
        b"250\r\r\n",
        b"250-a\r\n251 b\r\n",
        b"250-a\r\n550 b\r\n",
        b"250-a\r\nnonsense\r\n",
    ],
)
def test_parse_garbage_raises(data: bytes) -> None:
    with pytest.raises(ReplyError):
        parse_all(data)


def test_line_too_long_without_end() -> None:
    parser = ReplyParser(max_line_length=100)
    parser.feed(b"250 " + b"x" * 96)
    assert parser.next_reply() is None
    parser.feed(b"x")
    with pytest.raises(ReplyError):
        parser.next_reply()


def test_line_too_long_with_end() -> None:
    assert parse_all(b"250 " + b"x" * 94 + b"\r\n", max_line_length=100)
    with pytest.raises(ReplyError):
        parse_all(b"250 " + b"x" * 95 + b"\r\n", max_line_length=100)


def test_too_many_lines() -> None:
    assert len(parse_all(b"250-a\r\n" * 4 + b"250 b\r\n", max_lines=5)[0].lines) == 5
    with pytest.raises(ReplyError):
        parse_all(b"250-a\r\n" * 5 + b"250 b\r\n", max_lines=5)
    parser = ReplyParser(max_lines=3)
    parser.feed(b"250-a\r\n250-a\r\n250-a\r\n")
    with pytest.raises(ReplyError):
        parser.next_reply()


def test_reply_size_is_bounded() -> None:
    """Issue 10: 200 lines of 4 KiB per reply made every session hold over a MiB."""
    line = b"250-" + b"x" * (smtp_replies.MAX_REPLY_LINE - 6) + b"\r\n"  # the longest line allowed
    assert parse_all(b"250 " + line[4:])
    whole = line * (smtp_replies.MAX_REPLY_SIZE // len(line) - 1)
    last = b"250 " + b"y" * (smtp_replies.MAX_REPLY_SIZE - len(whole) - 6) + b"\r\n"
    assert len(whole + last) == smtp_replies.MAX_REPLY_SIZE
    assert len(parse_all(whole + last)[0].raw or b"") == smtp_replies.MAX_REPLY_SIZE
    with pytest.raises(ReplyError, match="reply longer than 16384 bytes"):
        parse_all(whole + b"250-z\r\n" + last)


def test_reply_size_bound_holds_without_a_final_line() -> None:
    """A reply that never ends is refused once it is over the bound, so the parser never
    holds more than the bound plus the last chunk fed."""
    parser = ReplyParser()
    chunk = (b"250-" + b"x" * 1000 + b"\r\n") * 4
    with pytest.raises(ReplyError, match="reply longer than"):
        for _ in range(100):
            parser.feed(chunk)
            assert parser.next_reply() is None
            assert parser.buffered <= smtp_replies.MAX_REPLY_SIZE
    assert parser.buffered <= smtp_replies.MAX_REPLY_SIZE + len(chunk)


def test_bounds_apply_per_reply_not_per_stream() -> None:
    one = b"250-" + b"x" * 1000 + b"\r\n250 ok\r\n"
    assert len(parse_all(one * 40)) == 40  # 40 KiB in all, each reply 1 KiB


@given(
    st.lists(
        st.sampled_from([smtp_replies.MAX_REPLY_LINE - 6, 1000])
        | st.integers(min_value=0, max_value=smtp_replies.MAX_REPLY_LINE - 6),
        max_size=20,
    ),
    st.integers(min_value=1, max_value=9000),
)
def test_reply_refused_exactly_when_over_the_bound(lengths: list[int], chunk: int) -> None:
    wire = b"".join(b"250-" + b"x" * n + b"\r\n" for n in lengths) + b"250 end\r\n"
    parser = ReplyParser()
    result: Reply | None = None
    try:
        for start in range(0, len(wire), chunk):
            parser.feed(wire[start : start + chunk])
            assert parser.buffered <= smtp_replies.MAX_REPLY_SIZE + chunk
            result = parser.next_reply() or result
    except ReplyError:
        assert len(wire) > smtp_replies.MAX_REPLY_SIZE
        return
    assert len(wire) <= smtp_replies.MAX_REPLY_SIZE
    assert result is not None and result.raw == wire


def test_error_is_sticky() -> None:
    parser = ReplyParser()
    parser.feed(b"bogus\r\n250 ok\r\n")
    with pytest.raises(ReplyError):
        parser.next_reply()
    with pytest.raises(ReplyError):
        parser.next_reply()


def test_parser_limits_must_be_sane() -> None:
    with pytest.raises(ValueError):
        ReplyParser(max_line_length=3)
    with pytest.raises(ValueError):
        ReplyParser(max_lines=0)
    with pytest.raises(ValueError):
        ReplyParser(max_line_length=100, max_reply_size=99)


# --- EHLO capabilities -----------------------------------------------------------------


def test_parse_ehlo_capabilities() -> None:
    (r,) = parse_all(
        b"250-mx.example Hello\r\n250-pipelining\r\n250-SIZE 35882577\r\n"
        b"250-AUTH PLAIN LOGIN\r\n250-STARTTLS\r\n250-SIZE 1\r\n250 LIMITS RCPTMAX=100\r\n"
    )
    assert parse_ehlo_capabilities(r) == {
        "PIPELINING": "",
        "SIZE": "35882577",
        "AUTH": "PLAIN LOGIN",
        "STARTTLS": "",
        "LIMITS": "RCPTMAX=100",
    }


def test_parse_ehlo_capabilities_single_line_and_errors() -> None:
    assert parse_ehlo_capabilities(Reply(250, ("mx.example",))) == {}
    assert parse_ehlo_capabilities(Reply(250, ("mx", "", "  8BITMIME "))) == {"8BITMIME": ""}
    assert parse_ehlo_capabilities(Reply(502, ("x", "PIPELINING"))) == {}


# --- properties ------------------------------------------------------------------------

_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("é\t"),
    max_size=20,
)


@st.composite
def _wire_reply(draw: st.DrawFn) -> tuple[int, tuple[str, ...], bytes]:
    code = draw(st.integers(min_value=200, max_value=599))
    lines = tuple(draw(st.lists(_text, min_size=1, max_size=5)))
    wire = b""
    for index, line in enumerate(lines):
        end = draw(st.sampled_from([b"\r\n", b"\n"]))
        final = index == len(lines) - 1
        if final and not line and draw(st.booleans()):
            wire += b"%d" % code + end
        else:
            wire += b"%d%s%s" % (code, b" " if final else b"-", line.encode()) + end
    return code, lines, wire


@given(
    st.lists(_wire_reply(), max_size=6),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_any_split_of_a_reply_stream_gives_the_same_replies(
    expected: list[tuple[int, tuple[str, ...], bytes]], cuts: list[int]
) -> None:
    stream = b"".join(wire for _, _, wire in expected)
    points = sorted({min(c, len(stream)) for c in cuts})
    bounds = [0, *points, len(stream)]
    parser = ReplyParser()
    out: list[Reply] = []
    for a, b in itertools.pairwise(bounds):
        parser.feed(stream[a:b])
        while (r := parser.next_reply()) is not None:
            out.append(r)
    assert [(r.code, r.lines, r.raw) for r in out] == expected
    assert b"".join(r.to_bytes() for r in out) == stream
    assert parser.buffered == 0


@given(st.integers(min_value=200, max_value=599), st.lists(_text, min_size=1, max_size=5))
def test_to_bytes_parses_back(code: int, lines: list[str]) -> None:
    r = Reply(code, tuple(lines))
    (parsed,) = parse_all(r.to_bytes())
    assert (parsed.code, parsed.lines, parsed.raw) == (code, tuple(lines), r.to_bytes())


@given(st.lists(st.binary(max_size=40), max_size=10))
def test_arbitrary_bytes_raise_only_reply_error(chunks: list[bytes]) -> None:
    parser = ReplyParser(max_line_length=32, max_lines=4)
    try:
        for chunk in chunks:
            parser.feed(chunk)
            while parser.next_reply() is not None:
                pass
    except ReplyError:
        pass


def test_feed_accepts_bytearray() -> None:
    parser = ReplyParser()
    parser.feed(bytearray(b"250-a\r\n"))
    parser.feed(bytearray(b"250 b\r\n"))
    r = parser.next_reply()
    assert r is not None
    assert r.raw == b"250-a\r\n250 b\r\n"
    assert type(r.raw) is bytes
