"""The Redis shaping backend against a real redis-server: the ShapingBackend contract (the
same cases as the memory backend's, in real time on Redis's clock), two backends ("two
sidecars") sharing one Redis, and outages (BackendUnavailable within the call bound, working
again after a restart)."""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import coredis
import pytest
import trio

from sidecar.shaping.backend import BackendUnavailable
from sidecar.shaping.model import PathLimits, Rate
from sidecar.shaping.redis import RedisBackend

from .harness import RedisFactory, RedisServer

PATH = "192.0.2.10|mx1.example.test,mx2.example.test"
OTHER = "192.0.2.11|mx1.example.test,mx2.example.test"
TOLERANCE = 0.05  # seconds: a script call and the test's own scheduling on a shared machine

_prefixes = itertools.count()


@pytest.fixture
def redis(redis_factory: RedisFactory) -> RedisServer:
    return redis_factory()


def new_backend(redis: RedisServer, **options: float) -> RedisBackend:
    return RedisBackend(redis.url, key_prefix=f"test{next(_prefixes)}:", **options)


@pytest.fixture
async def backend(redis: RedisServer) -> AsyncIterator[RedisBackend]:
    async with new_backend(redis) as opened:
        yield opened


async def redis_pttl(redis: RedisServer, key: str) -> int:
    """The key's milliseconds to live as Redis says (-2: no such key)."""
    client = coredis.Redis.from_url(redis.url, decode_responses=True)
    async with client:
        return await client.pttl(key)


# -- connection slots ---------------------------------------------------------------------------


async def test_slots_up_to_the_limit_then_release(backend: RedisBackend) -> None:
    assert [await backend.acquire_slot(PATH, f"h{i}", 3, 30) for i in range(3)] == [True] * 3
    assert await backend.acquire_slot(PATH, "h3", 3, 30) is False
    assert await backend.slots_in_use(PATH) == 3
    assert await backend.slots_in_use(OTHER) == 0
    assert await backend.acquire_slot(OTHER, "o0", 3, 30) is True  # paths are separate

    await backend.release_slot(PATH, "h1")
    assert await backend.slots_in_use(PATH) == 2
    assert await backend.acquire_slot(PATH, "h3", 3, 30) is True
    assert await backend.acquire_slot(PATH, "h4", 3, 30) is False
    await backend.release_slot(PATH, "h1")  # already released: no error
    await backend.release_slot(PATH, "never-held")
    assert await backend.slots_in_use(PATH) == 3


async def test_a_lease_expires_unless_renewed(backend: RedisBackend) -> None:
    assert await backend.acquire_slot(PATH, "kept", 2, 0.6)
    assert await backend.acquire_slot(PATH, "dead", 2, 0.6)  # its sidecar is SIGKILLed
    assert await backend.acquire_slot(PATH, "late", 2, 0.6) is False
    await trio.sleep(0.4)
    await backend.renew_slots([(PATH, "kept")], 0.6)
    await trio.sleep(0.4)  # 0.8 s: "dead" expired, "kept" renewed at 0.4 s lives to 1.0 s
    assert await backend.slots_in_use(PATH) == 1
    assert await backend.acquire_slot(PATH, "late", 2, 0.6) is True
    assert await backend.acquire_slot(PATH, "dead", 2, 0.6) is False
    await trio.sleep(0.7)  # nobody renewed: everything expired
    assert await backend.slots_in_use(PATH) == 0
    # Renewing an expired slot does not bring it back (its place may have been taken).
    await backend.renew_slots([(PATH, "kept"), (PATH, "late")], 0.6)
    assert await backend.slots_in_use(PATH) == 0


async def test_renew_covers_several_paths(backend: RedisBackend) -> None:
    assert await backend.acquire_slot(PATH, "a", 1, 0.5)
    assert await backend.acquire_slot(OTHER, "b", 1, 0.5)
    await trio.sleep(0.3)
    await backend.renew_slots([(PATH, "a"), (OTHER, "b")], 0.5)
    await trio.sleep(0.3)
    assert (await backend.slots_in_use(PATH), await backend.slots_in_use(OTHER)) == (1, 1)


async def test_an_idle_slot_key_vanishes_with_its_last_lease(
    redis: RedisServer, backend: RedisBackend
) -> None:
    assert await backend.acquire_slot(PATH, "a", 1, 0.3)
    assert 0 < await redis_pttl(redis, f"{backend.key_prefix}slots:{PATH}") <= 300
    await trio.sleep(0.45)
    assert await redis_pttl(redis, f"{backend.key_prefix}slots:{PATH}") == -2


# -- rates (GCRA) -------------------------------------------------------------------------------


async def test_gcra_burst_then_the_steady_rate(backend: RedisBackend) -> None:
    rate = Rate(5, 1.0)  # one every 0.2 s, a burst of 5
    key = f"{PATH}|messages"
    assert [await backend.reserve(key, rate, 0.0) for _ in range(5)] == [0.0] * 5
    assert await backend.reserve(key, rate, 0.0) is None  # full, and nothing reserved
    wait = await backend.reserve(key, rate, 1.0)
    assert wait == pytest.approx(0.2, abs=TOLERANCE)
    # Reserved: the next is one interval later; a refusal reserves nothing.
    assert await backend.reserve(key, rate, 0.3) is None
    wait = await backend.reserve(key, rate, 1.0)
    assert wait == pytest.approx(0.4, abs=TOLERANCE)
    assert await backend.reserve(f"{OTHER}|messages", rate, 0.0) == 0.0  # keys are separate


async def test_gcra_recovers_at_the_rate(redis: RedisServer, backend: RedisBackend) -> None:
    rate = Rate(4, 0.8)  # one every 0.2 s, a burst of 4
    key = f"{PATH}|connections"
    for _ in range(4):
        assert await backend.reserve(key, rate, 0.0) == 0.0
    assert await backend.reserve(key, rate, 0.0) is None
    await trio.sleep(0.45)  # two intervals and a bit: two admissions earned back
    assert await backend.reserve(key, rate, 0.0) == 0.0
    assert await backend.reserve(key, rate, 0.0) == 0.0
    assert await backend.reserve(key, rate, 0.0) is None
    # The key expires when its state equals a fresh key's (TAT passed): at most ``per``.
    assert 0 < await redis_pttl(redis, f"{backend.key_prefix}rate:{key}") <= 800
    await trio.sleep(0.85)
    assert await redis_pttl(redis, f"{backend.key_prefix}rate:{key}") == -2
    assert [await backend.reserve(key, rate, 0.0) for _ in range(5)] == [0.0] * 4 + [None]


async def test_gcra_admission_times_over_a_window(backend: RedisBackend) -> None:
    """Callers that wait what they are told go at the steady rate after the burst."""
    rate = Rate(10, 1.0)  # one every 0.1 s, a burst of 10
    key = f"{PATH}|messages"
    start = trio.current_time()
    admitted: list[float] = []
    for _ in range(20):
        wait = await backend.reserve(key, rate, 5.0)
        assert wait is not None
        await trio.sleep(wait)
        admitted.append(trio.current_time() - start)
    assert admitted[9] < TOLERANCE  # the burst, at once
    for n in range(10, 20):  # then one every interval
        assert admitted[n] == pytest.approx((n - 9) * 0.1, abs=TOLERANCE)


# -- suspensions and overrides ------------------------------------------------------------------


async def test_suspension_is_visible_and_expires(backend: RedisBackend) -> None:
    assert await backend.suspension(PATH) is None
    await backend.suspend(PATH, 0.5, "421 4.7.28 rate limited")
    found = await backend.suspension(PATH)
    assert found is not None
    remaining, reason = found
    assert remaining == pytest.approx(0.5, abs=TOLERANCE)
    assert reason == "421 4.7.28 rate limited"
    assert await backend.suspension(OTHER) is None
    await trio.sleep(0.6)
    assert await backend.suspension(PATH) is None


async def test_override_round_trips_and_expires(backend: RedisBackend) -> None:
    limits = PathLimits(
        connection_limit=2,
        max_connection_rate=Rate(10, 60.0),
        max_message_rate=Rate(7, 0.3),
        max_deliveries_per_connection=None,
    )
    assert await backend.overrides(PATH) is None
    await backend.override(PATH, limits, 0.5, "451 4.7.500 Server busy")
    found = await backend.overrides(PATH)
    assert found is not None
    assert found[0] == limits
    assert found[1] == pytest.approx(0.5, abs=TOLERANCE)
    assert found[2] == "451 4.7.500 Server busy"
    await trio.sleep(0.6)
    assert await backend.overrides(PATH) is None


async def test_resume_ends_suspension_and_override(backend: RedisBackend) -> None:
    await backend.suspend(PATH, 60, "by hand")
    await backend.override(PATH, PathLimits(connection_limit=1), 60, "by hand")
    await backend.suspend(OTHER, 60, "other")
    await backend.resume(PATH)
    assert await backend.suspension(PATH) is None
    assert await backend.overrides(PATH) is None
    assert await backend.suspension(OTHER) is not None
    await backend.resume(PATH)  # nothing left: no error


# -- two sidecars -------------------------------------------------------------------------------


async def test_two_backends_never_exceed_the_limit_together(redis: RedisServer) -> None:
    limit, attempts = 7, 50
    prefix = f"shared{next(_prefixes)}:"
    taken: list[str] = []

    async def attempt(backend: RedisBackend, holder: str) -> None:
        if await backend.acquire_slot(PATH, holder, limit, 30):
            taken.append(holder)

    async with (
        RedisBackend(redis.url, key_prefix=prefix) as one,
        RedisBackend(redis.url, key_prefix=prefix) as two,
    ):
        async with trio.open_nursery() as nursery:
            for n in range(attempts):
                nursery.start_soon(attempt, one, f"one-{n}")
                nursery.start_soon(attempt, two, f"two-{n}")
        assert len(taken) == limit
        assert await one.slots_in_use(PATH) == await two.slots_in_use(PATH) == limit
        # A slot released by one sidecar is free for the other.
        await one.release_slot(PATH, taken[0])
        assert await two.acquire_slot(PATH, "two-late", limit, 30)
        assert not await one.acquire_slot(PATH, "one-late", limit, 30)


async def test_two_backends_share_one_rate(redis: RedisServer) -> None:
    rate = Rate(20, 60.0)
    prefix = f"shared{next(_prefixes)}:"
    admitted: list[float] = []

    async def attempt(backend: RedisBackend) -> None:
        wait = await backend.reserve(f"{PATH}|messages", rate, 0.0)
        if wait is not None:
            admitted.append(wait)

    async with (
        RedisBackend(redis.url, key_prefix=prefix) as one,
        RedisBackend(redis.url, key_prefix=prefix) as two,
    ):
        async with trio.open_nursery() as nursery:
            for _ in range(30):
                nursery.start_soon(attempt, one)
                nursery.start_soon(attempt, two)
        assert admitted == [0.0] * 20
        await one.suspend(PATH, 30, "seen by both")
        assert await two.suspension(PATH) is not None


# -- outages ------------------------------------------------------------------------------------


def every_operation(backend: RedisBackend) -> list[tuple[str, Callable[[], Awaitable[object]]]]:
    return [
        ("acquire_slot", lambda: backend.acquire_slot(PATH, "h", 3, 30)),
        ("renew_slots", lambda: backend.renew_slots([(PATH, "h")], 30)),
        ("release_slot", lambda: backend.release_slot(PATH, "h")),
        ("slots_in_use", lambda: backend.slots_in_use(PATH)),
        ("reserve", lambda: backend.reserve(f"{PATH}|messages", Rate(5, 1.0), 1.0)),
        ("suspend", lambda: backend.suspend(PATH, 10, "r")),
        ("resume", lambda: backend.resume(PATH)),
        ("suspension", lambda: backend.suspension(PATH)),
        ("override", lambda: backend.override(PATH, PathLimits(connection_limit=1), 10, "r")),
        ("overrides", lambda: backend.overrides(PATH)),
    ]


async def test_redis_stopped_then_restarted(redis: RedisServer) -> None:
    async with new_backend(redis) as backend:
        assert await backend.acquire_slot(PATH, "before", 3, 30)
        redis.stop()
        for name, operation in every_operation(backend):
            start = trio.current_time()
            with pytest.raises(BackendUnavailable, match="Redis"):
                await operation()
            assert trio.current_time() - start < backend.timeout + TOLERANCE, name
        redis.start()  # empty again: no persistence, and no scripts loaded
        for _, operation in every_operation(backend):
            await operation()  # no BackendUnavailable
        assert await backend.slots_in_use(PATH) == 0
        assert await backend.reserve(f"{OTHER}|messages", Rate(5, 1.0), 0.0) == 0.0


async def test_redis_unresponsive_gives_backend_unavailable_within_the_bound(
    redis: RedisServer,
) -> None:
    async with new_backend(redis, timeout=0.3) as backend:
        assert await backend.reserve(f"{PATH}|messages", Rate(5, 1.0), 0.0) == 0.0
        assert redis.pid is not None
        os.kill(redis.pid, signal.SIGSTOP)
        try:
            for name, operation in every_operation(backend)[:4]:
                start = trio.current_time()
                with pytest.raises(BackendUnavailable, match=r"within 0\.3s"):
                    await operation()
                assert trio.current_time() - start < 0.3 + TOLERANCE, name
        finally:
            os.kill(redis.pid, signal.SIGCONT)
        # The late answers to the timed-out calls are not taken for later ones.
        for _ in range(3):
            assert await backend.slots_in_use(OTHER) == 0
            assert await backend.suspension(OTHER) is None


async def test_entering_does_not_need_redis(redis_factory: RedisFactory) -> None:
    redis = redis_factory(start=False)
    async with new_backend(redis) as backend:
        with pytest.raises(BackendUnavailable):
            await backend.slots_in_use(PATH)
        redis.start()
        assert await backend.slots_in_use(PATH) == 0


# -- Cluster and Sentinel -----------------------------------------------------------------------


@pytest.fixture(params=["cluster", "sentinel"])
def deployment_url(request: pytest.FixtureRequest, redis_factory: RedisFactory) -> str:
    """The URL of a one-node Redis Cluster, or of a Sentinel naming a primary."""
    if request.param == "cluster":
        return redis_factory(cluster=True).url
    return redis_factory.sentinel(redis_factory()).url


@pytest.mark.filterwarnings("ignore:Use coredis.connection.TCPLocation:DeprecationWarning")
async def test_cluster_and_sentinel_urls(deployment_url: str) -> None:
    prefix = f"deployed{next(_prefixes)}:"
    async with (
        RedisBackend(deployment_url, key_prefix=prefix) as one,
        RedisBackend(deployment_url, key_prefix=prefix) as two,
    ):
        taken = [
            await backend.acquire_slot(PATH, f"h{n}-{i}", 3, 30)
            for n in range(4)
            for i, backend in enumerate((one, two))
        ]
        assert taken.count(True) == 3
        await one.renew_slots([(PATH, "h0-0"), (OTHER, "x")], 30)
        await two.release_slot(PATH, "h0-0")
        assert await one.slots_in_use(PATH) == 2
        rate = Rate(2, 1.0)
        assert [await b.reserve(f"{PATH}|messages", rate, 0.0) for b in (one, two, one)] == [
            0.0,
            0.0,
            None,
        ]
        await one.suspend(PATH, 30, "421 4.7.28")
        await one.override(PATH, PathLimits(connection_limit=1), 30, "set")
        assert (await two.suspension(PATH) or (0, ""))[1] == "421 4.7.28"
        assert (await two.overrides(PATH) or (None,))[0] == PathLimits(connection_limit=1)
        await two.resume(PATH)
        assert await one.suspension(PATH) is None
        assert await one.overrides(PATH) is None


@pytest.mark.filterwarnings("ignore:Use coredis.connection.TCPLocation:DeprecationWarning")
async def test_a_cluster_unreachable_at_start_is_connected_later(
    redis_factory: RedisFactory,
) -> None:
    """coredis cannot enter a Cluster client with no node reachable: the backend still
    enters, answers BackendUnavailable, and connects once the cluster is up."""
    redis = redis_factory(cluster=True, start=False)
    async with RedisBackend(redis.url, key_prefix="late:", reconnect_delay=0.2) as backend:
        with pytest.raises(BackendUnavailable, match="not connected"):
            await backend.slots_in_use(PATH)
        redis.start()
        with trio.fail_after(3):
            while True:
                try:
                    assert await backend.acquire_slot(PATH, "h", 1, 30)
                    break
                except BackendUnavailable:
                    await trio.sleep(0.1)
        assert await backend.slots_in_use(PATH) == 1


async def test_take_admits_the_burst_room_left_in_one_call(backend: RedisBackend) -> None:
    rate = Rate(10, 60.0)  # a burst of 10, then one every 6 s: nothing comes back meanwhile
    assert await backend.take("takes", rate, 4) == 4
    assert await backend.take("takes", rate, 10) == 6
    assert await backend.take("takes", rate, 1) == 0
    assert await backend.reserve("takes", rate, 0.0) is None
