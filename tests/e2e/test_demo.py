"""The README's demo, as a user runs it: ``DEMO_ONCE=1 ./scripts/demo.sh`` (several times in a
row: it once failed 3 times in 4 because its own port probe reset the demo MX, whose handler let
the error cancel the whole server), and the demo MX on its own against peers that reset."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest
import trio

from .harness import (
    Endpoint,
    Lab,
    RawSMTPClient,
    fixed_ipv4,
    free_port,
    reset_connection,
)

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "scripts" / "demo.sh"
DEMO_MX = ROOT / "scripts" / "demo_mx.py"
RESETS = [None, b"", b"EHLO c.test\r\n", b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\n"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the demo runs as root (apt, TPROXY)")


async def _banner(endpoint: Endpoint) -> bool:
    """Whether an SMTP banner comes from ``endpoint`` (read, then QUIT: no reset)."""
    try:
        async with await RawSMTPClient.connect(endpoint) as client:
            banner = await client.read_reply()
            await client.command(b"QUIT")
    except OSError:
        return False
    return banner.startswith(b"220 ")


@pytest.fixture
async def demo_mx(lab: Lab) -> AsyncIterator[tuple[Endpoint, trio.Process]]:
    host = lab.addresses.ipv4()
    endpoint = Endpoint(host, free_port(host))
    process = await trio.lowlevel.open_process(
        [sys.executable, str(DEMO_MX), endpoint.host, str(endpoint.port)],
        stdout=subprocess.PIPE,
    )
    try:
        with trio.fail_after(10):
            while not await _banner(endpoint):
                await trio.sleep(0.05)
        yield endpoint, process
    finally:
        process.kill()
        await process.wait()


async def test_demo_mx_survives_peers_that_reset(
    demo_mx: tuple[Endpoint, trio.Process],
) -> None:
    endpoint, process = demo_mx
    for _ in range(3):
        for before in RESETS:
            await trio.to_thread.run_sync(reset_connection, endpoint, before)
    await trio.sleep(0.2)  # let it meet every reset
    assert process.poll() is None

    def deliver() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP(endpoint.host, endpoint.port, timeout=5) as client:
            return client.sendmail("a@c.test", ["r@demo.test"], b"Subject: x\r\n\r\nhi\r\n")

    assert await trio.to_thread.run_sync(deliver) == {}
    assert process.poll() is None
    assert process.stdout is not None
    with trio.fail_after(5):
        line = await process.stdout.receive_some()
    assert line.startswith(b"demo MX: message from source address "), line


async def test_demo_script_runs_as_the_readme_says(tmp_path: Path) -> None:
    """``DEMO_ONCE=1 ./scripts/demo.sh``, three times in a row. DEMO_NET puts it on this test
    worker's fixed addresses (127.N.0.1-5: no other test's, no other worker's) and DEMO_DIR
    its files under tmp_path; it installs nothing when everything is installed."""
    net = fixed_ipv4(1).rsplit(".", 1)[0]
    env = {**os.environ, "DEMO_ONCE": "1", "DEMO_NET": net}
    for run in range(3):
        env["DEMO_DIR"] = str(tmp_path / f"demo-run-{run}")
        process = subprocess.Popen(
            ["./scripts/demo.sh"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            output, _ = await trio.to_thread.run_sync(partial(process.communicate, timeout=120))
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        text = output.decode(errors="replace")
        assert process.returncode == 0, f"run {run}:\n{text}"
        assert f"==> OK: the MX saw the binding's source address {net}.5\n" in text, text
        assert f"demo MX: message from source address {net}.5: " in text, text
