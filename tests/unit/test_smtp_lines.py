"""LineReader: splitting the client's command stream into bounded lines."""

from __future__ import annotations

import itertools
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.smtp import LineReader, LineTooLong

Item = bytes | LineTooLong


def drain(reader: LineReader) -> list[Item]:
    out: list[Item] = []
    while (item := reader.next_line()) is not None:
        out.append(item)
    return out


def reference_split(stream: bytes, max_length: int) -> tuple[list[Item], int]:
    """What a reader fed `stream` and drained returns, and how many bytes it then holds."""
    out: list[Item] = []
    pos = 0
    while True:
        lf = stream.find(b"\n", pos)
        if lf < 0:
            tail = len(stream) - pos
            if tail >= max_length:
                out.append(LineTooLong())
                tail = 0
            return out, tail
        line = stream[pos : lf + 1]
        if len(line) > max_length:
            out.append(LineTooLong())
        else:
            out.append(line[:-2] if line.endswith(b"\r\n") else line[:-1])
        pos = lf + 1


# --- examples --------------------------------------------------------------------------


def test_crlf_lines() -> None:
    reader = LineReader(512)
    reader.feed(b"EHLO a\r\nMAIL FROM:<>\r\n")
    assert drain(reader) == [b"EHLO a", b"MAIL FROM:<>"]
    assert reader.buffered == 0


def test_bare_lf_ends_a_command_line() -> None:
    reader = LineReader(512)
    reader.feed(b"NOOP\nQUIT\r\n")
    assert drain(reader) == [b"NOOP", b"QUIT"]


def test_bare_cr_is_not_a_line_end() -> None:
    reader = LineReader(512)
    reader.feed(b"NOOP\rQUIT\r\r\n")
    assert drain(reader) == [b"NOOP\rQUIT\r"]


def test_empty_lines() -> None:
    reader = LineReader(512)
    reader.feed(b"\r\n\n")
    assert drain(reader) == [b"", b""]


def test_partial_line_waits_for_more() -> None:
    reader = LineReader(512)
    reader.feed(b"MAIL FR")
    assert reader.next_line() is None
    assert reader.buffered == 7
    reader.feed(b"OM:<>\r")
    assert reader.next_line() is None
    reader.feed(b"\nRCPT")
    assert reader.next_line() == b"MAIL FROM:<>"
    assert reader.next_line() is None
    assert reader.buffered == 4


def test_line_of_exactly_max_length_is_accepted() -> None:
    reader = LineReader(10)
    reader.feed(b"x" * 8 + b"\r\n")
    assert drain(reader) == [b"x" * 8]


def test_line_over_max_length_comes_out_once() -> None:
    reader = LineReader(10)
    reader.feed(b"x" * 9 + b"\r\nNOOP\r\n")
    assert drain(reader) == [LineTooLong(), b"NOOP"]


def test_over_long_partial_line_is_dropped_as_it_arrives() -> None:
    reader = LineReader(512)
    reader.feed(b"NOOP\r\n")
    assert reader.next_line() == b"NOOP"
    for _ in range(10):
        reader.feed(b"y" * 1_000_000)
        assert reader.buffered < 512
    items = drain(reader)
    assert items == [LineTooLong()]
    reader.feed(b"y" * 1000 + b"\r\nQUIT\r\n")
    assert drain(reader) == [b"QUIT"]
    assert reader.buffered == 0


def test_ten_megabytes_in_one_feed_without_lf() -> None:
    reader = LineReader(512)
    reader.feed(b"z" * 10_000_000)
    assert reader.buffered == 0
    reader.feed(b"zzz\r\nRSET\r\n")
    assert drain(reader) == [LineTooLong(), b"RSET"]


def test_over_long_line_after_pending_lines_keeps_order() -> None:
    reader = LineReader(16)
    reader.feed(b"A\r\n" + b"b" * 100)
    assert reader.next_line() == b"A"
    assert isinstance(reader.next_line(), LineTooLong)
    assert reader.buffered == 0
    reader.feed(b"bbb\nC\r\n")
    assert drain(reader) == [b"C"]


def test_take_buffer_hands_over_data_untouched() -> None:
    """After DATA, everything that followed it goes to the data phase, long lines too."""
    reader = LineReader(16)
    body = b"x" * 1000 + b"\r\n.\r\n"
    reader.feed(b"DATA\r\n" + body)
    assert reader.next_line() == b"DATA"
    assert reader.buffered == len(body)
    assert reader.take_buffer() == body
    assert reader.buffered == 0
    assert reader.next_line() is None
    reader.feed(b"QUIT\r\n")
    assert drain(reader) == [b"QUIT"]


def test_take_buffer_after_partial_feed() -> None:
    reader = LineReader(16)
    reader.feed(b"DATA\r\nSubj")
    assert reader.next_line() == b"DATA"
    assert reader.take_buffer() == b"Subj"
    assert reader.take_buffer() == b""


def test_take_buffer_forgets_a_line_being_dropped() -> None:
    reader = LineReader(8)
    reader.feed(b"x" * 20)
    assert reader.take_buffer() == b""
    reader.feed(b"NOOP\r\n")
    assert drain(reader) == [b"NOOP"]


def test_max_length_must_leave_room_for_crlf() -> None:
    with pytest.raises(ValueError):
        LineReader(1)


def test_large_pipelined_batch_is_linear() -> None:
    lines = [b"RCPT TO:<user%d@example.com>" % i for i in range(200_000)]
    stream = b"".join(line + b"\r\n" for line in lines)
    reader = LineReader(512)
    started = time.perf_counter()
    out: list[Item] = []
    for offset in range(0, len(stream), 65536):
        reader.feed(stream[offset : offset + 65536])
        out.extend(drain(reader))
    elapsed = time.perf_counter() - started
    assert out == lines
    assert elapsed < 2.0


# --- properties ------------------------------------------------------------------------

_stream = st.lists(
    st.one_of(
        st.sampled_from([b"\r\n", b"\n", b"\r"]),
        st.binary(min_size=0, max_size=30),
    ),
    max_size=30,
).map(b"".join)


def _chunks(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(stream)) for c in cuts})
    bounds = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


@given(
    stream=_stream,
    cuts=st.lists(st.integers(min_value=0, max_value=1000), max_size=20),
    max_length=st.integers(min_value=2, max_value=24),
)
def test_any_chunking_gives_the_reference_lines(
    stream: bytes, cuts: list[int], max_length: int
) -> None:
    reader = LineReader(max_length)
    out: list[Item] = []
    for chunk in _chunks(stream, cuts):
        reader.feed(chunk)
        out.extend(drain(reader))
        assert reader.buffered < max_length
    expected, remaining = reference_split(stream, max_length)
    assert out == expected
    assert reader.buffered == remaining


@given(
    stream=_stream,
    cuts=st.lists(st.integers(min_value=0, max_value=1000), max_size=20),
    max_length=st.integers(min_value=2, max_value=24),
)
def test_feeding_everything_before_draining_gives_the_same_lines(
    stream: bytes, cuts: list[int], max_length: int
) -> None:
    reader = LineReader(max_length)
    for chunk in _chunks(stream, cuts):
        reader.feed(chunk)
    expected, remaining = reference_split(stream, max_length)
    assert drain(reader) == expected
    assert reader.buffered == remaining


@given(
    commands=st.lists(
        st.binary(max_size=10).filter(lambda b: b"\n" not in b), min_size=1, max_size=8
    ),
    tail=st.binary(max_size=200),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
def test_take_buffer_returns_exactly_what_followed_the_last_line(
    commands: list[bytes], tail: bytes, cuts: list[int]
) -> None:
    head = b"".join(c + b"\r\n" for c in commands)
    stream = head + tail
    reader = LineReader(16)
    chunks = _chunks(stream, cuts)
    seen: list[Item] = []
    taken = b""
    while chunks:
        reader.feed(chunks.pop(0))
        while len(seen) < len(commands) and (item := reader.next_line()) is not None:
            seen.append(item)
        if len(seen) == len(commands):
            taken = reader.take_buffer()
            break
    assert seen == commands
    assert taken + b"".join(chunks) == tail


def test_feed_accepts_bytearray() -> None:
    reader = LineReader(512)
    reader.feed(bytearray(b"NOOP\r\nDATA\r\nbody"))
    line = reader.next_line()
    assert line == b"NOOP"
    assert type(line) is bytes
    assert reader.next_line() == b"DATA"
    rest = reader.take_buffer()
    assert rest == b"body"
    assert type(rest) is bytes


def test_next_is_peeks_at_the_next_line_without_taking_it() -> None:
    reader = LineReader(100)
    reader.feed(b"RCPT TO:<a@b.test>\r\ndata\r\nQUIT\r\n")
    assert not reader.next_is(b"DATA\r\n")  # the RCPT comes first
    assert reader.next_line() == b"RCPT TO:<a@b.test>"
    assert reader.next_is(b"DATA\r\n")  # case-insensitive, terminator included
    assert reader.next_line() == b"data"
    assert not reader.next_is(b"DATA\r\n")
    reader.next_line()
    assert not reader.next_is(b"DATA\r\n")  # nothing buffered
    reader.feed(b"DAT")
    assert not reader.next_is(b"DATA\r\n")  # not all of it yet
    reader.feed(b"A \r\n")
    assert not reader.next_is(b"DATA\r\n")  # "DATA " is not "DATA"


@given(st.lists(st.sampled_from([b"DATA\r\n", b"data\r\n", b"DATA\n", b"NOOP\r\n", b"DATA"])))
def test_next_is_never_claims_a_line_that_next_line_does_not_return(parts: list[bytes]) -> None:
    reader = LineReader(100)
    reader.feed(b"".join(parts))
    while True:
        peeked = reader.next_is(b"DATA\r\n")
        line = reader.next_line()
        if peeked:
            assert isinstance(line, bytes) and line.upper() == b"DATA"
        if line is None:
            break
