"""A private ``redis-server`` for end-to-end tests (Debian's redis-server package; its system
instance is stopped by scripts/lib.sh): no config file, no persistence (``--save ''``,
``--appendonly no``), listening only on its test address and port. Readiness is an answer
``+PONG`` to ``PING``. Restarting it (:meth:`~.process.ManagedProcess.restart`) empties it,
as a real outage without persistence would.
"""

from __future__ import annotations

import socket
from pathlib import Path

from .net import Endpoint
from .process import ManagedProcess

__all__ = ["RedisServer"]


class RedisServer(ManagedProcess):
    """``redis-server`` in the foreground on ``listen`` (an IPv4 or IPv6 loopback endpoint)."""

    name = "redis"

    def __init__(
        self, workdir: Path, listen: Endpoint, *, executable: str = "redis-server"
    ) -> None:
        super().__init__(workdir)
        self.endpoint = listen
        self.executable = executable

    @property
    def url(self) -> str:
        """``redis://host:port`` (brackets around an IPv6 address)."""
        return f"redis://{self.endpoint}"

    def argv(self) -> list[str]:
        return [
            self.executable,
            "--port",
            str(self.endpoint.port),
            "--bind",
            self.endpoint.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--daemonize",
            "no",
            "--loglevel",
            "notice",
        ]

    def ready(self) -> bool:
        return self.ping()

    def ping(self, timeout: float = 0.2) -> bool:
        """One ``PING``: True when the server answers ``+PONG`` within ``timeout`` seconds."""
        try:
            with socket.create_connection(self.endpoint.as_tuple(), timeout=timeout) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False
