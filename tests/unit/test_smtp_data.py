from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.smtp.data import DataScanner

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n|\x00")


def reference(data: bytes) -> tuple[int | None, bool]:
    """Where the data ends (offset past the marker) and whether a bad byte precedes it."""
    at = (b"\r\n" + data).find(b"\r\n.\r\n")
    end = None if at == -1 else at + 5 - 2
    # An unfinished stream's final CR may still become a CRLF.
    body = data.removesuffix(b"\r") if end is None else data[:end]
    return end, _BARE.search(body) is not None


def reference_size(data: bytes) -> int:
    """RFC 1870's size of ended data: without the final ".CRLF" and the stuffing dots."""
    lines = data.removesuffix(b".\r\n").split(b"\r\n")
    return len(b"\r\n".join(line.removeprefix(b".") for line in lines))


def reference_header_non_ascii(data: bytes) -> bool:
    """Whether the header section (before the first empty line) holds a non-ASCII byte."""
    at = (b"\r\n" + data).find(b"\r\n\r\n")
    return not (data if at == -1 else data[:at]).isascii()


def scan(chunks: list[bytes]) -> tuple[int | None, bool]:
    """Feed ``chunks``; check the size and the header flag against the references on the way."""
    scanner = DataScanner(check_header=True)
    offset = 0
    sizes = []
    for chunk in chunks:
        end = scanner.feed(chunk)
        sizes.append(scanner.size)
        if end is not None:
            assert scanner.ended
            data = b"".join(chunks)[: offset + end]
            assert scanner.size == reference_size(data)
            # Before the end, the size was a lower bound that never went down.
            assert sizes == sorted(sizes)
            assert scanner.non_ascii_header == reference_header_non_ascii(data)
            return offset + end, scanner.bad_byte
        offset += len(chunk)
    data = b"".join(chunks)
    assert scanner.non_ascii_header == reference_header_non_ascii(data)
    assert sizes == sorted(sizes)
    # Whatever ends the data next, the size so far is not more than the message's.
    for ending in (b".\r\n", b"\n.\r\n", b"\r\n.\r\n"):
        whole = data + ending
        at = (b"\r\n" + whole).find(b"\r\n.\r\n")
        if at != -1:
            assert scanner.size <= reference_size(whole[: at + 3])
    return None, scanner.bad_byte


def every_split(data: bytes) -> list[list[bytes]]:
    splits = [[data]]
    for i in range(len(data) + 1):
        splits.append([data[:i], data[i:]])
        for j in range(i, len(data) + 1):
            splits.append([data[:i], data[i:j], data[j:]])
    return splits


CASES = [
    (b"Subject: x\r\n\r\nhello\r\n.\r\n", 24, False),
    (b".\r\n", 3, False),
    (b"\r\n.\r\n", 5, False),
    (b"a\r\n..dot-stuffed\r\n.\r\nQUIT\r\n", 21, False),
    (b"a\r\n.b\r\n", None, False),
    (b"smuggle\n.\nx\r\n.\r\n", 16, True),
    (b"smuggle\r\n.\nx\r\n.\r\n", 17, True),
    (b"smuggle\n.\r\nx\r\n.\r\n", 17, True),
    (b"smuggle\r.\rx\r\n.\r\n", 16, True),
    (b"smuggle\r\n.\rx\r\n.\r\n", 17, True),
    (b"smuggle\r\n\x00.\r\nx\r\n.\r\n", 19, True),
    (b"ok\r\n.\r\nafter\n", 7, False),
    (b"trailing cr\r", None, False),
]


@pytest.mark.parametrize(("data", "end", "bad"), CASES)
def test_every_split_agrees_with_reference(data: bytes, end: int | None, bad: bool) -> None:
    assert reference(data) == (end, bad)
    for chunks in every_split(data):
        assert scan(chunks) == (end, bad), chunks


def test_pending_cr_then_other_byte_is_bare() -> None:
    scanner = DataScanner()
    assert scanner.feed(b"abc\r") is None
    assert not scanner.bad_byte
    assert scanner.feed(b"x\r\n.\r\n") == 6
    assert scanner.bad_byte


def test_feed_after_end_is_an_error() -> None:
    scanner = DataScanner()
    scanner.feed(b".\r\n")
    with pytest.raises(RuntimeError):
        scanner.feed(b"more")


def test_large_message_in_big_chunks() -> None:
    line = b"x" * 998 + b"\r\n"
    body = line * 10_000 + b".\r\n"
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    assert scan(chunks) == (len(body), False)


@given(
    st.lists(
        st.sampled_from(
            [b"\r", b"\n", b".", b"a", b"\x00", b"\xc3", b"\r\n", b"\r\n.\r\n", b"\r\n\r\n"]
        )
    ).map(b"".join),
    st.lists(st.integers(min_value=0, max_value=64), max_size=8),
)
def test_any_chunking_agrees_with_reference(data: bytes, cuts: list[int]) -> None:
    chunks = []
    rest = data
    for cut in cuts:
        chunks.append(rest[:cut])
        rest = rest[cut:]
    chunks.append(rest)
    assert scan(chunks) == reference(data)


# -- RFC 1870 size ------------------------------------------------------------------------------


def feed_all(data: bytes, chunk_size: int = 65536, check_header: bool = False) -> DataScanner:
    scanner = DataScanner(check_header)
    for i in range(0, len(data), chunk_size):
        if scanner.feed(data[i : i + chunk_size]) is not None:
            break
    assert scanner.ended
    return scanner


def test_size_excludes_the_end_marker() -> None:
    """A message of exactly max_message_size octets must not count the final ".CRLF"."""
    line = b"x" * 98 + b"\r\n"
    message = line * 1000
    assert len(message) == 100_000
    assert feed_all(message + b".\r\n").size == 100_000
    assert feed_all(b".\r\n").size == 0


def test_size_excludes_stuffing_dots() -> None:
    """12 000 lines starting with a dot, 90 000 octets of message: the 12 000 dots added by
    dot-stuffing are not part of it (RFC 1870 section 3)."""
    message = b".line\r\n" * 12_000 + b"x" * 5_998 + b"\r\n"
    assert len(message) == 90_000
    stuffed = message.replace(b"\r\n.", b"\r\n..").replace(b".", b"..", 1)
    assert len(stuffed) == 102_000
    for chunk_size in (1, 2, 3, 7, 65536):
        assert feed_all(stuffed + b".\r\n", chunk_size).size == 90_000


@given(st.binary(max_size=200), st.lists(st.integers(min_value=0, max_value=50), max_size=6))
def test_size_of_any_stuffed_message(message: bytes, cuts: list[int]) -> None:
    """Stuff any CRLF-clean message the way a client does; the scanner gives back its length
    whatever the chunking."""
    message = message.replace(b"\r", b"").replace(b"\n", b"\r\n")
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    lines = message.split(b"\r\n")
    stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    data = stuffed + b".\r\n"
    chunks = []
    for cut in cuts:
        chunks.append(data[:cut])
        data = data[cut:]
    chunks.append(data)
    scanner = DataScanner()
    for chunk in chunks:
        if scanner.feed(chunk) is not None:
            break
    assert scanner.ended
    assert scanner.size == len(message)


# -- the header section, for an MX without SMTPUTF8 ---------------------------------------------

HEADERS = [
    (b"Subject: caf\xc3\xa9\r\n\r\nbody\r\n.\r\n", True),
    (b"Subject: cafe\r\n\r\nbody caf\xc3\xa9\r\n.\r\n", False),  # 8-bit body: fine
    (b"From: a@b\r\nTo: j\xc3\xb6rg@b\r\n\r\n.\r\n", True),
    (b"\r\nno header, caf\xc3\xa9\r\n.\r\n", False),  # starts with the empty line
    (b"Subject: only a header, caf\xc3\xa9\r\n.\r\n", True),  # no empty line at all
    (b"Subject: x\r\n\r\n\r\n\xff\r\n.\r\n", False),
    (b"S: x\r\n \xe9 folded\r\n\r\n.\r\n", True),
]


@pytest.mark.parametrize(("data", "non_ascii"), HEADERS)
def test_non_ascii_header_any_split(data: bytes, non_ascii: bool) -> None:
    assert reference_header_non_ascii(data) == non_ascii
    for chunks in every_split(data):
        scanner = DataScanner(check_header=True)
        for chunk in chunks:
            if scanner.feed(chunk) is not None:
                break
        assert scanner.non_ascii_header == non_ascii, chunks


def test_header_is_not_looked_at_unless_asked() -> None:
    assert not feed_all(b"Subject: caf\xc3\xa9\r\n\r\n.\r\n").non_ascii_header
