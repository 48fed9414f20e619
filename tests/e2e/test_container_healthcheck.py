"""The container's HEALTHCHECK script (container/healthcheck.py) against a real ``sidecar run``:
it finds the process through /proc and probes it with the configuration that process was
given, whatever ``SIDECAR_CONFIG`` says in the checker's own environment (the image's default
path, which a ``sidecar run -c OTHER`` does not use)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from .harness import CliStack, Processes, SidecarProcess, wait_exit, wait_listening

SCRIPT = Path(__file__).resolve().parents[2] / "container" / "healthcheck.py"


def only(started: SidecarProcess, tmp_path: Path) -> Path:
    """A /proc holding only this sidecar: other tests on this machine run theirs too."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / str(started.process.pid)).symlink_to(f"/proc/{started.process.pid}")
    return proc


async def check(proc: Path) -> subprocess.CompletedProcess[bytes]:
    """Run the script as Docker would: in the image's environment, where SIDECAR_CONFIG is a
    path the running sidecar need not use."""
    env = {**os.environ, "SIDECAR_CONFIG": "/nonexistent/sidecar.toml"}
    return await trio.run_process(
        [sys.executable, str(SCRIPT), "--proc", str(proc), "--timeout", "5"],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_healthcheck_finds_the_config_given_with_an_option(
    cli_stack: CliStack, processes: Processes, tmp_path: Path
) -> None:
    relative = os.path.relpath(cli_stack.config_path)  # resolved against the sidecar's cwd
    started = await processes.start(["run", f"--config={relative}"])
    await wait_listening(cli_stack.listener, started)
    proc = only(started, tmp_path)

    result = await check(proc)
    assert result.returncode == 0, result.stderr

    started.process.send_signal(signal.SIGTERM)
    assert await wait_exit(started) == 0
    result = await check(proc)
    assert result.returncode == 1
    assert b"no `sidecar run` process found" in result.stderr


async def test_healthcheck_finds_the_config_given_in_the_environment(
    cli_stack: CliStack, processes: Processes, tmp_path: Path
) -> None:
    started = await processes.start(["run"], env={"SIDECAR_CONFIG": str(cli_stack.config_path)})
    await wait_listening(cli_stack.listener, started)
    result = await check(only(started, tmp_path))
    assert result.returncode == 0, result.stderr
    started.process.send_signal(signal.SIGTERM)
    assert await wait_exit(started) == 0
