"""The DATA phase scanner: finds ``<CRLF>.<CRLF>`` and flags bare CR/LF and NUL, chunk by chunk.

The sidecar copies the client's bytes to the MX unchanged (dot-stuffing included), so the only
work per chunk is a handful of C-speed scans (``bytes.count``/``bytes.find``); no per-line Python
code runs on the hot path. State (the last bytes of the previous chunk, a pending CR) is carried
across chunk boundaries so a marker or CRLF split anywhere is still seen.

Why bare CR/LF/NUL are refused: an MX that accepts ``<LF>.<LF>`` (or similar) as the end of data
could see a different end than the sidecar and deliver a smuggled second message
(CVE-2023-51764/51765/51766). Refusing the whole transaction keeps client and MX in agreement.

The size kept is RFC 1870's (section 3): the message's octets, CRLFs included, without the
terminating ``.CRLF`` and without the dots added by dot-stuffing. Each line that starts with a
dot carries one stuffing dot (RFC 5321 section 4.5.2), so counting ``CRLF.`` (with the data's
start taken as a CRLF) gives them, in C-speed ``bytes.count`` calls.

On request the scanner also says whether the header section (everything before the first
empty line) holds a byte that is not ASCII: such a message needs SMTPUTF8 (RFC 6532) and
cannot go to an MX without it. Only the header section is looked at, with ``bytes.isascii``.
"""

from __future__ import annotations

END_OF_DATA = b"\r\n.\r\n"
_TAIL = len(END_OF_DATA) - 1
_STUFFED = b"\r\n."  # a line that starts with a dot (its first dot is not message data)
_HEADER_END = b"\r\n\r\n"  # the empty line after the header section


class DataScanner:
    """Feed the client's DATA bytes; learn where the end marker is, whether the data is clean,
    and the message's size.

    With ``check_header`` the scanner also sets ``non_ascii_header`` when the header section
    holds a non-ASCII byte; without it the header is not looked at.
    """

    __slots__ = (
        "_dots",
        "_in_header",
        "_octets",
        "_pending_cr",
        "_tail",
        "bad_byte",
        "ended",
        "non_ascii_header",
    )

    def __init__(self, check_header: bool = False) -> None:
        # The start of the data counts as "just after a CRLF": an empty body is ".\r\n".
        self._tail = b"\r\n"
        self._pending_cr = False
        self._octets = 0  # bytes fed, up to and including the end marker
        self._dots = 0  # "CRLF." seen, the data's start counting as a CRLF
        self._in_header = check_header
        self.bad_byte = False
        self.ended = False
        self.non_ascii_header = False

    @property
    def size(self) -> int:
        """The message size in octets as RFC 1870 counts it (section 3): without the final
        ``.CRLF`` and the stuffing dots. Exact once ``ended``; before, a lower bound (at most
        2 under what the message will count), so a check against a limit never refuses too
        early."""
        # Every "CRLF." is a line starting with a dot: one stuffing dot each, and the last one
        # is the end marker's, whose ".CRLF" is the other 2 octets that do not count.
        return max(0, self._octets - self._dots - 2)

    def feed(self, chunk: bytes | bytearray) -> int | None:
        """Scan ``chunk``. Returns the offset just past the end marker if it ends in this chunk
        (the bytes after it belong to the next SMTP command), else ``None``.

        ``bad_byte`` becomes true once a bare CR, bare LF or NUL has been seen before the end.
        """
        if self.ended:
            raise RuntimeError("feed() after the end of data")
        end = self._find_end(chunk)
        part = chunk if end is None else chunk[:end]
        self._octets += len(part)
        # "CRLF." straddling the previous bytes and this part, then within the part (a
        # pattern of 3 bytes cannot lie in either 2-byte half of the window).
        self._dots += (self._tail[-2:] + part[:2]).count(_STUFFED) + part.count(_STUFFED)
        if self._in_header:
            self._scan_header(part)
        if not self.bad_byte:
            self.bad_byte = self._has_bad_byte(part)
        if end is None:
            self._tail = (self._tail + chunk[-_TAIL:])[-_TAIL:]
        else:
            self.ended = True
        return end

    def _find_end(self, chunk: bytes | bytearray) -> int | None:
        # A marker straddling the previous chunk and this one.
        window = self._tail + chunk[:_TAIL]
        at = window.find(END_OF_DATA)
        if at != -1:
            return at + len(END_OF_DATA) - len(self._tail)
        at = chunk.find(END_OF_DATA)
        return None if at == -1 else at + len(END_OF_DATA)

    def _scan_header(self, part: bytes | bytearray) -> None:
        """Check the header bytes in ``part`` for non-ASCII, up to the first empty line."""
        before = self._tail[-3:]
        at = (before + part[:3]).find(_HEADER_END)  # an empty line straddling the two
        if at != -1:
            stop = at + len(_HEADER_END) - len(before)
        else:
            at = part.find(_HEADER_END)
            stop = len(part) if at == -1 else at + len(_HEADER_END)
        if not part[:stop].isascii():
            self.non_ascii_header = True
            self._in_header = False
        elif at != -1:
            self._in_header = False  # the body is not looked at

    def _has_bad_byte(self, part: bytes | bytearray) -> bool:
        if not part:
            return False
        crs = part.count(b"\r")
        lfs = part.count(b"\n")
        pairs = part.count(b"\r\n")
        if self._pending_cr:
            if part[0] != 0x0A:
                return True
            crs += 1
            pairs += 1
        self._pending_cr = part[-1] == 0x0D
        if self._pending_cr:
            crs -= 1
        return crs != pairs or lfs != pairs or b"\x00" in part
