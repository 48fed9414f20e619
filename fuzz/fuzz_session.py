"""atheris fuzz target: arbitrary client bytes, in arbitrary chunks, into one SMTP session.

Routing is replaced by a stand-in that refuses every recipient (451 or 550), so no input can
make the target touch the network. Checked for every input: the session ends without an
exception, and everything it wrote is a sequence of well-formed SMTP replies.

    .venv/bin/python fuzz/fuzz_session.py -runs=100000 fuzz/corpus     # longer local runs
"""

from __future__ import annotations

import sys
import zlib

import atheris

with atheris.instrument_imports():
    import trio
    import trio.testing

    from sidecar.config import parse_config
    from sidecar.routing import Route, RouteError, Router
    from sidecar.server import build_context
    from sidecar.session import Session
    from sidecar.smtp.replies import ReplyParser, reply

CONFIG = {
    "server": {"hostname": "fuzz.test", "max_errors": 20, "max_recipients": 50},
    "listener": [{"address": "127.0.0.1:2525", "binding": "b1"}],
    "dns": {"nameservers": ["127.0.0.1:9"]},
    "binding": {"b1": {"ha_proxy_server": "127.0.0.1:9", "ha_proxy_src_addr": "192.0.2.1"}},
}


class RefusingRouter(Router):
    async def route(self, listener, domain, literal, prefer=None, excluded=()) -> Route:  # type: ignore[no-untyped-def]
        await trio.sleep(0)
        code = 451 if zlib.crc32(domain.encode()) % 2 else 550
        raise RouteError(reply(code, f"{code // 100}.1.0", f"fuzz refuses {domain}"))


CONTEXT = build_context(parse_config(CONFIG))
CONTEXT.router = RefusingRouter(CONTEXT.config, CONTEXT.router.resolver, CONTEXT.health)


async def one_session(chunks: list[bytes]) -> bytes:
    client, server = trio.testing.memory_stream_pair()
    session = Session(server, "127.0.0.1", CONTEXT.config.listeners[0], CONTEXT)
    received = bytearray()

    async def feed() -> None:
        for chunk in chunks:
            try:
                await client.send_all(chunk)
            except trio.BrokenResourceError:
                return
        await client.send_stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        nursery.start_soon(feed)
        while data := await client.receive_some(65536):
            received += data
    return bytes(received)


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    chunks = []
    while provider.remaining_bytes():
        size = provider.ConsumeIntInRange(1, 64)
        chunks.append(provider.ConsumeBytes(size))
    output = trio.run(one_session, chunks, clock=trio.testing.MockClock(autojump_threshold=0))
    parser = ReplyParser()
    parser.feed(output)
    count = 0
    while (answer := parser.next_reply()) is not None:
        assert 200 <= answer.code <= 599, answer
        count += 1
    assert parser.buffered == 0, output[-200:]
    assert count >= 1 and output.startswith(b"220 "), output[:200]


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
