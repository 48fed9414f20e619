"""Operating a real ``sidecar run`` process: the status endpoint and ``sidecar status``, the
per-transaction log line (text and JSON), health flips in the log, and SIGHUP reloads."""

from __future__ import annotations

import json
import resource
import signal
import urllib.request
from typing import Any

import tomli_w
import trio
import trustme

from testkit.metrics import value

from .harness import (
    MESSAGE,
    CliStack,
    Endpoint,
    Lab,
    Processes,
    RawSMTPClient,
    SidecarProcess,
    run_cli,
    send,
    wait_exit,
    wait_listening,
)


def write_config(stack: CliStack, config: dict[str, Any]) -> None:
    stack.config_path.write_text(tomli_w.dumps(config), encoding="utf-8")


def with_status(stack: CliStack, lab: Lab, **health: float) -> Endpoint:
    status = lab.addresses.endpoint()
    config = dict(stack.config)
    config["status"] = {"address": str(status)}
    config["ha_proxy_client"] = {**config["ha_proxy_client"], **health}
    stack.config = config
    write_config(stack, config)
    return status


async def http_get(endpoint: Endpoint, path: str) -> tuple[int, str]:
    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{endpoint}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    return await trio.to_thread.run_sync(get)


async def wait_for_log(started: SidecarProcess, text: str, timeout: float = 10) -> str:
    with trio.fail_after(timeout):
        while text not in started.stderr:
            await trio.sleep(0.05)
    return started.stderr


async def test_status_endpoint_and_status_command(
    cli_stack: CliStack, processes: Processes, lab: Lab
) -> None:
    status = with_status(cli_stack, lab)
    started = await processes.start(["run", "-c", str(cli_stack.config_path)])
    await wait_listening(cli_stack.listener, started)
    result = await send(cli_stack.listener, "a@client.test", ["rcpt@example.test"], MESSAGE)
    assert result.error is None and not result.refused, result

    assert await http_get(status, "/healthz") == (200, "ok\n")
    code, body = await http_get(status, "/status")
    assert code == 200
    data = json.loads(body)
    (server,) = data["servers"]
    assert server["server"] == str(cli_stack.haproxy.bind) and server["plumbed"] is True
    assert data["bindings"][0]["ha_proxy_src_addr"] == cli_stack.source
    assert data["counters"]["transactions_total"]["delivered"] == 1
    assert data["counters"]["recipients_total"]["accepted"] == 1
    assert data["dns"]["queries"] >= 1
    code, metrics = await http_get(status, "/metrics")
    assert code == 200
    assert value(metrics, "sidecar_transactions_total", binding="b1", outcome="delivered") == 1
    assert value(metrics, "sidecar_haproxy_server_plumbed", server=f"{cli_stack.haproxy.bind}") == 1
    assert value(metrics, "sidecar_upstream_connect_seconds_count") == 1
    assert (await http_get(status, "/nope"))[0] == 404

    probed = await run_cli("probe", "-c", str(cli_stack.config_path))
    assert probed.returncode == 0, probed.stderr
    shown = await run_cli("status", "-c", str(cli_stack.config_path))
    assert shown.returncode == 0, shown.stderr
    table = shown.stdout.decode()
    assert str(cli_stack.haproxy.bind) in table and "plumbed" in table
    assert cli_stack.source in table
    assert "transactions total: " in table and "delivered 1" in table

    started.process.send_signal(signal.SIGTERM)
    assert await wait_exit(started) == 0


async def test_health_flip_is_logged_and_shown(
    cli_stack: CliStack, processes: Processes, lab: Lab
) -> None:
    status = with_status(
        cli_stack,
        lab,
        health_check_interval=0.1,
        health_check_failure_threshold=2,
        health_check_success_threshold=2,
    )
    started = await processes.start(["run", "-c", str(cli_stack.config_path)])
    await wait_listening(cli_stack.listener, started)
    cli_stack.haproxy.stop()
    log = await wait_for_log(started, "is now unplumbed")
    assert "WARNING" in log and "2 consecutive failures" in log
    data = json.loads((await http_get(status, "/status"))[1])
    assert data["servers"][0]["plumbed"] is False
    assert data["servers"][0]["last_error"]
    shown = await run_cli("status", "-c", str(cli_stack.config_path))
    assert "UNPLUMBED" in shown.stdout.decode()
    cli_stack.haproxy.start()
    await wait_for_log(started, "is now plumbed")
    started.process.send_signal(signal.SIGTERM)
    assert await wait_exit(started) == 0


async def test_one_log_line_per_transaction(cli_stack: CliStack, processes: Processes) -> None:
    started = await processes.start(["run", "-c", str(cli_stack.config_path)])
    await wait_listening(cli_stack.listener, started)
    result = await send(cli_stack.listener, "a@client.test", ["rcpt@example.test"], MESSAGE)
    assert result.error is None and not result.refused, result
    log = await wait_for_log(started, "outcome=delivered")
    (line,) = [line for line in log.splitlines() if "sidecar.transaction" in line]
    for part in (
        "binding=b1",
        f"proxy={cli_stack.haproxy.bind}",
        f"source={cli_stack.source}",
        "mx=mx0.test",
        f"mx_address={cli_stack.mx_addresses[0]}",
        "tls=-",
        "rcpt=1/0/0",
        'reply="250 ',
        f"bytes={len(MESSAGE)}",  # RFC 1870 size: no final ".CRLF", no stuffing dots
    ):
        assert part in line, (part, line)
    started.process.send_signal(signal.SIGTERM)
    assert await wait_exit(started) == 0


async def test_json_log_lines(cli_stack: CliStack, processes: Processes) -> None:
    started = await processes.start(
        ["run", "-c", str(cli_stack.config_path), "--log-format", "json"]
    )
    await wait_listening(cli_stack.listener, started)
    result = await send(cli_stack.listener, "a@client.test", ["nobody@nxdomain.test"], MESSAGE)
    assert result.refused["nobody@nxdomain.test"][0] == 550
    log = await wait_for_log(started, '"outcome": ')
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]
    (entry,) = [entry for entry in entries if entry["logger"] == "sidecar.transaction"]
    assert entry["outcome"] == "aborted" and entry["rcpt"] == "0/0/1"
    assert entry["listener"] == str(cli_stack.listener)
    started.process.send_signal(signal.SIGTERM)
    assert await wait_exit(started) == 0


async def stop_during_a_transaction(stack: CliStack, started: SidecarProcess) -> None:
    """SIGTERM while a client is in DATA, which then ends its message within the grace: its
    transaction line comes after the "shutting down" warning, just before the exit."""
    async with await RawSMTPClient.connect(stack.listener) as client:
        assert (await client.read_reply()).startswith(b"220 ")
        assert (await client.command(b"EHLO client.test")).startswith(b"250")
        assert (await client.command(b"MAIL FROM:<a@client.test>")).startswith(b"250")
        assert (await client.command(b"RCPT TO:<rcpt@example.test>")).startswith(b"250")
        assert (await client.command(b"DATA")).startswith(b"354")
        started.process.send_signal(signal.SIGTERM)
        await wait_for_log(started, "shutting down")
        await client.send(MESSAGE + b".\r\n")
        assert (await client.read_reply()).startswith(b"250 ")


async def test_no_transaction_line_lost_on_sigterm(
    cli_stack: CliStack, processes: Processes
) -> None:
    # Lines are written in batches (up to 0.2 s late): those of the transactions before a
    # SIGTERM and of one that ends in the grace period all get out before the process ends.
    started = await processes.start(["run", "-c", str(cli_stack.config_path)])
    await wait_listening(cli_stack.listener, started)
    count = 20
    for _ in range(count):
        result = await send(cli_stack.listener, "a@client.test", ["rcpt@example.test"], MESSAGE)
        assert result.error is None and not result.refused, result
    await stop_during_a_transaction(cli_stack, started)
    assert await wait_exit(started) == 0
    lines = [line for line in started.stderr.splitlines() if "sidecar.transaction" in line]
    assert len(lines) == count + 1 and all("outcome=delivered" in line for line in lines), lines


async def test_sighup_reloads_new_sessions_use_it(
    cli_stack: CliStack, processes: Processes, lab: Lab
) -> None:
    started = await processes.start(["run", "-c", str(cli_stack.config_path)])
    await wait_listening(cli_stack.listener, started)
    mx = cli_stack.mxes[0]

    new_source = lab.addresses.ipv4()
    config = dict(cli_stack.config)
    config["binding"] = {"b1": {**config["binding"]["b1"], "ha_proxy_src_addr": new_source}}
    write_config(cli_stack, config)
    started.process.send_signal(signal.SIGHUP)
    await wait_for_log(started, "configuration reloaded")
    result = await send(cli_stack.listener, "a@client.test", ["rcpt@example.test"], MESSAGE)
    assert result.error is None and not result.refused, result
    (message,) = await mx.wait_for_messages(1)
    assert message.peer_host == new_source

    # The health checks follow the new server list.
    status = lab.addresses.endpoint()
    extra = lab.addresses.endpoint()
    config["status"] = {"address": str(status)}
    config["binding"]["b1"]["ha_proxy_server"] = [str(cli_stack.haproxy.bind), str(extra)]
    write_config(cli_stack, config)
    started.process.send_signal(signal.SIGHUP)
    await wait_for_log(started, "status.address changed")  # needs a restart: refused
    del config["status"]
    write_config(cli_stack, config)
    started.process.send_signal(signal.SIGHUP)
    with trio.fail_after(10):
        while started.stderr.count("configuration reloaded") < 2:
            await trio.sleep(0.05)
    await wait_for_log(started, f"HAProxy server {extra} is now unplumbed")

    # An invalid file is refused, and the running configuration stays.
    cli_stack.config_path.write_text("[binding.b1]\nha_proxy_src_addr = 1\n", encoding="utf-8")
    started.process.send_signal(signal.SIGHUP)
    await wait_for_log(started, "reload failed, keeping the running configuration")
    # A listener change needs a restart: refused too.
    moved = dict(config)
    moved["listener"] = [{"address": str(lab.addresses.endpoint()), "binding": "b1"}]
    write_config(cli_stack, moved)
    started.process.send_signal(signal.SIGHUP)
    await wait_for_log(started, "listener addresses changed")
    result = await send(cli_stack.listener, "a@client.test", ["rcpt@example.test"], MESSAGE)
    assert result.error is None and not result.refused, result
    messages = await mx.wait_for_messages(2)
    assert messages[1].peer_host == new_source
    started.process.send_signal(signal.SIGTERM)
    assert await wait_exit(started) == 0


async def test_sighup_with_an_unusable_ca_file_keeps_the_running_config(
    cli_stack: CliStack, processes: Processes
) -> None:
    """The CA bundle is read again on SIGHUP (a rotated bundle is picked up); one that cannot
    be used refuses the reload, says why, and delivery goes on with the running config."""
    ca_file = cli_stack.config_path.parent / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    config = dict(cli_stack.config)
    # opportunistic: the bundle is loaded, the test MX (no STARTTLS) still takes plaintext
    config["delivery"] = {**config["delivery"], "tls": "opportunistic", "tls_ca_file": str(ca_file)}
    write_config(cli_stack, config)
    started = await processes.start(["run", "-c", str(cli_stack.config_path)])
    await wait_listening(cli_stack.listener, started)
    ca_file.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    started.process.send_signal(signal.SIGHUP)
    log = await wait_for_log(started, "reload failed, keeping the running configuration")
    assert f'delivery.tls_ca_file: "{ca_file}" is not a PEM CA bundle' in log, log
    ca_file.unlink()
    started.process.send_signal(signal.SIGHUP)
    with trio.fail_after(10):
        while started.stderr.count("reload failed") < 2:
            await trio.sleep(0.05)
    assert f'cannot read "{ca_file}": No such file or directory' in started.stderr
    assert "Traceback" not in started.stderr
    result = await send(cli_stack.listener, "a@client.test", ["rcpt@example.test"], MESSAGE)
    assert result.error is None and not result.refused, result
    await cli_stack.mxes[0].wait_for_messages(1)
    started.process.send_signal(signal.SIGTERM)
    assert await wait_exit(started) == 0


async def test_sighup_keeps_open_sessions_on_their_config(
    cli_stack: CliStack, processes: Processes, lab: Lab
) -> None:
    """An open session keeps the configuration it started with."""
    started = await processes.start(["run", "-c", str(cli_stack.config_path)])
    await wait_listening(cli_stack.listener, started)
    async with await RawSMTPClient.connect(cli_stack.listener) as client:
        await client.read_reply()
        await client.command(b"EHLO client.test")
        new_source = lab.addresses.ipv4()
        config = dict(cli_stack.config)
        config["binding"] = {"b1": {**config["binding"]["b1"], "ha_proxy_src_addr": new_source}}
        write_config(cli_stack, config)
        started.process.send_signal(signal.SIGHUP)
        await wait_for_log(started, "configuration reloaded")
        assert (await client.command(b"MAIL FROM:<a@client.test>")).startswith(b"250")
        assert (await client.command(b"RCPT TO:<r@example.test>")).startswith(b"250")
        assert (await client.command(b"DATA")).startswith(b"354")
        assert (await client.command(MESSAGE + b".")).startswith(b"250")
    (message,) = await cli_stack.mxes[0].wait_for_messages(1)
    assert message.peer_host == cli_stack.source
    started.process.send_signal(signal.SIGTERM)
    assert await wait_exit(started) == 0


def _low_descriptor_limit() -> None:
    """In the child before exec: 256 descriptors, soft and hard (``ulimit -n 256``)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


async def _first_reply(endpoint: Endpoint, clients: list[RawSMTPClient]) -> bytes:
    """Connect and read the greeting (``b""`` if none came); a client greeted with 220 is
    kept open, idle, in ``clients``."""
    client = await RawSMTPClient.connect(endpoint)
    reply = b""
    with trio.move_on_after(5):
        reply = await client.read_reply()
    if reply.startswith(b"220 "):
        clients.append(client)
    else:
        await client.aclose()
    return reply


async def test_low_descriptor_limit_refuses_clients_and_keeps_haproxy_plumbed(
    cli_stack: CliStack, lab: Lab, processes: Processes
) -> None:
    """Issue 10, item 11: under ``ulimit -n 256`` with 300 idle clients, the sidecar admits
    what its descriptors allow and greets the rest with 421 4.3.2; a transaction still
    delivers while they stay connected, and HAProxy is never counted as failing."""
    status = with_status(cli_stack, lab, health_check_interval=0.5)
    cli_stack.config["server"] = {**cli_stack.config["server"], "client_command_timeout": 60}
    write_config(cli_stack, cli_stack.config)
    started = await processes.start(
        ["run", "-c", str(cli_stack.config_path)], preexec_fn=_low_descriptor_limit
    )
    await wait_listening(cli_stack.listener, started)

    idle: list[RawSMTPClient] = []
    try:
        async with trio.open_nursery() as nursery:
            greetings: list[bytes] = []

            async def connect() -> None:
                greetings.append(await _first_reply(cli_stack.listener, idle))

            for _ in range(300):
                nursery.start_soon(connect)
                await trio.sleep(0.002)
        admitted = [g for g in greetings if g.startswith(b"220 ")]
        refused = [g for g in greetings if g.startswith(b"421 4.3.2 ")]
        assert len(admitted) + len(refused) == 300, set(greetings) - set(admitted + refused)
        await wait_for_log(started, "max_connections 1000 reduced to")
        limit = json.loads((await http_get(status, "/status"))[1])["descriptors"]
        assert limit["limit"] == 256 and 0 < limit["max_sessions"] < 128, limit
        assert len(admitted) == limit["max_sessions"] and refused

        # Make room for one transaction; the other idle clients stay connected.
        for client in idle[:2]:
            await client.aclose()
        del idle[:2]
        with trio.fail_after(5):
            while True:
                counters = json.loads((await http_get(status, "/status"))[1])["counters"]
                if counters["sessions_active"] <= len(idle):
                    break
                await trio.sleep(0.05)

        async def knock() -> None:  # new clients keep being refused meanwhile
            for _ in range(50):
                client = await RawSMTPClient.connect(cli_stack.listener)
                async with client:
                    assert (await client.read_reply()).startswith((b"421 4.3.2 ", b"220 "))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(knock)
            result = await send(
                cli_stack.listener, "sender@client.test", ["rcpt@example.test"], MESSAGE
            )
        assert result.error is None and result.final is not None, result
        assert result.final[0] == 250, result
        assert any(m.data == MESSAGE for mx in cli_stack.mxes for m in mx.messages)
    finally:
        for client in idle:
            await client.aclose()

    await trio.sleep(1.5)  # a few health checks more
    data = json.loads((await http_get(status, "/status"))[1])
    (server,) = data["servers"]
    assert server["plumbed"] is True and server["consecutive_failures"] == 0, server
    assert server["last_error"] is None, server
    log = started.stderr
    assert "Cannot reach HAProxy" not in log and "unplumbed" not in log
    assert "Too many open files" not in log and "Traceback" not in log


async def test_probes_are_not_sessions_and_work_whatever_allowed_clients_says(
    cli_stack: CliStack, processes: Processes, lab: Lab
) -> None:
    """``sidecar probe`` (the container's HEALTHCHECK) counts as sidecar_probes_total, never
    as a client session, and passes without a WARNING when allowed_clients does not list
    the host it probes from; a real client that is refused is still counted and logged."""
    status = with_status(cli_stack, lab)
    path = str(cli_stack.config_path)
    started = await processes.start(["run", "-c", path])
    await wait_listening(cli_stack.listener, started)  # a TCP check: a probe too
    before = value((await http_get(status, "/metrics"))[1], "sidecar_probes_total") or 0
    for _ in range(2):
        probed = await run_cli("probe", "-c", path)
        assert probed.returncode == 0, probed.stderr
    metrics = (await http_get(status, "/metrics"))[1]
    assert value(metrics, "sidecar_probes_total") == before + 2, metrics
    assert value(metrics, "sidecar_sessions_total") == 0, metrics
    result = await send(cli_stack.listener, "a@client.test", ["rcpt@example.test"], MESSAGE)
    assert result.error is None and not result.refused, result
    metrics = (await http_get(status, "/metrics"))[1]
    assert value(metrics, "sidecar_sessions_total") == 1, metrics
    assert value(metrics, "sidecar_probes_total") == before + 2, metrics

    # allowed_clients without the loopback block: the probe still passes, quietly.
    config = dict(cli_stack.config)
    config["server"] = {**config["server"], "allowed_clients": ["192.0.2.0/24"]}
    write_config(cli_stack, config)
    started.process.send_signal(signal.SIGHUP)
    await wait_for_log(started, "configuration reloaded")
    probed = await run_cli("probe", "-c", path)
    assert probed.returncode == 0, probed.stderr
    metrics = (await http_get(status, "/metrics"))[1]
    assert value(metrics, "sidecar_probes_total") == before + 3, metrics
    assert value(metrics, "sidecar_connections_refused_total") == 0, metrics
    assert "refused client" not in started.stderr, started.stderr
    # A client that is refused for real is counted and logged as before.
    refused = await send(cli_stack.listener, "a@client.test", ["rcpt@example.test"], MESSAGE)
    assert refused.error is not None or refused.refused, refused
    await wait_for_log(started, "refused client")
    metrics = (await http_get(status, "/metrics"))[1]
    assert value(metrics, "sidecar_connections_refused_total") == 1, metrics
    assert value(metrics, "sidecar_sessions_total") == 1, metrics
