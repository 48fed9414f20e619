"""The command line as a real process: ``sidecar run`` delivering through a real HAProxy, dnsmasq
and a TestMX, stopping on SIGTERM/SIGINT, refusing bad configurations and busy addresses;
``sidecar route`` explaining a route from the same configuration."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest
import tomli_w
import trio

from .harness import RawSMTPClient
from .processes import (
    CliStack,
    Processes,
    refuses_connections,
    run_cli,
    wait_exit,
    wait_listening,
)
from .stack import MESSAGE, send

# -- sidecar run -------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_run_delivers_and_stops_on_signal(
    cli_stack: CliStack, processes: Processes, signum: signal.Signals
) -> None:
    started = await processes.start(["run", "-c", str(cli_stack.config_path)])
    await wait_listening(cli_stack.listener, started)
    result = await send(cli_stack.listener, "a@client.test", ["rcpt@example.test"], MESSAGE)
    assert result.error is None and not result.refused, (result, started.stderr)
    mx0 = cli_stack.mxes[0]
    (message,) = await mx0.wait_for_messages(1)
    assert message.data == MESSAGE
    assert message.peer_host == cli_stack.source
    assert result.final is not None and result.final[0] == 250
    assert result.final[1].decode() in message.reply.decode()
    assert cli_stack.mxes[1].connections == []

    started.process.send_signal(signum)
    assert await wait_exit(started) == 0, started.stderr
    assert refuses_connections(cli_stack.listener)
    assert signum.name in started.stderr


async def test_run_stops_promptly_with_an_idle_client(
    cli_stack: CliStack, processes: Processes
) -> None:
    """An MTA holding an idle session open must not hold up the shutdown for the whole grace
    period; the client is told 421 before the close."""
    config = dict(cli_stack.config)
    config["server"] = {**config["server"], "shutdown_grace": 30}
    cli_stack.config_path.write_text(tomli_w.dumps(config), encoding="utf-8")
    started = await processes.start(["run", "-c", str(cli_stack.config_path)])
    await wait_listening(cli_stack.listener, started)
    async with await RawSMTPClient.connect(cli_stack.listener) as client:
        assert (await client.read_reply()).startswith(b"220 ")
        assert (await client.command(b"EHLO client.test")).startswith(b"250")
        started.process.send_signal(signal.SIGTERM)
        assert await wait_exit(started) == 0, started.stderr
        with trio.fail_after(2):
            assert (await client.read_reply()).startswith(b"421 4.3.0 ")
            assert await client.read_reply() == b""


async def test_run_with_sidecar_config_env(cli_stack: CliStack, processes: Processes) -> None:
    started = await processes.start(["run"], env={"SIDECAR_CONFIG": str(cli_stack.config_path)})
    await wait_listening(cli_stack.listener, started)
    result = await send(cli_stack.listener, "a@client.test", ["rcpt@example.test"], MESSAGE)
    assert result.error is None and not result.refused, result
    (message,) = await cli_stack.mxes[0].wait_for_messages(1)
    assert message.data == MESSAGE
    started.process.send_signal(signal.SIGTERM)
    assert await wait_exit(started) == 0, started.stderr


async def test_run_invalid_config_exits_2_and_never_listens(
    cli_stack: CliStack, processes: Processes
) -> None:
    text = cli_stack.config_path.read_text()
    bad = text.replace(f'ha_proxy_src_addr = "{cli_stack.source}"', 'ha_proxy_src_addr = "1.2.3"')
    assert bad != text
    cli_stack.config_path.write_text(bad)
    started = await processes.start(["run", "-c", str(cli_stack.config_path)])
    assert await wait_exit(started, 10) == 2
    assert started.stderr == 'error: binding.b1.ha_proxy_src_addr: "1.2.3" is not an IPv4 address\n'
    assert started.stdout == ""
    assert refuses_connections(cli_stack.listener)


async def test_run_missing_config_exits_2(tmp_path: Path, processes: Processes) -> None:
    started = await processes.start(["run", "-c", str(tmp_path / "absent.toml")])
    assert await wait_exit(started, 10) == 2
    assert started.stderr.startswith("error: cannot read ")


async def test_run_listener_address_in_use(cli_stack: CliStack, processes: Processes) -> None:
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(cli_stack.listener.as_tuple())
        busy.listen()
        started = await processes.start(["run", "-c", str(cli_stack.config_path)])
        code = await wait_exit(started, 10)
    assert code not in (0, None)
    stderr = started.stderr
    assert stderr == f"error: cannot listen on {cli_stack.listener}: Address already in use\n"


# -- sidecar route -----------------------------------------------------------------------------


async def test_route_explains_binding_proxy_and_mx_order(cli_stack: CliStack) -> None:
    result = await run_cli("route", "-c", str(cli_stack.config_path), "user@example.test")
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    lines = out.splitlines()
    a0, a1 = cli_stack.mx_addresses
    source, port = cli_stack.source, cli_stack.port
    assert lines == [
        "recipient: user@example.test",
        f"listener:  {cli_stack.listener} -> binding b1",
        "binding:   b1",
        "tls:       disabled",
        f"proxy:     {cli_stack.haproxy.bind} - answers (plumbed)",
        "MX hosts for example.test:",
        f"     10 mx0.test: {a0}",
        f"     20 mx1.test: {a1}",
        "tried in this order (at most 5):",
        f"  mx0.test [{a0}]: PROXY source {source} -> {a0}:{port}",
        f"  mx1.test [{a1}]: PROXY source {source} -> {a1}:{port}",
    ]
    # Nothing was sent: route only looks.
    assert all(mx.connections == [] for mx in cli_stack.mxes)


async def test_route_nxdomain_is_550_and_exit_1(cli_stack: CliStack) -> None:
    result = await run_cli("route", "-c", str(cli_stack.config_path), "user@nowhere.test")
    out = result.stdout.decode()
    assert result.returncode == 1, out + result.stderr.decode()
    assert "result:    550 5.1.2 " in out
    assert "MX hosts" not in out


async def test_route_with_the_proxy_down_shows_its_state(cli_stack: CliStack) -> None:
    cli_stack.haproxy.stop()
    result = await run_cli("route", "-c", str(cli_stack.config_path), "user@example.test")
    out = result.stdout.decode()
    assert result.returncode == 1, out + result.stderr.decode()
    assert f"proxy:     {cli_stack.haproxy.bind} - unplumbed: " in out
    assert "result:    451 4.4.1 " in out
