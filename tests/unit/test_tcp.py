"""TcpStream over a real socket pair: deadlines (swept by Timeouts, at most RESOLUTION
late), ready calls that still let other tasks run, and no bookkeeping left behind."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from sidecar.tcp import RESOLUTION, ScopedStream, TcpStream, Timeouts, _current_timeouts

SLACK = 0.5  # scheduling noise on a busy test machine


@pytest.fixture
async def pair() -> AsyncIterator[tuple[TcpStream, socket.socket]]:
    ours, theirs = socket.socketpair()
    stream = TcpStream(ours)
    yield stream, theirs
    await stream.aclose()
    theirs.close()


async def test_receive_by_times_out_and_the_stream_still_sends(
    pair: tuple[TcpStream, socket.socket],
) -> None:
    stream, peer = pair
    started = trio.current_time()
    with trio.fail_after(5):  # a broken sweeper must fail the test, not hang it
        assert await stream.receive_by(100, started + 0.3) is None
    waited = trio.current_time() - started
    assert 0.3 <= waited <= 0.3 + RESOLUTION + SLACK
    # A timed-out wait leaves the socket usable: the 421 still goes out.
    assert await stream.send_by(b"421 timeout\r\n", trio.current_time() + 1)
    assert peer.recv(100) == b"421 timeout\r\n"
    peer.send(b"more\r\n")
    assert await stream.receive_by(100, trio.current_time() + 1) == b"more\r\n"


async def test_data_before_the_deadline_wins_and_no_bucket_is_left(
    pair: tuple[TcpStream, socket.socket],
) -> None:
    stream, peer = pair

    async def answer_later() -> None:
        await trio.sleep(0.05)
        peer.send(b"250 OK\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_later)
        await stream.send_by(b"NOOP\r\n", trio.current_time() + 1)
        assert await stream.receive_by(100, trio.current_time() + 5) == b"250 OK\r\n"
    timeouts = _current_timeouts()
    assert timeouts is not None and not timeouts._buckets


async def test_send_by_times_out_when_the_peer_stops_reading(
    pair: tuple[TcpStream, socket.socket],
) -> None:
    stream, _ = pair
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    started = trio.current_time()
    with trio.fail_after(5):
        assert not await stream.send_by(b"x" * 50_000_000, started + 0.3)
    assert trio.current_time() - started <= 0.3 + RESOLUTION + SLACK


async def test_a_peer_that_closes_gives_end_of_stream(
    pair: tuple[TcpStream, socket.socket],
) -> None:
    stream, peer = pair
    peer.close()
    assert await stream.receive_by(100, trio.current_time() + 1) == b""


async def test_a_stream_that_is_always_ready_still_lets_others_run(
    pair: tuple[TcpStream, socket.socket],
) -> None:
    stream, peer = pair
    peer.setblocking(False)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        for _ in range(100):  # sends that never wait
            assert await stream.send_by(b"x", trio.current_time() + 1)
        nursery.cancel_scope.cancel()
    assert ticks >= 100 // 8 - 1


def test_expire_ends_only_the_due_waits() -> None:
    class Stub:
        expired = 0

        def interrupt(self) -> None:
            self.expired += 1

    timeouts = Timeouts()
    early, late = Stub(), Stub()
    timeouts.add(early, 1.0)  # type: ignore[arg-type]
    key = timeouts.add(late, 5.0)  # type: ignore[arg-type]
    timeouts.expire(2.0)
    assert (early.expired, late.expired) == (1, 0)
    timeouts.discard(late, key)  # type: ignore[arg-type]
    timeouts.expire(10.0)
    assert late.expired == 0 and not timeouts._buckets


async def test_scoped_stream_has_the_same_deadline_api(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Any other stream (TLS, memory) waits the same way as a TcpStream: a deadline gives
    None/False, interrupt() ends the current wait, bytes and end of stream pass through."""
    ours, theirs = trio.testing.memory_stream_pair()
    stream = ScopedStream(ours)
    started = trio.current_time()
    assert await stream.receive_by(100, started + 30) is None
    assert trio.current_time() - started == 30
    await theirs.send_all(b"220 hi\r\n")
    assert await stream.receive_by(100, trio.current_time() + 1) == b"220 hi\r\n"
    assert await stream.send_by(b"EHLO x\r\n", trio.current_time() + 1)
    assert await theirs.receive_some(100) == b"EHLO x\r\n"
    async with trio.open_nursery() as nursery:

        async def interrupt_soon() -> None:
            await trio.sleep(5)
            stream.interrupt()

        nursery.start_soon(interrupt_soon)
        assert await stream.receive_by(100, trio.current_time() + 300) is None
    assert trio.current_time() - started == 35
    await theirs.aclose()
    assert await stream.receive_by(100, trio.current_time() + 1) == b""
