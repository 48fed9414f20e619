"""sidecar.shaping.shaper.Shaper on trio's MockClock: exact waits and refusals, FIFO slot
hand-over, the wake event, suspensions, rules, and the fallback backend."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
import trio
import trio.testing

from sidecar.config import parse_config
from sidecar.shaping.backend import BackendUnavailable
from sidecar.shaping.memory import MemoryBackend
from sidecar.shaping.model import EgressPath
from sidecar.shaping.policy import ShapingPolicy
from sidecar.shaping.shaper import LEASE, Grant, Shaper
from sidecar.smtp.replies import Reply

BASE: dict[str, Any] = {
    "listener": [{"address": "127.0.0.1:2525", "binding": "b1"}],
    "binding": {"b1": {"ha_proxy_server": "127.0.0.1:5000", "ha_proxy_src_addr": "192.0.2.10"}},
    "shaping": {
        "connection_limit": 2,
        "site": {"google": {"mx": ["*.google.com"]}},
        "rule": [
            {"site": "google", "match": r"^421[ -]4\.7\.28 ", "action": "suspend",
             "duration": "1h"},
            {"code": 451, "enhanced": "4.7.500", "action": "set", "connection_limit": 1,
             "duration": "10min"},
        ],
    },
}  # fmt: skip


def make(shaping: dict[str, Any] | None = None, **kw: Any) -> Shaper:
    data = copy.deepcopy(BASE)
    data["shaping"].update(shaping or {})
    return Shaper(ShapingPolicy(parse_config(data)), kw.pop("backend", MemoryBackend()), **kw)


def gpath(shaper: Shaper) -> EgressPath:
    return shaper.path("192.0.2.10", ["aspmx.l.google.com"])


async def test_path_direct_and_site(autojump_clock: trio.testing.MockClock) -> None:
    s = make(max_wait=2.0)
    assert s.path(None, ["MX.Example.org."]) == EgressPath("direct", "mx.example.org")
    assert gpath(s) == EgressPath("192.0.2.10", "google")


async def test_a_waiter_gets_the_slot_another_releases(
    autojump_clock: trio.testing.MockClock,
) -> None:
    s, got = make(max_wait=2.0), []
    p = gpath(s)
    first, second = await s.open_connection("b1", p), await s.open_connection("b1", p)
    assert isinstance(first, Grant) and isinstance(second, Grant)

    async def waiter() -> None:
        start = trio.current_time()
        got.append((await s.open_connection("b1", p), trio.current_time() - start))

    async with trio.open_nursery() as n:
        n.start_soon(waiter)
        await trio.sleep(1.5)
        await first.release()
    grant, waited = got[0]
    assert isinstance(grant, Grant) and waited == pytest.approx(1.5)
    assert s.stats.waits == 1 and s.stats.wait_seconds == pytest.approx(1.5)
    assert (await s.usage(p)).connections == 2


async def test_waiters_are_served_first_in_first_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    s, order = make({"connection_limit": 3}, max_wait=5.0), []
    p = gpath(s)
    held = [await s.open_connection("b1", p) for _ in range(3)]

    async def waiter(name: str) -> None:
        grant = await s.open_connection("b1", p)
        assert isinstance(grant, Grant)
        order.append(name)

    async with trio.open_nursery() as n:
        for name in "abcd":
            n.start_soon(waiter, name)
            await trio.sleep(0.1)
        assert (await s.usage(p)).waiting == 4
        for grant in held:
            assert isinstance(grant, Grant)
            await grant.release()
            await trio.sleep(0.1)
        await trio.sleep(0.1)
        assert order == ["a", "b", "c"]  # "d" waits on, nobody jumped the queue
        n.cancel_scope.cancel()


async def test_refused_at_once_when_the_expected_wait_is_over_max_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The place in the queue times how fast its waiters were served lately: with one slot
    freed every second and two waiters ahead, a newcomer would wait ~3 s > max_wait 2 s."""
    s = make({"connection_limit": 1}, max_wait=2.0)
    p = gpath(s)
    grant = await s.open_connection("b1", p)
    assert isinstance(grant, Grant)

    async def serve_and_hold() -> None:
        got = await s.open_connection("b1", p)
        assert isinstance(got, Grant)
        await trio.sleep(1)
        await got.release()

    async with trio.open_nursery() as n:
        n.start_soon(serve_and_hold)  # served at 1 s (when `grant` goes), holds until 2 s
        await trio.sleep(0.5)
        n.start_soon(serve_and_hold)  # served at 2 s: one place per second
        await trio.sleep(0.5)
        await grant.release()
        await trio.sleep(1.5)
        n.start_soon(serve_and_hold)  # two waiters ahead of the newcomer
        n.start_soon(serve_and_hold)
        await trio.sleep(0.1)
        start = trio.current_time()
        refused = await s.open_connection("b1", p)
        assert isinstance(refused, Reply) and refused.code == 451
        assert trio.current_time() == start  # at once, not after max_wait
        assert refused.lines == (
            "4.4.5 Egress 192.0.2.10 to site google: connection_limit 1 reached, try later",
        )
    assert s.stats.deferrals["connection_limit"] == 1


async def test_refused_when_no_slot_comes_within_max_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    s = make(max_wait=2.0)
    p = gpath(s)
    await s.open_connection("b1", p), await s.open_connection("b1", p)
    start = trio.current_time()
    refused = await s.open_connection("b1", p)
    assert isinstance(refused, Reply) and refused.code == 451
    assert trio.current_time() - start == pytest.approx(2.0)
    assert s.stats.waits == 0


async def test_the_wake_event_ends_the_wait_with_none(
    autojump_clock: trio.testing.MockClock,
) -> None:
    s, wake, got = make(max_wait=2.0), trio.Event(), []
    p = gpath(s)
    await s.open_connection("b1", p), await s.open_connection("b1", p)

    async def waiter() -> None:
        got.append(await s.open_connection("b1", p, wake=wake))

    async with trio.open_nursery() as n:
        n.start_soon(waiter)
        await trio.sleep(0.5)
        wake.set()
    assert got == [None]
    assert (await s.usage(p)).waiting == 0 and (await s.usage(p)).connections == 2


async def test_connection_rate_waits_exactly_or_refuses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    s = make({"connection_limit": 100, "max_connection_rate": "2/4s"}, max_wait=1.0)
    p = gpath(s)  # a burst of 2, then one per 2 s
    assert isinstance(await s.open_connection("b1", p), Grant)
    assert isinstance(await s.open_connection("b1", p), Grant)
    refused = await s.open_connection("b1", p)  # the next admission is 2 s away: over 1 s
    assert isinstance(refused, Reply)
    assert "max_connection_rate 2/4s reached" in refused.text
    assert (await s.usage(p)).connections == 2  # the refused one gave its slot back
    await trio.sleep(1.5)
    start = trio.current_time()
    assert isinstance(await s.open_connection("b1", p), Grant)
    assert trio.current_time() - start == pytest.approx(0.5)


async def test_message_rate(autojump_clock: trio.testing.MockClock) -> None:
    s = make({"max_message_rate": "1/2s"}, max_wait=1.0)
    p = gpath(s)
    assert await s.start_transaction("b1", p) is None
    refused = await s.start_transaction("b1", p)
    assert isinstance(refused, Reply) and "max_message_rate 1/2s reached" in refused.text
    await trio.sleep(1.5)
    start = trio.current_time()
    assert await s.start_transaction("b1", p) is None
    assert trio.current_time() - start == pytest.approx(0.5)
    assert s.stats.deferrals["max_message_rate"] == 1 and s.stats.waits == 1


async def test_a_rule_match_suspends_the_path(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    s = make(max_wait=2.0)
    p = gpath(s)
    with caplog.at_level(logging.WARNING, logger="sidecar.shaping"):
        await s.observe("b1", p, Reply(250, ("2.0.0 OK",)))
        assert (await s.usage(p)).suspended_for is None
        await s.observe("b1", p, Reply(421, ("4.7.28 unusual rate of unsolicited mail",)))
    assert "shaping.rule[0] suspends egress 192.0.2.10 to site google" in caplog.text
    refused = await s.open_connection("b1", p)
    assert isinstance(refused, Reply) and refused.code == 451
    assert refused.text.startswith("4.4.5 Egress 192.0.2.10 to site google suspended for 3600s")
    assert isinstance(await s.start_transaction("b1", p), Reply)
    other = s.path("192.0.2.11", ["aspmx.l.google.com"])
    assert isinstance(await s.open_connection("b1", other), Grant)  # another source: free
    await trio.sleep(3600)
    assert isinstance(await s.open_connection("b1", p), Grant)
    assert s.stats.deferrals["suspended"] == 2


async def test_a_set_rule_overrides_limits_until_it_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    s = make(max_wait=0.0)
    p = gpath(s)
    await s.observe("b1", p, Reply(451, ("4.7.500 Server busy. Please try again later",)))
    assert (await s.limits("b1", p)).connection_limit == 1
    assert isinstance(await s.open_connection("b1", p), Grant)
    assert isinstance(await s.open_connection("b1", p), Reply)
    await trio.sleep(600)
    assert (await s.limits("b1", p)).connection_limit == 2


async def test_suspend_and_resume_by_hand(autojump_clock: trio.testing.MockClock) -> None:
    s = make(max_wait=2.0)
    p = gpath(s)
    await s.suspend(p, 60.0, "by hand (127.0.0.1)")
    usage = await s.usage(p)
    assert usage.suspended_for == pytest.approx(60.0)
    assert usage.suspension_reason == "by hand (127.0.0.1)"
    await s.resume(p)
    assert isinstance(await s.open_connection("b1", p), Grant)


async def test_run_renews_live_leases_and_a_dead_one_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    s = make(max_wait=0.0, backend=backend)
    p = gpath(s)
    async with trio.open_nursery() as n:
        await n.start(s.run)
        live = await s.open_connection("b1", p)
        assert isinstance(live, Grant)
        await backend.acquire_slot(p.key, "a-dead-sidecar", 2, LEASE)
        await trio.sleep(LEASE * 3)
        assert await backend.slots_in_use(p.key) == 1  # the dead one's lease ran out
        await live.release()
        assert await backend.slots_in_use(p.key) == 0
        n.cancel_scope.cancel()


class FlakyBackend(MemoryBackend):
    """A shared backend that can be made unavailable."""

    down = False

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name in {"acquire_slot", "renew_slots", "release_slot", "slots_in_use", "reserve",
                    "suspend", "resume", "suspension", "override", "overrides"}:  # fmt: skip

            async def call(*args: Any) -> Any:
                if super(FlakyBackend, self).__getattribute__("down"):
                    raise BackendUnavailable("connection refused")
                return await attr(*args)

            return call
        return attr


async def test_fallback_while_the_backend_is_down_logged_once_then_back(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    shared, local = FlakyBackend(), MemoryBackend()
    s = make({"connection_limit": 1}, max_wait=0.0, backend=shared, fallback=local)
    p = gpath(s)
    with caplog.at_level(logging.WARNING, logger="sidecar.shaping"):
        async with trio.open_nursery() as n:
            await n.start(s.run)
            shared.down = True
            first = await s.open_connection("b1", p)
            assert isinstance(first, Grant) and s.degraded
            assert isinstance(await s.open_connection("b1", p), Reply)  # local limit holds
            assert await local.slots_in_use(p.key) == 1
            await trio.sleep(5)
            assert s.degraded
            shared.down = False
            await trio.sleep(1.5)
            assert not s.degraded
            second = await s.open_connection("b1", p)
            assert isinstance(second, Grant)
            assert await shared.slots_in_use(p.key) == 1
            await first.release()
            assert await local.slots_in_use(p.key) == 0
            n.cancel_scope.cancel()
    unavailable = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(unavailable) == 1 and unavailable[0].levelname == "WARNING"
    assert any("answers again" in r.getMessage() for r in caplog.records)


async def test_a_high_message_rate_takes_its_tokens_in_batches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A shared backend is asked once per batch (a hundredth of the count, at most 64), not
    once per message; a small rate stays one call per message (exact)."""

    class Counting(MemoryBackend):
        takes = 0

        async def take(self, key: str, rate: Any, n: int) -> int:
            type(self).takes += 1
            return await super().take(key, rate, n)

    backend = Counting()
    s = make({"max_message_rate": "100000/h"}, max_wait=2.0, backend=backend)
    p = gpath(s)
    for _ in range(128):
        assert await s.start_transaction("b1", p) is None
    assert Counting.takes == 2
    small = make({"max_message_rate": "10/s"}, max_wait=2.0, backend=Counting())
    Counting.takes = 0
    for _ in range(10):
        assert await small.start_transaction("b1", gpath(small)) is None
    assert Counting.takes == 0  # one reserve per message instead


async def test_sessions_at_a_batch_boundary_share_one_backend_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """100 sessions that find the batch spent at once wait for one take and share its
    tokens (and one read of the path's state), rather than each take a batch of its own
    (all but one of which were wasted) and each read the state: a shared backend's
    round trip is where concurrent sessions meet (issue 12, the Redis -d cost)."""

    class Slow(MemoryBackend):
        takes = 0
        reads = 0

        async def take(self, key: str, rate: Any, n: int) -> int:
            type(self).takes += 1
            await trio.sleep(0.001)  # a round trip
            return await super().take(key, rate, n)

        async def suspension(self, key: str) -> Any:
            type(self).reads += 1
            await trio.sleep(0.001)
            return await super().suspension(key)

    s = make({"max_message_rate": "100000/h"}, max_wait=2.0, backend=Slow())
    p = gpath(s)
    admitted = 0

    async def session() -> None:
        nonlocal admitted
        assert await s.start_transaction("b1", p) is None
        admitted += 1

    async with trio.open_nursery() as n:
        for _ in range(64):
            n.start_soon(session)
    assert admitted == 64
    assert Slow.takes == 1
    assert Slow.reads == 1
