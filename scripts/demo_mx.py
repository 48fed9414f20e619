"""A stand-in MX for the demo: accepts mail on one address and prints, for each message, the
source address the connection came from (the point of the whole exercise) and the envelope.

Not part of the product: it only exists so that scripts/demo.sh can show the path end to end.
"""

from __future__ import annotations

import sys

import trio

END = b"\r\n.\r\n"


async def handle(stream: trio.SocketStream) -> None:
    """One connection. A peer that resets or vanishes costs this connection only: an error
    escaping here would cancel serve_tcp and with it every other connection and the listener
    (scripts/demo.sh's own port probe connects and closes without reading the banner)."""
    try:
        await converse(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def converse(stream: trio.SocketStream) -> None:
    peer = stream.socket.getpeername()[0]
    buffer = b""
    envelope: list[str] = []

    async def send(line: str) -> None:
        await stream.send_all(line.encode() + b"\r\n")

    async def read_line() -> str | None:
        nonlocal buffer
        while b"\r\n" not in buffer:
            data = await stream.receive_some(65536)
            if not data:
                return None
            buffer += data
        line, buffer = buffer.split(b"\r\n", 1)
        return line.decode("utf-8", "replace")

    await send("220 mx.demo.test ESMTP demo MX")
    while (line := await read_line()) is not None:
        verb = line[:4].upper()
        if verb == "EHLO":
            await send("250-mx.demo.test\r\n250 PIPELINING")
        elif verb in ("MAIL", "RCPT"):
            envelope.append(line)
            await send("250 OK")
        elif verb == "DATA":
            await send("354 go ahead")
            while END not in b"\r\n" + buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            body, buffer = (b"\r\n" + buffer).split(END, 1)
            print(
                f"demo MX: message from source address {peer}: {'; '.join(envelope)}; "
                f"{len(body) - 2} bytes",
                flush=True,
            )
            envelope.clear()
            await send(f"250 2.0.0 queued; demo MX saw your connection from {peer}")
        elif verb == "QUIT":
            await send("221 bye")
            return
        else:
            await send("250 OK")


async def main(host: str, port: int) -> None:
    await trio.serve_tcp(handle, port, host=host)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]))
