"""``server.workers = N``: N processes share the listeners, each with its own trio loop.

``sidecar run`` becomes a small supervisor. It binds every listener N times with SO_REUSEPORT
(the kernel spreads new connections across the N sockets), then forks one worker per socket
set before any thread or event loop exists. It forwards SIGTERM, SIGINT and SIGHUP to the
workers, restarts a worker that dies (its socket stays open in the supervisor, so connections
that arrive meanwhile wait in its backlog), and exits when all have stopped after a shutdown.

Each worker is a whole sidecar: its own health checks, DNS cache, connection cache and
counters. Worker ``i`` serves the status endpoint on the configured port + ``i``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

import trio

from sidecar.config import Config, ConfigError, HostPort, Listener, load_config_bytes
from sidecar.logs import shutdown_logging, tag_worker
from sidecar.mxtls.tlsrpt_store import StateDirError, TlsRptStore
from sidecar.server import ListenError, reload_problem, run_until_signal
from sidecar.tcp import addresses_of, listen, listening_socket

log = logging.getLogger("sidecar.workers")

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# A worker that dies is restarted after this many seconds, doubled on every death that
# follows a short life, up to the maximum; a worker that ran RESTART_RESET seconds starts over.
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
RESTART_RESET = 60.0
PR_SET_PDEATHSIG = 1


@dataclass
class WorkerSockets:
    """The listening sockets of one worker: its share of every listener, and its status port."""

    listeners: list[tuple[Listener, list[socket.socket]]] = field(default_factory=list)
    status: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        for _, sockets in self.listeners:
            for sock in sockets:
                sock.close()
        for sock in self.status:
            sock.close()


def bind_shared(address: HostPort, copies: int) -> list[list[socket.socket]]:
    """``copies`` sets of sockets listening on ``address`` with SO_REUSEPORT.

    First a plain bind: it fails if anything else listens there, including another sidecar
    whose own SO_REUSEPORT sockets would otherwise silently share the port with ours.
    """
    sets: list[list[socket.socket]] = [[] for _ in range(copies)]
    try:
        for family, sockaddr in addresses_of(address.host, address.port):
            listening_socket(family, sockaddr).close()
            if sockaddr[1] == 0:
                raise OSError(0, "port 0 cannot be shared by several workers")
            for sockets in sets:
                sockets.append(listening_socket(family, sockaddr, reuse_port=True))
    except BaseException:
        for sockets in sets:
            for sock in sockets:
                sock.close()
        raise
    return sets


def bind_workers(config: Config, workers: int) -> list[WorkerSockets]:
    """Every worker's sockets, or :class:`ListenError` (and nothing left open)."""
    bound = [WorkerSockets() for _ in range(workers)]
    try:
        for listener in config.listeners:
            try:
                sets = bind_shared(listener.address, workers)
            except OSError as error:
                raise ListenError(listener, error) from error
            for worker, sockets in zip(bound, sets, strict=True):
                worker.listeners.append((listener, sockets))
        status = config.status.address
        if status is not None:
            for index, worker in enumerate(bound):
                address = HostPort(status.host, status.port + index)
                what = f"status endpoint {address} (worker {index})"
                try:
                    if address.port > 65535:  # getaddrinfo would wrap it to 0, 1, ...
                        raise OSError(0, f"port {address.port} is beyond 65535")
                    worker.status = listen(address.host, address.port)
                except OSError as error:
                    raise ListenError(what, error) from error
    except BaseException:
        for worker in bound:
            worker.close()
        raise
    return bound


def _trio_listeners(sockets: list[socket.socket]) -> list[trio.SocketListener]:
    return [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in sockets]


def run_worker(
    index: int, count: int, sockets: WorkerSockets, config: Config, config_path: str
) -> int:
    """In a forked child: serve on this worker's sockets (worker ``index`` of ``count``)
    until a signal; the exit code."""
    tag_worker(index)
    with contextlib.suppress(OSError, AttributeError):
        # The kernel ends this worker if the supervisor dies without stopping it.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    try:
        # Each worker its own (sqlite connections do not cross a fork); they share the file.
        tls_store: TlsRptStore | None = TlsRptStore.open(config.delivery.state_dir)
    except StateDirError as error:  # the supervisor opened it: unlikely, and not fatal here
        log.error("worker %d records no TLS-RPT results: %s", index, error)
        tls_store = None

    async def main() -> None:
        await run_until_signal(
            config,
            config_path,
            opened=sockets.listeners,
            status_sockets=_trio_listeners(sockets.status),
            worker=(index, count),
            tls_store=tls_store,
        )

    try:
        trio.run(main)
    except Exception:
        log.exception("worker %d failed", index)
        return 1
    return 0


@dataclass
class _Worker:
    index: int
    pid: int
    started: float
    delay: float


class Supervisor:
    """Forks the workers and keeps them running until a shutdown signal."""

    def __init__(
        self,
        config: Config,
        config_path: str,
        sockets: list[WorkerSockets],
        fork: Callable[[], int] = os.fork,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.sockets = sockets
        self.fork = fork
        self.workers: dict[int, _Worker] = {}
        self.stopping = False
        self.failed = False
        # The file's content at the last SIGHUP, read by the signal handler; a worker
        # (re)started after it gets what the running workers reloaded, not the start-up one.
        self.reloaded: bytes | None = None
        self.reload_pending = False

    def _spawn(self, index: int, delay: float = RESTART_DELAY) -> None:
        if self.reload_pending:
            self._take_reload()
        for handler in logging.getLogger().handlers:
            handler.flush()
        # Signals wait until the child has dropped the supervisor's handlers: a SIGTERM
        # caught in between would otherwise make the child forward it to its siblings. The
        # child keeps them blocked until its own handlers are in place (run_until_signal), so
        # a SIGHUP right after a (re)start cannot kill it either.
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
        pid = self.fork()
        if pid == 0:  # the child never returns from here
            code = 1
            try:
                for signum in FORWARDED_SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)
                code = run_worker(
                    index, len(self.sockets), self.sockets[index], self.config, self.config_path
                )
            finally:
                shutdown_logging()  # the buffered lines: os._exit runs no atexit hook
                sys.stderr.flush()
                os._exit(code)
        self.workers[pid] = _Worker(index, pid, time.monotonic(), delay)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
        log.info("worker %d started (pid %d)", index, pid)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        if signum != signal.SIGHUP:
            self.stopping = True
        else:
            # Only the bytes here: parsing logs, and a handler must not take the log's locks.
            try:
                with open(self.config_path, "rb") as f:
                    self.reloaded = f.read()
            except OSError:
                self.reloaded = None
            self.reload_pending = True
        for pid in list(self.workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def run(self) -> int:
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, self._forward)
        for index in range(len(self.sockets)):
            self._spawn(index)
        log.info("supervising %d workers", len(self.sockets))
        while self.workers:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:  # pragma: no cover - every child is in self.workers
                break
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                if code != 0:
                    self.failed = True
                    log.error("worker %d exited with status %d", worker.index, code)
                continue
            self._restart(worker, code)
        for sockets in self.sockets:
            sockets.close()
        return 1 if self.failed else 0

    def _take_reload(self) -> None:
        """Make the configuration of the last SIGHUP the one new workers get, when the
        workers could take it (valid, and no change that needs a restart); else keep ours,
        as they did (each logged why)."""
        self.reload_pending = False
        content = self.reloaded
        try:
            if content is None:
                raise ConfigError("", f"cannot read {self.config_path} as at the last SIGHUP")
            new = load_config_bytes(content, self.config_path)
        except ConfigError as error:
            log.info("a restarted worker keeps the running configuration: %s", error)
            return
        if reload_problem(self.config, new) is None:
            self.config = new

    def _restart(self, worker: _Worker, code: int) -> None:
        lived = time.monotonic() - worker.started
        delay = RESTART_DELAY if lived >= RESTART_RESET else worker.delay
        log.error(
            "worker %d (pid %d) exited with status %d after %.1fs; restarting it in %.1fs",
            worker.index,
            worker.pid,
            code,
            lived,
            delay,
        )
        deadline = time.monotonic() + delay
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, delay))
        if self.stopping:
            return
        self._spawn(worker.index, min(delay * 2, RESTART_DELAY_MAX))


def supervise(config: Config, config_path: str) -> int:
    """``sidecar run`` with more than one worker (``server.workers``); raises
    :class:`ListenError` before forking."""
    sockets = bind_workers(config, config.server.worker_count)
    return Supervisor(config, config_path, sockets).run()
