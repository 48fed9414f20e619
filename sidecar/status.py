"""The status endpoint: ``/healthz``, ``/status`` (JSON) and ``/metrics`` (Prometheus text).

What the pages show is :mod:`sidecar.status_view`'s (one snapshot per request, rendered
there). HTTP parsing is h11's (sans-IO); this module only moves bytes. One request per
connection, bounded in time and size, so a stuck scraper costs nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import h11
import trio

from sidecar.errors import describe_error
from sidecar.limits import STATUS_CONNECTIONS
from sidecar.status_view import StatusSnapshot, render_json, render_prometheus

log = logging.getLogger("sidecar.status")

REQUEST_TIMEOUT = 10.0
MAX_REQUEST_BYTES = 16_384
# Requests served at once; more are closed at once (the descriptor budget, sidecar.limits,
# sets this many aside for the endpoint).
MAX_CONNECTIONS = STATUS_CONNECTIONS


@dataclass(frozen=True)
class StatusSource:
    """What the endpoints show, asked for at request time."""

    healthy: Callable[[], bool]
    snapshot: Callable[[], StatusSnapshot]


def respond(source: StatusSource, method: bytes, target: bytes) -> tuple[int, str, bytes]:
    """(status code, content type, body) for one request; pure, so it is unit-testable."""
    path = target.split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return 405, "text/plain; charset=utf-8", b"method not allowed\n"
    if path == b"/healthz":
        if source.healthy():
            return 200, "text/plain; charset=utf-8", b"ok\n"
        return 503, "text/plain; charset=utf-8", b"shutting down\n"
    if path == b"/status":
        return 200, "application/json", render_json(source.snapshot()).encode()
    if path == b"/metrics":
        return (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            render_prometheus(source.snapshot()).encode(),
        )
    return 404, "text/plain; charset=utf-8", b"not found: try /healthz, /status or /metrics\n"


async def handle(source: StatusSource, stream: trio.SocketStream) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await stream.receive_some(MAX_REQUEST_BYTES))
                    continue
                if isinstance(event, h11.Request):
                    code, content_type, body = respond(source, event.method, event.target)
                    headers = [
                        ("content-type", content_type),
                        ("content-length", str(len(body))),
                        ("connection", "close"),
                    ]
                    data = connection.send(h11.Response(status_code=code, headers=headers))
                    if event.method != b"HEAD":
                        data = (data or b"") + (connection.send(h11.Data(data=body)) or b"")
                    data = (data or b"") + (connection.send(h11.EndOfMessage()) or b"")
                    await stream.send_all(data)
                return
    except h11.RemoteProtocolError as error:
        with trio.move_on_after(1):
            reply = (
                f"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n{describe_error(error)}\n"
            )
            await stream.send_all(reply.encode())
    except (trio.BrokenResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def serve_status(
    source: StatusSource,
    listeners: list[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    serving = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal serving
        if serving >= MAX_CONNECTIONS:
            await trio.aclose_forcefully(stream)
            return
        serving += 1
        try:
            await handle(source, stream)
        finally:
            serving -= 1

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started()
