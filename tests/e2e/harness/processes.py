"""Running ``sidecar`` as a real process in e2e tests: the process manager and waiting helpers
(the stack it runs in comes from :mod:`.stack`)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from testkit.client import RawSMTPClient
from testkit.net import Endpoint

_ENTRY_POINT = shutil.which("sidecar", path=str(Path(sys.executable).parent))
SIDECAR = [_ENTRY_POINT] if _ENTRY_POINT else [sys.executable, "-m", "sidecar.cli"]


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

    async def start(
        self,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], object] | None = None,
    ) -> SidecarProcess:
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
                preexec_fn=preexec_fn,
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
