"""A foreground subprocess owned by one test: start, wait until ready, stop, kill, restart.

stdout/stderr go to files in the test's directory (appended across restarts) so a failure can
show them; :meth:`ManagedProcess.logs` returns both. Processes started from the main thread
also get ``PR_SET_PDEATHSIG``, so they die with the test run even if pytest itself is killed
(not set from other threads: the signal fires when the starting *thread* exits).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Self

__all__ = ["HarnessError", "ManagedProcess", "wait_until"]

_PR_SET_PDEATHSIG = 1
_live: weakref.WeakSet[ManagedProcess] = weakref.WeakSet()


class HarnessError(RuntimeError):
    """The test harness could not set something up (the message includes the process logs)."""


def wait_until(
    probe: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Poll ``probe`` until it returns true, with a short growing pause between attempts.

    Raises :class:`HarnessError` after ``timeout`` seconds, or as soon as ``alive`` says the
    thing being waited for has died.
    """
    deadline = time.monotonic() + timeout
    pause = 0.002
    while True:
        if probe():
            return
        if alive is not None and not alive():
            raise HarnessError(f"{what}: process exited while waiting")
        now = time.monotonic()
        if now >= deadline:
            raise HarnessError(f"{what}: not ready after {timeout:.1f}s")
        time.sleep(min(pause, deadline - now))
        pause = min(pause * 2, 0.05)


def _pdeathsig_preexec() -> Callable[[], None] | None:
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    return preexec


class ManagedProcess:
    """Base class: subclasses provide :meth:`argv` and :meth:`ready`, maybe :meth:`prepare`."""

    name = "process"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = workdir / f"{self.name}.stdout.log"
        self.stderr_path = workdir / f"{self.name}.stderr.log"
        self._process: subprocess.Popen[bytes] | None = None

    # -- to override -------------------------------------------------------------------------

    def argv(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write configuration files; called before every start."""

    def ready(self) -> bool:
        """One quick readiness probe (must not block for long)."""
        raise NotImplementedError

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def start(self, timeout: float = 10.0) -> None:
        """Start the process and return once :meth:`ready` says so."""
        if self.running:
            raise HarnessError(f"{self.name} is already running (pid {self.pid})")
        self.prepare()
        with (
            self.stdout_path.open("ab") as stdout,
            self.stderr_path.open("ab") as stderr,
        ):
            self._process = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                preexec_fn=_pdeathsig_preexec(),
            )
        _live.add(self)
        try:
            wait_until(self.ready, timeout=timeout, what=self.name, alive=lambda: self.running)
        except HarnessError as exc:
            rc = self.returncode
            self.kill()
            raise HarnessError(
                f"{self.name} did not start (exit status {rc}): {exc}\n"
                f"command: {' '.join(self.argv())}\n{self.logs()}"
            ) from None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Idempotent."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        _live.discard(self)

    def kill(self) -> None:
        """SIGKILL (simulates a crash) and reap. Idempotent."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        process.wait()
        _live.discard(self)

    def restart(self, timeout: float = 10.0) -> None:
        self.stop()
        self.start(timeout)

    def logs(self) -> str:
        """Everything the process wrote so far, stdout then stderr."""
        parts = []
        for label, path in (("stdout", self.stdout_path), ("stderr", self.stderr_path)):
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {self.name} {label} ({path}) ---\n{text}")
        return "\n".join(parts)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_live):
        process.kill()
