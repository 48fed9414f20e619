"""sidecar.upstream.Upstream against a scripted MX on trio.testing memory streams (no sockets):
multi-line replies (RFC 5321 section 4.2.1), pipelined commands (RFC 2920), a reply stream out
of step, timeouts on trio's mock clock through the production deadlines, an oversized reply,
QUIT and abort. Each wait is one of Upstream's named steps, with its limit from [delivery] and
an absolute deadline ``by`` that cuts it."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
import trio
import trio.testing

from sidecar.config import DeliveryConfig
from sidecar.routing import Candidate
from sidecar.smtp.replies import MAX_REPLY_SIZE
from sidecar.tcp import deadline_stream
from sidecar.upstream import Upstream, UpstreamLost, UpstreamTimedOut

CANDIDATE = Candidate("mx.example.test", ip_address("192.0.2.25"), ip_address("192.0.2.1"))


class ScriptedMX:
    """The MX end of the stream: ``lines()`` reads what the upstream sent, ``say`` answers."""

    def __init__(self, stream: trio.testing.MemorySendStream | trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def lines(self, count: int) -> list[bytes]:
        while self.buffer.count(b"\r\n") < count:
            data = await self.stream.receive_some(65536)  # type: ignore[union-attr]
            if not data:
                raise EOFError
            self.buffer += data
        *found, self.buffer = self.buffer.split(b"\r\n", count)
        return found

    async def say(self, data: bytes) -> None:
        await self.stream.send_all(data)  # type: ignore[union-attr]


def pair(**delivery: float) -> tuple[Upstream, ScriptedMX]:
    """An upstream and its MX; ``delivery``: time limits in seconds for this test."""
    ours, theirs = trio.testing.memory_stream_pair()
    upstream = Upstream(deadline_stream(ours), CANDIDATE, None, DeliveryConfig(**delivery))
    return upstream, ScriptedMX(theirs)


async def test_a_multi_line_reply_is_one_reply() -> None:
    upstream, mx = pair()
    await mx.say(b"250-mx.example.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n")
    answer = await upstream.read_banner()
    assert answer.code == 250
    assert answer.lines == ("mx.example.test", "PIPELINING", "SIZE 1000")
    assert answer.raw == b"250-mx.example.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
    assert not upstream.parser.buffered


async def test_a_reply_split_across_reads_is_put_together() -> None:
    upstream, mx = pair()

    async def trickle() -> None:
        for piece in (b"25", b"0-fir", b"st\r\n250 la", b"st\r\n"):
            await mx.say(piece)
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        answer = await upstream.read_banner()
    assert answer.code == 250 and answer.raw == b"250-first\r\n250 last\r\n"


async def test_pipelined_commands_go_in_one_write_and_get_their_replies_in_order() -> None:
    upstream, mx = pair()
    seen: list[list[bytes]] = []

    async def serve() -> None:
        seen.append(await mx.lines(3))
        await mx.say(b"250 2.1.0 sender ok\r\n550 5.1.1 no such user\r\n250 2.1.5 ok\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        answers = await upstream.commands(
            b"MAIL FROM:<a@b.test>\r\n",
            b"RCPT TO:<x@c.test>\r\n",
            b"RCPT TO:<y@c.test>\r\n",
        )
    assert seen == [[b"MAIL FROM:<a@b.test>", b"RCPT TO:<x@c.test>", b"RCPT TO:<y@c.test>"]]
    assert [answer.code for answer in answers] == [250, 550, 250]
    assert answers[1].raw == b"550 5.1.1 no such user\r\n"


async def test_an_extra_reply_puts_the_stream_out_of_step_and_nothing_is_sent() -> None:
    upstream, mx = pair()

    async def serve() -> None:
        await mx.lines(1)
        await mx.say(b"250 ok\r\n421 4.4.2 idle too long\r\n")  # one reply too many

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        assert (await upstream.command(b"NOOP\r\n")).code == 250
    assert upstream.parser.buffered
    assert upstream.out_of_step() == "unsolicited bytes from the MX"
    with pytest.raises(UpstreamLost, match="unsolicited"):
        await upstream.command(b"MAIL FROM:<a@b.test>\r\n")
    with trio.move_on_after(0.1):
        await mx.lines(1)  # nothing came
    assert mx.buffer == b""


async def test_a_clean_idle_memory_stream_is_in_step() -> None:
    upstream, _ = pair()
    assert upstream.out_of_step() is None


async def test_no_reply_in_time_is_upstream_timed_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream, mx = pair(mx_command_timeout=30)
    started = trio.current_time()
    with pytest.raises(UpstreamTimedOut, match="no reply within 30s"):
        await upstream.command(b"NOOP\r\n")
    assert trio.current_time() - started == pytest.approx(30)
    assert await mx.lines(1) == [b"NOOP"]


async def test_a_step_is_cut_to_the_absolute_deadline_it_is_given(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The RCPT set-up budget: a step's own limit (300 s) ends earlier when ``by`` says so,
    and the error says how long it waited."""
    upstream, _ = pair()
    started = trio.current_time()
    with pytest.raises(UpstreamTimedOut, match="no reply within 42s"):
        await upstream.command(b"RCPT TO:<x@c.test>\r\n", by=started + 42)
    assert trio.current_time() - started == pytest.approx(42)


async def test_a_partial_reply_then_silence_times_out_on_the_same_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream, mx = pair(banner_timeout=30)

    async def dribble() -> None:
        await mx.say(b"250-still\r\n")
        await trio.sleep(20)
        await mx.say(b"250-thinking\r\n")

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dribble)
        with pytest.raises(UpstreamTimedOut):
            await upstream.read_banner()
    assert trio.current_time() - started == pytest.approx(30)  # not 30 s after the last bytes


async def test_an_mx_that_takes_nothing_times_the_send_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, _theirs = trio.testing.lockstep_stream_pair()  # nobody reads the other end
    upstream = Upstream(
        deadline_stream(ours), CANDIDATE, None, DeliveryConfig(data_send_timeout=12)
    )
    started = trio.current_time()
    with pytest.raises(UpstreamTimedOut, match="took nothing for 12s"):
        await upstream.send_data(b"Subject: x\r\n")
    assert trio.current_time() - started == pytest.approx(12)


async def test_end_of_stream_is_upstream_lost() -> None:
    upstream, mx = pair()
    await mx.stream.aclose()
    with pytest.raises(UpstreamLost, match="closed by the MX") as caught:
        await upstream.read_banner()
    assert not isinstance(caught.value, UpstreamTimedOut)


async def test_an_oversized_reply_is_lost_with_a_reply_of_ours() -> None:
    upstream, mx = pair()
    line = b"250-" + b"x" * 996 + b"\r\n"
    await mx.say(line * (MAX_REPLY_SIZE // len(line) + 2))
    with pytest.raises(UpstreamLost) as caught:
        await upstream.read_banner()
    assert caught.value.reply is not None
    assert caught.value.reply.code // 100 == 4  # never the MX's bytes, never a 5xx of ours


async def test_garbage_is_lost_not_passed_on() -> None:
    upstream, mx = pair()
    await mx.say(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(UpstreamLost) as caught:
        await upstream.read_banner()
    assert caught.value.reply is not None and caught.value.reply.code // 100 == 4


async def test_quit_sends_quit_reads_221_and_closes() -> None:
    upstream, mx = pair()

    async def serve() -> None:
        assert await mx.lines(1) == [b"QUIT"]
        await mx.say(b"221 2.0.0 bye\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await upstream.quit()
    assert upstream.closed
    assert await mx.stream.receive_some(10) == b""  # type: ignore[union-attr]
    await upstream.quit()  # a second quit sends nothing more


async def test_quit_to_a_silent_mx_gives_up_after_five_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream, _ = pair()
    started = trio.current_time()
    await upstream.quit()
    assert upstream.closed and trio.current_time() - started == pytest.approx(5)


async def test_abort_closes_without_quit() -> None:
    upstream, mx = pair()
    await upstream.abort()
    assert upstream.closed
    assert await mx.stream.receive_some(10) == b""  # type: ignore[union-attr]
