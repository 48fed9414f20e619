"""PROXY protocol version 2 header: encode (what the sidecar writes) and decode (for tests and
for the health probe), sans-IO.

Only the PROXY command with TCP over IPv4/IPv6 is ever written: a LOCAL header would make
HAProxy keep the real socket addresses and, with ``server 0.0.0.0:0``, connect back to itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_COMMAND_PROXY = 0x21
VERSION_COMMAND_LOCAL = 0x20
FAMILY_TCP4 = 0x11
FAMILY_TCP6 = 0x21

_ADDR4 = struct.Struct("!4s4sHH")
_ADDR6 = struct.Struct("!16s16sHH")
_FIXED = struct.Struct("!12sBBH")
HEADER_MIN = _FIXED.size  # 16


class ProxyHeaderError(ValueError):
    """Bytes that are not a PROXY v2 header we can use."""


@dataclass(frozen=True)
class ProxyHeader:
    source: IPv4Address | IPv6Address
    source_port: int
    destination: IPv4Address | IPv6Address
    destination_port: int


def encode(
    source: IPv4Address | IPv6Address,
    source_port: int,
    destination: IPv4Address | IPv6Address,
    destination_port: int,
) -> bytes:
    """The whole header (to be sent in one write) for a TCP connection source -> destination."""
    if source.version != destination.version:
        raise ValueError(f"address families differ: {source} -> {destination}")
    for port in (source_port, destination_port):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port out of range: {port}")
    if isinstance(source, IPv4Address):
        body = _ADDR4.pack(source.packed, destination.packed, source_port, destination_port)
        family = FAMILY_TCP4
    else:
        body = _ADDR6.pack(source.packed, destination.packed, source_port, destination_port)
        family = FAMILY_TCP6
    return _FIXED.pack(SIGNATURE, VERSION_COMMAND_PROXY, family, len(body)) + body


def decode(data: bytes) -> tuple[ProxyHeader, int] | None:
    """Parse a PROXY v2 header at the start of ``data``.

    Returns ``(header, bytes consumed)``, or ``None`` if more bytes are needed. TLVs after the
    addresses are skipped. Raises :class:`ProxyHeaderError` for anything else.
    """
    if len(data) < HEADER_MIN:
        if not SIGNATURE.startswith(data[: len(SIGNATURE)]):
            raise ProxyHeaderError("not a PROXY v2 signature")
        return None
    signature, version_command, family, length = _FIXED.unpack_from(data)
    if signature != SIGNATURE:
        raise ProxyHeaderError("not a PROXY v2 signature")
    if version_command != VERSION_COMMAND_PROXY:
        raise ProxyHeaderError(f"unsupported version/command byte 0x{version_command:02x}")
    if len(data) < HEADER_MIN + length:
        return None
    if family == FAMILY_TCP4 and length >= _ADDR4.size:
        src, dst, sport, dport = _ADDR4.unpack_from(data, HEADER_MIN)
    elif family == FAMILY_TCP6 and length >= _ADDR6.size:
        src, dst, sport, dport = _ADDR6.unpack_from(data, HEADER_MIN)
    else:
        raise ProxyHeaderError(f"unsupported family 0x{family:02x} or length {length}")
    header = ProxyHeader(ip_address(src), sport, ip_address(dst), dport)
    return header, HEADER_MIN + length
