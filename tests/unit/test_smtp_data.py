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


def scan(chunks: list[bytes]) -> tuple[int | None, bool]:
    scanner = DataScanner()
    offset = 0
    for chunk in chunks:
        end = scanner.feed(chunk)
        if end is not None:
            assert scanner.ended
            assert scanner.size == offset + end
            return offset + end, scanner.bad_byte
        offset += len(chunk)
    assert scanner.size == offset
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
    st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\x00", b"\r\n", b"\r\n.\r\n"])).map(
        b"".join
    ),
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
