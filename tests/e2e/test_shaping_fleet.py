"""Shaping across a fleet (issue 12): two real ``sidecar run`` processes share one real
redis-server and one egress source address. The MX never sees more connections from that
source than ``connection_limit``, summed over both; a shared message rate holds; the slots of
a SIGKILLed sidecar are free again within the lease; with Redis stopped mail keeps flowing
under per-process limits (WARNING logged, metric set) and the shared limits come back with
Redis."""

from __future__ import annotations

import copy
import signal
from pathlib import Path
from typing import Any

import tomli_w
import trio

from testkit.metrics import value

from .harness import (
    FAST_DELIVERY,
    FAST_SERVER,
    MESSAGE,
    Endpoint,
    Lab,
    Processes,
    SendResult,
    SidecarProcess,
    Stack,
    TestMX,
    final_status,
    send,
    wait_listening,
)
from .test_operations import http_get, wait_for_log


async def fleet(
    lab: Lab,
    processes: Processes,
    tmp_path: Path,
    redis_url: str,
    shaping: dict[str, Any],
    mx: dict[str, Any] | None = None,
    count: int = 2,
) -> tuple[Stack, list[tuple[SidecarProcess, Endpoint, Endpoint]]]:
    """One MX behind one HAProxy, ``count`` sidecar processes with one binding (one source
    address) and the shaping backend on ``redis_url``: (process, listener, status) each."""
    stack = await lab.build(
        mxes=[mx or {}], server=FAST_SERVER, delivery=FAST_DELIVERY, start=False
    )
    sidecars = []
    for index in range(count):
        config = copy.deepcopy(stack.config)
        listener, status = lab.addresses.endpoint(), lab.addresses.endpoint()
        config["listener"] = [{"address": str(listener), "binding": "b1"}]
        config["status"] = {"address": str(status)}
        config["shaping"] = {"backend": "redis", "redis_url": redis_url, **shaping}
        path = tmp_path / f"fleet{index}.toml"
        path.write_text(tomli_w.dumps(config), encoding="utf-8")
        started = await processes.start(["run", "-c", str(path)])
        await wait_listening(listener, started)
        sidecars.append((started, listener, status))
    return stack, sidecars


def _delivered(result: SendResult) -> bool:
    return result.error is None and result.final is not None and result.final[0] == 250


async def _peak(mx: TestMX, peak: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], sum(not c.closed for c in mx.connections))
        await trio.sleep(0.005)


async def _send_many(listeners: list[Endpoint], count: int) -> list[SendResult]:
    results: list[SendResult] = []

    async def one(index: int) -> None:
        endpoint = listeners[index % len(listeners)]
        results.append(await send(endpoint, "a@client.test", [f"r{index}@example.test"], MESSAGE))

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(one, index)
    return results


async def test_connection_limit_holds_in_sum_over_two_sidecars(
    lab: Lab, processes: Processes, redis_factory: Any, tmp_path: Path
) -> None:
    redis = redis_factory()
    stack, sidecars = await fleet(
        lab,
        processes,
        tmp_path,
        redis.url,
        {"connection_limit": 3, "max_wait": 10},
        mx={"delays": {"END": 0.3}},
    )
    mx = stack.mxes[0]
    peak = [0]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_peak, mx, peak)
        results = await _send_many([listener for _, listener, _ in sidecars], 16)
        nursery.cancel_scope.cancel()
    delivered = [r for r in results if _delivered(r)]
    assert len(delivered) == len(mx.messages) >= 12, results
    for result in results:  # the others were deferred by shaping, never anything else
        if result not in delivered:
            (code, text), *_ = result.refused.values()
            assert code == 451 and text.startswith(b"4.4.5 "), result
    assert 1 <= peak[0] <= 3, peak
    assert all(message.peer_host == stack.source for message in mx.messages)


async def test_a_shared_message_rate_holds_over_two_sidecars(
    lab: Lab, processes: Processes, redis_factory: Any, tmp_path: Path
) -> None:
    arrivals: list[float] = []

    def end(data: bytes) -> bytes:
        arrivals.append(trio.current_time())
        return b"250 2.0.0 queued\r\n"

    redis = redis_factory()
    _, sidecars = await fleet(
        lab,
        processes,
        tmp_path,
        redis.url,
        {"max_message_rate": "10/s", "max_wait": 5},
        mx={"replies": {"END": end}},
    )
    results = await _send_many([listener for _, listener, _ in sidecars], 40)
    assert all(final_status(r) == (250, "2.0.0") for r in results), results
    arrivals.sort()
    # A burst of 10, then one every 0.1 s: the 30 after the burst take about 3 s.
    steady = arrivals[10:]
    span = steady[-1] - arrivals[9]
    rate = len(steady) / span
    assert 9.0 <= rate <= 11.0, (rate, span)  # within 10% of the limit


async def test_a_killed_sidecars_slots_are_free_again_within_the_lease(
    lab: Lab, processes: Processes, redis_factory: Any, tmp_path: Path
) -> None:
    redis = redis_factory()
    stack, sidecars = await fleet(
        lab,
        processes,
        tmp_path,
        redis.url,
        {"connection_limit": 1, "max_wait": 0.5, "slot_lease": 2},
        mx={"delays": {"END": 30}},
    )
    (killed, first, _), (_, second, _) = sidecars
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, first, "a@client.test", ["held@example.test"], MESSAGE)
        mx = stack.mxes[0]
        await mx.wait_for(lambda: len(mx.messages) == 1)  # the slot is taken, held for 30 s
        refused = await send(second, "a@client.test", ["r@example.test"], MESSAGE)
        code, text = refused.refused["r@example.test"]
        assert code == 451 and b"connection_limit 1" in text, refused
        killed.process.send_signal(signal.SIGKILL)
        killed_at = trio.current_time()
        mx.delays["END"] = 0
        while True:
            result = await send(second, "a@client.test", ["r@example.test"], MESSAGE)
            if _delivered(result):
                break
            assert trio.current_time() - killed_at < 5, result
            await trio.sleep(0.2)
        freed_after = trio.current_time() - killed_at
        nursery.cancel_scope.cancel()
    assert freed_after <= 2 + 1.5, freed_after  # the 2 s lease, and a retry or two


async def test_mail_flows_under_local_limits_while_redis_is_down(
    lab: Lab, processes: Processes, redis_factory: Any, tmp_path: Path
) -> None:
    redis = redis_factory()
    _, sidecars = await fleet(lab, processes, tmp_path, redis.url, {"connection_limit": 5}, count=1)
    ((started, listener, status),) = sidecars
    redis.stop()
    for index in range(3):
        result = await send(listener, "a@client.test", [f"r{index}@example.test"], MESSAGE)
        assert final_status(result) == (250, "2.0.0"), result
    await wait_for_log(started, "WARNING")
    log = started.stderr
    assert log.count("unavailable") >= 1, log
    _, metrics = await http_get(status, "/metrics")
    assert value(metrics, "sidecar_shaping_backend_degraded", backend="redis") == 1, metrics
    redis.start()
    with trio.fail_after(10):
        while True:
            _, metrics = await http_get(status, "/metrics")
            if 'sidecar_shaping_backend_degraded{backend="redis"} 0' in metrics:
                break
            await trio.sleep(0.2)
    result = await send(listener, "a@client.test", ["after@example.test"], MESSAGE)
    assert final_status(result) == (250, "2.0.0"), result
