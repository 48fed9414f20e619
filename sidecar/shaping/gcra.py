"""GCRA (generic cell rate algorithm), sans-IO: one theoretical arrival time (TAT) per key.

The algorithm of ATM traffic policing (ITU-T I.371, the "virtual scheduling" form) as rate
limiters use it: a rate of ``count`` per ``per`` seconds admits one event every ``interval =
per / count`` seconds, with a burst of ``count`` events at once. The state of a key is one
number, the TAT: the time at which the key's bucket would be empty again. An event at ``now``
is admitted when ``TAT - now <= per - interval``; admitting it moves the TAT on by
``interval``. Keeping one float per key makes the same algorithm an atomic script in Redis.

:meth:`Gcra.reserve` keeps the contract of :meth:`ShapingBackend.reserve`: 0.0 (admitted now),
a wait of at most ``max_wait`` seconds (the admission at ``now + wait`` is reserved: the caller
waits, then goes), or ``None`` (not within ``max_wait``: nothing reserved).
"""

from __future__ import annotations

import math
from typing import Final

from sidecar.shaping.model import Rate

__all__ = ["Gcra"]

# Floating-point slack (seconds): a wait below it is no wait (sums of intervals such as
# 100 x 0.6 s are not exact in binary floating point).
EPSILON: Final = 1e-9
# The table is pruned of keys whose TAT has passed (their state equals a fresh key's) when it
# has grown to this many keys, then each time it doubles: amortised O(1) per call.
_PRUNE_FROM: Final = 1024


class Gcra:
    """TATs per key; times are seconds on the caller's clock (trio's, or Redis's)."""

    __slots__ = ("_next_prune", "_tat")

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}
        self._next_prune = _PRUNE_FROM

    def reserve(self, key: str, rate: Rate, now: float, max_wait: float) -> float | None:
        """Admit one event of ``key`` at ``rate`` at time ``now`` (seconds).

        Returns 0.0 when admitted now; the seconds to wait (``0 < wait <= max_wait``) when the
        next admission is reserved for ``now + wait``; ``None`` when no admission is possible
        within ``max_wait`` seconds (nothing is reserved then)."""
        tat = max(self._tat.get(key, now), now)
        wait = tat - (rate.per - rate.interval) - now
        if wait <= EPSILON:
            wait = 0.0
        elif wait > max_wait + EPSILON:
            return None
        self._tat[key] = tat + rate.interval
        if len(self._tat) >= self._next_prune:
            self.prune(now)
        return wait

    def take(self, key: str, rate: Rate, now: float, n: int) -> int:
        """Admit up to ``n`` events of ``key`` that are admissible at ``now`` (no wait), at
        once: the burst room left, at most ``n``. Returns how many (0 when none is)."""
        tat = max(self._tat.get(key, now), now)
        room = math.floor((now + (rate.per - rate.interval) - tat) / rate.interval + EPSILON) + 1
        taken = max(0, min(n, room))
        if taken:
            self._tat[key] = tat + taken * rate.interval
        return taken

    def prune(self, now: float) -> None:
        """Forget the keys whose TAT is not after ``now`` (a fresh key behaves the same)."""
        self._tat = {key: tat for key, tat in self._tat.items() if tat > now}
        self._next_prune = max(_PRUNE_FROM, 2 * len(self._tat))

    def __len__(self) -> int:
        """Keys held (for tests: the table stays bounded)."""
        return len(self._tat)
