"""Listeners and the nursery that owns everything: health checker tasks and sessions.

Limits applied before a session spends any work: ``allowed_clients`` (554 5.7.1 at greeting)
and ``max_connections`` (421 4.3.2 at greeting).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from functools import partial
from ipaddress import IPv6Address, ip_address

import trio

from sidecar.config import Config, Listener
from sidecar.health import HealthRegistry, run_health_checks
from sidecar.resolver import Resolver
from sidecar.routing import Router
from sidecar.session import ServerContext, Session
from sidecar.smtp import replies

log = logging.getLogger("sidecar.server")


def build_context(config: Config) -> ServerContext:
    servers = [server for binding in config.bindings.values() for server in binding.ha_proxy_server]
    health = HealthRegistry(servers, config.ha_proxy_client)
    router = Router(config, Resolver(config.dns), health)
    return ServerContext(config, router, health)


def _peer(stream: trio.SocketStream) -> str:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return "?"
    return str(peer[0])


def client_allowed(config: Config, client: str) -> bool:
    try:
        address = ip_address(client.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in config.server.allowed_clients)


async def _refuse(stream: trio.SocketStream, answer: bytes) -> None:
    with trio.move_on_after(5):
        with contextlib.suppress(trio.BrokenResourceError, OSError):
            await stream.send_all(answer)
    await trio.aclose_forcefully(stream)


async def handle_connection(
    context: ServerContext, listener: Listener, stream: trio.SocketStream
) -> None:
    client = _peer(stream)
    counters = context.counters
    if not client_allowed(context.config, client):
        log.warning("refused client %s on %s: not in allowed_clients", client, listener.address)
        await _refuse(stream, replies.ACCESS_DENIED.to_bytes())
        return
    if counters.active_sessions >= context.config.server.max_connections:
        await _refuse(stream, replies.TOO_MANY_CONNECTIONS.to_bytes())
        return
    counters.sessions += 1
    counters.active_sessions += 1
    try:
        await Session(stream, client, listener, context).run()
    finally:
        counters.active_sessions -= 1


class ListenError(Exception):
    """A listener address cannot be bound (in use, not local, no permission)."""

    def __init__(self, listener: Listener, error: OSError) -> None:
        super().__init__(f"{listener.address}: {error.strerror or error}")
        self.listener = listener
        self.error = error


async def open_listeners(config: Config) -> list[tuple[Listener, list[trio.SocketListener]]]:
    """Bind every listener, or close those already bound and raise :class:`ListenError`."""
    opened: list[tuple[Listener, list[trio.SocketListener]]] = []
    for listener in config.listeners:
        try:
            sockets = await trio.open_tcp_listeners(
                listener.address.port, host=listener.address.host, backlog=1024
            )
        except OSError as error:
            for _, bound in opened:
                for sock in bound:
                    sock.socket.close()
            raise ListenError(listener, error) from error
        opened.append((listener, sockets))
    return opened


async def serve(
    config: Config,
    shutdown: trio.Event | None = None,
    opened: list[tuple[Listener, list[trio.SocketListener]]] | None = None,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown`` is set: then stop accepting, give open sessions
    ``server.shutdown_grace`` seconds, and cancel what is left."""
    context = build_context(config)
    if shutdown is None:
        shutdown = trio.Event()
    if opened is None:
        opened = await open_listeners(config)
    bound = [sock.socket.getsockname()[:2] for _, sockets in opened for sock in sockets]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_health_checks, context.health)
        async with trio.open_nursery() as sessions:
            accepting = trio.CancelScope()

            async def accept_all() -> None:
                with accepting:
                    async with trio.open_nursery() as acceptors:
                        for listener, sockets in opened:
                            handler: Callable[[trio.SocketStream], object] = partial(
                                handle_connection, context, listener
                            )
                            acceptors.start_soon(
                                partial(
                                    trio.serve_listeners,
                                    handler,  # type: ignore[arg-type]
                                    sockets,
                                    handler_nursery=sessions,
                                )
                            )

            sessions.start_soon(accept_all)
            log.info("listening on %s", ", ".join(f"{h}:{p}" for h, p in bound))
            task_status.started([(str(h), int(p)) for h, p in bound])
            await shutdown.wait()
            context.begin_shutdown()
            accepting.cancel()
            for _, sockets in opened:
                for sock in sockets:
                    await sock.aclose()
            with trio.move_on_after(config.server.shutdown_grace):
                while context.counters.active_sessions:
                    await trio.sleep(0.05)
            sessions.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def run_until_signal(config: Config) -> None:
    import signal

    shutdown = trio.Event()
    # Listening errors (address in use, no permission) surface here, before any task starts.
    opened = await open_listeners(config)
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await nursery.start(serve, config, shutdown, opened)
            async for signum in signals:
                log.warning("received %s, shutting down", signal.Signals(signum).name)
                shutdown.set()
                break
