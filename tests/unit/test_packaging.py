"""Packaging: the distribution's name (not PyPI's unrelated "sidecar"), ``sidecar --version``,
and constraints.txt pinning every dependency that an install with the test extras pulls in."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from click.testing import CliRunner
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from sidecar.cli import DISTRIBUTION, main

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not a pin (NAME==VERSION)"
            pins[canonicalize_name(name)] = version
    return pins


def test_distribution_name_is_ours_and_the_command_stays_sidecar() -> None:
    project = PYPROJECT["project"]
    assert project["name"] == DISTRIBUTION == "smtp-proxy-sidecar"
    assert project["scripts"] == {"sidecar": "sidecar.cli:main"}
    assert metadata.distribution(DISTRIBUTION).metadata["Name"] == DISTRIBUTION


def test_version_is_the_installed_distributions() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"sidecar, version {PYPROJECT['project']['version']}\n"
    assert metadata.version(DISTRIBUTION) == PYPROJECT["project"]["version"]


def test_constraints_pin_every_dependency_installed() -> None:
    """Everything ``pip install -c constraints.txt -e .[test]`` installed (walked from the
    distribution's requirements, transitively) is pinned, at the version installed: the file
    is complete, and this environment was installed with it."""
    pins = constraints()
    seen: set[str] = set()
    pending = [(DISTRIBUTION, frozenset({"test"}))]
    while pending:
        name, extras = pending.pop()
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is not None and not any(
                marker.evaluate({"extra": extra}) for extra in (extras or {""})
            ):
                continue
            key = canonicalize_name(requirement.name)
            if key in seen:
                continue
            seen.add(key)
            assert key in pins, f"{requirement.name} (needed by {name}) is not in constraints.txt"
            assert metadata.version(requirement.name) == pins[key], requirement.name
            pending.append((requirement.name, frozenset(requirement.extras)))
    assert "trio" in seen and "pytest" in seen and "pyyaml" in seen
    assert DISTRIBUTION not in pins and "sidecar" not in pins
