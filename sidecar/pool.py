"""A cache of idle upstream SMTP sessions, reused across client sessions (as Postfix's
connection cache does): a finished upstream is kept for ``connection_cache_idle`` seconds and
for at most ``connection_reuse_limit`` transactions, then closed politely.

Reuse needs no probe: an idle connection that the MX has meanwhile closed (or that answers
421) fails on its first command, and the session then opens a new one transparently, because
no recipient of the transaction depends on it yet (see ``Session._route_and_replay_once``).
The key is the route key (binding, bypass, MX hosts, TLS policy), so a connection only ever
carries mail that could have opened it. A configuration reload starts a new pool.
"""

from __future__ import annotations

from collections import deque

import trio

from sidecar.config import DeliveryConfig
from sidecar.routing import RouteKey
from sidecar.upstream import Upstream

REAP_INTERVAL = 1.0


class UpstreamPool:
    def __init__(self, delivery: DeliveryConfig) -> None:
        self.delivery = delivery
        self._idle: dict[RouteKey, list[tuple[float, Upstream]]] = {}
        self._size = 0
        self._closing: list[Upstream] = []
        self.closed = False  # once its reaper has stopped, nothing more is parked
        self.reused = 0
        # Sessions waiting for a shaping slot of a route, first come first served: parking a
        # connection of the route sets the first one's event (one waiter per connection).
        self._wakers: dict[RouteKey, deque[trio.Event]] = {}

    def __len__(self) -> int:
        return self._size

    def take(self, key: RouteKey) -> Upstream | None:
        """The most recently parked usable upstream for ``key``, or ``None``."""
        parked = self._idle.get(key)
        now = trio.current_time()
        while parked:
            since, upstream = parked.pop()
            self._size -= 1
            if now - since <= self.delivery.connection_cache_idle and not upstream.closed:
                self.reused += 1
                return upstream
            self._closing.append(upstream)
        return None

    async def put(self, upstream: Upstream) -> None:
        """Park ``upstream`` for reuse, or close it politely when it may not be kept."""
        key = upstream.route_key
        keep = (
            not self.closed
            and self.delivery.connection_cache
            and key is not None
            and not upstream.closed
            and not upstream.parser.buffered
            and upstream.transactions
            < (upstream.max_transactions or self.delivery.connection_reuse_limit)
            and self._size < self.delivery.connection_cache_size
        )
        if not keep or key is None:
            await upstream.quit()
            return
        self._idle.setdefault(key, []).append((trio.current_time(), upstream))
        self._size += 1
        waiters = self._wakers.get(key)
        if waiters:
            waiters.popleft().set()
            if not waiters:
                del self._wakers[key]

    def parked_event(self, key: RouteKey) -> trio.Event:
        """An event of this caller's own, set when a connection for ``key`` is parked and the
        callers who asked before were served: a session waiting for a traffic-shaping slot
        takes that connection rather than opening a new one. One connection wakes one
        waiter; :meth:`forget_event` when done waiting."""
        event = trio.Event()
        self._wakers.setdefault(key, deque()).append(event)
        return event

    def forget_event(self, key: RouteKey, event: trio.Event) -> None:
        """The waiter of ``event`` no longer waits: a parked connection goes to the next."""
        waiters = self._wakers.get(key)
        if waiters is not None and event in waiters:
            waiters.remove(event)
            if not waiters:
                del self._wakers[key]

    def _expired(self) -> list[Upstream]:
        now = trio.current_time()
        expired, self._closing = self._closing, []
        for key in list(self._idle):
            keep = []
            for since, upstream in self._idle[key]:
                if now - since > self.delivery.connection_cache_idle or upstream.closed:
                    expired.append(upstream)
                    self._size -= 1
                else:
                    keep.append((since, upstream))
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        return expired

    async def reap_forever(self) -> None:
        """Close idle connections past their time (QUIT), once a second; on cancellation
        (shutdown, or a reload replacing this pool) close them all."""
        try:
            while True:
                await trio.sleep(REAP_INTERVAL)
                await _quit_all(self._expired())
        finally:
            self.closed = True
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                everything = [upstream for parked in self._idle.values() for _, upstream in parked]
                self._idle.clear()
                self._size = 0
                await _quit_all(everything + self._closing)


async def _quit_all(upstreams: list[Upstream]) -> None:
    if not upstreams:
        return
    async with trio.open_nursery() as nursery:
        for upstream in upstreams:
            nursery.start_soon(upstream.quit)
