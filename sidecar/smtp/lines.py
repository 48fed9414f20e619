"""Sans-IO splitting of the client's command stream into lines, with a bounded buffer."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LineReader", "LineTooLong"]


@dataclass(frozen=True, slots=True)
class LineTooLong:
    """Returned by `LineReader.next_line()` in place of a line longer than the limit."""


_TOO_LONG = LineTooLong()

# Values of LineReader._lf besides an index.
_NO_LF = -1  # the buffered bytes hold no LF: they are one partial line
_UNKNOWN = -2  # not searched yet since the last line was returned


class LineReader:
    """Split a command stream into lines.

    `max_length` counts a line with its terminator. A line ends at CRLF; a bare LF also ends
    a command line. A line longer than `max_length` comes out once as a `LineTooLong`, and
    its bytes are dropped up to and including its LF: they are never buffered beyond
    `max_length`, so as long as the caller drains `next_line()` after each `feed()`, at most
    `max_length - 1` bytes stay buffered between feeds.

    Bytes after a returned line are not inspected until `next_line()` is called again, so
    after a DATA command `take_buffer()` hands over everything that followed it untouched.
    """

    __slots__ = ("_data", "_discarding", "_lf", "_max", "_owed", "_pos")

    def __init__(self, max_length: int) -> None:
        if max_length < 2:
            raise ValueError("max_length must be at least 2 (room for CRLF)")
        self._max = max_length
        self._data = b""
        self._pos = 0  # start of the next line in _data
        self._lf = _NO_LF  # index in _data of the LF ending the next line, or a marker
        self._owed = 0  # LineTooLong results due before anything in _data
        self._discarding = False  # dropping the rest of an over-long line up to its LF

    @property
    def buffered(self) -> int:
        """Bytes held after the last returned line."""
        return len(self._data) - self._pos

    def feed(self, data: bytes | bytearray) -> None:
        """Add bytes received from the client."""
        start = 0
        if self._discarding:
            lf = data.find(b"\n")
            if lf < 0:
                return
            self._discarding = False
            start = lf + 1
        if start >= len(data):
            return
        rest = self._data[self._pos :]
        self._pos = 0
        if self._lf == _UNKNOWN:
            self._lf = rest.find(b"\n")
        elif self._lf >= 0:
            self._lf -= len(self._data) - len(rest)
        if self._lf >= 0:
            # A complete line is already waiting: leave everything to next_line(), which
            # the caller runs before feeding more (and which must not touch DATA content).
            self._data = rest + data[start:]
            return
        # The buffered bytes are one partial line: drop over-long lines here, so that
        # a stream without LF never piles up.
        pending = len(rest)
        limit = self._max
        while True:
            lf = data.find(b"\n", start)
            if lf < 0:
                if pending + len(data) - start >= limit:
                    # Cannot end within the limit any more (the LF alone is one more byte).
                    self._owed += 1
                    self._discarding = True
                    self._data = b""
                    return
                break
            if pending + lf + 1 - start > limit:
                self._owed += 1
                rest = b""
                pending = 0
                start = lf + 1
                continue
            self._lf = pending + lf - start
            break
        self._data = rest + data[start:] if start else rest + data

    def next_line(self) -> bytes | LineTooLong | None:
        """The next line without its terminator, a `LineTooLong`, or None for more data."""
        if self._owed:
            self._owed -= 1
            return _TOO_LONG
        data = self._data
        pos = self._pos
        lf = self._lf
        if lf == _UNKNOWN:
            lf = data.find(b"\n", pos)
        if lf < 0:
            self._lf = _NO_LF
            if len(data) - pos >= self._max:
                self._data = b""
                self._pos = 0
                self._discarding = True
                return _TOO_LONG
            return None
        if lf + 1 == len(data):
            self._data = b""
            self._pos = 0
            self._lf = _NO_LF
        else:
            self._pos = lf + 1
            self._lf = _UNKNOWN
        if lf + 1 - pos > self._max:
            return _TOO_LONG
        if lf > pos and data[lf - 1] == 13:
            return data[pos : lf - 1]
        return data[pos:lf]

    def next_is(self, line: bytes) -> bool:
        """Whether the next buffered line is ``line`` (terminator included, given in upper
        case; compared case-insensitively), without consuming it. Lets a server see that a
        pipelining client already sent its next command."""
        if self._owed or self._discarding:
            return False
        start = self._pos
        return self._data[start : start + len(line)].upper() == line

    def take_buffer(self) -> bytes:
        """Remove and return every byte buffered after the last returned line.

        Used when switching to the DATA phase. Any over-long line still being dropped is
        forgotten.
        """
        rest = self._data[self._pos :]
        self._data = b""
        self._pos = 0
        self._lf = _NO_LF
        self._owed = 0
        self._discarding = False
        return rest
