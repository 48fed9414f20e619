"""MX-side waits of a session with the default configuration (issue 10, item 8): RFC 5321
section 4.5.3.2 values, each cut to fit the MTA's own wait for the same reply. trio's mock
clock and in-memory streams; the MX is a scripted task on the other end of the upstream."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

import sidecar.session as session_module
from sidecar.config import DeliveryConfig, parse_config
from sidecar.routing import Route
from sidecar.server import build_context
from sidecar.session import Session
from sidecar.tcp import deadline_stream
from sidecar.upstream import Upstream

CONFIG = {
    "server": {"hostname": "sidecar.test"},
    "listener": [{"address": "127.0.0.1:2525", "binding": "b1"}],
    "binding": {"b1": {"ha_proxy_server": "127.0.0.1:9", "ha_proxy_src_addr": "192.0.2.1"}},
    "dns": {"static": {"example.test": ["1.2.3.4"]}},
}
# What Postfix waits for each reply (smtp_rcpt_timeout, smtp_data_init_timeout,
# smtp_data_done_timeout): the sidecar must answer before these run out.
POSTFIX_RCPT_WAIT = 300
POSTFIX_DATA_INIT_WAIT = 120
POSTFIX_DATA_DONE_WAIT = 600

Script = Callable[["ScriptedMX"], Awaitable[None]]


class ScriptedMX:
    """The MX end of an upstream memory stream: reads lines, the script answers."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    async def data(self) -> bytes:
        while b"\r\n.\r\n" not in self.buffer:
            self.buffer += await self.stream.receive_some(65536)
        body, self.buffer = self.buffer.split(b"\r\n.\r\n", 1)
        return body

    async def reply(self, text: bytes) -> None:
        await self.stream.send_all(text + b"\r\n")


async def converse(script: Script) -> tuple[list[tuple[float, bytes]], float]:
    """Run a client session through the sidecar to a scripted MX; the client sends one
    message to bob@example.test. Returns (seconds after the RCPT, reply) for each reply the
    client got after its RCPT, and when the session started."""
    context = build_context(parse_config(CONFIG))
    client, server = trio.testing.memory_stream_pair()
    sidecar_end, mx_end = trio.testing.memory_stream_pair()
    mx = ScriptedMX(mx_end)

    async def fake_open_upstream(
        route: Route, ehlo: str, delivery: DeliveryConfig, *a: Any, **kw: Any
    ) -> Any:
        stream = deadline_stream(sidecar_end)
        return Upstream(stream, route.candidates[0], None, delivery, route_key=route.key)

    received: list[tuple[float, bytes]] = []
    buffer = b""

    async def read_reply() -> bytes:
        nonlocal buffer
        while True:
            lines = buffer.split(b"\r\n")
            for count, line in enumerate(lines[:-1]):
                if line[3:4] == b" " or len(line) == 3:
                    reply = b"\r\n".join(lines[: count + 1]) + b"\r\n"
                    buffer = buffer[len(reply) :]
                    return reply
            data = await client.receive_some(65536)
            if not data:
                return b""
            buffer += data

    started = 0.0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(session_module, "open_upstream", fake_open_upstream)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                Session(server, "127.0.0.1", context.config.listeners[0], context).run
            )
            nursery.start_soon(script, mx)
            assert (await read_reply()).startswith(b"220")
            for command in (b"EHLO client.test", b"MAIL FROM:<alice@client.test>"):
                await client.send_all(command + b"\r\n")
                assert (await read_reply()).startswith(b"250")
            started = trio.current_time()
            await client.send_all(b"RCPT TO:<bob@example.test>\r\n")
            answer = await read_reply()
            received.append((trio.current_time() - started, answer))
            if answer.startswith(b"250"):
                await client.send_all(b"DATA\r\n")
                answer = await read_reply()
                received.append((trio.current_time() - started, answer))
                if answer.startswith(b"354"):
                    await client.send_all(b"Subject: x\r\n\r\nhello\r\n.\r\n")
                    answer = await read_reply()
                    received.append((trio.current_time() - started, answer))
            nursery.cancel_scope.cancel()
    return received, started


async def envelope(mx: ScriptedMX) -> None:
    assert (await mx.line()).startswith(b"MAIL")
    await mx.reply(b"250 2.1.0 Ok")
    assert (await mx.line()).startswith(b"RCPT")


async def test_slow_rcpt_within_the_rfc_wait_is_delivered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A policy service that takes 90 s to answer RCPT: its reply (and the message) get
    through; the old 60 s wait turned this into a 451 on every retry."""

    async def script(mx: ScriptedMX) -> None:
        await envelope(mx)
        await trio.sleep(90)
        await mx.reply(b"250 2.1.5 Ok")
        assert await mx.line() == b"DATA"
        await mx.reply(b"354 go ahead")
        await mx.data()
        await mx.reply(b"250 2.0.0 queued as X")
        await trio.sleep_forever()

    received, _ = await converse(script)
    (rcpt_at, rcpt), _, (_, final) = received
    assert rcpt == b"250 2.1.5 Ok\r\n" and 90 <= rcpt_at < 91
    assert final == b"250 2.0.0 queued as X\r\n"


async def test_silent_rcpt_times_out_before_the_mta_gives_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def script(mx: ScriptedMX) -> None:
        await envelope(mx)
        await trio.sleep_forever()

    ((at, answer),), _ = await converse(script)
    assert answer == (
        b"451 4.4.1 Timed out after 240s setting up delivery to the MX, try later\r\n"
    )
    assert 240 <= at < POSTFIX_RCPT_WAIT


async def test_silent_data_command_times_out_before_the_mta_gives_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def script(mx: ScriptedMX) -> None:
        await envelope(mx)
        await mx.reply(b"250 2.1.5 Ok")
        assert await mx.line() == b"DATA"
        await trio.sleep_forever()

    received, _ = await converse(script)
    (rcpt_at, _), (data_at, answer) = received
    assert answer == (
        b"451 4.4.2 Timed out waiting for the MX at DATA (no reply within 100s); message not"
        b" delivered, try later\r\n"
    )
    assert 100 <= data_at - rcpt_at < POSTFIX_DATA_INIT_WAIT


async def test_silent_end_of_data_times_out_before_the_mta_gives_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def script(mx: ScriptedMX) -> None:
        await envelope(mx)
        await mx.reply(b"250 2.1.5 Ok")
        assert await mx.line() == b"DATA"
        await mx.reply(b"354 go ahead")
        await mx.data()
        await trio.sleep_forever()

    received, _ = await converse(script)
    (_, _), (data_at, _), (final_at, answer) = received
    assert answer == (
        b"451 4.4.2 Timed out waiting for the MX before its final reply (no reply within 480s);"
        b" message not delivered, try later\r\n"
    )
    assert 480 <= final_at - data_at < POSTFIX_DATA_DONE_WAIT
