"""Command lines and the MAIL FROM / RCPT TO envelope grammar."""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.smtp import (
    Address,
    Command,
    CommandError,
    MailFrom,
    RcptTo,
    parse_command,
    parse_mail_from,
    parse_rcpt_to,
)


def error_of(call: object, *args: object) -> tuple[int, str]:
    assert callable(call)
    with pytest.raises(CommandError) as info:
        call(*args)
    reply = info.value.reply
    return reply.code, reply.lines[0].split(" ", 1)[0]


# --- parse_command ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "verb", "argument"),
    [
        (b"EHLO client.example", "EHLO", "client.example"),
        (b"ehlo client.example", "EHLO", "client.example"),
        (b"QUIT", "QUIT", ""),
        (b"QUIT ", "QUIT", ""),
        (b"RSET  \t", "RSET", ""),
        (b"MAIL FROM:<a@b.example> SIZE=10", "MAIL", "FROM:<a@b.example> SIZE=10"),
        (b"MAIL  FROM:<>", "MAIL", " FROM:<>"),
        (b"StartTLS", "STARTTLS", ""),
        ("RCPT TO:<dörte@bücher.example>".encode(), "RCPT", "TO:<dörte@bücher.example>"),
        (b"NOOP a\tb", "NOOP", "a\tb"),
    ],
)
def test_parse_command(line: bytes, verb: str, argument: str) -> None:
    assert parse_command(line) == Command(verb, argument)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b" ",
        b" QUIT",
        b"QUIT\x00",
        b"MAIL FROM:<a\x00@b>",
        b"NOOP \r",
        b"NOOP\rQUIT",
        b"NOOP\n",
        b"MAIL FROM:<\xff@b>",
        b"\xc3\x28",
        b"HE1O x",
        b"MAIL:FROM",
        b"QUIT\tnow",
        b"X" * 17,
        "ÉHLO x".encode(),
    ],
)
def test_parse_command_syntax_errors(line: bytes) -> None:
    assert error_of(parse_command, line) == (500, "5.5.2")


# --- addresses -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "local_part", "domain", "text"),
    [
        ("FROM:<a@b.example>", "a", "b.example", "a@b.example"),
        ("from:<A.B@Mail.B.Example>", "A.B", "mail.b.example", "A.B@Mail.B.Example"),
        ("FROM: <a@b.example>", "a", "b.example", "a@b.example"),
        ("FROM:<first.last+tag@b.example>", "first.last+tag", "b.example", None),
        ("FROM:<!#$%&'*+-/=?^_`{|}~@b.example>", "!#$%&'*+-/=?^_`{|}~", "b.example", None),
        ('FROM:<"john doe"@b.example>', '"john doe"', "b.example", None),
        ('FROM:<"a>b@c"@b.example>', '"a>b@c"', "b.example", None),
        ('FROM:<"quoted\\"pair\\\\"@b.example>', '"quoted\\"pair\\\\"', "b.example", None),
        ('FROM:<""@b.example>', '""', "b.example", None),
        ('FROM:<"a..b."@b.example>', '"a..b."', "b.example", None),
        ("FROM:<user@x-y.b-c.example>", "user", "x-y.b-c.example", None),
        ("FROM:<user@123.example>", "user", "123.example", None),
        ("FROM:<user@localhost>", "user", "localhost", None),
        ("FROM:<dörte@bücher.example>", "dörte", "bücher.example", None),
        ("FROM:<用户@例子.广告>", "用户", "例子.广告", None),
        ('FROM:<"ü ü"@xn--bcher-kva.example>', '"ü ü"', "xn--bcher-kva.example", None),
        ("FROM:<@relay.example:user@b.example>", "user", "b.example", "user@b.example"),
        ("FROM:<@r1.example,@r2.example:user@b.example>", "user", "b.example", "user@b.example"),
    ],
)
def test_valid_senders(argument: str, local_part: str, domain: str, text: str | None) -> None:
    sender = parse_mail_from(argument).sender
    assert sender is not None
    assert sender.local_part == local_part
    assert sender.domain == domain
    assert sender.literal is None
    if text is not None:
        assert sender.text == text


@pytest.mark.parametrize(
    ("argument", "domain", "literal"),
    [
        ("TO:<u@[192.0.2.1]>", "192.0.2.1", IPv4Address("192.0.2.1")),
        ("TO:<u@[IPv6:2001:db8::1]>", "ipv6:2001:db8::1", IPv6Address("2001:db8::1")),
        ("TO:<u@[ipv6:2001:DB8::1]>", "ipv6:2001:db8::1", IPv6Address("2001:db8::1")),
        (
            "TO:<u@[IPv6:::ffff:192.0.2.1]>",
            "ipv6:::ffff:192.0.2.1",
            IPv6Address("::ffff:192.0.2.1"),
        ),
    ],
)
def test_address_literals(argument: str, domain: str, literal: object) -> None:
    recipient = parse_rcpt_to(argument).recipient
    assert recipient.domain == domain
    assert recipient.literal == literal
    assert recipient.routing_domain == domain


@pytest.mark.parametrize(
    "path",
    [
        "<>",
        "<a>",
        "<a@>",
        "<@b.example>",
        "<a@b.example",
        "a@b.example",
        "<a@@b.example>",
        "<a b@b.example>",
        "<.a@b.example>",
        "<a.@b.example>",
        "<a..b@b.example>",
        '<"unterminated@b.example>',
        '<"bad\\\x01"@b.example>',
        "<a@b..example>",
        "<a@.b.example>",
        "<a@b.example.>",
        "<a@-b.example>",
        "<a@b-.example>",
        "<a@b_c.example>",
        "<a@b.example >",
        "<a@[300.0.0.1]>",
        "<a@[192.0.2]>",
        "<a@[192.0.2.01]>",
        "<a@[IPv6:2001:db8::g]>",
        "<a@[IPv6:2001:db8::1%eth0]>",
        "<a@[IPv6:192.0.2.1]>",
        "<a@[tag:content]>",
        "<a@[]>",
        "<a@b.example>>",
        "<a@xn--.example>",
        "<a@bü-.example>",
        "<a@b\u3000c.example>",
        "<@:a@b.example>",
        "<@relay:>",
        "<<a@b.example>>",
        "<a@" + "x" * 64 + ".example>",
    ],
)
def test_invalid_addresses(path: str) -> None:
    assert error_of(parse_rcpt_to, "TO:" + path) in {(501, "5.1.3"), (501, "5.5.4")}
    if path != "<>":
        assert error_of(parse_mail_from, "FROM:" + path) in {(501, "5.1.7"), (501, "5.5.4")}


def test_bad_sender_and_recipient_codes() -> None:
    assert error_of(parse_mail_from, "FROM:<a@@b>") == (501, "5.1.7")
    assert error_of(parse_rcpt_to, "TO:<a@@b>") == (501, "5.1.3")
    assert error_of(parse_mail_from, "FROM:a@b") == (501, "5.1.7")
    assert error_of(parse_rcpt_to, "TO:<>") == (501, "5.1.3")


SRS = "SRS0=Ab3d=XY=newsletter-sender.example.org=bounce-0123456789abcdef"


def test_local_part_over_64_octets_is_accepted() -> None:
    """RFC 5321 section 4.5.3.1: 64 octets is what every server MUST accept, not a maximum;
    SRS, VERP and list-confirmation addresses are longer. Only the line length bounds it."""
    sender = parse_mail_from(f"FROM:<{SRS}@forwarder.example.net>").sender
    assert sender is not None and sender.local_part == SRS and len(SRS) > 64
    assert parse_rcpt_to(f"TO:<{SRS}@forwarder.example.net>").recipient.local_part == SRS
    assert parse_rcpt_to(f"TO:<{'a' * 1000}@b.example>").recipient.local_part == "a" * 1000
    assert parse_rcpt_to(f"TO:<{'é' * 500}@b.example>").recipient.local_part == "é" * 500
    quoted = '"' + "q " * 100 + '"'
    assert parse_mail_from(f"FROM:<{quoted}@b.example>").sender is not None


def test_path_over_256_octets_is_accepted() -> None:
    domain = "a" * 63 + "." + "b" * 63 + "." + "c" * 61
    path = f"<{'l' * 200}@{domain}>"
    assert len(path) > 256
    assert parse_mail_from("FROM:" + path).sender is not None
    assert parse_rcpt_to("TO:" + path).recipient.domain == domain


def test_domain_length_limit_is_dns_s() -> None:
    """253 octets in text form is the longest name DNS holds (255 on the wire)."""
    domain = ".".join(["d" * 63] * 3) + "." + "e" * 61
    assert len(domain) == 253
    assert parse_rcpt_to(f"TO:<a@{domain}>").recipient.domain == domain
    assert error_of(parse_rcpt_to, f"TO:<a@{domain}e>") == (501, "5.1.3")
    assert error_of(parse_mail_from, f"FROM:<a@{domain}e>") == (501, "5.1.7")


def test_internationalised_domain_length_is_its_a_label_s() -> None:
    """Over 253 octets in UTF-8 but within DNS's limits as an A-label: accepted."""
    label = "ü" * 50  # 100 octets in UTF-8, 56 as an A-label
    domain = ".".join([label] * 4) + ".example"
    assert len(domain.encode()) > 253
    recipient = parse_rcpt_to(f"TO:<a@{domain}>").recipient
    assert len(recipient.routing_domain) <= 253
    too_long = ".".join([label] * 5) + ".example"  # over 253 octets as A-labels too
    assert error_of(parse_rcpt_to, f"TO:<a@{too_long}>") == (501, "5.1.3")


def test_label_length_limit() -> None:
    assert parse_rcpt_to(f"TO:<a@{'x' * 63}.example>")
    assert error_of(parse_rcpt_to, f"TO:<a@{'x' * 64}.example>") == (501, "5.1.3")
    assert error_of(parse_rcpt_to, f"TO:<a@{'ü' * 63}.example>") == (501, "5.1.3")


def test_long_source_route_is_ignored() -> None:
    route = ",".join(["@" + "r" * 60 + ".example"] * 4)
    assert parse_rcpt_to(f"TO:<{route}:u@b.example>").recipient.text == "u@b.example"


def test_null_sender() -> None:
    assert parse_mail_from("FROM:<>") == MailFrom(None, ())
    assert parse_mail_from("FROM:<> BODY=8BITMIME") == MailFrom(None, (("BODY", "8BITMIME"),))
    assert parse_mail_from("From: <>").sender is None


def test_postmaster_without_domain() -> None:
    for written in ("postmaster", "Postmaster", "POSTMASTER"):
        rcpt = parse_rcpt_to(f"TO:<{written}>")
        assert rcpt.recipient == Address(written, "", None, written)
        assert rcpt.to_line() == f"RCPT TO:<{written}>\r\n".encode()
    assert parse_rcpt_to("TO:<postmaster> NOTIFY=NEVER").params == (("NOTIFY", "NEVER"),)
    assert parse_rcpt_to("TO:<postmaster@b.example>").recipient.domain == "b.example"
    assert error_of(parse_mail_from, "FROM:<postmaster>") == (501, "5.1.7")
    assert error_of(parse_rcpt_to, "TO:<postmasters>") == (501, "5.1.3")


def test_routing_domain_is_a_label() -> None:
    sender = parse_mail_from("FROM:<a@Bücher.Example>").sender
    assert sender is not None
    assert sender.domain == "bücher.example"
    assert sender.routing_domain == "xn--bcher-kva.example"
    recipient = parse_rcpt_to("TO:<a@MAIL.Example.COM>").recipient
    assert recipient.domain == "mail.example.com"
    assert recipient.routing_domain == "mail.example.com"


def test_invalid_idn_is_a_syntax_error() -> None:
    # U+2764 HEAVY BLACK HEART is not allowed in IDNA 2008 labels
    assert error_of(parse_rcpt_to, "TO:<a@\u2764.example>") == (501, "5.1.3")


# --- prefixes and parameters -----------------------------------------------------------


@pytest.mark.parametrize("argument", ["", "FROM", "FROM<a@b>", "TO:<a@b>", "FRM:<a@b>"])
def test_mail_needs_from(argument: str) -> None:
    assert error_of(parse_mail_from, argument) == (501, "5.5.4")


@pytest.mark.parametrize("argument", ["", "TO", "FROM:<a@b>", "T0:<a@b>"])
def test_rcpt_needs_to(argument: str) -> None:
    assert error_of(parse_rcpt_to, argument) == (501, "5.5.4")


def test_parameters() -> None:
    mail = parse_mail_from("FROM:<a@b.example> size=1000 Body=8BITMIME SMTPUTF8  RET=HDRS")
    assert mail.params == (
        ("SIZE", "1000"),
        ("BODY", "8BITMIME"),
        ("SMTPUTF8", None),
        ("RET", "HDRS"),
    )
    rcpt = parse_rcpt_to("TO:<a@b.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+40b.example")
    assert rcpt.params == (("NOTIFY", "SUCCESS,FAILURE"), ("ORCPT", "rfc822;a+40b.example"))
    assert parse_rcpt_to("TO:<a@b.example> X-UTF8=ü").params == (("X-UTF8", "ü"),)


@pytest.mark.parametrize(
    "params",
    ["SIZE=", "SIZE==1", "SIZE=1=2", "-X", "SIZE=1 SIZE=2", "size=1 SIZE=2", "A\tB", "SIZE=\x01"],
)
def test_bad_parameters(params: str) -> None:
    assert error_of(parse_mail_from, f"FROM:<a@b.example> {params}") == (501, "5.5.4")
    assert error_of(parse_rcpt_to, f"TO:<a@b.example> {params}") == (501, "5.5.4")


def test_parameters_need_a_space_after_the_path() -> None:
    assert error_of(parse_mail_from, "FROM:<a@b.example>SIZE=1") == (501, "5.5.4")
    assert error_of(parse_mail_from, "FROM:<>SIZE=1") == (501, "5.5.4")


# --- to_line ---------------------------------------------------------------------------


def test_to_line() -> None:
    mail = parse_mail_from("from: <@relay.example:U@B.example> size=10 body=8BITMIME")
    assert mail.to_line() == b"MAIL FROM:<U@B.example> SIZE=10 BODY=8BITMIME\r\n"
    assert mail.to_line(lambda k: k != "SIZE") == b"MAIL FROM:<U@B.example> BODY=8BITMIME\r\n"
    assert parse_mail_from("FROM:<> SMTPUTF8").to_line() == b"MAIL FROM:<> SMTPUTF8\r\n"
    rcpt = parse_rcpt_to("to:<dörte@bücher.example> NOTIFY=NEVER")
    assert rcpt.to_line() == "RCPT TO:<dörte@bücher.example> NOTIFY=NEVER\r\n".encode()
    assert rcpt.to_line(lambda k: False) == "RCPT TO:<dörte@bücher.example>\r\n".encode()


def test_command_error_carries_the_reply() -> None:
    with pytest.raises(CommandError) as info:
        parse_command(b"")
    assert info.value.reply.code == 500
    assert "5.5.2" in str(info.value)


def test_without_smtputf8_domains_go_as_a_labels() -> None:
    """RFC 6531: without SMTPUTF8 in use, an address must be ASCII; a U-label domain has an
    ASCII form (its A-label), a non-ASCII local part has none."""
    rcpt = parse_rcpt_to("TO:<bob@Bücher.example.com>")
    assert rcpt.to_line() == "RCPT TO:<bob@Bücher.example.com>\r\n".encode()
    assert rcpt.to_line(utf8=False) == b"RCPT TO:<bob@xn--bcher-kva.example.com>\r\n"
    assert not rcpt.recipient.needs_smtputf8
    mail = parse_mail_from("FROM:<alice@bücher.example> SMTPUTF8 SIZE=10")
    assert mail.to_line(lambda k: k != "SMTPUTF8", utf8=False) == (
        b"MAIL FROM:<alice@xn--bcher-kva.example> SIZE=10\r\n"
    )
    assert parse_mail_from("FROM:<>").to_line(utf8=False) == b"MAIL FROM:<>\r\n"
    ascii_rcpt = parse_rcpt_to("TO:<Bob@Example.COM>")  # ASCII goes as written
    assert ascii_rcpt.to_line(utf8=False) == b"RCPT TO:<Bob@Example.COM>\r\n"
    literal = parse_rcpt_to("TO:<bob@[192.0.2.1]>")
    assert literal.to_line(utf8=False) == b"RCPT TO:<bob@[192.0.2.1]>\r\n"


def test_a_non_ascii_local_part_needs_smtputf8() -> None:
    for address in ("jörg@example.com", "jörg@bücher.example", '"jö rg"@example.com'):
        recipient = parse_rcpt_to(f"TO:<{address}>").recipient
        assert recipient.needs_smtputf8
        assert recipient.wire_text(utf8=True) == address
        with pytest.raises(ValueError):
            recipient.wire_text(utf8=False)


# --- properties ------------------------------------------------------------------------

_ATEXT = "abcXYZ019!#$%&'*+-/=?^_`{|}~éß中"
_atom = st.text(alphabet=_ATEXT, min_size=1, max_size=6)
_dot_string = st.lists(_atom, min_size=1, max_size=3).map(".".join)
_qchar = st.sampled_from([*"aZ9 !#[]~<>@,:;.()é", '\\"', "\\\\", "\\a"])
_quoted = st.lists(_qchar, max_size=8).map(lambda cs: '"' + "".join(cs) + '"')
_ldh_label = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?", fullmatch=True)
_label = st.one_of(_ldh_label, st.sampled_from(["bücher", "München", "例え", "пример", "δοκιμή"]))
_domain = st.lists(_label, min_size=1, max_size=4).map(".".join)
_literal = st.one_of(
    st.ip_addresses(v=4).map(lambda a: f"[{a}]"),
    st.ip_addresses(v=6).map(lambda a: f"[IPv6:{a}]"),
)
_mailbox = st.tuples(st.one_of(_dot_string, _quoted), st.one_of(_domain, _literal)).map("@".join)
_keyword = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,8}", fullmatch=True)
_value = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="=")
    | st.sampled_from("éü"),
    min_size=1,
    max_size=10,
)
_params = st.dictionaries(_keyword.map(str.upper), st.one_of(st.none(), _value), max_size=4).map(
    lambda d: tuple(d.items())
)


def _params_text(params: tuple[tuple[str, str | None], ...]) -> str:
    return "".join(f" {k}" if v is None else f" {k}={v}" for k, v in params)


@given(_mailbox, _params, st.booleans())
def test_mail_from_round_trips(
    mailbox: str, params: tuple[tuple[str, str | None], ...], null: bool
) -> None:
    path = "" if null else mailbox
    mail = parse_mail_from(f"FROM:<{path}>{_params_text(params)}")
    assert mail.params == params
    if null:
        assert mail.sender is None
    else:
        assert mail.sender is not None
        assert mail.sender.text == mailbox
        assert mail.sender.domain == mail.sender.domain.lower()
        assert mail.sender.routing_domain.isascii()
    line = mail.to_line()
    assert line.endswith(b"\r\n")
    command = parse_command(line[:-2])
    assert command.verb == "MAIL"
    assert parse_mail_from(command.argument) == mail


@given(_mailbox, _params)
def test_rcpt_to_round_trips(mailbox: str, params: tuple[tuple[str, str | None], ...]) -> None:
    rcpt = parse_rcpt_to(f"to:<{mailbox}>{_params_text(params)}")
    assert rcpt.recipient.text == mailbox
    line = rcpt.to_line()
    command = parse_command(line[:-2])
    assert command.verb == "RCPT"
    assert parse_rcpt_to(command.argument) == rcpt
    kept = RcptTo(rcpt.recipient, tuple(p for p in params if p[0] < "M"))
    assert parse_rcpt_to(parse_command(rcpt.to_line(lambda k: k < "M")[:-2]).argument) == kept


@given(st.binary(max_size=80))
def test_parse_command_raises_only_command_error(line: bytes) -> None:
    with contextlib.suppress(CommandError):
        parse_command(line)


_smtpish = st.text(alphabet='<>@:"\\[]., =-_aZ0éü中\x00\t\u3002IPv6fromTO', max_size=60)


@given(st.one_of(st.text(max_size=60), _smtpish, _mailbox.map(lambda m: f"<{m}>")))
def test_envelope_parsers_raise_only_command_error(text: str) -> None:
    for parse, prefix in ((parse_mail_from, "FROM:"), (parse_rcpt_to, "TO:")):
        for argument in (text, prefix + text):
            with contextlib.suppress(CommandError):
                parse(argument)
