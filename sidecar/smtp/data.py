"""The DATA phase scanner: finds ``<CRLF>.<CRLF>`` and flags bare CR/LF and NUL, chunk by chunk.

The sidecar copies the client's bytes to the MX unchanged (dot-stuffing included), so the only
work per chunk is a handful of C-speed scans (``bytes.count``/``bytes.find``); no per-line Python
code runs on the hot path. State (the last bytes of the previous chunk, a pending CR) is carried
across chunk boundaries so a marker or CRLF split anywhere is still seen.

Why bare CR/LF/NUL are refused: an MX that accepts ``<LF>.<LF>`` (or similar) as the end of data
could see a different end than the sidecar and deliver a smuggled second message
(CVE-2023-51764/51765/51766). Refusing the whole transaction keeps client and MX in agreement.
"""

from __future__ import annotations

END_OF_DATA = b"\r\n.\r\n"
_TAIL = len(END_OF_DATA) - 1


class DataScanner:
    """Feed the client's DATA bytes; learn where the end marker is and whether the data is clean."""

    __slots__ = ("_pending_cr", "_tail", "bad_byte", "ended", "size")

    def __init__(self) -> None:
        # The start of the data counts as "just after a CRLF": an empty body is ".\r\n".
        self._tail = b"\r\n"
        self._pending_cr = False
        self.bad_byte = False
        self.ended = False
        self.size = 0

    def feed(self, chunk: bytes | bytearray) -> int | None:
        """Scan ``chunk``. Returns the offset just past the end marker if it ends in this chunk
        (the bytes after it belong to the next SMTP command), else ``None``.

        ``bad_byte`` becomes true once a bare CR, bare LF or NUL has been seen before the end.
        """
        if self.ended:
            raise RuntimeError("feed() after the end of data")
        end = self._find_end(chunk)
        part = chunk if end is None else chunk[:end]
        self.size += len(part)
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
