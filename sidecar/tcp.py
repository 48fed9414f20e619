"""TCP on the hot path: a lean stream, deadline-bounded send and receive, and the accept loop.

trio's SocketStream pays on every send and receive for two passes through the scheduler, a
conflict detector and an error-translating context manager, and the sidecar added a cancel
scope per call for its timeout; that was about a fifth of its CPU per message
(bench/NOTES.md). :class:`TcpStream` makes the system call first and sets up a deadline only
when it has to wait. So that a connection whose peer is always ready cannot starve the
others, it yields to the scheduler after every few calls that did not wait.
"""

from __future__ import annotations

import errno
import heapq
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Iterable
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address

import trio

from sidecar.errors import describe_error

log = logging.getLogger("sidecar.tcp")

# Calls that completed without waiting before the stream yields to the scheduler once.
YIELD_EVERY = 8
LISTEN_BACKLOG = 1024
ACCEPT_BATCH = 64  # connections taken per wake-up of a listening socket
# accept() errors that mean "out of a resource for now": wait a little and go on (as trio does).
_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_PAUSE = 0.1


class Timeouts:
    """Deadlines for :class:`TcpStream` waits, cheaper than a cancel scope per wait.

    Entering and leaving a cancel scope costs 5-10 us; the sidecar waits about 8 times per
    message with a deadline, which came to some 10% of its CPU. Here a wait puts its stream
    in a bucket RESOLUTION seconds wide and takes it out again when the wait ends, and one
    system task per trio run (:meth:`run`) sweeps the expired buckets every RESOLUTION
    seconds: ``notify_closing`` wakes those waits with ClosedResourceError, which the stream
    turns into its timeout. A timeout fires at most RESOLUTION late; SMTP timeouts are
    seconds to minutes.
    """

    def __init__(self) -> None:
        self._buckets: dict[int, set[TcpStream]] = {}
        self._keys: list[int] = []  # heap of bucket keys (some may be gone already)
        self.running = True

    def add(self, stream: TcpStream, deadline: float) -> int:
        key = math.ceil(deadline / RESOLUTION)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
            heapq.heappush(self._keys, key)
        bucket.add(stream)
        return key

    def discard(self, stream: TcpStream, key: int) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.discard(stream)
            if not bucket:
                del self._buckets[key]

    def expire(self, now: float | None = None) -> None:
        """End every wait whose deadline is at or before ``now`` (``None``: every wait)."""
        due = None if now is None else math.floor(now / RESOLUTION)
        while self._keys and (due is None or self._keys[0] <= due):
            for stream in self._buckets.pop(heapq.heappop(self._keys), ()):
                stream.interrupt()

    async def run(self) -> None:
        """Sweep until the trio run ends."""
        try:
            while True:
                await trio.sleep(RESOLUTION)
                self.expire(trio.current_time())
        finally:
            self.running = False  # later waits use cancel scopes
            self.expire()  # nothing may wait for a sweep that will not come


def _current_timeouts() -> Timeouts | None:
    """This trio run's sweeper, started on first use; ``None`` once it has stopped."""
    timeouts = _timeouts.get()
    if timeouts is None:
        timeouts = Timeouts()
        _timeouts.set(timeouts)
        trio.lowlevel.spawn_system_task(timeouts.run, name="sidecar.tcp.Timeouts.run")
    return timeouts if timeouts.running else None


RESOLUTION = 0.1  # seconds: how late a TcpStream timeout may fire
_Wait = Callable[[socket.socket], Awaitable[None]]  # trio.lowlevel.wait_readable/_writable
_timeouts: trio.lowlevel.RunVar[Timeouts | None] = trio.lowlevel.RunVar(
    "sidecar_timeouts", default=None
)


def _broken(error: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    if error.errno == errno.EBADF:
        return trio.ClosedResourceError("the socket was closed")
    return trio.BrokenResourceError(f"socket error: {describe_error(error)}")


class TcpStream(trio.abc.HalfCloseableStream):
    """A :class:`trio.abc.HalfCloseableStream` over a connected, non-blocking TCP socket."""

    __slots__ = ("_answer_pending", "_timed_out", "_unyielded", "socket")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._unyielded = 0
        # After a send, the peer's answer is almost never there yet: the next receive waits
        # for it rather than first paying for a recv() that fails.
        self._answer_pending = False
        self._timed_out = False

    async def _after_ready_call(self) -> None:
        self._unyielded += 1
        if self._unyielded >= YIELD_EVERY:
            self._unyielded = 0
            await trio.lowlevel.checkpoint()

    async def _wait(self, wait: _Wait, deadline: float) -> bool:
        """Wait until the socket is ready (``True``) or ``deadline`` has passed (``False``)."""
        self._unyielded = 0
        if deadline == math.inf:
            await wait(self.socket)
            return True
        self._timed_out = False
        timeouts = _current_timeouts()
        try:
            if timeouts is None or deadline <= trio.current_time():
                with trio.move_on_at(deadline) as scope:
                    await wait(self.socket)
                return not scope.cancelled_caught
            key = timeouts.add(self, deadline)
            try:
                await wait(self.socket)
            finally:
                timeouts.discard(self, key)
            return True
        except trio.ClosedResourceError:
            if self._timed_out:  # interrupt(): the deadline passed, or a shutdown
                return False
            raise

    def interrupt(self) -> None:
        """End the current wait (if any) as if its deadline had passed: :class:`Timeouts`
        calls this, and so does a shutdown for sessions waiting between transactions."""
        self._timed_out = True
        if self.socket.fileno() != -1:
            trio.lowlevel.notify_closing(self.socket)

    async def receive_by(self, max_bytes: int, deadline: float) -> bytes | None:
        """Up to ``max_bytes`` (``b""`` at end of stream), or ``None`` if nothing arrived
        by ``deadline`` (trio time)."""
        wait_first, self._answer_pending = self._answer_pending, False
        while True:
            if wait_first and not await self._wait(trio.lowlevel.wait_readable, deadline):
                return None
            try:
                data = self.socket.recv(max_bytes)
            except BlockingIOError:
                wait_first = True
                continue
            except OSError as error:
                raise _broken(error) from None
            if not wait_first:
                await self._after_ready_call()
            return data

    async def send_by(self, data: bytes | bytearray | memoryview, deadline: float) -> bool:
        """Send all of ``data``; ``False`` if it could not all go by ``deadline`` (then
        part of it may have gone: the connection is no longer usable)."""
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                try:
                    sent += self.socket.send(view[sent:])
                except BlockingIOError:
                    if not await self._wait(trio.lowlevel.wait_writable, deadline):
                        return False
                except OSError as error:
                    raise _broken(error) from None
        self._answer_pending = True
        await self._after_ready_call()
        return True

    # ---- trio.abc.HalfCloseableStream -----------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.receive_by(max_bytes or 65536, math.inf)
        assert data is not None
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.send_by(data, math.inf)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.socket)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as error:
            raise _broken(error) from None

    def close(self) -> None:
        if self.socket.fileno() != -1:
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


class ScopedStream(trio.abc.Stream):
    """:class:`TcpStream`'s deadline API (``receive_by``, ``send_by``, ``interrupt``) over any
    other trio stream: TLS (``trio.SSLStream``) and the memory streams of tests. Each wait
    runs in a cancel scope with its deadline, which ``interrupt`` cancels; so every stream the
    session and the upstream use waits the same way, whatever is under it."""

    __slots__ = ("_scope", "inner")

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self._scope: trio.CancelScope | None = None

    async def receive_by(self, max_bytes: int, deadline: float) -> bytes | bytearray | None:
        """Up to ``max_bytes`` (``b""`` at end of stream), or ``None`` if nothing arrived by
        ``deadline`` (trio time) or the wait was interrupted."""
        with trio.CancelScope(deadline=deadline) as self._scope:
            return await self.inner.receive_some(max_bytes)
        return None

    async def send_by(self, data: bytes | bytearray | memoryview, deadline: float) -> bool:
        """Send all of ``data``; ``False`` if it could not all go by ``deadline`` (the stream
        is then unusable: a TLS stream cancelled mid-send is broken)."""
        with trio.CancelScope(deadline=deadline) as self._scope:
            await self.inner.send_all(data)
            return True
        return False

    def interrupt(self) -> None:
        """End the current wait (if any) as if its deadline had passed."""
        if self._scope is not None:
            self._scope.cancel()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


DeadlineStream = TcpStream | ScopedStream
"""A stream with ``receive_by``/``send_by`` (absolute trio deadlines) and ``interrupt``: what
sessions and upstreams hold."""


def deadline_stream(stream: trio.abc.Stream) -> DeadlineStream:
    """``stream`` itself when it is a :class:`TcpStream`, else wrapped in :class:`ScopedStream`."""
    if isinstance(stream, (TcpStream, ScopedStream)):
        return stream
    return ScopedStream(stream)


async def close_now(stream: trio.abc.AsyncResource) -> None:
    """Close at once, even in a cancelled scope. For a TcpStream that is a plain close();
    ``trio.aclose_forcefully`` would build and cancel two cancel scopes to do it."""
    if isinstance(stream, TcpStream):
        stream.close()
        return
    if isinstance(stream, ScopedStream):
        stream = stream.inner
    with trio.CancelScope(shield=True):
        await trio.aclose_forcefully(stream)


def stream_from(stream: trio.SocketStream) -> TcpStream:
    """A :class:`TcpStream` that takes over the socket of a trio ``SocketStream`` (as
    ``trio.open_tcp_stream`` returns)."""
    trio_socket = stream.socket
    family, kind, proto = trio_socket.family, trio_socket.type, trio_socket.proto
    return TcpStream(socket.socket(family, kind, proto, fileno=trio_socket.detach()))


def peer_in(networks: Iterable[IPv4Network | IPv6Network], peer: str) -> bool:
    """Whether the peer address ``peer`` (text, maybe with a %zone) is in one of
    ``networks``; an IPv4-mapped IPv6 address counts as its IPv4 address. False for text
    that is no address."""
    try:
        address = ip_address(peer.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


# ---- listening ------------------------------------------------------------------------------


def addresses_of(host: str, port: int) -> list[tuple[int, tuple[object, ...]]]:
    """(family, sockaddr) for each address ``host`` names, as a listener binds them."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    unique: dict[tuple[object, ...], int] = {}
    for family, _, _, _, sockaddr in infos:
        unique.setdefault(tuple(sockaddr), family)
    return [(family, sockaddr) for sockaddr, family in unique.items()]


def listening_socket(
    family: int, sockaddr: tuple[object, ...], *, reuse_port: bool = False
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address of ``host``, or OSError (none left open)."""
    sockets: list[socket.socket] = []
    try:
        for family, sockaddr in addresses_of(host, port):
            sockets.append(listening_socket(family, sockaddr))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


Handler = Callable[[TcpStream, str], Awaitable[object]]


async def accept_forever(listener: socket.socket, handler: Handler, nursery: trio.Nursery) -> None:
    """Accept connections on ``listener`` and run ``handler(stream, peer_host)`` for each in
    ``nursery``; the handler owns (and closes) the stream."""
    listener.setblocking(False)
    while True:
        await trio.lowlevel.wait_readable(listener)
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = listener.accept()
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno in _ACCEPT_RESOURCE_ERRORS:
                    log.error("accept failed, pausing %gs: %s", ACCEPT_PAUSE, describe_error(error))
                    await trio.sleep(ACCEPT_PAUSE)
                    break
                if error.errno == errno.EBADF:
                    raise trio.ClosedResourceError("the listening socket was closed") from None
                continue  # the connection died in the backlog (ECONNABORTED and the like)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                sock.close()
                continue
            nursery.start_soon(handler, TcpStream(sock), str(peer[0]))


async def accept_all(
    listeners: list[socket.socket], handler: Handler, nursery: trio.Nursery
) -> None:
    """:func:`accept_forever` on each listening socket; returns when cancelled."""
    async with trio.open_nursery() as acceptors:
        for listener in listeners:
            acceptors.start_soon(accept_forever, listener, handler, nursery)
