"""The command line as a real process: ``sidecar run`` delivering through a real HAProxy, dnsmasq
and a TestMX, stopping on SIGTERM/SIGINT, refusing bad configurations and busy addresses;
``sidecar route`` explaining a route from the same configuration."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
import trio
import trustme

from .harness import (
    MESSAGE,
    SIDECAR,
    CliStack,
    Processes,
    RawSMTPClient,
    refuses_connections,
    run_cli,
    send,
    wait_exit,
    wait_listening,
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


# -- files the configuration names (issue 10 item 13) ----------------------------------------

AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users may enter (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="sidecar-ca-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _config_with_ca_file(cli_stack: CliStack, directory: Path, ca_file: Path) -> Path:
    config = dict(cli_stack.config)
    config["delivery"] = {**config["delivery"], "tls": "verify", "tls_ca_file": str(ca_file)}
    path = directory / "sidecar.toml"
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    path.chmod(0o644)
    return path


async def _sidecar(*args: str, user: list[str] | None = None) -> tuple[int, str]:
    with trio.fail_after(20):
        done = await trio.run_process(
            [*(user or []), *SIDECAR, *args], capture_stdout=True, capture_stderr=True, check=False
        )
    return done.returncode, done.stderr.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the check as another user")
async def test_check_and_run_read_the_ca_file_as_the_run_user(
    cli_stack: CliStack, processes: Processes, shared_dir: Path
) -> None:
    """A CA bundle only root may read passes for root, and fails `sidecar check` and
    `sidecar run` for the user who runs them (before: check passed, and each verified
    delivery ended with a traceback and 421 after STARTTLS was sent)."""
    ca_file = shared_dir / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    ca_file.chmod(0o600)
    config_path = _config_with_ca_file(cli_stack, shared_dir, ca_file)
    assert (await _sidecar("check", "-c", str(config_path)))[0] == 0
    expected = f'error: delivery.tls_ca_file: cannot read "{ca_file}": Permission denied\n'
    code, stderr = await _sidecar("check", "-c", str(config_path), user=AS_NOBODY)
    assert (code, stderr) == (2, expected)
    code, stderr = await _sidecar("run", "-c", str(config_path), user=AS_NOBODY)
    assert (code, stderr) == (2, expected)
    assert refuses_connections(cli_stack.listener)


@pytest.mark.parametrize("ca", ["missing", "garbage-pem", "not-pem"])
async def test_check_refuses_a_ca_file_it_cannot_use(
    cli_stack: CliStack, shared_dir: Path, ca: str
) -> None:
    ca_file = shared_dir / "ca.pem"
    if ca == "garbage-pem":
        ca_file.write_text(
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
        )
    elif ca == "not-pem":
        ca_file.write_text("just text\n")
    config_path = _config_with_ca_file(cli_stack, shared_dir, ca_file)
    code, stderr = await _sidecar("check", "-c", str(config_path))
    assert code == 2, stderr
    if ca == "missing":
        assert stderr == (
            f'error: delivery.tls_ca_file: cannot read "{ca_file}": No such file or directory\n'
        )
    else:
        assert stderr.startswith(f'error: delivery.tls_ca_file: "{ca_file}" is not a PEM CA'), (
            stderr
        )
    assert "Traceback" not in stderr


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
        "mta-sts:   no policy for example.test (deliver as before)",
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
    assert "MX hosts for nowhere.test: none (550 5.1.2 " in out
    assert "down:      DNS of nowhere.test" in out


async def test_route_with_the_proxy_down_shows_its_state(cli_stack: CliStack) -> None:
    cli_stack.haproxy.stop()
    result = await run_cli("route", "-c", str(cli_stack.config_path), "user@example.test")
    out = result.stdout.decode()
    assert result.returncode == 1, out + result.stderr.decode()
    assert f"proxy:     {cli_stack.haproxy.bind} - unplumbed: " in out
    assert "result:    451 4.4.1 " in out
    # The rest of the path all the same: the MX hosts, their addresses, the source of each,
    # and which part is down.
    a0, a1 = cli_stack.mx_addresses
    source, port = cli_stack.source, cli_stack.port
    assert "binding:   b1 - DOWN (no proxy answers)" in out
    assert f"     10 mx0.test: {a0}" in out and f"     20 mx1.test: {a1}" in out
    assert f"  mx0.test [{a0}]: PROXY source {source} -> {a0}:{port}" in out
    assert f"  mx1.test [{a1}]: PROXY source {source} -> {a1}:{port}" in out
    assert "down:      HAProxy of binding b1" in out
