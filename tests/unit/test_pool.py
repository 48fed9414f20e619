"""sidecar.pool.UpstreamPool with fake upstreams (no sockets) on trio's mock clock: what is
parked, for how long, how often reused, and what is closed instead (QUIT)."""

from __future__ import annotations

import dataclasses
from typing import Any

import trio
import trio.testing

from sidecar.config import DeliveryConfig
from sidecar.pool import REAP_INTERVAL, UpstreamPool


@dataclasses.dataclass
class FakeParser:
    buffered: bytes = b""


@dataclasses.dataclass(eq=False)
class FakeUpstream:
    """What the pool looks at: route_key, closed, parser.buffered, transactions,
    max_transactions; quit()."""

    route_key: Any = "route-a"
    closed: bool = False
    transactions: int = 1
    max_transactions: int | None = None
    parser: FakeParser = dataclasses.field(default_factory=FakeParser)
    quits: int = 0

    async def quit(self) -> None:
        self.quits += 1
        self.closed = True


def make_pool(**delivery: Any) -> UpstreamPool:
    return UpstreamPool(dataclasses.replace(DeliveryConfig(), **delivery))


async def park(pool: UpstreamPool, upstream: FakeUpstream) -> None:
    await pool.put(upstream)  # type: ignore[arg-type]


async def test_a_parked_upstream_is_taken_again_for_its_route_only() -> None:
    pool = make_pool()
    upstream = FakeUpstream()
    await park(pool, upstream)
    assert len(pool) == 1 and upstream.quits == 0
    assert pool.take("route-b") is None
    assert pool.take("route-a") is upstream
    assert len(pool) == 0 and pool.reused == 1
    assert pool.take("route-a") is None


async def test_the_most_recently_parked_is_taken_first() -> None:
    pool = make_pool()
    older, newer = FakeUpstream(), FakeUpstream()
    await park(pool, older)
    await park(pool, newer)
    assert pool.take("route-a") is newer
    assert pool.take("route-a") is older


async def test_past_the_idle_time_it_is_not_taken_and_the_reaper_quits_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = make_pool(connection_cache_idle=5.0)
    upstream = FakeUpstream()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.reap_forever)
        await park(pool, upstream)
        await trio.sleep(4)
        assert upstream.quits == 0 and len(pool) == 1
        await trio.sleep(5 + 2 * REAP_INTERVAL)
        assert upstream.quits == 1 and len(pool) == 0
        nursery.cancel_scope.cancel()
    assert pool.closed


async def test_an_expired_upstream_met_by_take_is_closed_by_the_reaper(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = make_pool(connection_cache_idle=5.0)
    upstream = FakeUpstream()
    await park(pool, upstream)
    await trio.sleep(6)
    assert pool.take("route-a") is None and len(pool) == 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.reap_forever)
        await trio.sleep(REAP_INTERVAL + 0.5)
        assert upstream.quits == 1
        nursery.cancel_scope.cancel()


async def test_the_reuse_limit_closes_instead_of_parking() -> None:
    pool = make_pool(connection_reuse_limit=3)
    worn = FakeUpstream(transactions=3)
    await park(pool, worn)
    assert len(pool) == 0 and worn.quits == 1
    fresh = FakeUpstream(transactions=2)
    await park(pool, fresh)
    assert len(pool) == 1 and fresh.quits == 0


async def test_the_size_limit_closes_what_does_not_fit() -> None:
    pool = make_pool(connection_cache_size=2)
    upstreams = [FakeUpstream(route_key=f"route-{i}") for i in range(3)]
    for upstream in upstreams:
        await park(pool, upstream)
    assert len(pool) == 2
    assert [u.quits for u in upstreams] == [0, 0, 1]


async def test_out_of_step_closed_keyless_or_disabled_are_never_parked() -> None:
    pool = make_pool()
    out_of_step = FakeUpstream(parser=FakeParser(b"421 bye\r\n"))
    closed = FakeUpstream(closed=True)
    keyless = FakeUpstream(route_key=None)
    for upstream in (out_of_step, closed, keyless):
        await park(pool, upstream)
    assert len(pool) == 0
    assert out_of_step.quits == 1 and keyless.quits == 1
    off = make_pool(connection_cache=False)
    upstream = FakeUpstream()
    await park(off, upstream)
    assert len(off) == 0 and upstream.quits == 1


async def test_an_upstream_closed_while_parked_is_not_taken() -> None:
    pool = make_pool()
    upstream = FakeUpstream()
    await park(pool, upstream)
    upstream.closed = True  # the MX hung up meanwhile
    assert pool.take("route-a") is None


async def test_stopping_the_reaper_quits_everything_and_parks_nothing_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = make_pool()
    parked = [FakeUpstream(route_key=f"route-{i}") for i in range(3)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.reap_forever)
        for upstream in parked:
            await park(pool, upstream)
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert [u.quits for u in parked] == [1, 1, 1] and len(pool) == 0
    late = FakeUpstream()
    await park(pool, late)
    assert len(pool) == 0 and late.quits == 1


async def test_a_connection_with_its_own_reuse_limit_is_closed_at_it() -> None:
    """Traffic shaping's max_deliveries_per_connection (Upstream.max_transactions) wins over
    delivery.connection_reuse_limit."""
    pool = make_pool(connection_reuse_limit=100)
    upstream = FakeUpstream(transactions=3, max_transactions=3)
    await pool.put(upstream)  # type: ignore[arg-type]
    assert upstream.quits == 1 and len(pool) == 0


async def test_a_parked_connection_wakes_a_waiter_of_its_route() -> None:
    pool = make_pool()
    woken = pool.parked_event("route-a")
    other = pool.parked_event("route-b")
    await pool.put(FakeUpstream())  # type: ignore[arg-type]
    assert woken.is_set() and not other.is_set()
    assert pool.parked_event("route-a") is not woken  # a new event for the next waiters
