"""The command line as a real process: ``sidecar run`` delivering through a real HAProxy, dnsmasq
and a TestMX, stopping on SIGTERM/SIGINT, refusing bad configurations and busy addresses;
``sidecar route`` explaining a route from the same configuration."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import trio

from .harness import (
    Addresses,
    DnsmasqFactory,
    Endpoint,
    HAProxy,
    HAProxyFactory,
    HostRecord,
    MXFactory,
    MXRecord,
    RawSMTPClient,
    TestMX,
    free_port,
)
from .stack import FAST_DELIVERY, FAST_SERVER, MESSAGE, make_config, send

_ENTRY_POINT = shutil.which("sidecar", path=str(Path(sys.executable).parent))
SIDECAR = [_ENTRY_POINT] if _ENTRY_POINT else [sys.executable, "-m", "sidecar.cli"]


@dataclass
class CliStack:
    config_path: Path
    config: dict[str, Any]
    listener: Endpoint
    haproxy: HAProxy
    mxes: list[TestMX]
    mx_addresses: list[str]
    source: str
    port: int


@dataclass
class SidecarProcess:
    process: trio.Process
    stdout_path: Path
    stderr_path: Path

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")


class Processes:
    """Starts ``sidecar`` processes and kills whatever is still running at the test's end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[SidecarProcess] = []

    async def start(self, args: Sequence[str], env: dict[str, str] | None = None) -> SidecarProcess:
        index = len(self.started)
        stdout_path = self.workdir / f"sidecar{index}.stdout.log"
        stderr_path = self.workdir / f"sidecar{index}.stderr.log"
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            process = await trio.lowlevel.open_process(
                [*SIDECAR, *args],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env={**os.environ, **(env or {})},
            )
        started = SidecarProcess(process, stdout_path, stderr_path)
        self.started.append(started)
        return started

    async def stop_all(self) -> None:
        for started in self.started:
            if started.process.returncode is None:
                started.process.kill()
            with trio.CancelScope(shield=True):
                await started.process.wait()
            print(f"--- sidecar stderr ---\n{started.stderr}")


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[Processes]:
    manager = Processes(tmp_path)
    try:
        yield manager
    finally:
        await manager.stop_all()


@pytest.fixture
async def cli_stack(
    tmp_path: Path,
    addresses: Addresses,
    haproxy_factory: HAProxyFactory,
    dnsmasq_factory: DnsmasqFactory,
    mx_factory: MXFactory,
) -> CliStack:
    """Two MX hosts for example.test (mx0.test pref 10, mx1.test pref 20), dnsmasq, HAProxy and
    a config file naming them; no sidecar yet."""
    mx_addresses = [addresses.ipv4(), addresses.ipv4()]
    port = free_port(mx_addresses[0])
    mxes = [await mx_factory(Endpoint(address, port)) for address in mx_addresses]
    dns = dnsmasq_factory(
        [
            MXRecord("example.test", "mx0.test", 10),
            MXRecord("example.test", "mx1.test", 20),
            HostRecord("mx0.test", [mx_addresses[0]]),
            HostRecord("mx1.test", [mx_addresses[1]]),
        ]
    )
    haproxy = haproxy_factory()
    source = addresses.ipv4()
    listener = addresses.endpoint()
    config = make_config(
        listeners=[(str(listener), "b1")],
        bindings={"b1": {"ha_proxy_server": str(haproxy.bind), "ha_proxy_src_addr": source}},
        nameserver=dns.endpoint,
        port=port,
        delivery=FAST_DELIVERY,
        server=FAST_SERVER,
    )
    path = tmp_path / "sidecar.toml"
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return CliStack(path, config, listener, haproxy, mxes, mx_addresses, source, port)


async def wait_listening(endpoint: Endpoint, started: SidecarProcess, timeout: float = 10) -> None:
    """Until the listener answers with a 220 banner (fails early if the process exits)."""
    with trio.fail_after(timeout):
        while True:
            if started.process.poll() is not None:
                pytest.fail(f"sidecar exited with {started.process.returncode}:\n{started.stderr}")
            try:
                client = await RawSMTPClient.connect(endpoint)
            except OSError:
                await trio.sleep(0.05)
                continue
            async with client:
                banner = await client.read_reply()
                await client.send(b"QUIT\r\n")
            assert banner.startswith(b"220 sidecar.test "), banner
            return


async def wait_exit(started: SidecarProcess, timeout: float = 5) -> int:
    with trio.fail_after(timeout):
        return await started.process.wait()


def refuses_connections(endpoint: Endpoint) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(endpoint.as_tuple()) != 0


async def run_cli(*args: str, timeout: float = 20) -> trio.CompletedProcess[bytes]:
    with trio.fail_after(timeout):
        return await trio.run_process(
            [*SIDECAR, *args], capture_stdout=True, capture_stderr=True, check=False
        )


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
