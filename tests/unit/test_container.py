"""The container files, checked statically (no Docker engine here): what the Dockerfile
COPYs exists and is not excluded by .dockerignore, dependencies come pinned from
constraints.txt, the user is the fixed uid/gid the README documents, the HEALTHCHECK's
script exists and finds the running sidecar's configuration however it was given."""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")


def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "container/healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = load_healthcheck()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", DOCKERFILE)
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and line[0] != "#"]


def ignored(path: str) -> bool:
    parts = path.split("/")
    for pattern in dockerignore():
        pattern = pattern.removeprefix("**/")
        for depth in range(1, len(parts) + 1):
            if fnmatch.fnmatch("/".join(parts[:depth]), pattern) or fnmatch.fnmatch(
                parts[depth - 1], pattern
            ):
                return True
    return False


def test_every_copy_source_exists_and_is_in_the_context() -> None:
    copies = [args for keyword, args in instructions() if keyword == "COPY"]
    sources = [
        source
        for args in copies
        if not args.startswith("--from")
        for source in shlex.split(args)[:-1]
    ]
    assert sources == [
        "pyproject.toml",
        "README.md",
        "constraints.txt",
        "sidecar",
        "container/healthcheck.py",
    ]
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source), f".dockerignore excludes {source}, which the image COPYs"
    # The second stage takes the venv only: no source tree, no build leftovers.
    assert [args for args in copies if args.startswith("--from")] == [
        "--from=build /opt/sidecar /opt/sidecar"
    ]


@pytest.mark.parametrize(
    "path",
    [".venv", ".git", "tests", "sidecar/__pycache__", "sidecar/x.pyc", ".mypy_cache",
     ".pytest_cache", ".ruff_cache", ".hypothesis", "smtp_proxy_sidecar.egg-info", "build"],
)  # fmt: skip
def test_dockerignore_keeps_out_what_the_image_does_not_need(path: str) -> None:
    assert ignored(path)


def test_dependencies_come_pinned_from_constraints() -> None:
    runs = [args for keyword, args in instructions() if keyword == "RUN"]
    installs = [args for args in runs if "pip install" in args]
    assert len(installs) == 1 and "-c constraints.txt ." in installs[0], installs


def test_fixed_uid_gid_documented() -> None:
    (user,) = [args for keyword, args in instructions() if keyword == "USER"]
    assert user == "2525:2525"
    assert "--uid 2525 --gid 2525" in DOCKERFILE and "--gid 2525 sidecar" in DOCKERFILE
    assert "uid 2525" in README and "gid 2525" in README


def test_the_default_state_dir_is_writable_by_the_user_and_a_volume() -> None:
    """delivery.state_dir (default /var/lib/sidecar, the MTA-STS policy cache) must be
    writable by uid 2525, or `sidecar run` stops with a delivery.state_dir error."""
    from sidecar.config import DeliveryConfig

    state_dir = DeliveryConfig().state_dir
    assert f"install -d -o 2525 -g 2525 -m 0750 {state_dir}" in DOCKERFILE
    assert ("VOLUME", state_dir) in instructions()


def test_healthcheck_command_exists_in_the_image() -> None:
    (check,) = [args for keyword, args in instructions() if keyword == "HEALTHCHECK"]
    command = check.split("CMD", 1)[1].strip()
    argv = eval(command)  # the exec form: a JSON array of strings
    assert argv[:2] == ["/opt/sidecar/bin/python", "/opt/sidecar/libexec/healthcheck.py"]
    assert "COPY container/healthcheck.py /opt/sidecar/libexec/healthcheck.py" in DOCKERFILE
    # "--timeout 5" goes through to `sidecar probe`, which must know it
    assert argv[2:] == ["--timeout", "5"]
    from click.testing import CliRunner

    from sidecar.cli import main

    assert "--timeout" in CliRunner().invoke(main, ["probe", "--help"]).output


def test_stop_grace_fits_shutdown_grace_and_is_documented() -> None:
    assert "--stop-timeout 45" in DOCKERFILE and "--stop-timeout 45" in README
    assert "stop_grace_period" in README and "terminationGracePeriodSeconds" in README


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/opt/sidecar/bin/python", "/opt/sidecar/bin/sidecar", "run"], None),
        (["sidecar", "run", "-c", "/config/s.toml"], "/config/s.toml"),
        (["sidecar", "run", "-c/config/s.toml"], "/config/s.toml"),
        (["sidecar", "run", "--config", "/config/s.toml"], "/config/s.toml"),
        (["sidecar", "run", "--log-level", "debug", "--config=/c.toml"], "/c.toml"),
        (["python", "-m", "sidecar.cli", "run", "-c", "/c.toml"], "/c.toml"),
    ],
)
def test_config_option_of_a_sidecar_run(argv: list[str], expected: str | None) -> None:
    options = healthcheck.run_options(argv)
    assert options is not None
    assert healthcheck.config_option(options) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["sidecar", "probe", "-c", "/c.toml"],
        ["/opt/sidecar/bin/python", "/opt/sidecar/libexec/healthcheck.py"],
        ["tini", "--", "sh", "-c", "run"],
    ],
)
def test_other_processes_are_not_a_sidecar_run(argv: list[str]) -> None:
    assert healthcheck.run_options(argv) is None


def fake_process(proc: Path, pid: int, argv: list[str], environ: dict[str, str], cwd: Path) -> None:
    base = proc / str(pid)
    base.mkdir(parents=True)
    (base / "cmdline").write_bytes(b"".join(arg.encode() + b"\0" for arg in argv))
    (base / "environ").write_bytes(
        b"".join(f"{k}={v}".encode() + b"\0" for k, v in environ.items())
    )
    (base / "cwd").symlink_to(cwd)


def test_running_configs_from_proc(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "self").mkdir()
    fake_process(proc, 1, ["/sbin/tini", "--", "sidecar", "run"], {}, Path("/"))
    fake_process(proc, 7, ["/opt/sidecar/bin/python", "/opt/sidecar/bin/sidecar", "run"],
                 {"SIDECAR_CONFIG": "/etc/sidecar/sidecar.toml"}, Path("/"))  # fmt: skip
    fake_process(proc, 9, ["sidecar", "run", "-c", "conf/s.toml"], {}, tmp_path)
    fake_process(proc, 12, ["sleep", "1000"], {"SIDECAR_CONFIG": "/x"}, Path("/"))
    assert list(healthcheck.running_configs(proc)) == [
        "/etc/sidecar/sidecar.toml",
        str(tmp_path / "conf/s.toml"),
    ]


def test_no_sidecar_run_is_unhealthy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck.main(["--proc", str(tmp_path)]) == 1
    assert "no `sidecar run` process found" in capsys.readouterr().err


def test_healthcheck_runs_on_the_image_python() -> None:
    # The image's Python: python:3.11-slim; the script must not need more than the stdlib.
    assert "python:3.11-slim" in DOCKERFILE
    assert sys.version_info >= (3, 11)
    assert os.access(ROOT / "container/healthcheck.py", os.R_OK)


def test_state_dir_is_a_volume_the_sidecar_user_owns() -> None:
    # [delivery] state_dir (MTA-STS cache, TLS-RPT results) must be writable by uid 2525, also
    # with a read-only root file system: created in the image, owned by 2525, a VOLUME.
    from sidecar.config import DeliveryConfig

    state_dir = DeliveryConfig().state_dir
    assert state_dir == "/var/lib/sidecar"
    runs = " ".join(args for keyword, args in instructions() if keyword == "RUN")
    assert re.search(rf"install -d -o 2525 -g 2525 (-m \d+ )?{state_dir}\b", runs), runs
    volumes = [args for keyword, args in instructions() if keyword == "VOLUME"]
    assert volumes == [state_dir]
    container_section = README.split("## The container", 1)[1].split("\n## ", 1)[0]
    assert f"{state_dir}" in container_section and "state_dir" in container_section


def test_the_system_user_is_created_without_a_warning() -> None:
    # useradd --system warns for a uid above SYS_UID_MAX (999 on Debian): the build log
    # should be clean, so the range is raised for that one call.
    runs = " ".join(args for keyword, args in instructions() if keyword == "RUN")
    (useradd,) = re.findall(r"useradd [^&]*", runs)
    uid = int(re.search(r"--uid (\d+)", useradd)[1])  # type: ignore[index]
    if "--system" in useradd:
        raised = re.search(r"-K SYS_UID_MAX=(\d+)", useradd)
        assert raised is not None and int(raised[1]) >= uid, useradd


def test_podman_build_keeps_the_healthcheck() -> None:
    # Podman and Buildah build OCI images by default, which have no HEALTHCHECK (dropped with
    # a warning): the README and the Dockerfile say to build in Docker's format.
    assert "--format docker" in README and "--format docker" in DOCKERFILE


def test_container_check_script_is_documented() -> None:
    script = ROOT / "scripts" / "container-check.sh"
    assert os.access(script, os.X_OK)
    container_section = README.split("## The container", 1)[1].split("\n## ", 1)[0]
    assert "scripts/container-check.sh" in container_section
    text = script.read_text(encoding="utf-8")
    # It builds the Dockerfile unchanged, on a stand-in base it says is one.
    assert "--build-arg PYTHON_IMAGE=" in text and "NOT the official images" in text
