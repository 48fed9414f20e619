from __future__ import annotations

import contextlib
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar import proxy_v2
from sidecar.proxy_v2 import ProxyHeader, ProxyHeaderError

SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")


def test_ipv4_header_bytes_hand_computed() -> None:
    header = proxy_v2.encode(IPv4Address("192.0.2.10"), 0, IPv4Address("198.51.100.25"), 25)
    expected = (
        SIG
        + bytes([0x21, 0x11, 0x00, 0x0C])
        + bytes([192, 0, 2, 10])
        + bytes([198, 51, 100, 25])
        + b"\x00\x00"  # source port 0: HAProxy's usesrc clientip picks one
        + b"\x00\x19"  # 25
    )
    assert header == expected
    assert len(header) == 28


def test_ipv6_header_bytes_hand_computed() -> None:
    header = proxy_v2.encode(IPv6Address("2001:db8::10"), 0, IPv6Address("::1"), 2525)
    expected = (
        SIG
        + bytes([0x21, 0x21, 0x00, 0x24])
        + bytes.fromhex("20010db8000000000000000000000010")
        + bytes.fromhex("00000000000000000000000000000001")
        + b"\x00\x00"
        + b"\x09\xdd"
    )
    assert header == expected
    assert len(header) == 52


def test_never_a_local_header() -> None:
    header = proxy_v2.encode(IPv4Address("127.0.0.5"), 0, IPv4Address("127.0.0.6"), 25)
    assert header[12] == proxy_v2.VERSION_COMMAND_PROXY != proxy_v2.VERSION_COMMAND_LOCAL


def test_mixed_families_refused() -> None:
    with pytest.raises(ValueError, match="families"):
        proxy_v2.encode(IPv4Address("192.0.2.1"), 0, IPv6Address("::1"), 25)


def test_port_range() -> None:
    with pytest.raises(ValueError, match="port"):
        proxy_v2.encode(IPv4Address("192.0.2.1"), 0, IPv4Address("192.0.2.2"), 65536)


def test_decode_needs_more_and_skips_tlvs() -> None:
    header = proxy_v2.encode(IPv4Address("192.0.2.1"), 1234, IPv4Address("192.0.2.2"), 25)
    assert proxy_v2.decode(header[:10]) is None
    assert proxy_v2.decode(header[:20]) is None
    with_tlv = bytearray(header)
    with_tlv[14:16] = (12 + 4).to_bytes(2, "big")
    with_tlv += b"\x04\x00\x01\x00"  # a NOOP TLV
    decoded = proxy_v2.decode(bytes(with_tlv) + b"EHLO")
    assert decoded == (
        ProxyHeader(IPv4Address("192.0.2.1"), 1234, IPv4Address("192.0.2.2"), 25),
        32,
    )


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        SIG + bytes([0x20, 0x11, 0, 12]) + bytes(12),  # LOCAL
        SIG + bytes([0x21, 0x31, 0, 0]),  # UNIX
        SIG + bytes([0x21, 0x11, 0, 4]) + bytes(4),  # too short for IPv4
    ],
)
def test_decode_rejects(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        proxy_v2.decode(data)


addresses = st.one_of(
    st.integers(0, 2**32 - 1).map(IPv4Address), st.integers(0, 2**128 - 1).map(IPv6Address)
)


@given(addresses, st.data(), st.integers(0, 65535), st.integers(0, 65535))
def test_round_trip(
    source: IPv4Address | IPv6Address, data: st.DataObject, sport: int, dport: int
) -> None:
    width = 32 if source.version == 4 else 128
    destination = ip_address(data.draw(st.integers(0, 2**width - 1)))
    if source.version == 6:
        destination = IPv6Address(int(destination))
    header = proxy_v2.encode(source, sport, destination, dport)
    assert proxy_v2.decode(header) == (ProxyHeader(source, sport, destination, dport), len(header))


@given(st.binary(max_size=80))
def test_decode_never_crashes(data: bytes) -> None:
    with contextlib.suppress(ProxyHeaderError):
        proxy_v2.decode(data)
