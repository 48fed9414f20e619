"""What a shaping backend does: the contract the memory and Redis backends both keep.

State lives per egress path key (:attr:`EgressPath.key`). Times given to and returned by a
backend are *seconds from now* (never absolute clocks: sidecars on several hosts share one
Redis, whose own clock decides; the memory backend uses trio's clock, so tests run on
``MockClock``).

- Connection slots are leases: a holder (one per upstream connection, a unique string) takes
  a slot for ``lease`` seconds and renews it while the connection lives; a slot whose lease
  ran out (its sidecar died, SIGKILL) is free again. At most ``limit`` unexpired slots.
- Rates are GCRA reservations: ``reserve`` admits now (returns 0.0), or reserves the next
  admission and returns the seconds to wait for it when that is at most ``max_wait``, or
  reserves nothing and returns ``None``. A caller that got a wait must wait it, then go.
- Suspensions and limit overrides ("set") are per path with an expiry, visible to all.
"""

from __future__ import annotations

from typing import Protocol

from sidecar.shaping.model import PathLimits, Rate

__all__ = ["BackendUnavailable", "ShapingBackend", "Suspension"]


class BackendUnavailable(Exception):
    """The shared store cannot be reached now (the caller falls back to per-process limits)."""


class Suspension(Protocol):
    reason: str
    remaining: float  # seconds


class ShapingBackend(Protocol):
    async def acquire_slot(self, path: str, holder: str, limit: int, lease: float) -> bool:
        """Take one of ``limit`` connection slots of ``path`` for ``holder`` for ``lease``
        seconds; False when all are taken (nothing changes then)."""

    async def renew_slots(self, slots: list[tuple[str, str]], lease: float) -> None:
        """Extend the leases of these (path, holder) slots to ``lease`` seconds from now."""

    async def release_slot(self, path: str, holder: str) -> None:
        """Give the slot back (no error if it had expired)."""

    async def slots_in_use(self, path: str) -> int:
        """Unexpired slots of ``path``."""

    async def reserve(self, key: str, rate: Rate, max_wait: float) -> float | None:
        """GCRA at ``rate`` for ``key`` (a path key and the kind of rate, e.g.
        "192.0.2.10|gmail|messages"): 0.0 admitted now; a wait <= ``max_wait`` reserved;
        ``None``: not admitted within ``max_wait``, nothing reserved."""

    async def take(self, key: str, rate: Rate, n: int) -> int:
        """Up to ``n`` GCRA admissions of ``key`` that are due now (no wait), in one call:
        how many (0..n). A sidecar spends them itself, so that a high rate does not cost
        one round trip per event; never more than the rate admits."""

    async def suspend(self, path: str, duration: float, reason: str) -> None:
        """No new connection or transaction on ``path`` for ``duration`` seconds."""

    async def resume(self, path: str) -> None:
        """End a suspension and a limit override of ``path`` now."""

    async def suspension(self, path: str) -> tuple[float, str] | None:
        """(seconds left, reason) of the path's suspension, or None."""

    async def override(self, path: str, limits: PathLimits, duration: float, reason: str) -> None:
        """Use ``limits`` (non-None fields replace the configured ones) for ``duration``."""

    async def overrides(self, path: str) -> tuple[PathLimits, float, str] | None:
        """(limits, seconds left, reason) of the path's override, or None."""
