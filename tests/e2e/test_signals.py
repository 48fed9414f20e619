"""Signals on a real ``sidecar run`` (issue 10, item 9): signals during the shutdown grace are
handled, never fatal, and never cost a reply the MX already owes; a SIGHUP right after the
start does not kill the process. With one process and with ``server.workers = 2``."""

from __future__ import annotations

import signal

import pytest
import trio

from .harness import (
    MESSAGE,
    CliStack,
    Lab,
    Processes,
    RawSMTPClient,
    SidecarProcess,
    send,
    wait_exit,
    wait_listening,
)
from .test_workers import start_workers, with_workers

BODY = b"Subject: signals\r\n\r\nHello.\r\n"


async def start(
    cli_stack: CliStack, processes: Processes, lab: Lab, workers: int
) -> SidecarProcess:
    if workers > 1:
        with_workers(cli_stack, lab, workers)
        return await start_workers(cli_stack, processes)
    started = await processes.start(["run", "-c", str(cli_stack.config_path)])
    await wait_listening(cli_stack.listener, started)
    return started


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("second", ["SIGHUP", "SIGTERM", "SIGINT"])
async def test_signals_during_the_grace_never_cost_an_owed_reply(
    cli_stack: CliStack, processes: Processes, lab: Lab, second: str, workers: int
) -> None:
    """SIGTERM while the MX holds a message's end of data (and answers after 2 s), then
    ``second`` twice: the process keeps going, the client gets the MX's own reply, exit 0.
    Before, the second signal killed the process and the client, told nothing, resent."""
    started = await start(cli_stack, processes, lab, workers)
    for mx in cli_stack.mxes:
        mx.delays["END"] = 2
    async with await RawSMTPClient.connect(cli_stack.listener) as client:
        assert (await client.read_reply()).startswith(b"220 ")
        for command in (
            b"EHLO client.test",
            b"MAIL FROM:<a@client.test>",
            b"RCPT TO:<rcpt@example.test>",
            b"DATA",
        ):
            assert (await client.command(command))[:1] in (b"2", b"3")
        await client.send(BODY + b".\r\n")
        mx = cli_stack.mxes[0]
        await mx.wait_for(lambda: len(mx.messages) == 1)  # the end of data is at the MX
        started.process.send_signal(signal.SIGTERM)
        await trio.sleep(0.3)
        for _ in range(2):
            started.process.send_signal(signal.Signals[second])
            await trio.sleep(0.2)
        with trio.fail_after(10):
            final = await client.read_reply()
        assert final == mx.messages[0].reply and final.startswith(b"250 "), started.stderr
    assert await wait_exit(started, timeout=15) == 0, started.stderr
    assert "Traceback" not in started.stderr


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_right_after_the_start_is_not_fatal(
    cli_stack: CliStack, processes: Processes, lab: Lab, workers: int
) -> None:
    if workers > 1:
        with_workers(cli_stack, lab, workers)
    started = await processes.start(["run", "-c", str(cli_stack.config_path)])
    for _ in range(5):  # through the interpreter's start, the imports and the first bind
        await trio.sleep(0.08)
        started.process.send_signal(signal.SIGHUP)
    await wait_listening(cli_stack.listener, started)
    started.process.send_signal(signal.SIGHUP)
    result = await send(cli_stack.listener, "a@client.test", ["rcpt@example.test"], MESSAGE)
    assert result.error is None and not result.refused, (result, started.stderr)
    assert started.process.returncode is None, started.stderr
    started.process.send_signal(signal.SIGTERM)
    assert await wait_exit(started) == 0, started.stderr
