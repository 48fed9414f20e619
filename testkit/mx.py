"""TestMX: a small SMTP server on trio that records what reaches it.

``await nursery.start(mx.serve)`` listens on ``mx.endpoint`` (port 0 picks one; the endpoint is
updated). Per connection it records the peer address it saw (this is how tests prove the
source address HAProxy used), the EHLO name, every command line, whether TLS was on; per
message the MAIL line, the accepted RCPT lines, and the raw DATA bytes exactly as received:
everything after the ``354`` up to and including the CRLF before the terminating ``.CRLF``,
still dot-stuffed. The data phase is a chunk scanner that looks for the end marker across
chunk boundaries, so 10 MB messages are cheap.

Behaviour is a set of public attributes that tests may also change while it runs:

* ``banner``: bytes of the greeting (default ``220 <hostname> ESMTP TestMX``). A ``421``
  banner closes the connection; any other non-2xx banner answers ``503`` until ``QUIT``.
* ``capabilities``: EHLO keywords; ``None`` means :data:`DEFAULT_CAPABILITIES` plus
  ``STARTTLS`` when ``tls_context`` is set (and TLS is not active yet).
* ``replies``: per phase (``EHLO HELO STARTTLS MAIL RCPT DATA END RSET NOOP QUIT``), the reply
  to send instead of the default: bytes (use :func:`smtp_reply`), or a callable given the
  command line (for ``END``: the message data) returning bytes. The state machine follows the
  reply actually sent (a 5xx RCPT adds no recipient, a non-354 DATA has no data phase).
* ``multiline_final_reply``: the default end-of-data reply has two lines, both naming the
  message's queue id, so tests can check a multi-line reply is passed through byte for byte.
* ``close_at`` / ``hang_at``: a phase (``CONNECT``, a verb, or ``END`` = after the data) at
  which to close the connection, or to stop answering (it keeps reading), instead of
  replying. ``close_at="CONNECT"`` closes right after accept, ``hang_at="CONNECT"`` never
  sends a banner. Data that reached ``END`` is recorded (with ``reply == b""``).
* ``delays``: per phase (``MAIL RCPT DATA END``), seconds to wait before replying (a slow
  policy service or a tarpit).
* ``slow_data``: (octets, seconds): in the data phase read at most that many octets at a time
  and wait that long before each read (an MX that takes the data slowly).
* ``unsolicited_after_end``: (delay in seconds, bytes): after each end-of-data reply, wait
  that long and then send those bytes unasked (an MX whose reply stream is out of step).
* ``accept_bare_lf``: also end the data at ``<LF>.<LF>`` (and ``<LF>.<CRLF>``,
  ``<CRLF>.<LF>``), as servers vulnerable to SMTP smuggling do. Default: only
  ``<CRLF>.<CRLF>``.
* ``tls_context``: server-side context (see :func:`server_tls_context`) enabling STARTTLS;
  bytes pipelined after ``STARTTLS`` are discarded (kept in ``discarded_before_tls``) and the
  client must EHLO again.
"""

from __future__ import annotations

import itertools
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import trio
import trustme

from .net import Endpoint

__all__ = [
    "DEFAULT_CAPABILITIES",
    "DEFAULT_TLS_IDENTITIES",
    "PHASES",
    "MXConnection",
    "MXMessage",
    "ReplySpec",
    "TestMX",
    "client_tls_context",
    "server_tls_context",
    "smtp_reply",
]

DEFAULT_CAPABILITIES: Final = (
    "PIPELINING",
    "8BITMIME",
    "SIZE 104857600",
    "ENHANCEDSTATUSCODES",
    "SMTPUTF8",
)
DEFAULT_TLS_IDENTITIES: Final = ("mx.test", "localhost", "127.0.0.1", "::1")
PHASES: Final = frozenset(
    {"CONNECT", "EHLO", "HELO", "STARTTLS", "MAIL", "RCPT", "DATA", "END", "RSET", "NOOP", "QUIT"}
)

ReplySpec = bytes | Callable[[bytes], bytes]

_CHUNK = 256 * 1024
# The data phase starts right after the CRLF of the DATA command, so the scanner prepends that
# CRLF: group 1 is the line ending that belongs to the last data line.
_END_CRLF = re.compile(rb"(\r\n)\.\r\n")
_END_BARE_LF = re.compile(rb"(\n)\.\r?\n")
_MARKER_MAX = 5


def smtp_reply(code: int, *lines: str) -> bytes:
    """``smtp_reply(250, "a", "b")`` -> ``b"250-a\\r\\n250 b\\r\\n"``."""
    texts = lines or ("",)
    last = len(texts) - 1
    return b"".join(
        f"{code}{' ' if i == last else '-'}{text}\r\n".encode() for i, text in enumerate(texts)
    )


def server_tls_context(ca: trustme.CA, *identities: str) -> ssl.SSLContext:
    """A server context with a certificate from ``ca`` for ``identities`` (names or IPs)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(identities or DEFAULT_TLS_IDENTITIES)).configure_cert(context)
    return context


def client_tls_context(ca: trustme.CA) -> ssl.SSLContext:
    """A verifying client context that trusts ``ca``."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@dataclass
class MXMessage:
    """One transaction that reached the end of its data."""

    peer: tuple[str, int]
    ehlo: str | None
    tls: bool
    mail_from: bytes
    rcpt_to: list[bytes]
    data: bytes
    reply: bytes
    queue_id: str
    connection_index: int
    received_at: float = 0.0  # trio.current_time() when the end of data came in

    @property
    def peer_host(self) -> str:
        return self.peer[0]

    @property
    def accepted(self) -> bool:
        return self.reply.startswith(b"2")


@dataclass
class MXConnection:
    """One accepted TCP connection (``peer`` is the address the MX saw)."""

    index: int
    peer: tuple[str, int]
    local: tuple[str, int]
    ehlo: str | None = None
    tls: bool = False
    commands: list[bytes] = field(default_factory=list)
    # For each command: was it already received when the reply to the one before was sent
    # (the client pipelined it)?
    pipelined: list[bool] = field(default_factory=list)
    messages: list[MXMessage] = field(default_factory=list)
    discarded_before_tls: bytes = b""
    error: str | None = None
    closed: bool = False

    @property
    def peer_host(self) -> str:
        return self.peer[0]


def _address(sockaddr: object) -> tuple[str, int]:
    if not isinstance(sockaddr, tuple) or len(sockaddr) < 2:
        raise TypeError(f"unexpected socket address {sockaddr!r}")
    return (str(sockaddr[0]), int(sockaddr[1]))


class _LineTooLongError(Exception):
    pass


class TestMX:
    """An SMTP server for tests; see the module docstring for the behaviour knobs."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        hostname: str = "mx.test",
        banner: bytes | None = None,
        capabilities: Sequence[str] | None = None,
        tls_context: ssl.SSLContext | None = None,
        replies: Mapping[str, ReplySpec] | None = None,
        multiline_final_reply: bool = False,
        close_at: str | None = None,
        hang_at: str | None = None,
        accept_bare_lf: bool = False,
        max_line_length: int = 4096,
        unsolicited_after_end: tuple[float, bytes] | None = None,
        delays: Mapping[str, float] | None = None,
        slow_data: tuple[int, float] | None = None,
    ) -> None:
        for phase in (*(replies or {}), close_at, hang_at):
            if phase is not None and phase not in PHASES:
                raise ValueError(f"unknown phase {phase!r}; expected one of {sorted(PHASES)}")
        self.endpoint = endpoint
        self.hostname = hostname
        self.banner = banner if banner is not None else smtp_reply(220, f"{hostname} ESMTP TestMX")
        self.capabilities = capabilities
        self.tls_context = tls_context
        self.replies: dict[str, ReplySpec] = dict(replies or {})
        self.multiline_final_reply = multiline_final_reply
        self.close_at = close_at
        self.hang_at = hang_at
        self.accept_bare_lf = accept_bare_lf
        self.unsolicited_after_end = unsolicited_after_end
        self.delays: dict[str, float] = dict(delays or {})
        self.slow_data = slow_data
        self.max_line_length = max_line_length
        self.connections: list[MXConnection] = []
        self.messages: list[MXMessage] = []
        self.open_connections = 0  # connections accepted and not closed yet
        self.peak_connections = 0  # the most open at any one time
        self._queue_numbers = itertools.count(1)
        self._scope: trio.CancelScope | None = None
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return f"<TestMX {self.endpoint} connections={len(self.connections)}>"

    # -- running ------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled or :meth:`close`; ``started()`` once listening."""
        listeners = await trio.open_tcp_listeners(self.endpoint.port, host=self.endpoint.host)
        try:
            port = _address(listeners[0].socket.getsockname())[1]
            self.endpoint = Endpoint(self.endpoint.host, port)
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    for listener in listeners:
                        nursery.start_soon(self._accept_loop, listener, nursery)
                    task_status.started()
        finally:
            for listener in listeners:
                listener.socket.close()

    def close(self) -> None:
        """Stop listening and drop every connection (the MX goes away)."""
        if self._scope is not None:
            self._scope.cancel()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            stream = await listener.accept()
            nursery.start_soon(self._handle, stream)

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One connection. Whatever the peer does (reset, vanish) costs this connection only:
        an error escaping here would take down the whole TestMX."""
        try:
            peer, local = stream.socket.getpeername(), stream.socket.getsockname()
        except OSError:  # reset before we got to it (ENOTCONN)
            await trio.aclose_forcefully(stream)
            return
        connection = MXConnection(
            index=len(self.connections), peer=_address(peer), local=_address(local)
        )
        self.connections.append(connection)
        self.open_connections += 1
        self.peak_connections = max(self.peak_connections, self.open_connections)
        self._notify()
        session = _Session(self, connection, stream)
        try:
            await session.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            connection.error = repr(exc)
        finally:
            connection.closed = True
            self.open_connections -= 1
            # Notify before the (cancellable) close, so waiters wake even when close() cancels us.
            self._notify()
            await trio.aclose_forcefully(session.stream)

    # -- observing -----------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds (re-checked on every connection/message event)."""
        with trio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()

    async def wait_for_messages(self, count: int = 1, timeout: float = 10.0) -> list[MXMessage]:
        await self.wait_for(lambda: len(self.messages) >= count, timeout)
        return self.messages

    async def wait_for_connections(
        self, count: int = 1, timeout: float = 10.0
    ) -> list[MXConnection]:
        await self.wait_for(lambda: len(self.connections) >= count, timeout)
        return self.connections

    async def wait_closed(self, index: int = -1, timeout: float = 10.0) -> MXConnection:
        """Wait for connection ``index`` (default: the latest) to be closed."""
        await self.wait_for_connections(1, timeout)
        await self.wait_for(lambda: self.connections[index].closed, timeout)
        return self.connections[index]

    # -- defaults ------------------------------------------------------------------------------

    def next_queue_id(self) -> str:
        return f"TESTMX{self.endpoint.port}Q{next(self._queue_numbers):04d}"

    def default_final_reply(self, queue_id: str) -> bytes:
        if self.multiline_final_reply:
            return smtp_reply(
                250,
                f"2.0.0 Ok: queued as {queue_id}",
                f"2.0.0 {queue_id} accepted by TestMX {self.hostname}",
            )
        return smtp_reply(250, f"2.0.0 Ok: queued as {queue_id}")

    def ehlo_keywords(self, tls_active: bool) -> list[str]:
        if self.capabilities is not None:
            keywords = list(self.capabilities)
        else:
            keywords = list(DEFAULT_CAPABILITIES)
            if self.tls_context is not None:
                keywords.append("STARTTLS")
        if tls_active:
            keywords = [k for k in keywords if k.upper() != "STARTTLS"]
        return keywords


class _Session:
    """One SMTP connection of a :class:`TestMX`."""

    def __init__(self, mx: TestMX, connection: MXConnection, stream: trio.SocketStream) -> None:
        self.mx = mx
        self.connection = connection
        self.stream: trio.abc.Stream = stream
        self.buffer = bytearray()
        self.line_was_buffered = False
        self.mail_from: bytes | None = None
        self.rcpt_to: list[bytes] = []
        self.handlers: dict[str, Callable[[bytes], Awaitable[bool]]] = {
            "EHLO": self.ehlo,
            "HELO": self.helo,
            "STARTTLS": self.starttls,
            "MAIL": self.mail,
            "RCPT": self.rcpt,
            "DATA": self.data,
            "RSET": self.rset,
            "NOOP": self.noop,
            "QUIT": self.quit,
        }

    # -- I/O ------------------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def pause(self, phase: str) -> None:
        delay = self.mx.delays.get(phase)
        if delay:
            await trio.sleep(delay)

    async def read_line(self) -> bytes | None:
        searched = 0
        self.line_was_buffered = True
        while True:
            end = self.buffer.find(b"\n", searched)
            if end >= 0:
                line = bytes(self.buffer[: end + 1])
                del self.buffer[: end + 1]
                return line
            searched = len(self.buffer)
            if searched > self.mx.max_line_length:
                raise _LineTooLongError
            self.line_was_buffered = False
            chunk = await self.stream.receive_some(_CHUNK)
            if not chunk:
                return None
            self.buffer += chunk

    async def read_data(self) -> bytes | None:
        """The data up to (not including) the end marker's ``.CRLF``; None on EOF."""
        pattern = _END_BARE_LF if self.mx.accept_bare_lf else _END_CRLF
        data = bytearray(b"\r\n")
        data += self.buffer
        searched = 0
        while True:
            match = pattern.search(data, searched)
            if match is not None:
                self.buffer = bytearray(data[match.end() :])
                return bytes(data[2 : match.end(1)])
            searched = max(0, len(data) - (_MARKER_MAX - 1))
            size = _CHUNK
            if self.mx.slow_data is not None:
                size, pause = self.mx.slow_data
                await trio.sleep(pause)
            chunk = await self.stream.receive_some(size)
            if not chunk:
                return None
            data += chunk

    async def hang(self) -> None:
        while await self.stream.receive_some(_CHUNK):
            pass

    # -- protocol -------------------------------------------------------------------------------

    async def stop_at(self, phase: str) -> bool:
        """Close (return True) or hang (then return True) if configured for ``phase``."""
        if self.mx.close_at == phase:
            return True
        if self.mx.hang_at == phase:
            await self.hang()
            return True
        return False

    def reply(self, phase: str, default: bytes, argument: bytes) -> bytes:
        override = self.mx.replies.get(phase)
        if override is None:
            return default
        return override(argument) if callable(override) else override

    def reset(self) -> None:
        self.mail_from = None
        self.rcpt_to = []

    async def run(self) -> None:
        if await self.stop_at("CONNECT"):
            return
        banner = self.mx.banner
        await self.send(banner)
        if banner.startswith(b"421"):
            return
        in_service = banner.startswith(b"2")
        while True:
            try:
                line = await self.read_line()
            except _LineTooLongError:
                await self.send(smtp_reply(500, "5.5.0 Error: line too long"))
                return
            if line is None:
                return
            command = line.rstrip(b"\r\n")
            self.connection.commands.append(command)
            self.connection.pipelined.append(self.line_was_buffered)
            verb = command.split(b" ", 1)[0].upper().decode("ascii", "replace")
            if not in_service and verb != "QUIT":
                await self.send(smtp_reply(503, "5.5.0 Error: no service"))
                continue
            handler = self.handlers.get(verb)
            if handler is None:
                await self.send(smtp_reply(500, "5.5.2 Error: command not recognized"))
                continue
            if await self.stop_at(verb):
                return
            if not await handler(command):
                return

    async def ehlo(self, command: bytes) -> bool:
        keywords = self.mx.ehlo_keywords(self.connection.tls)
        reply = self.reply("EHLO", smtp_reply(250, self.mx.hostname, *keywords), command)
        await self.send(reply)
        if reply.startswith(b"2"):
            self.connection.ehlo = command[5:].strip().decode("utf-8", "replace")
            self.reset()
        return True

    async def helo(self, command: bytes) -> bool:
        reply = self.reply("HELO", smtp_reply(250, self.mx.hostname), command)
        await self.send(reply)
        if reply.startswith(b"2"):
            self.connection.ehlo = command[5:].strip().decode("utf-8", "replace")
            self.reset()
        return True

    async def starttls(self, command: bytes) -> bool:
        context = self.mx.tls_context
        if self.connection.tls:
            default = smtp_reply(503, "5.5.1 Error: TLS already active")
        elif context is None:
            default = smtp_reply(502, "5.5.1 Error: command not implemented")
        else:
            default = smtp_reply(220, "2.0.0 Ready to start TLS")
        reply = self.reply("STARTTLS", default, command)
        await self.send(reply)
        if reply.startswith(b"220") and context is not None and not self.connection.tls:
            self.connection.discarded_before_tls = bytes(self.buffer)
            self.buffer.clear()
            tls_stream = trio.SSLStream(self.stream, context, server_side=True)
            self.stream = tls_stream
            await tls_stream.do_handshake()
            self.connection.tls = True
            self.connection.ehlo = None
            self.reset()
        return True

    async def mail(self, command: bytes) -> bool:
        if self.connection.ehlo is None:
            default = smtp_reply(503, "5.5.1 Error: send HELO/EHLO first")
        elif self.mail_from is not None:
            default = smtp_reply(503, "5.5.1 Error: nested MAIL command")
        else:
            default = smtp_reply(250, "2.1.0 Ok")
        reply = self.reply("MAIL", default, command)
        await self.pause("MAIL")
        await self.send(reply)
        if reply.startswith(b"2"):
            self.mail_from = command
            self.rcpt_to = []
        return True

    async def rcpt(self, command: bytes) -> bool:
        if self.mail_from is None:
            default = smtp_reply(503, "5.5.1 Error: need MAIL command")
        else:
            default = smtp_reply(250, "2.1.5 Ok")
        reply = self.reply("RCPT", default, command)
        await self.pause("RCPT")
        await self.send(reply)
        if reply.startswith(b"2"):
            self.rcpt_to.append(command)
        return True

    async def data(self, command: bytes) -> bool:
        if self.mail_from is None:
            default = smtp_reply(503, "5.5.1 Error: need MAIL command")
        elif not self.rcpt_to:
            default = smtp_reply(554, "5.5.1 Error: no valid recipients")
        else:
            default = smtp_reply(354, "End data with <CR><LF>.<CR><LF>")
        reply = self.reply("DATA", default, command)
        await self.pause("DATA")
        await self.send(reply)
        if not reply.startswith(b"3"):
            return True
        data = await self.read_data()
        if data is None:
            return False
        queue_id = self.mx.next_queue_id()
        stop = self.mx.close_at == "END" or self.mx.hang_at == "END"
        final = b"" if stop else self.reply("END", self.mx.default_final_reply(queue_id), data)
        message = MXMessage(
            peer=self.connection.peer,
            ehlo=self.connection.ehlo,
            tls=self.connection.tls,
            mail_from=self.mail_from or b"",
            rcpt_to=list(self.rcpt_to),
            data=data,
            reply=final,
            queue_id=queue_id,
            connection_index=self.connection.index,
            received_at=trio.current_time(),
        )
        self.connection.messages.append(message)
        self.mx.messages.append(message)
        self.mx._notify()
        self.reset()
        if await self.stop_at("END"):
            return False
        await self.pause("END")
        await self.send(final)
        if self.mx.unsolicited_after_end is not None:
            delay, extra = self.mx.unsolicited_after_end
            await trio.sleep(delay)
            await self.send(extra)
        return True

    async def rset(self, command: bytes) -> bool:
        self.reset()
        await self.send(self.reply("RSET", smtp_reply(250, "2.0.0 Ok"), command))
        return True

    async def noop(self, command: bytes) -> bool:
        await self.send(self.reply("NOOP", smtp_reply(250, "2.0.0 Ok"), command))
        return True

    async def quit(self, command: bytes) -> bool:
        await self.send(self.reply("QUIT", smtp_reply(221, "2.0.0 Bye"), command))
        return False
