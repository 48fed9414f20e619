"""The in-process shaping backend (``[shaping] backend = "memory"``, and the fallback of the
Redis one while Redis cannot be reached): limits hold within one process (one worker).

Keeps the contract of :class:`~sidecar.shaping.backend.ShapingBackend` on trio's clock
(``trio.current_time``, so tests run on ``MockClock``): slots are leases that expire, rates
are a :class:`~sidecar.shaping.gcra.Gcra`, suspensions and overrides expire on their own.
Nothing here awaits: each call is atomic with respect to the other tasks of the process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from sidecar.shaping.gcra import Gcra
from sidecar.shaping.model import PathLimits, Rate

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """A :class:`~sidecar.shaping.backend.ShapingBackend` in this process's memory.

    State is bounded by what is live: a path's slots are dropped when they expire or are
    released, suspensions and overrides when they expire, GCRA keys when they are back to
    fresh (:meth:`Gcra.prune`)."""

    def __init__(self, clock: Callable[[], float] = trio.current_time) -> None:
        self._clock = clock
        self._slots: dict[str, dict[str, float]] = {}  # path -> holder -> lease expiry
        self._gcra = Gcra()
        self._suspensions: dict[str, tuple[float, str]] = {}  # path -> (until, reason)
        self._overrides: dict[str, tuple[PathLimits, float, str]] = {}

    def _live_slots(self, path: str) -> dict[str, float]:
        """The path's unexpired slots (expired ones dropped)."""
        slots = self._slots.get(path)
        if slots is None:
            return {}
        now = self._clock()
        for holder in [h for h, until in slots.items() if until <= now]:
            del slots[holder]
        if not slots:
            del self._slots[path]
        return slots

    async def acquire_slot(self, path: str, holder: str, limit: int, lease: float) -> bool:
        """Take one of ``limit`` slots of ``path`` for ``lease`` seconds (a holder that has
        one already keeps it, renewed); False when all are taken."""
        slots = self._live_slots(path)
        if holder not in slots and len(slots) >= limit:
            return False
        self._slots.setdefault(path, slots)[holder] = self._clock() + lease
        return True

    async def renew_slots(self, slots: list[tuple[str, str]], lease: float) -> None:
        """Extend these unexpired (path, holder) leases to ``lease`` seconds from now (an
        expired one stays expired: its slot may be another's already)."""
        until = self._clock() + lease
        for path, holder in slots:
            live = self._live_slots(path)
            if holder in live:
                live[holder] = until

    async def release_slot(self, path: str, holder: str) -> None:
        """Give the slot back; nothing if it had expired or was never taken."""
        slots = self._slots.get(path)
        if slots is not None:
            slots.pop(holder, None)
            if not slots:
                del self._slots[path]

    async def slots_in_use(self, path: str) -> int:
        """Unexpired slots of ``path``."""
        return len(self._live_slots(path))

    async def reserve(self, key: str, rate: Rate, max_wait: float) -> float | None:
        """GCRA at ``rate`` for ``key``: 0.0, a reserved wait <= ``max_wait`` seconds, or
        ``None`` (nothing reserved)."""
        return self._gcra.reserve(key, rate, self._clock(), max_wait)

    async def take(self, key: str, rate: Rate, n: int) -> int:
        """Up to ``n`` admissions of ``key`` that need no wait, at once (see the protocol)."""
        return self._gcra.take(key, rate, self._clock(), n)

    async def suspend(self, path: str, duration: float, reason: str) -> None:
        """Suspend ``path`` for ``duration`` seconds from now (replacing any suspension)."""
        self._suspensions[path] = (self._clock() + duration, reason)

    async def resume(self, path: str) -> None:
        """End the path's suspension and override now."""
        self._suspensions.pop(path, None)
        self._overrides.pop(path, None)

    async def suspension(self, path: str) -> tuple[float, str] | None:
        """(seconds left, reason), or None."""
        found = self._suspensions.get(path)
        if found is None:
            return None
        left = found[0] - self._clock()
        if left <= 0:
            del self._suspensions[path]
            return None
        return left, found[1]

    async def override(self, path: str, limits: PathLimits, duration: float, reason: str) -> None:
        """Use ``limits`` on ``path`` for ``duration`` seconds (replacing any override)."""
        self._overrides[path] = (limits, self._clock() + duration, reason)

    async def overrides(self, path: str) -> tuple[PathLimits, float, str] | None:
        """(limits, seconds left, reason), or None."""
        found = self._overrides.get(path)
        if found is None:
            return None
        limits, until, reason = found
        left = until - self._clock()
        if left <= 0:
            del self._overrides[path]
            return None
        return limits, left, reason

    def prune(self) -> None:
        """Drop every expired entry (the shaper calls it now and then; reads drop lazily)."""
        now = self._clock()
        for path in list(self._slots):
            self._live_slots(path)
        self._suspensions = {p: s for p, s in self._suspensions.items() if s[0] > now}
        self._overrides = {p: o for p, o in self._overrides.items() if o[1] > now}
        self._gcra.prune(now)


if TYPE_CHECKING:  # mypy checks that the class keeps the protocol
    from sidecar.shaping.backend import ShapingBackend

    _CHECK: ShapingBackend = MemoryBackend()
