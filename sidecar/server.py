"""Listeners and the nursery that owns everything: health checker tasks and sessions.

Limits applied before a session spends any work: ``allowed_clients`` (554 5.7.1 at greeting)
and the admission limit (421 4.3.2 at greeting): ``max_connections``, or fewer when the
process's descriptors (``RLIMIT_NOFILE``) do not go that far (:mod:`sidecar.limits`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import signal
import socket
from functools import partial

import trio

from sidecar import replies
from sidecar.config import Config, ConfigError, HostPort, Listener, load_config
from sidecar.context import ServerContext
from sidecar.errors import describe_error
from sidecar.health import registry_for, run_health_checks
from sidecar.limits import (
    REFUSALS,
    DescriptorBudget,
    nofile_limit,
    open_descriptors,
    plan_descriptors,
)
from sidecar.lmtp import LmtpSession
from sidecar.metrics import Metrics
from sidecar.mxtls.outcome import NullReporter, TlsReporter
from sidecar.mxtls.sts_cache import MtaSts, StsStore, build_mta_sts, sts_configured
from sidecar.mxtls.tlsrpt_store import TlsRptStore
from sidecar.pool import UpstreamPool
from sidecar.resolver import Resolver
from sidecar.routing import Router
from sidecar.session import LAST_WORD_TIMEOUT, Session
from sidecar.shaping.control import control
from sidecar.shaping.shaper import Shaper, shaper_for
from sidecar.status import StatusSource, serve_status
from sidecar.status_view import ShapingState, StatusSnapshot, shaping_state, take_snapshot
from sidecar.tcp import TcpStream, accept_all, listen, peer_in

log = logging.getLogger("sidecar.server")

SHAPING_REFRESH_TIMEOUT = 2.0  # seconds a status request waits for the shaping backend


def build_context(config: Config, previous: ServerContext | None = None) -> ServerContext:
    """The context of ``config``; on a reload, ``previous`` is the running one (its traffic
    shaper goes on with the new policy when its backend settings did not change)."""
    health = registry_for(config)
    resolver = Resolver(config.dns)
    router = Router(config, resolver, health, _mta_sts(config, resolver, previous))
    shaper = shaper_for(config, previous.shaper if previous is not None else None)
    return ServerContext(config, router, health, pool=UpstreamPool(config.delivery), shaper=shaper)


def _mta_sts(config: Config, resolver: Resolver, previous: ServerContext | None) -> MtaSts | None:
    """The MTA-STS look-up of ``config``: on a reload, over the running one's policy store
    when ``delivery.state_dir`` did not change. A store that cannot be opened is a
    :class:`ConfigError` at start-up; on a reload it is logged and the policies are kept in
    memory only."""
    if not sts_configured(config):
        return None
    if previous is None:
        return build_mta_sts(config, resolver)
    old = previous.router.sts
    if old is not None and previous.config.delivery.state_dir == config.delivery.state_dir:
        return build_mta_sts(config, resolver, old.store)
    try:
        return build_mta_sts(config, resolver)
    except ConfigError as error:
        log.error("%s; MTA-STS policies are kept in memory only until it is fixed", error)
        return build_mta_sts(config, resolver, StsStore())


def client_allowed(config: Config, client: str) -> bool:
    return peer_in(config.server.allowed_clients, client)


async def _refuse(stream: TcpStream, answer: bytes) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_by(answer, trio.current_time() + 5)
    stream.close()


# A client refused by allowed_clients gets its 554 and then (RFC 5321 section 3.1) this long
# to say its first command, at most this many bytes, and this many such clients are heard at
# once (the others are closed at once): bounded, since none of them holds a session slot.
REFUSED_WAIT = 2.0
REFUSED_LINE_BYTES = 512
REFUSED_HEARD = REFUSALS // 2  # within the descriptors set aside for refusals
_refused_waiting = 0


async def _first_line(stream: TcpStream, deadline: float) -> bytes:
    """What the client says first (up to its CRLF, REFUSED_LINE_BYTES at most, by
    ``deadline``): b"" when nothing came."""
    data = b""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        while b"\n" not in data and len(data) < REFUSED_LINE_BYTES:
            more = await stream.receive_by(REFUSED_LINE_BYTES - len(data), deadline)
            if not more:
                break
            data += more
    return data


async def refuse_client(stream: TcpStream, counters: Metrics, client: str, address: str) -> None:
    """554 5.7.1 to a client not in allowed_clients. A health check (``sidecar probe``,
    whose first command is NOOP) is told so (250, then 221 to its QUIT), counted as a
    probe and logged at DEBUG only; any other client is counted as refused and logged at
    WARNING (RFC 5321 section 3.1: after a 554 greeting the server waits for QUIT)."""
    global _refused_waiting
    sent = False
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        sent = await stream.send_by(replies.ACCESS_DENIED.to_bytes(), trio.current_time() + 5)
    first = b""
    if sent and _refused_waiting < REFUSED_HEARD:
        _refused_waiting += 1
        try:
            first = await _first_line(stream, trio.current_time() + REFUSED_WAIT)
            if first[:4].upper() == b"NOOP":
                answer = replies.OK.to_bytes()
                if b"QUIT" in first[4:].upper():  # the probe pipelines its QUIT
                    answer += replies.GOODBYE.to_bytes()
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_by(answer, trio.current_time() + 1)
        finally:
            _refused_waiting -= 1
    stream.close()
    if first[:4].upper() == b"NOOP":
        counters.probes += 1
        log.debug("health check from %s on %s (not in allowed_clients)", client, address)
        return
    counters.refused_connections += 1
    log.warning("refused client %s on %s: not in allowed_clients", client, address)


async def handle_connection(
    runtime: Runtime, address: HostPort, stream: TcpStream, client: str
) -> None:
    context = runtime.context
    counters = context.metrics
    try:
        listener = runtime.listener_for(address)
        if not client_allowed(context.config, client):
            await refuse_client(stream, counters, client, str(address))
            return
        if counters.active_sessions >= runtime.budget.sessions:
            counters.refused_connections += 1
            await _refuse(stream, replies.TOO_MANY_CONNECTIONS.to_bytes())
            return
        counters.active_sessions += 1
        kind = LmtpSession if listener.protocol == "lmtp" else Session
        session = kind(stream, client, listener, context)
        try:
            await session.run()
        finally:
            counters.active_sessions -= 1
            if session.probe:  # a client session counts itself once it says more
                counters.probes += 1
    finally:
        stream.close()


class ListenError(Exception):
    """A listener address cannot be bound (in use, not local, no permission)."""

    def __init__(self, what: Listener | str, error: OSError) -> None:
        name = what if isinstance(what, str) else str(what.address)
        super().__init__(f"{name}: {describe_error(error)}")
        self.error = error


Opened = list[tuple[Listener, list[socket.socket]]]


def open_listeners(config: Config) -> Opened:
    """Bind every listener, or close those already bound and raise :class:`ListenError`."""
    opened: Opened = []
    for listener in config.listeners:
        try:
            sockets = listen(listener.address.host, listener.address.port)
        except OSError as error:
            for _, bound in opened:
                for sock in bound:
                    sock.close()
            raise ListenError(listener, error) from error
        opened.append((listener, sockets))
    return opened


class Runtime:
    """The current configuration's :class:`ServerContext`. A reload swaps it: new sessions get
    the new one, open sessions keep theirs. Metrics, shutdown state, the TLS-RPT store and the
    health of servers present in both configurations carry over."""

    def __init__(
        self,
        config: Config,
        worker: tuple[int, int] | None = None,
        tls_reporter: TlsReporter | None = None,
    ) -> None:
        self.context = build_context(config)
        # One TLS-RPT store for the process: every configuration's context records into it.
        self.context.tls_reporter = tls_reporter if tls_reporter is not None else NullReporter()
        self.started = trio.current_time()
        self.worker = worker  # (index, count) when one of several worker processes
        # Descriptors open before any session: listeners, status socket, the event loop's.
        self.open_at_start = open_descriptors()
        self.budget = self.plan_descriptors(config)
        self.shaping: ShapingState | None = None  # read by refresh_shaping

    def plan_descriptors(self, config: Config) -> DescriptorBudget:
        """The admission limit for ``config`` under this process's RLIMIT_NOFILE, logged when
        it is below ``max_connections`` (DESIGN.md invariant 5)."""
        budget = plan_descriptors(nofile_limit(), self.open_at_start, config)
        if budget.sessions < 1:
            log.error(
                "no descriptors left for client sessions, every client gets 421 4.3.2: %s; "
                "raise the limit (LimitNOFILE=, ulimit -n) or lower "
                "delivery.connection_cache_size",
                budget.describe(),
            )
        elif budget.reduced:
            log.warning(
                "max_connections %d reduced to %d: %s",
                budget.max_connections,
                budget.sessions,
                budget.describe(),
            )
        else:
            log.info("descriptor budget: %s", budget.describe())
        return budget

    def reload(self, config: Config) -> ServerContext:
        old = self.context
        new = build_context(config, old)
        for server, health in old.health.servers.items():
            if server in new.health.servers:
                health.config = config.ha_proxy_client
                new.health.servers[server] = health
        if config.dns == old.config.dns:
            new.router.resolver = old.router.resolver  # keep the DNS cache
            if new.router.sts is not None:
                new.router.sts.resolver = new.router.sts.fetcher.resolver = old.router.resolver
        new.metrics = old.metrics
        new.tls_reporter = old.tls_reporter
        if config.delivery.state_dir != old.config.delivery.state_dir and isinstance(
            old.tls_reporter, TlsRptStore
        ):
            log.warning(
                "delivery.state_dir changed: TLS-RPT results still go to %s until a restart",
                old.tls_reporter.path,
            )
        new.shutting_down = old.shutting_down
        new.idle_sessions = old.idle_sessions
        new.sessions = old.sessions
        self.context = new
        self.budget = self.plan_descriptors(config)
        return new

    def listener_for(self, address: HostPort) -> Listener:
        for listener in self.context.config.listeners:
            if listener.address == address:
                return listener
        raise LookupError(address)  # pragma: no cover - reloads keep the listener addresses

    def status_source(self) -> StatusSource:
        return StatusSource(
            healthy=lambda: not self.context.shutting_down.is_set(),
            snapshot=self.snapshot,
            refresh=self.refresh_shaping,
            control=lambda action, request: control(
                self.context.config, self.context.shaper, action, request
            ),
            allow_control_from=lambda: self.context.config.status.allow_control_from,
        )

    async def refresh_shaping(self) -> None:
        """Read the traffic shaping state for the next snapshot (the recent paths' usage
        from the backend, within SHAPING_REFRESH_TIMEOUT seconds; else the last one read)."""
        shaper = self.context.shaper
        if shaper is None:
            self.shaping = None
            return
        with trio.move_on_after(SHAPING_REFRESH_TIMEOUT):
            self.shaping = shaping_state(shaper, await shaper.report())
        if self.shaping is None:  # the first read timed out: counters without the paths
            self.shaping = shaping_state(shaper, [])

    def snapshot(self) -> StatusSnapshot:
        """The status view's inputs, read now (:func:`sidecar.status_view.take_snapshot`)."""
        return take_snapshot(
            self.context,
            now=trio.current_time(),
            started=self.started,
            worker=self.worker,
            budget=self.budget,
            shaping=self.shaping if self.context.shaper is not None else None,
        )


def reload_problem(old: Config, new: Config) -> str | None:
    """Why ``new`` cannot replace ``old`` without a restart, or ``None``."""
    if [listener.address for listener in old.listeners] != [
        listener.address for listener in new.listeners
    ]:
        return "listener addresses changed (restart to apply)"
    if old.status.address != new.status.address:
        return "status.address changed (restart to apply)"
    if old.server.workers != new.server.workers:
        return "server.workers changed (restart to apply)"
    return None


async def _generation(
    context: ServerContext, *, task_status: trio.TaskStatus[trio.CancelScope]
) -> None:
    """The background work of one configuration: its health checks and its connection
    cache's reaper (which closes the cached connections when cancelled)."""
    with trio.CancelScope() as scope:
        task_status.started(scope)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_health_checks, context.health)
            if context.pool is not None:
                nursery.start_soon(context.pool.reap_forever)


async def _shaping(
    shaper: Shaper | None, *, task_status: trio.TaskStatus[trio.CancelScope | None]
) -> None:
    """A traffic shaper's background work (lease renewal, the backend's connection and its
    fall-back). It outlives a reload that keeps the shaper (same backend settings)."""
    if shaper is None:
        task_status.started(None)
        return
    with trio.CancelScope() as scope:
        task_status.started(scope)
        await shaper.run()


async def serve(
    config: Config,
    shutdown: trio.Event | None = None,
    opened: Opened | None = None,
    reloads: trio.MemoryReceiveChannel[Config] | None = None,
    status_sockets: list[trio.SocketListener] | None = None,
    *,
    worker: tuple[int, int] | None = None,
    hurry: trio.Event | None = None,
    tls_store: TlsRptStore | None = None,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown`` is set: then stop accepting and give open sessions
    ``server.shutdown_grace`` seconds (less if ``hurry`` is set meanwhile: a second SIGTERM).
    At the end of the grace every session gets 421 and closes, except those whose end of
    data the MX already has: they pass on its reply first, within ``data_done_timeout``
    (see :meth:`ServerContext.end_grace`). Configs received on ``reloads`` replace the
    running one (SIGHUP). ``tls_store``: where TLS session outcomes are counted (TLS-RPT),
    written every few seconds and once more after the last session (None: not recorded)."""
    runtime = Runtime(config, worker, tls_store)
    if shutdown is None:
        shutdown = trio.Event()
    if opened is None:
        opened = open_listeners(config)
    if status_sockets is None:
        status_sockets = await open_status_listener(config)
    bound = [sock.getsockname()[:2] for _, sockets in opened for sock in sockets]
    async with trio.open_nursery() as nursery:
        if tls_store is not None:
            # Cancelled with the nursery, after the last session: its final write comes then.
            nursery.start_soon(tls_store.run)
        generation = await nursery.start(_generation, runtime.context)
        shaping = await nursery.start(_shaping, runtime.context.shaper)
        if status_sockets:
            await nursery.start(serve_status, runtime.status_source(), status_sockets)

        async def apply_reloads(channel: trio.MemoryReceiveChannel[Config]) -> None:
            nonlocal generation, shaping
            async for new_config in channel:
                problem = reload_problem(runtime.context.config, new_config)
                if problem is not None:
                    log.error("reload refused, keeping the running configuration: %s", problem)
                    continue
                old_shaper = runtime.context.shaper
                context = runtime.reload(new_config)
                generation.cancel()
                generation = await nursery.start(_generation, context)
                if context.shaper is not old_shaper:
                    if shaping is not None:
                        shaping.cancel()
                    shaping = await nursery.start(_shaping, context.shaper)
                log.warning("configuration reloaded: new sessions use it")

        if reloads is not None:
            nursery.start_soon(apply_reloads, reloads)
        async with trio.open_nursery() as sessions:
            accepting = trio.CancelScope()

            async def accept_every_listener() -> None:
                with accepting:
                    async with trio.open_nursery() as acceptors:
                        for listener, sockets in opened:
                            handler = partial(handle_connection, runtime, listener.address)
                            acceptors.start_soon(accept_all, sockets, handler, sessions)

            sessions.start_soon(accept_every_listener)
            log.info("listening on %s", ", ".join(f"{h}:{p}" for h, p in bound))
            task_status.started([(str(h), int(p)) for h, p in bound])
            await shutdown.wait()
            context = runtime.context
            context.begin_shutdown()
            accepting.cancel()
            for _, sockets in opened:
                for sock in sockets:
                    trio.lowlevel.notify_closing(sock)
                    sock.close()
            with trio.move_on_after(context.config.server.shutdown_grace):
                while context.metrics.active_sessions and not (
                    hurry is not None and hurry.is_set()
                ):
                    await trio.sleep(0.05)
            if context.metrics.active_sessions:
                owed = context.end_grace()
                log.warning(
                    "shutdown grace over: closing %d sessions with 421, waiting for the MX's"
                    " final reply in %d",
                    context.metrics.active_sessions - owed,
                    owed,
                )
                # Each is bounded: a last word by LAST_WORD_TIMEOUT, an owed reply by
                # data_done_timeout.
                last = context.config.delivery.data_done_timeout + LAST_WORD_TIMEOUT + 1
                with trio.move_on_after(last):
                    while context.metrics.active_sessions:
                        await trio.sleep(0.05)
            sessions.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def open_status_listener(config: Config) -> list[trio.SocketListener]:
    address = config.status.address
    if address is None:
        return []
    try:
        return await trio.open_tcp_listeners(address.port, host=address.host)
    except OSError as error:
        raise ListenError(f"status endpoint {address}", error) from error


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)


def hold_signals() -> None:
    """Keep SIGTERM, SIGINT and SIGHUP pending (blocked) until :func:`run_until_signal` can
    handle them: ``sidecar run`` calls this first thing, so that a SIGHUP (logrotate, a
    deploy's reload) in the first moments after start no longer kills the process."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)


async def run_until_signal(
    config: Config,
    config_path: str | None = None,
    *,
    opened: Opened | None = None,
    status_sockets: list[trio.SocketListener] | None = None,
    worker: tuple[int, int] | None = None,
    tls_store: TlsRptStore | None = None,
) -> None:
    """``sidecar run``: serve; SIGTERM/SIGINT shut down gracefully, SIGHUP re-reads
    ``config_path`` (an invalid file is logged and the running configuration kept).

    Signals stay handled until the last session is done: during the shutdown grace a SIGHUP
    is ignored (logged), and a second SIGTERM or SIGINT ends the grace at once, which never
    skips a reply already owed (see :func:`serve`). Signals held by :func:`hold_signals` are
    handled once the handlers are in place.

    A worker of several (``server.workers``) gets its sockets bound by the supervisor and
    ``worker`` = (its index, how many there are). ``tls_store``: the TLS-RPT results store
    (see :func:`serve`)."""
    shutdown = trio.Event()
    hurry = trio.Event()
    # Listening errors (address in use, no permission) surface here, before any task starts.
    if opened is None:
        opened = open_listeners(config)
    if status_sockets is None:
        status_sockets = await open_status_listener(config)
    send_reload, receive_reload = trio.open_memory_channel[Config](1)
    # What the file held when the sidecar started (near enough: `sidecar run` read it just
    # before), so that a SIGHUP can tell an unchanged file (see _reload).
    loaded = file_digest(config_path) if config_path is not None else None
    held = signal.pthread_sigmask(signal.SIG_BLOCK, ())  # the mask as it is (hold_signals)
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(*HANDLED_SIGNALS) as signals:

            async def serve_then_stop(*, task_status: trio.TaskStatus[object]) -> None:
                await serve(
                    config,
                    shutdown,
                    opened,
                    receive_reload,
                    status_sockets,
                    worker=worker,
                    hurry=hurry,
                    tls_store=tls_store,
                    task_status=task_status,
                )
                nursery.cancel_scope.cancel()  # the signal loop below ends with it

            try:
                await nursery.start(serve_then_stop)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        if shutdown.is_set():
                            log.warning("received SIGHUP while shutting down: ignored")
                        elif config_path is not None:
                            loaded = await _reload(config_path, send_reload, loaded)
                    elif not shutdown.is_set():
                        log.warning("received %s, shutting down", name)
                        shutdown.set()
                    else:
                        log.warning(
                            "received %s again: ending the shutdown grace now (replies the"
                            " MX already owes are still passed on)",
                            name,
                        )
                        hurry.set()
            finally:
                # Held again as they were (for `sidecar run`: blocked), before trio puts the
                # default handlers back: a signal after the last session must not kill the
                # process while it exits.
                signal.pthread_sigmask(signal.SIG_SETMASK, held)


def file_digest(path: str) -> bytes | None:
    """SHA-256 of the file's content, or None when it cannot be read (load_config says why)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").digest()
    except OSError:
        return None


async def _reload(
    config_path: str, reloads: trio.MemorySendChannel[Config], loaded: bytes | None
) -> bytes | None:
    """Re-read ``config_path`` for a SIGHUP and send the new configuration to ``reloads``.

    ``loaded`` is the digest of the content last read; when the file still holds the same
    bytes, a warning says so (the reload goes on: files it names, such as
    ``delivery.tls_ca_file``, may have changed). A file edited on a host and bind-mounted
    into a container by itself is the usual cause: the mount keeps the old inode. Returns the
    digest of what was read now."""
    digest = file_digest(config_path)
    if digest is not None and digest == loaded:
        log.warning(
            "configuration unchanged: %s has the same content as when last read (re-read"
            " anyway, with the files it names); if it was edited, the sidecar sees another"
            " file: a single-file bind mount keeps the old one, mount its directory",
            config_path,
        )
    try:
        new_config = load_config(config_path)
    except ConfigError as error:
        log.error("reload failed, keeping the running configuration: %s", error)
        return loaded
    await reloads.send(new_config)
    return digest
