"""The container's HEALTHCHECK: ``sidecar probe`` with the configuration the running sidecar
was started with, however it was given (``sidecar run -c FILE``, ``--config=FILE`` or
``$SIDECAR_CONFIG``, relative to the sidecar's working directory).

Docker runs a health check as a new process in the container, with the image's environment,
not with the options of the command that runs: a bare ``sidecar probe`` would only find
``$SIDECAR_CONFIG`` (the image's default path) and call a container started with
``sidecar run -c /config/other.toml`` unhealthy. This finds the ``sidecar run`` process in
/proc (PID 1 in the image, or a child of an init such as ``docker run --init``), reads its
command line, environment and working directory, and runs ``sidecar probe -c FILE``.

Exit status: that of ``sidecar probe`` (0 healthy), or 1 when no ``sidecar run`` is found.
Usage: healthcheck.py [--proc DIR] [PROBE OPTIONS...]   (e.g. --timeout 5)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

CONFIG_ENVVAR = "SIDECAR_CONFIG"


def run_options(argv: Sequence[str]) -> list[str] | None:
    """The options after ``run`` when ``argv`` is a ``sidecar run`` command line (the console
    script, or ``python -m sidecar.cli``), else None."""
    if "run" not in argv:
        return None
    run = argv.index("run")
    if not any(Path(arg).name == "sidecar" or arg == "sidecar.cli" for arg in argv[:run]):
        return None
    return list(argv[run + 1 :])


def config_option(options: Sequence[str]) -> str | None:
    """The last ``-c/--config`` value among ``sidecar run``'s options (click's forms: ``-c F``,
    ``-cF``, ``--config F``, ``--config=F``), or None."""
    found = None
    items = iter(options)
    for arg in items:
        if arg == "--":
            break
        if arg in ("-c", "--config"):
            found = next(items, None)
        elif arg.startswith("--config="):
            found = arg.removeprefix("--config=")
        elif arg.startswith("-c") and len(arg) > 2 and not arg.startswith("--"):
            found = arg[2:]
    return found


def _read_nul_separated(path: Path) -> list[str]:
    return [item.decode(errors="surrogateescape") for item in path.read_bytes().split(b"\0")[:-1]]


def running_configs(proc: Path) -> Iterator[str]:
    """The configuration path of each ``sidecar run`` process under ``proc``, absolute (a
    relative one is resolved against that process's working directory), lowest PID first."""
    pids = sorted(int(entry.name) for entry in proc.iterdir() if entry.name.isdigit())
    for pid in pids:
        base = proc / str(pid)
        try:
            options = run_options(_read_nul_separated(base / "cmdline"))
            if options is None:
                continue
            path = config_option(options)
            if path is None:
                environ = dict(
                    item.partition("=")[::2] for item in _read_nul_separated(base / "environ")
                )
                path = environ.get(CONFIG_ENVVAR)
            if path and not os.path.isabs(path):
                path = os.path.join(os.readlink(base / "cwd"), path)
        except OSError:  # gone meanwhile, or another user's
            continue
        if path:
            yield path


def main(args: list[str]) -> int:
    proc = Path("/proc")
    if args[:1] == ["--proc"] and len(args) > 1:
        proc, args = Path(args[1]), args[2:]
    config = next(running_configs(proc), None)
    if config is None:
        print("unhealthy: no `sidecar run` process found", file=sys.stderr)
        return 1
    sidecar = os.path.join(os.path.dirname(sys.executable), "sidecar")
    os.execv(sidecar, [sidecar, "probe", "-c", config, *args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
