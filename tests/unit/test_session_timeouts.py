"""Client-side time limits of a session, on trio's mock clock, through both production wait
mechanisms: a TcpStream on a socket pair (deadlines ended by the Timeouts sweeper) and a
ScopedStream on memory streams (a cancel scope per wait, as for TLS)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from sidecar.config import parse_config
from sidecar.server import build_context
from sidecar.session import Session
from sidecar.smtp.commands import parse_mail_from
from sidecar.smtp.replies import reply
from sidecar.tcp import TcpStream

CONFIG = {
    "server": {"hostname": "sidecar.test", "client_command_timeout": 10},
    "listener": [{"address": "127.0.0.1:2525", "binding": "b1"}],
    "binding": {"b1": {"ha_proxy_server": "127.0.0.1:9", "ha_proxy_src_addr": "192.0.2.1"}},
}


@pytest.fixture(params=["tcp", "memory"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def stream_pair(transport: str) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """(the client's end, the session's end)."""
    if transport == "memory":
        return trio.testing.memory_stream_pair()
    ours, theirs = socket.socketpair()
    return trio.SocketStream(trio.socket.from_stdlib_socket(ours)), TcpStream(theirs)


async def run_session(client_side: Callable[[Any], Awaitable[None]], transport: str) -> bytes:
    context = build_context(parse_config(CONFIG))
    client, server = stream_pair(transport)
    received = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Session(server, "127.0.0.1", context.config.listeners[0], context).run)
        nursery.start_soon(client_side, client)
        while data := await client.receive_some(4096):
            received += data
        nursery.cancel_scope.cancel()
    await client.aclose()
    return received


async def test_slowloris_hits_the_per_command_timeout(
    autojump_clock: trio.testing.MockClock, transport: str
) -> None:
    started = trio.current_time()

    async def trickle(client: trio.abc.Stream) -> None:
        for byte in b"NOOP NOOP NOOP NOOP NOOP NOOP\r\n":
            await client.send_all(bytes([byte]))
            await trio.sleep(1)

    received = await run_session(trickle, transport)
    assert received.startswith(b"220 ")
    assert received.endswith(b"421 4.4.2 Timeout, closing connection\r\n")
    assert b"250" not in received  # the trickled NOOP never completed
    assert 10 <= trio.current_time() - started < 11


async def test_idle_session_times_out(
    autojump_clock: trio.testing.MockClock, transport: str
) -> None:
    started = trio.current_time()

    async def idle(client: trio.abc.Stream) -> None:
        await client.send_all(b"EHLO client.test\r\n")

    received = await run_session(idle, transport)
    assert b"250-sidecar.test greets client.test\r\n" in received
    assert received.endswith(b"421 4.4.2 Timeout, closing connection\r\n")
    assert 10 <= trio.current_time() - started < 11


async def test_complete_commands_reset_the_deadline(
    autojump_clock: trio.testing.MockClock, transport: str
) -> None:
    async def steady(client: trio.abc.Stream) -> None:
        for _ in range(5):
            await client.send_all(b"NOOP\r\n")
            await trio.sleep(8)  # each under the 10 s limit, 40 s in all
        await client.send_all(b"QUIT\r\n")

    received = await run_session(steady, transport)
    assert received.count(b"250 2.0.0") == 5
    assert received.endswith(b"221 2.0.0 Bye\r\n")


async def test_trickled_data_hits_the_total_data_timeout(
    autojump_clock: trio.testing.MockClock, transport: str
) -> None:
    """Each chunk arrives within data_timeout, but the whole data may not take longer than
    data_total_timeout: then 421 and close (and the MX would see no end of data)."""
    import sidecar.session as session_module

    config = {**CONFIG, "server": {**CONFIG["server"], "data_total_timeout": 100}}
    context = build_context(parse_config(config))

    class FakeUpstream:
        closed = False
        sent = b""

        async def send_data(self, data: bytes) -> None:
            self.sent += data

        async def abort(self) -> None:
            self.closed = True

    upstream = FakeUpstream()
    client, server = stream_pair(transport)
    session = Session(server, "127.0.0.1", context.config.listeners[0], context)
    session.upstream = upstream  # type: ignore[assignment]
    txn = session_module.Transaction(parse_mail_from("FROM:<a@b.test>"))
    session.smtp.answer_data(reply(354, None, "go ahead"))  # the DATA phase, its 354 sent
    session.smtp.take_output()
    started = trio.current_time()
    received = b""

    async def trickle() -> None:
        # Half a period off the deadline, so the sweeper's 0.1 s resolution cannot matter.
        await trio.sleep(2.5)
        for _ in range(50):
            try:
                await client.send_all(b"x")
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            await trio.sleep(5)  # far under data_timeout (180 s) each time

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)

        async def relay() -> None:
            with contextlib.suppress(session_module._CloseSession):
                await session._relay_data(upstream, txn)  # type: ignore[arg-type]
            await server.aclose()

        nursery.start_soon(relay)
        while data := await client.receive_some(4096):
            received += data
        nursery.cancel_scope.cancel()
    assert received == b"421 4.4.2 Timeout, closing connection\r\n"
    assert 100 <= trio.current_time() - started < 101
    assert upstream.sent == b"x" * 20
    assert upstream.closed  # aborted: no end of data
