"""Operating traffic shaping on a real ``sidecar run`` (issue 12): ``sidecar suspend`` makes
the next message get 451 4.4.5 without reaching the MX, ``sidecar resume`` lets it through,
/metrics shows the deferral and the suspension, ``sidecar route`` the site, the limits with
their scope and the usage now. Real HAProxy, dnsmasq and test MX."""

from __future__ import annotations

import signal

from testkit.metrics import value

from .harness import (
    MESSAGE,
    CliStack,
    Lab,
    Processes,
    final_status,
    run_cli,
    send,
    wait_exit,
    wait_listening,
)
from .test_operations import http_get, wait_for_log, with_status, write_config

SHAPING = {
    "max_message_rate": "1000/min",
    "site": {"testmx": {"mx": ["mx*.test"], "connection_limit": 3}},
}


def _commands(stack: CliStack) -> int:
    return sum(len(c.commands) for mx in stack.mxes for c in mx.connections)


async def test_suspend_resume_metrics_and_route(
    cli_stack: CliStack, processes: Processes, lab: Lab
) -> None:
    status = with_status(cli_stack, lab)
    config = {**cli_stack.config, "shaping": SHAPING}
    cli_stack.config = config
    write_config(cli_stack, config)
    path = str(cli_stack.config_path)
    started = await processes.start(["run", "-c", path])
    await wait_listening(cli_stack.listener, started)
    (binding,) = config["binding"]

    routed = await run_cli("route", "-c", path, "rcpt@example.test")
    shown = routed.stdout.decode()
    assert routed.returncode == 0, routed.stderr
    assert "shaping:   site testmx (named site), backend memory" in shown, shown
    assert f"egress {cli_stack.source} -> testmx:" in shown, shown
    assert 'connection_limit: 3 (shaping.site."testmx")' in shown, shown
    assert "max_message_rate: 1000/min (shaping)" in shown, shown
    assert "no recent use of this path" in shown, shown

    first = await send(cli_stack.listener, "a@client.test", ["r1@example.test"], MESSAGE)
    assert final_status(first) == (250, "2.0.0"), first

    suspended = await run_cli(
        "suspend", "-c", path, "--binding", binding, "--site", "MX1.test.,mx0.test",
        "--duration", "1h", "--reason", "e2e by hand",
    )  # fmt: skip
    assert suspended.returncode == 0, suspended.stderr
    said = suspended.stdout.decode()
    assert f"suspended egress {cli_stack.source} to site testmx for 3600s: e2e by hand" in said
    await wait_for_log(started, "control request POST /shaping/suspend from 127.")

    before = _commands(cli_stack)
    later = await send(cli_stack.listener, "a@client.test", ["r2@example.test"], MESSAGE)
    code, text = later.refused["r2@example.test"]
    assert code == 451 and text.startswith(b"4.4.5 ") and b"suspended" in text, text
    assert _commands(cli_stack) == before  # the MX saw nothing of it

    code, metrics = await http_get(status, "/metrics")
    assert code == 200
    labels = {"binding": binding, "site": "testmx"}
    assert value(metrics, "sidecar_shaping_enabled") == 1, metrics
    assert value(metrics, "sidecar_shaping_backend_degraded", backend="memory") == 0, metrics
    assert value(metrics, "sidecar_shaping_deferrals_total", **labels, limit="suspended") == 1
    assert value(metrics, "sidecar_shaping_suspensions", **labels) == 1, metrics
    routed = await run_cli("route", "-c", path, "rcpt@example.test")
    assert "SUSPENDED for " in routed.stdout.decode() and "e2e by hand" in routed.stdout.decode()
    table = (await run_cli("status", "-c", path)).stdout.decode()
    assert "traffic shaping: backend memory" in table and "SUSPENDED" in table, table

    resumed = await run_cli("resume", "-c", path, "--binding", binding, "--site", "testmx")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed egress {cli_stack.source} to site testmx" in resumed.stdout.decode()
    again = await send(cli_stack.listener, "a@client.test", ["r3@example.test"], MESSAGE)
    assert final_status(again) == (250, "2.0.0"), again
    metrics = (await http_get(status, "/metrics"))[1]
    assert value(metrics, "sidecar_shaping_suspensions", **labels) == 0, metrics

    unknown = await run_cli("suspend", "-c", path, "--binding", "nope", "--site", "x",
                            "--duration", "1h")  # fmt: skip
    assert unknown.returncode == 2 and b"no binding 'nope'" in unknown.stderr

    started.process.send_signal(signal.SIGTERM)
    assert await wait_exit(started) == 0
    gone = await run_cli("resume", "-c", path, "--binding", binding, "--site", "testmx")
    assert gone.returncode == 1 and b"is the sidecar running?" in gone.stderr, gone.stderr
    routed = await run_cli("route", "-c", path, "rcpt@example.test")
    assert "now: not running (no answer from" in routed.stdout.decode(), routed.stdout


async def test_suspend_without_a_status_endpoint_says_so(cli_stack: CliStack) -> None:
    config = {**cli_stack.config, "shaping": SHAPING}
    write_config(cli_stack, config)
    (binding,) = config["binding"]
    done = await run_cli(
        "suspend", "-c", str(cli_stack.config_path), "--binding", binding, "--site", "testmx",
        "--duration", "2h",
    )  # fmt: skip
    assert done.returncode == 2
    assert b"status.address is not set" in done.stderr, done.stderr
