"""``server.workers = N`` on a real ``sidecar run``: N processes share each listener
(SO_REUSEPORT), a supervisor forwards signals and restarts a worker that dies."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from collections.abc import Callable

import trio

from .harness import (
    MESSAGE,
    CliStack,
    Endpoint,
    Lab,
    Processes,
    SidecarProcess,
    refuses_connections,
    run_cli,
    send,
    wait_exit,
    wait_listening,
)
from .test_operations import (
    http_get,
    stop_during_a_transaction,
    wait_for_log,
    with_status,
    write_config,
)


def with_workers(stack: CliStack, lab: Lab, workers: int = 2) -> Endpoint:
    """Set ``server.workers`` and a status endpoint (worker i serves it on port + i)."""
    status = with_status(stack, lab)
    stack.config = {**stack.config, "server": {**stack.config["server"], "workers": workers}}
    write_config(stack, stack.config)
    return status


def worker_pids(started: SidecarProcess) -> dict[int, int]:
    """The latest pid of each worker, from the supervisor's "worker N started (pid P)" lines."""
    pids: dict[int, int] = {}
    for index, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", started.stderr):
        pids[int(index)] = int(pid)
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def start_workers(stack: CliStack, processes: Processes) -> SidecarProcess:
    """``sidecar run`` with the stack's config, once it answers and both workers started."""
    started = await processes.start(["run", "-c", str(stack.config_path)])
    await wait_listening(stack.listener, started)
    with trio.fail_after(10):
        while len(worker_pids(started)) < 2:
            await trio.sleep(0.05)
    return started


async def send_ok(stack: CliStack, count: int) -> None:
    for _ in range(count):
        result = await send(stack.listener, "a@client.test", ["rcpt@example.test"], MESSAGE)
        assert result.error is None and not result.refused, result


async def test_workers_share_the_listener_and_each_serve_status(
    cli_stack: CliStack, processes: Processes, lab: Lab
) -> None:
    status = with_workers(cli_stack, lab)
    started = await processes.start(["run", "-c", str(cli_stack.config_path)])
    await wait_listening(cli_stack.listener, started)
    await send_ok(cli_stack, 24)
    assert len(await cli_stack.mxes[0].wait_for_messages(24)) == 24
    # The kernel spread the 24 connections over both workers: each logged transactions
    # (within the log's flush delay).
    for index in (0, 1):
        await wait_for_log(started, f"[worker {index}] sidecar.transaction")
    assert len(worker_pids(started)) == 2

    for index in (0, 1):
        endpoint = Endpoint(status.host, status.port + index)
        code, body = await http_get(endpoint, "/status")
        assert code == 200
        data = json.loads(body)
        assert (data["worker"], data["workers"]) == (index, 2)
    shown = await run_cli("status", "-c", str(cli_stack.config_path))
    assert "worker 0 of 2" in shown.stdout.decode(), shown

    started.process.send_signal(signal.SIGTERM)
    assert await wait_exit(started, timeout=10) == 0
    assert refuses_connections(cli_stack.listener)
    assert not any(alive(pid) for pid in worker_pids(started).values())


async def kill_and_await_restart(started: SidecarProcess, index: int) -> None:
    """SIGKILL worker ``index``; return once the supervisor has started its successor."""
    killed = worker_pids(started)[index]
    os.kill(killed, signal.SIGKILL)
    await wait_for_log(started, "restarting it")
    with trio.fail_after(10):
        while worker_pids(started)[index] == killed:
            await trio.sleep(0.05)


async def test_a_worker_that_dies_is_restarted(
    cli_stack: CliStack, processes: Processes, lab: Lab
) -> None:
    with_workers(cli_stack, lab)
    started = await start_workers(cli_stack, processes)
    await kill_and_await_restart(started, 1)
    # Connections that arrive while a worker is down wait in its backlog: none is refused.
    await send_ok(cli_stack, 16)
    assert len(await cli_stack.mxes[0].wait_for_messages(16)) == 16
    started.process.send_signal(signal.SIGTERM)
    assert await wait_exit(started, timeout=10) == 0


async def test_sighup_reaches_every_worker(
    cli_stack: CliStack, processes: Processes, lab: Lab
) -> None:
    with_workers(cli_stack, lab)
    started = await start_workers(cli_stack, processes)
    await trio.sleep(0.5)  # both workers past start-up (their signal handlers installed)
    started.process.send_signal(signal.SIGHUP)
    await wait_for_log(started, "[worker 0] sidecar.server: configuration reloaded")
    await wait_for_log(started, "[worker 1] sidecar.server: configuration reloaded")
    # A change of the worker count needs a restart: every worker refuses it.
    config = dict(cli_stack.config)
    config["server"] = {**config["server"], "workers": 3}
    write_config(cli_stack, config)
    started.process.send_signal(signal.SIGHUP)
    await wait_for_log(started, "server.workers changed (restart to apply)")
    await send_ok(cli_stack, 2)
    started.process.send_signal(signal.SIGINT)
    assert await wait_exit(started, timeout=10) == 0


async def test_a_taken_port_is_refused_before_any_worker_starts(
    cli_stack: CliStack, processes: Processes, lab: Lab
) -> None:
    with_workers(cli_stack, lab)
    first = await processes.start(["run", "-c", str(cli_stack.config_path)])
    await wait_listening(cli_stack.listener, first)
    # A second sidecar with the same file must not quietly share the port through
    # SO_REUSEPORT: it fails like any listener whose address is in use.
    second = await processes.start(["run", "-c", str(cli_stack.config_path)])
    assert await wait_exit(second, timeout=10) == 1
    assert f"error: cannot listen on {cli_stack.listener}" in second.stderr
    assert "worker" not in second.stderr
    first.process.send_signal(signal.SIGTERM)
    assert await wait_exit(first, timeout=10) == 0

    # Likewise a plain listener that holds the port.
    with socket.socket() as holder:
        holder.bind(cli_stack.listener.as_tuple())
        holder.listen()
        third = await processes.start(["run", "-c", str(cli_stack.config_path)])
        assert await wait_exit(third, timeout=10) == 1
        assert "Address already in use" in third.stderr


async def test_workers_stop_when_the_supervisor_is_killed(
    cli_stack: CliStack, processes: Processes, lab: Lab
) -> None:
    with_workers(cli_stack, lab)
    started = await start_workers(cli_stack, processes)
    started.process.kill()  # no chance to forward anything: the kernel tells the workers
    await started.process.wait()
    with trio.fail_after(10):
        while any(alive(pid) for pid in worker_pids(started).values()):
            await trio.sleep(0.05)
    assert refuses_connections(cli_stack.listener)


async def test_workers_lose_no_transaction_line_on_sigterm(
    cli_stack: CliStack, processes: Processes, lab: Lab
) -> None:
    # Each worker buffers its lines (up to 0.2 s) and ends with os._exit: its exit path must
    # write them first.
    with_workers(cli_stack, lab)
    started = await start_workers(cli_stack, processes)
    count = 24
    await send_ok(cli_stack, count)
    await stop_during_a_transaction(cli_stack, started)
    assert await wait_exit(started) == 0
    lines = [line for line in started.stderr.splitlines() if "sidecar.transaction" in line]
    assert len(lines) == count + 1, lines


def pinned_to(cpus: list[int]) -> Callable[[], None]:
    """A ``preexec_fn`` that gives the started ``sidecar run`` this affinity mask."""
    return lambda: os.sched_setaffinity(0, cpus)


async def test_workers_auto_starts_one_per_cpu_of_the_affinity_mask(
    cli_stack: CliStack, processes: Processes, lab: Lab
) -> None:
    """``workers = "auto"``: as many workers as CPUs the process may use (here its affinity
    mask: two CPUs), and ``sidecar status`` asks each of them."""
    mask = sorted(os.sched_getaffinity(0))
    assert len(mask) >= 2, "this test needs a machine with two CPUs"
    status = with_status(cli_stack, lab)
    server = {**cli_stack.config["server"], "workers": "auto"}
    cli_stack.config = {**cli_stack.config, "server": server}
    write_config(cli_stack, cli_stack.config)
    started = await processes.start(
        ["run", "-c", str(cli_stack.config_path)], preexec_fn=pinned_to(mask[:2])
    )
    await wait_listening(cli_stack.listener, started)
    await wait_for_log(started, "supervising 2 workers")
    await send_ok(cli_stack, 8)
    assert len(await cli_stack.mxes[0].wait_for_messages(8)) == 8
    code, body = await http_get(Endpoint(status.host, status.port + 1), "/status")
    assert code == 200 and json.loads(body)["workers"] == 2
    shown = await run_cli("status", "-c", str(cli_stack.config_path))
    assert "worker 0 of 2" in shown.stdout.decode(), shown
    started.process.send_signal(signal.SIGTERM)
    assert await wait_exit(started, timeout=10) == 0


async def test_workers_auto_on_one_cpu_is_a_single_process(
    cli_stack: CliStack, processes: Processes
) -> None:
    server = {**cli_stack.config["server"], "workers": "auto"}
    cli_stack.config = {**cli_stack.config, "server": server}
    write_config(cli_stack, cli_stack.config)
    mask = sorted(os.sched_getaffinity(0))
    started = await processes.start(
        ["run", "-c", str(cli_stack.config_path)], preexec_fn=pinned_to(mask[:1])
    )
    await wait_listening(cli_stack.listener, started)
    await send_ok(cli_stack, 2)
    assert len(await cli_stack.mxes[0].wait_for_messages(2)) == 2
    assert "supervising" not in started.stderr and not worker_pids(started)
    started.process.send_signal(signal.SIGTERM)
    assert await wait_exit(started, timeout=10) == 0


async def test_workers_auto_whose_status_ports_pass_65535_refuses_to_start(
    cli_stack: CliStack, processes: Processes, lab: Lab
) -> None:
    """``check`` cannot know how many workers "auto" starts: ``run`` refuses a status port
    + i beyond 65535 (getaddrinfo would wrap 65536 to 0, a random port, without a word)."""
    mask = sorted(os.sched_getaffinity(0))
    assert len(mask) >= 2, "this test needs a machine with two CPUs"
    status = Endpoint(lab.addresses.ipv4(), 65535)
    server = {**cli_stack.config["server"], "workers": "auto"}
    cli_stack.config = {**cli_stack.config, "server": server, "status": {"address": str(status)}}
    write_config(cli_stack, cli_stack.config)
    started = await processes.start(
        ["run", "-c", str(cli_stack.config_path)], preexec_fn=pinned_to(mask[:2])
    )
    assert await wait_exit(started, timeout=10) == 1
    assert (
        f"error: cannot listen on status endpoint {status.host}:65536 (worker 1): "
        "port 65536 is beyond 65535"
    ) in started.stderr, started.stderr
    assert "supervising" not in started.stderr


def banner(endpoint: Endpoint) -> bytes:
    with socket.create_connection((endpoint.host, endpoint.port), timeout=5) as sock:
        line = sock.recv(512)
        sock.sendall(b"QUIT\r\n")
        return line


async def test_a_restarted_worker_gets_the_configuration_reloaded_before(
    cli_stack: CliStack, processes: Processes, lab: Lab
) -> None:
    """A SIGHUP reloads every worker; a worker restarted after it must serve that
    configuration too, not the one the supervisor started with."""
    with_workers(cli_stack, lab)
    started = await start_workers(cli_stack, processes)
    await trio.sleep(0.5)  # both workers past start-up (their signal handlers installed)
    config = dict(cli_stack.config)
    config["server"] = {**config["server"], "hostname": "reloaded.example"}
    write_config(cli_stack, config)
    started.process.send_signal(signal.SIGHUP)
    await wait_for_log(started, "[worker 0] sidecar.server: configuration reloaded")
    await wait_for_log(started, "[worker 1] sidecar.server: configuration reloaded")
    await kill_and_await_restart(started, 1)
    await trio.sleep(0.5)  # the new worker 1 accepting
    # SO_REUSEPORT spreads connections by their ports: 24 reach both workers.
    banners = [await trio.to_thread.run_sync(banner, cli_stack.listener) for _ in range(24)]
    assert all(b"reloaded.example" in line for line in banners), banners
    started.process.send_signal(signal.SIGTERM)
    assert await wait_exit(started, timeout=10) == 0


async def test_a_restarted_worker_keeps_the_running_configuration_after_a_bad_reload(
    cli_stack: CliStack, processes: Processes, lab: Lab
) -> None:
    with_workers(cli_stack, lab)
    started = await start_workers(cli_stack, processes)
    await trio.sleep(0.5)
    cli_stack.config_path.write_text("[server]\nworkers = 0\n")
    started.process.send_signal(signal.SIGHUP)
    await wait_for_log(started, "reload failed, keeping the running configuration")
    os.kill(worker_pids(started)[1], signal.SIGKILL)
    await wait_for_log(started, "a restarted worker keeps the running configuration")
    await trio.sleep(0.5)
    await send_ok(cli_stack, 8)
    assert len(await cli_stack.mxes[0].wait_for_messages(8)) == 8
    started.process.send_signal(signal.SIGTERM)
    assert await wait_exit(started, timeout=10) == 0
