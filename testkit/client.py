"""A raw SMTP client for tests: sends exactly the bytes it is given, returns replies as bytes.

Unlike smtplib it never rewrites line endings or dot-stuffs, so tests can send bare LFs,
pipelined commands or odd chunkings, and compare multi-line replies byte for byte.
"""

from __future__ import annotations

import socket
import ssl
import struct

import trio

from .net import Endpoint

__all__ = ["RawSMTPClient", "reset_connection"]

_CHUNK = 65536


class RawSMTPClient:
    """Wraps a connected stream; ``async with`` closes it."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def connect(
        cls, endpoint: Endpoint, *, local_address: str | None = None
    ) -> RawSMTPClient:
        stream = await trio.open_tcp_stream(
            endpoint.host, endpoint.port, local_address=local_address
        )
        return cls(stream)

    async def __aenter__(self) -> RawSMTPClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read_reply(self) -> bytes:
        """One complete reply (all its lines, raw). ``b""`` if the peer closed first; raises
        ``EOFError`` if it closed in the middle of a reply."""
        start = 0
        while True:
            end = self.buffer.find(b"\n", start)
            if end >= 0:
                line = self.buffer[start : end + 1]
                if len(line) < 4 or line[3:4] != b"-":
                    reply = bytes(self.buffer[: end + 1])
                    del self.buffer[: end + 1]
                    return reply
                start = end + 1
                continue
            chunk = await self.stream.receive_some(_CHUNK)
            if not chunk:
                if self.buffer:
                    raise EOFError(f"connection closed inside a reply: {bytes(self.buffer)!r}")
                return b""
            self.buffer += chunk

    async def command(self, line: bytes | str) -> bytes:
        """Send one command (CRLF appended if missing) and return its reply."""
        data = line.encode() if isinstance(line, str) else line
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        await self.send(data)
        return await self.read_reply()

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> bytes:
        """``STARTTLS``; on 220 wraps the stream and completes the handshake."""
        reply = await self.command(b"STARTTLS")
        if reply.startswith(b"220"):
            self.buffer.clear()
            tls_stream = trio.SSLStream(self.stream, context, server_hostname=server_hostname)
            self.stream = tls_stream
            await tls_stream.do_handshake()
        return reply


def reset_connection(endpoint: Endpoint, before: bytes | None = None) -> None:
    """Connect to ``endpoint`` and reset the connection (RST, by SO_LINGER 0), as a port probe
    that never reads the banner or a crashed client does. With ``before``: read what the server
    says first (its banner), send ``before``, then reset."""
    with socket.socket(endpoint.family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.connect(endpoint.as_tuple())
        if before is not None:
            sock.recv(4096)
            sock.sendall(before)
