"""The ShapingBackend contract (sidecar.shaping.backend), run against every backend.

The fixture ``backend`` yields a fresh backend for each kind in :data:`BACKENDS`; ``elapse``
moves that backend's clock on by some seconds (a manual clock for the memory backend; a real
sleep for one whose clock is a server's). A new backend kind adds its name to BACKENDS and a
branch to ``backend`` and ``elapse``. Times are compared with a tolerance of :data:`SLACK`
seconds so that a backend on a real clock passes too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import trio

from sidecar.shaping.backend import ShapingBackend
from sidecar.shaping.memory import MemoryBackend
from sidecar.shaping.model import PathLimits, Rate

BACKENDS = ["memory"]
SLACK = 0.05  # seconds
Elapse = Callable[[float], Awaitable[None]]


@dataclass
class ManualClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=BACKENDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def manual_clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def backend(backend_kind: str, manual_clock: ManualClock) -> AsyncIterator[ShapingBackend]:
    if backend_kind == "memory":
        yield MemoryBackend(clock=manual_clock)
    else:  # pragma: no cover - another backend's branch goes here
        raise AssertionError(backend_kind)


@pytest.fixture
def elapse(backend_kind: str, manual_clock: ManualClock) -> Elapse:
    async def manual(seconds: float) -> None:
        manual_clock.now += seconds

    async def real(seconds: float) -> None:  # pragma: no cover - a backend on a real clock
        await trio.sleep(seconds)

    return manual if backend_kind == "memory" else real


P = "192.0.2.10|gmail"


# -- connection slots -------------------------------------------------------------------------


async def test_at_most_limit_slots_and_a_refusal_changes_nothing(backend: ShapingBackend) -> None:
    assert await backend.acquire_slot(P, "h1", 2, 30.0)
    assert await backend.acquire_slot(P, "h2", 2, 30.0)
    assert not await backend.acquire_slot(P, "h3", 2, 30.0)
    assert await backend.slots_in_use(P) == 2
    assert await backend.slots_in_use("192.0.2.11|gmail") == 0
    assert await backend.acquire_slot("192.0.2.11|gmail", "h3", 2, 30.0)


async def test_a_released_slot_is_free_again(backend: ShapingBackend) -> None:
    assert await backend.acquire_slot(P, "h1", 1, 30.0)
    await backend.release_slot(P, "h1")
    await backend.release_slot(P, "h1")  # twice: no error
    await backend.release_slot(P, "never")
    assert await backend.slots_in_use(P) == 0
    assert await backend.acquire_slot(P, "h2", 1, 30.0)


async def test_a_lease_expires_unless_renewed(backend: ShapingBackend, elapse: Elapse) -> None:
    """A holder that dies (SIGKILL: no release, no renewal) frees its slot at lease end."""
    assert await backend.acquire_slot(P, "dead", 2, 0.5)
    assert await backend.acquire_slot(P, "alive", 2, 0.5)
    await elapse(0.3)
    await backend.renew_slots([(P, "alive")], 0.5)
    await elapse(0.3)  # dead's lease is over, alive's renewed one is not
    assert await backend.slots_in_use(P) == 1
    assert await backend.acquire_slot(P, "new", 2, 0.5)
    assert not await backend.acquire_slot(P, "newer", 2, 0.5)


async def test_an_expired_lease_is_not_renewed(backend: ShapingBackend, elapse: Elapse) -> None:
    assert await backend.acquire_slot(P, "h1", 1, 0.2)
    await elapse(0.3)
    assert await backend.acquire_slot(P, "h2", 1, 30.0)
    await backend.renew_slots([(P, "h1")], 30.0)
    assert await backend.slots_in_use(P) == 1


# -- rates ------------------------------------------------------------------------------------


async def test_reserve_admits_a_burst_then_reserves_waits(backend: ShapingBackend) -> None:
    rate = Rate(2, 2.0)  # one per second, burst 2
    key = P + "|messages"
    assert await backend.reserve(key, rate, 0.0) == 0.0
    assert await backend.reserve(key, rate, 0.0) == 0.0
    assert await backend.reserve(key, rate, 0.5) is None
    assert await backend.reserve(key, rate, 5.0) == pytest.approx(1.0, abs=SLACK)
    assert await backend.reserve(key, rate, 5.0) == pytest.approx(2.0, abs=SLACK)
    assert await backend.reserve(P + "|connections", rate, 0.0) == 0.0  # another key


async def test_reserve_recovers_with_time(backend: ShapingBackend, elapse: Elapse) -> None:
    rate = Rate(1, 0.5)
    key = P + "|messages"
    assert await backend.reserve(key, rate, 0.0) == 0.0
    assert await backend.reserve(key, rate, 0.0) is None
    await elapse(0.6)
    assert await backend.reserve(key, rate, 0.0) == 0.0


# -- suspensions and overrides ------------------------------------------------------------------


async def test_a_suspension_expires(backend: ShapingBackend, elapse: Elapse) -> None:
    assert await backend.suspension(P) is None
    await backend.suspend(P, 0.5, "421 4.7.28 rate limited")
    found = await backend.suspension(P)
    assert found is not None
    assert found[0] == pytest.approx(0.5, abs=SLACK)
    assert found[1] == "421 4.7.28 rate limited"
    assert await backend.suspension("192.0.2.11|gmail") is None
    await elapse(0.6)
    assert await backend.suspension(P) is None


async def test_resume_ends_suspension_and_override(backend: ShapingBackend) -> None:
    await backend.suspend(P, 60.0, "by hand")
    await backend.override(P, PathLimits(connection_limit=1), 60.0, "rule")
    await backend.resume(P)
    assert await backend.suspension(P) is None
    assert await backend.overrides(P) is None
    await backend.resume(P)  # nothing to resume: no error


async def test_an_override_holds_its_limits_until_it_expires(
    backend: ShapingBackend, elapse: Elapse
) -> None:
    limits = PathLimits(connection_limit=1, max_message_rate=Rate(10, 3600.0))
    await backend.override(P, limits, 0.5, "shaping.rule[0]")
    found = await backend.overrides(P)
    assert found is not None
    assert found[0] == limits
    assert found[1] == pytest.approx(0.5, abs=SLACK)
    assert found[2] == "shaping.rule[0]"
    await elapse(0.6)
    assert await backend.overrides(P) is None


async def test_a_later_suspension_replaces_the_earlier(
    backend: ShapingBackend, elapse: Elapse
) -> None:
    await backend.suspend(P, 0.2, "first")
    await backend.suspend(P, 1.0, "second")
    await elapse(0.5)
    found = await backend.suspension(P)
    assert found is not None and found[1] == "second"


# -- the memory backend's own bounds ---------------------------------------------------------


async def test_memory_backend_drops_what_expired(manual_clock: ManualClock) -> None:
    backend = MemoryBackend(clock=manual_clock)
    for i in range(100):
        await backend.acquire_slot(f"p{i}", "h", 1, 1.0)
        await backend.suspend(f"p{i}", 1.0, "x")
        await backend.override(f"p{i}", PathLimits(), 1.0, "x")
        await backend.reserve(f"p{i}|messages", Rate(1, 1.0), 0.0)
    manual_clock.now += 2.0
    backend.prune()
    assert (backend._slots, backend._suspensions, backend._overrides) == ({}, {}, {})
    assert len(backend._gcra) == 0
