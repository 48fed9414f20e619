"""The status endpoint: ``/healthz``, ``/status`` (JSON) and ``/metrics`` (Prometheus text),
and the control requests ``POST /shaping/suspend`` and ``POST /shaping/resume`` (JSON body;
``sidecar suspend`` and ``sidecar resume`` send them).

What the pages show is :mod:`sidecar.status_view`'s (one snapshot per request, rendered
there). HTTP parsing is h11's (sans-IO); this module only moves bytes. One request per
connection, bounded in time and size, so a stuck scraper costs nothing. A control request is
served only to a caller in ``status.allow_control_from`` (default: loopback); any other gets
403, and every control request is logged at WARNING with its caller.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Any

import h11
import trio

from sidecar.errors import describe_error
from sidecar.limits import STATUS_CONNECTIONS
from sidecar.status_view import (
    METRICS_CONTENT_TYPE,
    StatusSnapshot,
    render_json,
    render_prometheus,
)
from sidecar.tcp import peer_in

log = logging.getLogger("sidecar.status")

REQUEST_TIMEOUT = 10.0
MAX_REQUEST_BYTES = 16_384
# Requests served at once; more are closed at once (the descriptor budget, sidecar.limits,
# sets this many aside for the endpoint).
MAX_CONNECTIONS = STATUS_CONNECTIONS
CONTROL_PATHS = (b"/shaping/suspend", b"/shaping/resume")
LOOPBACK: tuple[IPv4Network | IPv6Network, ...] = (
    IPv4Network("127.0.0.0/8"),
    IPv6Network("::1/128"),
)
JSON_TYPE = "application/json"

# A control request's handler: (action, the request's JSON object) -> (HTTP code, answer).
Control = Callable[[str, Mapping[str, Any]], Awaitable[tuple[int, dict[str, object]]]]


def _no_control(
    action: str, request: Mapping[str, Any]
) -> Awaitable[tuple[int, dict[str, object]]]:
    async def answer() -> tuple[int, dict[str, object]]:
        return 503, {"error": "this endpoint takes no control requests"}

    return answer()


async def _nothing() -> None:
    return None


@dataclass(frozen=True)
class StatusSource:
    """What the endpoints show, asked for at request time. ``refresh`` is awaited before a
    snapshot is taken for /status or /metrics (it reads what needs awaiting: the shaping
    backend); ``control`` serves the control requests of the callers ``allow_control_from``
    lets in (networks, read at request time so that a reload applies)."""

    healthy: Callable[[], bool]
    snapshot: Callable[[], StatusSnapshot]
    refresh: Callable[[], Awaitable[None]] = _nothing
    control: Control = _no_control
    allow_control_from: Callable[[], tuple[IPv4Network | IPv6Network, ...]] = field(
        default=lambda: LOOPBACK
    )


def control_allowed(networks: tuple[IPv4Network | IPv6Network, ...], peer: str | None) -> bool:
    """Whether the caller at ``peer`` (an IP address as text; None: unknown) is in
    ``networks`` (an IPv4-mapped IPv6 address counts as its IPv4 address)."""
    return peer is not None and peer_in(networks, peer)


def _json_reply(code: int, answer: Mapping[str, object]) -> tuple[int, str, bytes]:
    return code, JSON_TYPE, (json.dumps(answer, sort_keys=True) + "\n").encode()


async def control_request(
    source: StatusSource, target: bytes, body: bytes, peer: str | None
) -> tuple[int, str, bytes]:
    """(status code, content type, body) for a POST to ``target`` with ``body`` from
    ``peer``: 404 for an unknown path, 403 for a caller not in allow_control_from, 400 for a
    body that is not a JSON object, else what ``source.control`` answers. Logs at WARNING
    who asked what (refused or not)."""
    path = target.split(b"?", 1)[0]
    if path not in CONTROL_PATHS:
        return 404, "text/plain; charset=utf-8", b"not found: POST /shaping/suspend or /resume\n"
    what = path.decode()
    shown = body[:300].decode("utf-8", "replace")
    if not control_allowed(source.allow_control_from(), peer):
        log.warning(
            "refused control request POST %s from %s (not in status.allow_control_from): %s",
            what,
            peer or "an unknown caller",
            shown,
        )
        return _json_reply(403, {"error": f"{peer} may not control this sidecar"})
    log.warning("control request POST %s from %s: %s", what, peer, shown)
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, ValueError) as error:
        return _json_reply(400, {"error": f"the body is not JSON: {error}"})
    if not isinstance(request, dict):
        return _json_reply(400, {"error": "the body must be a JSON object"})
    code, answer = await source.control(what.rsplit("/", 1)[1], request)
    return _json_reply(code, answer)


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
            METRICS_CONTENT_TYPE,
            render_prometheus(source.snapshot()).encode(),
        )
    return 404, "text/plain; charset=utf-8", b"not found: try /healthz, /status or /metrics\n"


async def _read_body(
    connection: h11.Connection, stream: trio.SocketStream, limit: int
) -> bytes | None:
    """The request's body (None when it is over ``limit`` bytes)."""
    body = b""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(MAX_REQUEST_BYTES))
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > limit:
                return None
        elif isinstance(event, h11.EndOfMessage):
            return body
        else:  # pragma: no cover - h11 sends nothing else between a request and its end
            raise h11.RemoteProtocolError(f"unexpected {event!r}")


async def handle(source: StatusSource, stream: trio.SocketStream, peer: str | None = None) -> None:
    """Serve one request on ``stream`` from ``peer`` (the caller's IP address; None:
    unknown, so never allowed to control)."""
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await stream.receive_some(MAX_REQUEST_BYTES))
                    continue
                if isinstance(event, h11.Request):
                    path = event.target.split(b"?", 1)[0]
                    if event.method == b"POST" and path in CONTROL_PATHS:
                        body = await _read_body(connection, stream, MAX_REQUEST_BYTES)
                        if body is None:
                            code, content_type, body = _json_reply(
                                413, {"error": f"over {MAX_REQUEST_BYTES} bytes"}
                            )
                        else:
                            code, content_type, body = await control_request(
                                source, event.target, body, peer
                            )
                    else:
                        if path in (b"/status", b"/metrics") and event.method in (b"GET", b"HEAD"):
                            await source.refresh()
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
            try:
                peer: str | None = str(stream.socket.getpeername()[0])
            except (OSError, IndexError):
                peer = None
            await handle(source, stream, peer)
        finally:
            serving -= 1

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started()
