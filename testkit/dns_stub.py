"""The one scripted DNS stub of the e2e harness (hardening, DNS-outcome tests, ``bench/faults.py``).

:class:`StubDns` is a UDP + TCP DNS server in a thread (usable with or without an event loop)
whose answers come from a *handler*: ``handler(query, transport) -> bytes | None`` (the wire
bytes to send, or ``None`` to stay silent / close the TCP connection). The handlers here:

* :func:`silent`: never answers (every query times out).
* :func:`rcode`: every query gets ``rcode`` (e.g. SERVFAIL) and no records.

* :func:`zone`: answers from a small record table (NXDOMAIN for unknown names, an empty
  NOERROR for a known name without the asked type). Answers are sent whatever their size,
  so an MX RRset of 200 hosts goes out as one oversized UDP datagram (dnspython accepts it).
* :func:`garbage`: random bytes; with ``echo_id`` they start with the query's ID and the QR
  bit, so they get past the ID check and fail in the parser instead.
* :func:`truncating`: over UDP an empty answer with the TC bit set (the client must retry
  over TCP); over TCP whatever ``over_tcp`` says.
* :func:`by_suffix`: picks a handler by the query name's suffix.
* :func:`forward`: asks a real server (dnsmasq) and passes its answer on, so one stub can
  front a normal zone and still misbehave for chosen names.

``queries`` records ``(transport, name, type)`` of every query received, so tests can bound
the work an answer made the sidecar do.
"""

from __future__ import annotations

import contextlib
import random
import selectors
import socket
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Self

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from .net import Endpoint

__all__ = [
    "Handler",
    "StubDns",
    "Transport",
    "by_suffix",
    "forward",
    "garbage",
    "rcode",
    "silent",
    "truncating",
    "zone",
]

Transport = Literal["udp", "tcp"]
Handler = Callable[[dns.message.Message, Transport], bytes | None]
Records = Mapping[tuple[str, str], Sequence[str]]


def _key(name: dns.name.Name | str) -> str:
    text = name.to_text() if isinstance(name, dns.name.Name) else name
    return text.rstrip(".").lower()


def silent() -> Handler:
    """Never answers: every query times out (datagrams are read and dropped)."""

    def answer(query: dns.message.Message, transport: Transport) -> bytes | None:
        return None

    return answer


def rcode(code: dns.rcode.Rcode = dns.rcode.SERVFAIL) -> Handler:
    """Every query gets ``code`` and no records (typical: SERVFAIL behind a dnsmasq
    :class:`~.dns.ForwardZone`, or asked directly)."""

    def answer(query: dns.message.Message, transport: Transport) -> bytes | None:
        response = dns.message.make_response(query)
        response.set_rcode(code)
        return response.to_wire()

    return answer


def zone(records: Records, ttl: int = 1) -> Handler:
    """Answers from ``records``: ``{("mx.test", "MX"): ["10 a.mx.test"], ("a.mx.test", "A"):
    ["127.0.0.5"]}`` (names without the final dot, rdata in zone-file text)."""
    table: dict[tuple[str, str], list[str]] = {}
    for (name, rdtype), values in records.items():
        table.setdefault((_key(name), rdtype.upper()), []).extend(values)
    names = {name for name, _ in table}

    def answer(query: dns.message.Message, transport: Transport) -> bytes | None:
        response = dns.message.make_response(query)
        question = query.question[0]
        name = _key(question.name)
        rdtype = dns.rdatatype.to_text(question.rdtype)
        values = table.get((name, rdtype))
        if values:
            rrset = dns.rrset.from_text_list(question.name, ttl, "IN", rdtype, values)
            response.answer.append(rrset)
        elif name not in names:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire(max_size=65535)

    return answer


def garbage(seed: int = 0, *, echo_id: bool = False, max_size: int = 512) -> Handler:
    """Random bytes (1 to ``max_size``); with ``echo_id`` the first 3 bytes are the query's ID
    and a QR bit, so the reply passes the ID check and fails while being parsed."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def answer(query: dns.message.Message, transport: Transport) -> bytes | None:
        with lock:
            size = rng.randint(1, max_size)
            data = bytearray(rng.randbytes(size))
        if echo_id:
            data = bytearray(struct.pack("!HB", query.id, 0x80 | (data[0] if data else 0)))
            data += rng.randbytes(max(0, size - 3))
        return bytes(data)

    return answer


def truncating(over_tcp: Handler | None) -> Handler:
    """UDP: an empty answer with TC set. TCP: ``over_tcp``'s answer (``None``: close)."""

    def answer(query: dns.message.Message, transport: Transport) -> bytes | None:
        if transport == "tcp":
            return None if over_tcp is None else over_tcp(query, transport)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.TC
        return response.to_wire()

    return answer


def by_suffix(handlers: Mapping[str, Handler], default: Handler) -> Handler:
    """The handler of the longest suffix (a zone name) matching the query name."""
    ordered = sorted(
        ((_key(suffix), h) for suffix, h in handlers.items()), key=lambda p: -len(p[0])
    )

    def answer(query: dns.message.Message, transport: Transport) -> bytes | None:
        name = _key(query.question[0].name) if query.question else ""
        for suffix, handler in ordered:
            if name == suffix or name.endswith("." + suffix):
                return handler(query, transport)
        return default(query, transport)

    return answer


def forward(server: Endpoint, timeout: float = 2.0) -> Handler:
    """Ask ``server`` (same transport) and pass its answer on; silence if it fails."""

    def answer(query: dns.message.Message, transport: Transport) -> bytes | None:
        try:
            if transport == "udp":
                response = dns.query.udp(query, server.host, port=server.port, timeout=timeout)
            else:
                response = dns.query.tcp(query, server.host, port=server.port, timeout=timeout)
        except (dns.exception.DNSException, OSError):
            return None
        return response.to_wire(max_size=65535)

    return answer


class StubDns:
    """A DNS server on ``endpoint`` (UDP and TCP, same port) answering with ``handler``.

    ``with StubDns(endpoint, handler):`` or :meth:`start`/:meth:`stop`. Queries that do not
    parse are ignored. A TCP client gets at most one answer per query and 2 s to send it.
    """

    def __init__(self, endpoint: Endpoint, handler: Handler, *, tcp: bool = True) -> None:
        self.endpoint = endpoint
        self.handler = handler
        self.tcp = tcp
        self.queries: list[tuple[Transport, str, str]] = []
        self._sockets: list[socket.socket] = []
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        udp = socket.socket(self.endpoint.family, socket.SOCK_DGRAM)
        self._sockets.append(udp)
        try:
            udp.bind(self.endpoint.as_tuple())
            if self.tcp:
                listener = socket.socket(self.endpoint.family, socket.SOCK_STREAM)
                self._sockets.append(listener)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(self.endpoint.as_tuple())
                listener.listen(16)
        except OSError:
            self.stop()
            raise
        self._wake = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name=f"StubDns {self.endpoint}")
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        if self._wake is not None:
            with contextlib.suppress(OSError):
                self._wake[0].send(b"x")
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for sock in (*self._sockets, *(self._wake or ())):
            sock.close()
        self._sockets = []
        self._wake = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def count(self, rdtype: str | None = None) -> int:
        """Queries received (of ``rdtype`` only, if given)."""
        return sum(1 for _, _, kind in self.queries if rdtype is None or kind == rdtype)

    # -- the server thread ----------------------------------------------------------------

    def _parse(self, wire: bytes, transport: Transport) -> dns.message.Message | None:
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError):
            return None
        if not query.question:
            return None
        question = query.question[0]
        self.queries.append(
            (transport, _key(question.name), dns.rdatatype.to_text(question.rdtype))
        )
        return query

    def _serve(self) -> None:
        assert self._wake is not None
        wake = self._wake[1]
        udp = self._sockets[0]
        listener = self._sockets[1] if self.tcp else None
        with selectors.DefaultSelector() as selector:
            selector.register(wake, selectors.EVENT_READ)
            selector.register(udp, selectors.EVENT_READ)
            if listener is not None:
                selector.register(listener, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if wake in ready:
                    return
                if udp in ready:
                    self._serve_udp(udp)
                if listener is not None and listener in ready:
                    self._serve_tcp(listener)

    def _serve_udp(self, udp: socket.socket) -> None:
        try:
            wire, peer = udp.recvfrom(65535)
        except OSError:
            return
        query = self._parse(wire, "udp")
        if query is None:
            return
        answer = self.handler(query, "udp")
        if answer is not None:
            with contextlib.suppress(OSError):
                udp.sendto(answer[:65507], peer)

    def _serve_tcp(self, listener: socket.socket) -> None:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        with connection:
            connection.settimeout(2)
            try:
                size = struct.unpack("!H", _read_exactly(connection, 2))[0]
                query = self._parse(_read_exactly(connection, size), "tcp")
                if query is None:
                    return
                answer = self.handler(query, "tcp")
                if answer is not None:
                    connection.sendall(struct.pack("!H", len(answer)) + answer)
            except (OSError, EOFError, struct.error):
                return


def _read_exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data
