"""The pieces of ``server.workers`` that need no process: shared binding, the worker tag in
log lines, and reloads that would change the worker count."""

from __future__ import annotations

import io
import json
import logging
import socket
from collections.abc import Iterator

import pytest

from sidecar.config import (
    Config,
    DeliveryConfig,
    DnsConfig,
    HealthConfig,
    HostPort,
    ServerConfig,
)
from sidecar.logs import JsonFormatter, configure_logging, tag_worker
from sidecar.server import reload_problem
from sidecar.workers import bind_shared


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def test_bind_shared_gives_each_worker_its_own_listening_socket() -> None:
    address = HostPort("127.0.0.1", _free_port("127.0.0.1"))
    sets = bind_shared(address, 3)
    try:
        assert [len(sockets) for sockets in sets] == [1, 1, 1]
        filenos = {sockets[0].fileno() for sockets in sets}
        assert len(filenos) == 3
        for sockets in sets:
            assert sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            assert sockets[0].getsockname() == ("127.0.0.1", address.port)
    finally:
        for sockets in sets:
            for sock in sockets:
                sock.close()


def test_bind_shared_refuses_a_port_someone_else_shares() -> None:
    port = _free_port("127.0.0.1")
    # Another program's SO_REUSEPORT listener (same user): a plain bind must notice it.
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", port))
        other.listen()
        with pytest.raises(OSError, match="in use"):
            bind_shared(HostPort("127.0.0.1", port), 2)


def test_bind_shared_refuses_port_zero() -> None:
    with pytest.raises(OSError, match="port 0"):
        bind_shared(HostPort("127.0.0.1", 0), 2)


def _config(workers: int) -> Config:
    return Config(
        server=ServerConfig(workers=workers),
        listeners=(),
        dns=DnsConfig(),
        delivery=DeliveryConfig(),
        ha_proxy_client=HealthConfig(),
        bindings={},
    )


def test_reload_refuses_a_new_worker_count() -> None:
    old = _config(workers=2)
    new = _config(workers=4)
    assert reload_problem(old, new) == "server.workers changed (restart to apply)"
    assert reload_problem(old, old) is None


@pytest.fixture
def root_handlers() -> Iterator[None]:
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    yield
    root.handlers[:] = saved
    root.setLevel(level)


def _emit(stream: io.StringIO) -> str:
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    logging.getLogger("sidecar.test").warning("hello")
    return stream.getvalue()


@pytest.mark.usefixtures("root_handlers")
def test_tag_worker_names_the_worker_in_text_lines() -> None:
    configure_logging("info", "text")
    tag_worker(1)
    assert "WARNING [worker 1] sidecar.test: hello" in _emit(io.StringIO())


@pytest.mark.usefixtures("root_handlers")
def test_tag_worker_adds_a_worker_field_to_json_lines() -> None:
    configure_logging("info", "json")
    tag_worker(3)
    entry = json.loads(_emit(io.StringIO()))
    assert entry["worker"] == 3 and entry["message"] == "hello"
    assert isinstance(logging.getLogger().handlers[0].formatter, JsonFormatter)
