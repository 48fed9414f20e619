"""PolicyServer: a small HTTPS server on trio that serves MTA-STS policies (RFC 8461 section
3.3) for the e2e tests, on port 443 of its own loopback address (the URL
``https://mta-sts.<domain>/.well-known/mta-sts.txt`` has no port: the sidecar must find it on
443, so the tests run as root), with a certificate from a test CA for ``mta-sts.<domain>``.

``await nursery.start(server.serve)`` listens. Behaviour is public and may change while it
runs: ``responses`` maps the request's Host (``mta-sts.<domain>``) to a :class:`PolicyResponse`
(status, Content-Type, extra headers, body, with or without Content-Length); a Host without
one gets 404. ``requests`` records ``(host, path)`` of every request read.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio
import trustme

from .net import Endpoint

__all__ = ["PolicyResponse", "PolicyServer", "policy_body"]

MAX_REQUEST = 8192


def policy_body(mode: str, mx: Sequence[str], max_age: int = 86400, newline: str = "\r\n") -> bytes:
    """A policy file: version, mode, each mx, max_age."""
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return (newline.join(lines) + newline).encode()


@dataclass
class PolicyResponse:
    """What one Host gets: ``status`` with ``body``; ``length=False`` sends no
    Content-Length (the body ends when the connection closes)."""

    body: bytes = b""
    status: int = 200
    content_type: str | None = "text/plain"
    headers: dict[str, str] = field(default_factory=dict)
    length: bool = True


REASONS = {200: "OK", 301: "Moved Permanently", 302: "Found", 404: "Not Found", 500: "Error"}


class PolicyServer:
    """HTTPS on ``endpoint`` (default port 443) with a certificate from ``ca`` for
    ``hosts``."""

    def __init__(self, endpoint: Endpoint, ca: trustme.CA, hosts: Sequence[str]) -> None:
        self.endpoint = endpoint
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*hosts).configure_cert(self.context)
        self.responses: dict[str, PolicyResponse] = {}
        self.requests: list[tuple[str, str]] = []
        self._scope: trio.CancelScope | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.endpoint.port, host=self.endpoint.host)
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(trio.serve_listeners, self._handle, [listener])
                task_status.started()

    def close(self) -> None:
        """Stop listening (connections to the port are refused from now on)."""
        if self._scope is not None:
            self._scope.cancel()

    async def _handle(self, stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, self.context, server_side=True)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            with trio.move_on_after(5):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST:
                    data = await tls.receive_some(4096)
                    if not data:
                        return
                    request += data
                head = request.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
                path = head[0].split(" ")[1] if len(head[0].split(" ")) > 1 else ""
                host = ""
                for line in head[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "host":
                        host = value.strip().lower().rsplit(":", 1)[0]
                self.requests.append((host, path))
                answer = self.responses.get(host, PolicyResponse(b"not found\n", 404))
                lines = [f"HTTP/1.1 {answer.status} {REASONS.get(answer.status, 'X')}"]
                if answer.content_type is not None:
                    lines.append(f"Content-Type: {answer.content_type}")
                if answer.length:
                    lines.append(f"Content-Length: {len(answer.body)}")
                lines += [f"{k}: {v}" for k, v in answer.headers.items()]
                lines.append("Connection: close")
                await tls.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + answer.body)
            with trio.move_on_after(1):
                await tls.aclose()
        await trio.aclose_forcefully(stream)
