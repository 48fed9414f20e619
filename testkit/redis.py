"""A private ``redis-server`` for end-to-end tests (Debian's redis-server package; its system
instance is stopped by scripts/lib.sh): no config file, no persistence (``--save ''``,
``--appendonly no``), listening only on its test address and port. Readiness is an answer
``+PONG`` to ``PING``. Restarting it (:meth:`~.process.ManagedProcess.restart`) empties it,
as a real outage without persistence would.

``cluster=True`` makes it a one-node Redis Cluster holding all 16384 hash slots (enough to
test a client's Cluster protocol: MOVED-free routing, CLUSTER SLOTS discovery);
:class:`RedisSentinel` is a Sentinel (the same binary, ``--sentinel``) monitoring one.
"""

from __future__ import annotations

import socket
from pathlib import Path

from .net import Endpoint, free_port
from .process import HarnessError, ManagedProcess, wait_until

__all__ = ["RedisSentinel", "RedisServer", "redis_command"]


def redis_command(endpoint: Endpoint, *args: str, timeout: float = 0.5) -> bytes:
    """Send one command (RESP array of bulk strings) and return the first reply read (raw
    bytes, enough for status, integer and short bulk replies); OSError when unreachable."""
    request = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        request += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection(endpoint.as_tuple(), timeout=timeout) as sock:
        sock.sendall(request)
        return sock.recv(65536)


class RedisServer(ManagedProcess):
    """``redis-server`` in the foreground on ``listen`` (an IPv4 or IPv6 loopback endpoint)."""

    name = "redis"

    def __init__(
        self,
        workdir: Path,
        listen: Endpoint,
        *,
        cluster: bool = False,
        executable: str = "redis-server",
    ) -> None:
        super().__init__(workdir)
        self.endpoint = listen
        self.cluster = cluster
        self.executable = executable
        self._cluster_port = 0

    @property
    def url(self) -> str:
        """``redis://host:port`` (``redis+cluster://`` for a cluster node)."""
        return f"redis{'+cluster' if self.cluster else ''}://{self.endpoint}"

    def prepare(self) -> None:
        (self.workdir / "nodes.conf").unlink(missing_ok=True)  # a new, empty cluster each start
        # The cluster bus would be port + 10000 (impossible above 55535): a free port of its own.
        self._cluster_port = free_port(self.endpoint.host) if self.cluster else 0

    def start(self, timeout: float = 10.0) -> None:
        """Start, and for a cluster node take every hash slot and wait for cluster_state:ok."""
        super().start(timeout)
        if self.cluster:
            if not redis_command(self.endpoint, "CLUSTER", "ADDSLOTSRANGE", "0", "16383"):
                raise HarnessError(f"redis: CLUSTER ADDSLOTSRANGE got no answer\n{self.logs()}")
            wait_until(
                lambda: b"cluster_state:ok" in redis_command(self.endpoint, "CLUSTER", "INFO"),
                timeout=timeout,
                what="redis cluster_state:ok",
            )

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
            *(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    str(self._cluster_port),
                ]
                if self.cluster
                else []
            ),
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


class RedisSentinel(ManagedProcess):
    """A Sentinel on ``listen`` monitoring ``primary`` as ``service`` (quorum 1). It rewrites
    its configuration file, so it gets a fresh one in its directory at every start."""

    name = "redis-sentinel"

    def __init__(
        self,
        workdir: Path,
        listen: Endpoint,
        primary: RedisServer,
        *,
        service: str = "sidecar",
        executable: str = "redis-server",
    ) -> None:
        super().__init__(workdir)
        self.endpoint = listen
        self.primary = primary
        self.service = service
        self.executable = executable
        self.config_path = workdir / "sentinel.conf"

    @property
    def url(self) -> str:
        """``redis+sentinel://host:port/service``."""
        return f"redis+sentinel://{self.endpoint}/{self.service}"

    def prepare(self) -> None:
        primary = self.primary.endpoint
        self.config_path.write_text(
            f"port {self.endpoint.port}\n"
            f"bind {self.endpoint.host}\n"
            f"dir {self.workdir}\n"
            f"sentinel monitor {self.service} {primary.host} {primary.port} 1\n"
        )

    def argv(self) -> list[str]:
        return [self.executable, str(self.config_path), "--sentinel"]

    def ready(self) -> bool:
        try:
            reply = redis_command(
                self.endpoint, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
            )
        except OSError:
            return False
        return self.primary.endpoint.host.encode() in reply
