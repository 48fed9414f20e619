"""The shaping runtime a session asks before it opens an upstream connection or starts a
transaction, and tells about the MX's replies.

- :meth:`Shaper.open_connection`: a connection slot (``connection_limit``) and a
  ``max_connection_rate`` token, or a 4xx at once, or ``None`` when a pooled connection of the
  path turned up meanwhile (``wake``). Waiters of one path queue FIFO in this process.
- :meth:`Shaper.start_transaction`: a ``max_message_rate`` token, or a 4xx.
- :meth:`Shaper.observe`: the ``[[shaping.rule]]`` reactions to the MX's replies.
- :meth:`Shaper.run`: renews the leases of live slots, and switches to the fallback backend
  (per-process limits) while the shared one is unavailable, and back.

A session never waits longer than ``max_wait`` seconds (shaping.max_wait): when the expected
wait is longer (more waiters ahead than the limit; a rate's next admission further off) the
MTA gets "451 4.4.5" at once, so the sidecar never holds one of the MTA's delivery processes
long for a throttled site.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import socket
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, TypeVar

import trio

from sidecar.config import Config
from sidecar.replies import Reply, shaping_limit_reached, shaping_suspended
from sidecar.shaping.backend import BackendUnavailable, ShapingBackend
from sidecar.shaping.memory import MemoryBackend
from sidecar.shaping.model import DIRECT, EgressPath, PathLimits, Rate
from sidecar.shaping.policy import ShapingPolicy, merge

__all__ = [
    "LEASE",
    "OTHER_SITE",
    "RECENT_PATHS",
    "Grant",
    "PathCounters",
    "PathReport",
    "PathUsage",
    "Shaper",
    "shaper_for",
    "shaping_configured",
]

log = logging.getLogger("sidecar.shaping")

LEASE: Final = 30.0  # seconds a slot is held without renewal: shaping.slot_lease's default
PROBE_EVERY: Final = 1.0  # seconds between two probes of an unavailable backend
STATE_TTL: Final = 1.0  # seconds a path's suspension and override, as last read from the
# backend, are used before it is asked again: another sidecar's change shows within this, and
# a message costs one backend call (its rate token), not three
TOKEN_BATCH: Final = 64  # most rate tokens taken from the backend in one call
TOKEN_HOLD: Final = 1.0  # seconds a batch's tokens are good for (unspent ones are lost)
SERVED_WEIGHT: Final = 0.3  # weight of the newest gap in the mean time per queue place
SITE_CACHE: Final = 10_000  # MX sets whose site is remembered (cleared when full)
RECENT_PATHS: Final = 100  # (binding, path) pairs remembered for /status and /metrics
OTHER_SITE: Final = "other"  # the metric label of every site that is not a named one
POLL_EVERY: Final = 0.25  # seconds between two tries of the first waiter for a slot (another
# sidecar's release is not announced here; this process's releases wake it at once)

_T = TypeVar("_T")
Suspended = tuple[float, str]  # seconds left, reason
Overridden = tuple[PathLimits, float, str]  # limits, seconds left, reason


@dataclass(frozen=True)
class PathUsage:
    """What a path uses now (for ``sidecar route`` and /status)."""

    connections: int  # unexpired slots (all sidecars sharing the backend)
    waiting: int  # sessions of this process waiting for a slot
    suspended_for: float | None  # seconds
    suspension_reason: str | None
    override: PathLimits | None  # limits set by a rule, in force instead of the configured
    override_for: float | None  # seconds
    override_reason: str | None


@dataclass
class PathCounters:
    """Counters of one (binding, site label) for /metrics: waits that ended in a grant, their
    seconds, and the 4xx given by kind."""

    waits: int = 0
    wait_seconds: float = 0.0
    deferrals: Counter[str] = field(default_factory=Counter)


@dataclass
class ShapingStats:
    """Counters for /metrics: waits that ended in a grant, their seconds, and the 4xx given
    by kind ("suspended", "connection_limit", "max_connection_rate", "max_message_rate");
    ``by_label`` the same per (binding, site label): a named site, or :data:`OTHER_SITE`
    (so at most bindings x (named sites + 1) entries)."""

    waits: int = 0
    wait_seconds: float = 0.0
    deferrals: Counter[str] = field(default_factory=Counter)
    by_label: dict[tuple[str, str], PathCounters] = field(default_factory=dict)


@dataclass(frozen=True)
class PathReport:
    """One recently used path of a binding: the limits in force and what it uses now."""

    binding: str
    path: EgressPath
    limits: PathLimits
    usage: PathUsage


class Grant:
    """One upstream connection's slot: ``release()`` it when the connection is closed.
    ``deliveries_left``: transactions still allowed on the connection (None: no limit);
    :meth:`delivered` counts one."""

    def __init__(
        self,
        shaper: Shaper,
        path: EgressPath,
        holder: str,
        backend: ShapingBackend | None,
        deliveries_left: int | None,
        binding: str = "",
    ) -> None:
        self.path = path
        self.binding = binding
        self.holder = holder
        self.deliveries_left = deliveries_left
        self._shaper = shaper
        self._backend = backend  # where the slot is held (None: no connection_limit)
        self.released = False

    def delivered(self) -> int | None:
        """Count one transaction; returns the deliveries left (None: no limit)."""
        if self.deliveries_left is not None:
            self.deliveries_left = max(0, self.deliveries_left - 1)
        return self.deliveries_left

    async def release(self) -> None:
        """Give the slot back (once; later calls do nothing). Never raises for an
        unavailable backend: the lease then runs out on its own."""
        if self.released:
            return
        self.released = True
        await self._shaper._release(self)


class _Waiter:
    __slots__ = ("poke",)

    def __init__(self) -> None:
        self.poke = trio.Event()

    def wake(self) -> None:
        self.poke.set()

    async def wait(self) -> None:
        await self.poke.wait()
        self.poke = trio.Event()


class Shaper:
    """Traffic shaping per egress path (see the module), on ``backend``; while it raises
    :class:`BackendUnavailable`, on ``fallback`` (default: a new :class:`MemoryBackend`)."""

    def __init__(
        self,
        policy: ShapingPolicy,
        backend: ShapingBackend,
        max_wait: float,
        fallback: ShapingBackend | None = None,
    ) -> None:
        self.policy = policy
        self.max_wait = max_wait
        self.lease = policy.slot_lease  # seconds (shaping.slot_lease)
        self._primary = backend
        self._fallback = fallback if fallback is not None else MemoryBackend()
        self.degraded = False
        self._went_down = trio.Event()
        self.stats = ShapingStats()
        self._live: dict[str, Grant] = {}
        self._queues: dict[str, deque[_Waiter]] = {}
        # (shaping.backend, shaping.redis_url) it was built for (see shaper_for).
        self.backend_settings: tuple[str, str | None] = ("memory", None)
        self._sites: dict[frozenset[str], str] = {}
        # per path key: (trio time read, suspension, override) as the backend last said
        self._state: dict[str, tuple[float, Suspended | None, Overridden | None]] = {}
        self._served_gap: dict[str, float] = {}  # per path: seconds between two servings
        # per rate key: (tokens of the batch left, trio time they are good until)
        self._tokens: dict[str, tuple[int, float]] = {}
        # Backend reads in flight, per key (a rate key's batch, a path's state): the sessions
        # that need the same answer meanwhile wait for it rather than ask again. At a batch's
        # end, 100 sessions would otherwise each take a batch (and all but one be wasted).
        self._in_flight: dict[str, trio.Event] = {}
        self._last_served: dict[str, float] = {}
        # The (binding, path) pairs used or acted on lately, newest last (/status, /metrics).
        self._recent: OrderedDict[tuple[str, str], EgressPath] = OrderedDict()
        tag = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"
        self._holders = (f"{tag}/{n}" for n in itertools.count(1))

    # -- paths and limits ---------------------------------------------------------------------

    def path(self, source: str | None, mx_hosts: Iterable[str]) -> EgressPath:
        """The egress path from ``source`` (the PROXY header's source address; None: a bypass
        delivery, :data:`DIRECT`) to the site of ``mx_hosts``."""
        if isinstance(mx_hosts, frozenset):  # a route's MX set: the same one, message after message
            site = self._sites.get(mx_hosts)
            if site is None:
                if len(self._sites) >= SITE_CACHE:
                    self._sites.clear()
                site = self._sites[mx_hosts] = self.policy.site_of(mx_hosts)
        else:
            site = self.policy.site_of(mx_hosts)
        return EgressPath(DIRECT if source is None else source, site)

    async def limits(self, binding: str, path: EgressPath) -> PathLimits:
        """The limits in force: a rule's override (its non-None keys) over the configured."""
        configured = self.policy.limits(binding, path.site)
        _, found = await self._path_state(path)
        return configured if found is None else merge(found[0], configured)

    async def _path_state(self, path: EgressPath) -> tuple[Suspended | None, Overridden | None]:
        """The path's suspension and override, read from the backend at most every
        :data:`STATE_TTL` seconds (their time left counted down meanwhile)."""
        now = trio.current_time()
        cached = self._state.get(path.key)
        if cached is None or now - cached[0] >= STATE_TTL:
            flight = "state|" + path.key
            pending = self._in_flight.get(flight)
            if pending is not None:
                await pending.wait()
                return await self._path_state(path)
            self._in_flight[flight] = done = trio.Event()
            try:
                suspension = await self._call(lambda b: b.suspension(path.key))
                override = await self._call(lambda b: b.overrides(path.key))
            finally:
                del self._in_flight[flight]
                done.set()
            if len(self._state) >= SITE_CACHE:
                self._state.clear()
            cached = self._state[path.key] = (now, suspension, override)
        read_at, suspension, override = cached
        elapsed = now - read_at
        if suspension is not None:
            left = suspension[0] - elapsed
            suspension = (left, suspension[1]) if left > 0 else None
        if override is not None:
            left = override[1] - elapsed
            override = (override[0], left, override[2]) if left > 0 else None
        return suspension, override

    # -- the session's questions ------------------------------------------------------------

    async def open_connection(
        self,
        binding: str,
        path: EgressPath,
        wake: trio.Event | None = None,
        *,
        deadline: float | None = None,
    ) -> Grant | Reply | None:
        """May ``binding`` open a new upstream connection on ``path``? A :class:`Grant` (keep
        it while the connection lives, release it after); a 4xx :class:`Reply` (suspended, or
        the limit's expected wait is over max_wait); ``None`` when ``wake`` was set while
        waiting (a pooled connection of the path is free: take it instead). ``deadline``
        (trio time): when a caller that asks again after a ``None`` must be answered by,
        so that all its asks together wait at most max_wait (default: now + max_wait)."""
        self._seen(binding, path)
        refusal = await self._suspended(binding, path)
        if refusal is not None:
            return refusal
        limits = await self.limits(binding, path)
        deliveries = limits.max_deliveries_per_connection
        if limits.connection_limit is None and limits.max_connection_rate is None:
            return Grant(self, path, next(self._holders), None, deliveries, binding)
        start = trio.current_time()
        if deadline is None:
            deadline = start + self.max_wait
        holder = next(self._holders)
        grant: Grant | None = None
        try:
            if limits.connection_limit is not None:
                got = await self._take_slot(path, holder, limits.connection_limit, deadline, wake)
                if got is None:
                    return None
                if isinstance(got, bool):
                    return self._defer(
                        binding, path, "connection_limit", str(limits.connection_limit)
                    )
                grant = Grant(self, path, holder, got, deliveries, binding)
                self._live[holder] = grant
            else:
                grant = Grant(self, path, holder, None, deliveries, binding)
            if limits.max_connection_rate is not None:
                rate = limits.max_connection_rate
                left = max(0.0, deadline - trio.current_time())
                wait = await self._call(lambda b: b.reserve(path.key + "|connections", rate, left))
                if wait is None:
                    await grant.release()
                    return self._defer(binding, path, "max_connection_rate", str(rate))
                if wait > 0 and not await self._sleep(wait, wake):
                    await grant.release()
                    return None
            waited = trio.current_time() - start
            if waited > 0:
                self._waited(binding, path, waited)
            result, grant = grant, None
            return result
        finally:
            if grant is not None:  # cancelled, or an error: give the slot back
                with trio.CancelScope(shield=True):
                    await grant.release()

    async def start_transaction(self, binding: str, path: EgressPath) -> Reply | None:
        """May a transaction start on ``path``? ``None`` (go; after a wait of at most
        max_wait for a ``max_message_rate`` token), or a 4xx :class:`Reply`."""
        self._seen(binding, path)
        refusal = await self._suspended(binding, path)
        if refusal is not None:
            return refusal
        rate = (await self.limits(binding, path)).max_message_rate
        if rate is None:
            return None
        key = path.key + "|messages"
        if await self._spend_token(key, rate):
            return None
        wait = await self._call(lambda b: b.reserve(key, rate, self.max_wait))
        if wait is None:
            return self._defer(binding, path, "max_message_rate", str(rate))
        if wait > 0:
            await trio.sleep(wait)
            self._waited(binding, path, wait)
        return None

    async def _spend_token(self, key: str, rate: Rate) -> bool:
        """A rate token due now from this process's batch for ``key``, taking a new batch
        from the backend when the last is spent or old. Only for rates high enough
        (count >= 100 * 2) that a batch of a hundredth of the count (at most
        :data:`TOKEN_BATCH`) is small beside the limit: at most that many go unspent per
        sidecar and :data:`TOKEN_HOLD` seconds, never one more than the rate admits."""
        batch = min(TOKEN_BATCH, rate.count // 100)
        if batch < 2:
            return False
        while True:
            now = trio.current_time()
            held = self._tokens.get(key)
            if held is not None and held[0] > 0 and held[1] > now:
                self._tokens[key] = (held[0] - 1, held[1])
                return True
            pending = self._in_flight.get(key)
            if pending is None:
                break
            await pending.wait()  # another session is taking a batch: share it
            if key not in self._tokens:  # the backend had none: the caller reserves
                return False
        self._in_flight[key] = done = trio.Event()
        try:
            taken = await self._call(lambda b: b.take(key, rate, batch))
        finally:
            del self._in_flight[key]
            done.set()
        if taken <= 0:
            self._tokens.pop(key, None)
            return False
        if len(self._tokens) >= SITE_CACHE:
            self._tokens.clear()
        self._tokens[key] = (taken - 1, now + TOKEN_HOLD)
        return True

    async def observe(self, binding: str, path: EgressPath, reply: Reply) -> None:
        """Apply the first ``[[shaping.rule]]`` of the path's site that matches the MX's
        ``reply``: suspend the path, or override its limits, for the rule's duration."""
        rule = next((r for r in self.policy.rules_for(path.site) if r.match(reply)), None)
        if rule is None:
            return
        reason = f"{rule.name}: {reply.code} {reply.text}"[:200]
        what = "suspends" if rule.action == "suspend" else "sets the limits of"
        log.warning(
            "shaping: %s %s egress %s to site %s for %gs (binding %s): %d %s",
            rule.name,
            what,
            path.source,
            path.site,
            rule.duration,
            binding,
            reply.code,
            reply.text[:200],
        )
        if rule.action == "suspend":
            await self._call(lambda b: b.suspend(path.key, rule.duration, reason))
            self._state.pop(path.key, None)
        else:
            await self._call(lambda b: b.override(path.key, rule.limits, rule.duration, reason))
            self._state.pop(path.key, None)

    # -- by hand ------------------------------------------------------------------------------

    async def suspend(
        self, path: EgressPath, duration: float, reason: str, binding: str | None = None
    ) -> None:
        """Suspend ``path`` for ``duration`` seconds (``sidecar suspend``); ``binding``, when
        given, lists the path among the recent ones of /status and /metrics."""
        if binding is not None:
            self._seen(binding, path)
        log.warning(
            "shaping: egress %s to site %s suspended for %gs: %s",
            path.source,
            path.site,
            duration,
            reason,
        )
        await self._call(lambda b: b.suspend(path.key, duration, reason))
        self._state.pop(path.key, None)

    async def resume(self, path: EgressPath, binding: str | None = None) -> None:
        """End the path's suspension and limit override now (``sidecar resume``)."""
        if binding is not None:
            self._seen(binding, path)
        log.warning("shaping: egress %s to site %s resumed", path.source, path.site)
        await self._call(lambda b: b.resume(path.key))
        self._state.pop(path.key, None)

    async def usage(self, path: EgressPath) -> PathUsage:
        """Slots in use, local waiters, suspension and override of ``path``."""
        connections = await self._call(lambda b: b.slots_in_use(path.key))
        suspension = await self._call(lambda b: b.suspension(path.key))
        override = await self._call(lambda b: b.overrides(path.key))
        return PathUsage(
            connections=connections,
            waiting=len(self._queues.get(path.key, ())),
            suspended_for=None if suspension is None else suspension[0],
            suspension_reason=None if suspension is None else suspension[1],
            override=None if override is None else override[0],
            override_for=None if override is None else override[1],
            override_reason=None if override is None else override[2],
        )

    def site_label(self, site: str) -> str:
        """The metric label of ``site``: its name when it is a named site, else
        :data:`OTHER_SITE` (bounded label cardinality)."""
        return site if site in self.policy.sites else OTHER_SITE

    def connections_held(self) -> Counter[tuple[str, str]]:
        """Connection slots this process holds now, per (binding, site label)."""
        return Counter((g.binding, self.site_label(g.path.site)) for g in self._live.values())

    async def report(self) -> list[PathReport]:
        """The recently used paths (at most :data:`RECENT_PATHS`, newest first) with their
        limits in force and usage (asks the backend)."""
        reports = []
        for (binding, _key), path in reversed(list(self._recent.items())):
            usage = await self.usage(path)
            configured = self.policy.limits(binding, path.site)
            limits = configured if usage.override is None else merge(usage.override, configured)
            reports.append(PathReport(binding, path, limits, usage))
        return reports

    def _seen(self, binding: str, path: EgressPath) -> None:
        key = (binding, path.key)
        if key in self._recent:
            self._recent.move_to_end(key)
            return
        self._recent[key] = path
        if len(self._recent) > RECENT_PATHS:
            self._recent.popitem(last=False)

    def _label(self, binding: str, path: EgressPath) -> PathCounters:
        key = (binding, self.site_label(path.site))
        found = self.stats.by_label.get(key)
        if found is None:
            found = self.stats.by_label[key] = PathCounters()
        return found

    def _waited(self, binding: str, path: EgressPath, seconds: float) -> None:
        self.stats.waits += 1
        self.stats.wait_seconds += seconds
        counters = self._label(binding, path)
        counters.waits += 1
        counters.wait_seconds += seconds

    # -- background ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the shared backend's client connected (a backend that is an async context
        manager, as the Redis one, is entered here); renew the leases of the live slots
        every third of the lease; while degraded, probe the shared backend every
        :data:`PROBE_EVERY` seconds and go back to it when it answers. Runs until cancelled."""
        primary = self._primary
        if isinstance(primary, contextlib.AbstractAsyncContextManager):
            async with primary:
                await self._maintain(task_status)
        else:
            await self._maintain(task_status)

    async def _maintain(self, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        next_renewal = trio.current_time() + self.lease / 3
        while True:
            now = trio.current_time()
            pause = max(0.0, next_renewal - now)
            if self.degraded:
                await trio.sleep(min(PROBE_EVERY, pause))
                await self._probe()
            else:
                with trio.move_on_after(pause):
                    await self._went_down.wait()  # probe from now on
                self._went_down = trio.Event()
            if trio.current_time() >= next_renewal:
                await self._renew()
                next_renewal = trio.current_time() + self.lease / 3
            if isinstance(self._fallback, MemoryBackend):
                self._fallback.prune()
            if isinstance(self._primary, MemoryBackend):
                self._primary.prune()

    async def _renew(self) -> None:
        for backend in (self._primary, self._fallback):
            slots = [(g.path.key, g.holder) for g in self._live.values() if g._backend is backend]
            if not slots:
                continue
            try:
                await backend.renew_slots(slots, self.lease)
            except BackendUnavailable as e:
                self._enter_degraded(e)

    async def _probe(self) -> None:
        try:
            await self._primary.suspension("probe")
        except BackendUnavailable:
            return
        self.degraded = False
        log.warning("shaping: the shared backend answers again; limits are shared again")

    # -- inside -------------------------------------------------------------------------------

    def _enter_degraded(self, error: BackendUnavailable) -> None:
        if not self.degraded:
            self.degraded = True
            self._went_down.set()
            log.warning(
                "shaping: the shared backend is unavailable (%s); limits hold per process "
                "until it answers again",
                error,
            )

    async def _call(self, op: Callable[[ShapingBackend], Awaitable[_T]]) -> _T:
        """``op`` on the shared backend, or on the fallback while it is unavailable."""
        result, _backend = await self._call_on(op)
        return result

    async def _call_on(
        self, op: Callable[[ShapingBackend], Awaitable[_T]]
    ) -> tuple[_T, ShapingBackend]:
        if not self.degraded:
            try:
                return await op(self._primary), self._primary
            except BackendUnavailable as e:
                self._enter_degraded(e)
        return await op(self._fallback), self._fallback

    async def _suspended(self, binding: str, path: EgressPath) -> Reply | None:
        found, _ = await self._path_state(path)
        if found is None:
            return None
        self.stats.deferrals["suspended"] += 1
        self._label(binding, path).deferrals["suspended"] += 1
        return shaping_suspended(path.source, path.site, found[0], found[1])

    def _defer(self, binding: str, path: EgressPath, limit: str, value: str) -> Reply:
        self.stats.deferrals[limit] += 1
        self._label(binding, path).deferrals[limit] += 1
        return shaping_limit_reached(path.source, path.site, limit, value)

    async def _sleep(self, seconds: float, wake: trio.Event | None) -> bool:
        """Sleep ``seconds``; False (at once) if ``wake`` is set meanwhile."""
        if wake is None:
            await trio.sleep(seconds)
            return True
        with trio.move_on_after(seconds):
            await wake.wait()
            return False
        return True

    async def _take_slot(
        self,
        path: EgressPath,
        holder: str,
        limit: int,
        deadline: float,
        wake: trio.Event | None,
    ) -> ShapingBackend | bool | None:
        """A slot of ``path``: the backend holding it; False when none came by ``deadline``
        (or the expected wait, from the place in the queue and how fast the waiters of this
        path were served lately, is past ``deadline``: refused at once); None when ``wake``
        was set while this waiter was first in line (a parked connection of the path is
        free: the caller takes it)."""
        queue = self._queues.setdefault(path.key, deque())
        if not queue:
            got, backend = await self._call_on(
                lambda b: b.acquire_slot(path.key, holder, limit, self.lease)
            )
            if got:
                return backend
        now = trio.current_time()
        gap = self._served_gap.get(path.key)
        expected = now + (len(queue) + 1) * gap if gap is not None else now
        if expected > deadline or now >= deadline:
            if not queue:
                del self._queues[path.key]
            return False
        me = _Waiter()
        queue.append(me)
        try:
            async with trio.open_nursery() as nursery:
                if wake is not None:

                    async def watch(wake: trio.Event = wake) -> None:
                        await wake.wait()
                        me.wake()

                    nursery.start_soon(watch)
                try:
                    with trio.move_on_at(deadline):
                        while True:
                            if wake is not None and wake.is_set():
                                self._served(path)
                                return None
                            if queue[0] is me:
                                got, backend = await self._call_on(
                                    lambda b: b.acquire_slot(path.key, holder, limit, self.lease)
                                )
                                if got:
                                    self._served(path)
                                    return backend
                                with trio.move_on_after(POLL_EVERY):
                                    await me.wait()
                            else:
                                await me.wait()
                    return False
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            head = queue[0] is me
            queue.remove(me)
            if not queue:
                self._queues.pop(path.key, None)
            elif head:
                queue[0].wake()  # the next in line tries now

    def _served(self, path: EgressPath) -> None:
        """A waiter of ``path`` was served: the gap since the one before feeds the estimate
        of how long a place in its queue takes (an exponentially weighted mean)."""
        now = trio.current_time()
        last = self._last_served.get(path.key)
        self._last_served[path.key] = now
        if last is None or now - last > self.max_wait:
            return  # the queue had emptied meanwhile: no gap between two servings
        gap = now - last
        mean = self._served_gap.get(path.key)
        self._served_gap[path.key] = gap if mean is None else mean + SERVED_WEIGHT * (gap - mean)
        if len(self._served_gap) > SITE_CACHE:
            self._served_gap.clear()
            self._last_served.clear()

    async def _release(self, grant: Grant) -> None:
        self._live.pop(grant.holder, None)
        backend = grant._backend
        if backend is not None:
            try:
                await backend.release_slot(grant.path.key, grant.holder)
            except BackendUnavailable as e:
                self._enter_degraded(e)  # the lease runs out on its own
        queue = self._queues.get(grant.path.key)
        if queue:
            queue[0].wake()


def _sets_a_limit(scope: object) -> bool:
    return any(
        getattr(scope, name) is not None
        for name in (
            "connection_limit",
            "max_connection_rate",
            "max_message_rate",
            "max_deliveries_per_connection",
        )
    )


def shaping_configured(config: Config) -> bool:
    """Whether the configuration shapes anything: a limit in any scope, a rule, or the Redis
    backend (whose suspensions other sidecars or an operator may set). Without, sessions skip
    shaping altogether."""
    shaping = config.shaping
    scopes: list[object] = [shaping, *shaping.sites.values()]
    for binding in config.bindings.values():
        scopes += [binding.shaping, *binding.shaping.sites.values()]
    return shaping.backend == "redis" or bool(shaping.rules) or any(map(_sets_a_limit, scopes))


def shaper_for(config: Config, previous: Shaper | None = None) -> Shaper | None:
    """The Shaper of ``config`` (None when nothing is shaped). On a reload whose backend
    settings did not change, ``previous`` is kept with the new policy, so that its slots,
    rates and suspensions (in memory) go on counting."""
    if not shaping_configured(config):
        return None
    policy = ShapingPolicy(config)
    shaping = config.shaping
    if previous is not None and previous.backend_settings == (shaping.backend, shaping.redis_url):
        previous.policy = policy
        previous.max_wait = policy.max_wait
        previous.lease = policy.slot_lease
        return previous
    backend: ShapingBackend
    if shaping.backend == "redis":
        from sidecar.shaping.redis import RedisBackend  # only with backend = "redis"

        assert shaping.redis_url is not None  # the config loader requires it
        backend = RedisBackend(shaping.redis_url)
    else:
        backend = MemoryBackend()
    shaper = Shaper(policy, backend, policy.max_wait)
    shaper.backend_settings = (shaping.backend, shaping.redis_url)
    return shaper
