"""``server.workers = "auto"``: the CPUs a process may use, from its affinity mask and its
cgroup's CPU bandwidth limit (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), on fake cgroup trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidecar.config import ServerConfig, parse_config
from sidecar.cpus import available_cpus, cgroup_cpu_limit


def _tree(tmp_path: Path, membership: str, files: dict[str, str]) -> tuple[Path, Path]:
    proc = tmp_path / "cgroup"
    proc.write_text(membership)
    root = tmp_path / "sys"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return proc, root


@pytest.mark.parametrize(
    ("membership", "files", "limit"),
    [
        pytest.param(
            "0::/system.slice/mta.service\n",
            {
                "cgroup.controllers": "cpu memory\n",
                "system.slice/mta.service/cpu.max": "150000 100000\n",
            },
            1.5,
            id="v2 quota of the own group",
        ),
        pytest.param(
            "0::/kubepods/pod1/ctr\n",
            {
                "cgroup.controllers": "cpu\n",
                "kubepods/pod1/cpu.max": "50000 100000\n",
                "kubepods/pod1/ctr/cpu.max": "max 100000\n",
                "kubepods/cpu.max": "400000 100000\n",
            },
            0.5,
            id="v2 smallest along the ancestors",
        ),
        pytest.param(
            "0::/\n",
            {"cgroup.controllers": "cpu\n", "cpu.max": "max 100000\n"},
            None,
            id="v2 no limit",
        ),
        pytest.param(
            "0::/c\n",
            {"unified/cgroup.controllers": "\n", "unified/c/cpu.max": "300000 100000\n"},
            3.0,
            id="v2 under unified/ on a hybrid host",
        ),
        pytest.param(
            "4:memory:/x\n2:cpu,cpuacct:/docker/abc\n0::/\n",
            {
                "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "200000\n",
                "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
            },
            2.0,
            id="v1 quota",
        ),
        pytest.param(
            "1:cpu:/\n0::/\n",
            {
                "cpu/cpu.cfs_quota_us": "-1\n",
                "cpu/cpu.cfs_period_us": "100000\n",
                "cpu.max": "junk",
            },
            None,
            id="v1 unlimited, v2 malformed",
        ),
    ],
)
def test_cgroup_cpu_limit(
    tmp_path: Path, membership: str, files: dict[str, str], limit: float | None
) -> None:
    proc, root = _tree(tmp_path, membership, files)
    assert cgroup_cpu_limit(proc, root) == limit


def test_no_membership_file_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path / "missing", tmp_path) is None


def test_available_cpus_rounds_a_quota_up_and_never_exceeds_the_affinity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    proc, root = _tree(
        tmp_path, "0::/c\n", {"cgroup.controllers": "cpu\n", "c/cpu.max": "150000 100000\n"}
    )
    assert available_cpus(proc, root) == 2
    (root / "c" / "cpu.max").write_text("1000000 100000\n")
    assert available_cpus(proc, root) == 4
    (root / "c" / "cpu.max").write_text("1000 100000\n")
    assert available_cpus(proc, root) == 1


def test_workers_auto_in_the_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sidecar.config.schema.available_cpus", lambda: 3)
    config = parse_config(
        {
            "server": {"workers": "auto"},
            "listener": [{"address": "127.0.0.1:2525", "binding": "b"}],
            "binding": {
                "b": {"ha_proxy_server": "127.0.0.1:5000", "ha_proxy_src_addr": "192.0.2.1"}
            },
        }
    )
    assert config.server.workers == "auto"
    assert config.server.worker_count == 3
    assert ServerConfig(workers=2).worker_count == 2


def test_a_path_outside_the_namespace_root_reads_no_other_group(tmp_path: Path) -> None:
    """In a cgroup namespace a process outside its root shows as "/../x": x under the mount
    is another group (a sibling of the namespace's root), not this process's."""
    proc, root = _tree(
        tmp_path, "0::/../x\n", {"cgroup.controllers": "cpu\n", "x/cpu.max": "50000 100000\n"}
    )
    assert cgroup_cpu_limit(proc, root) is None


def test_a_group_name_that_is_not_ascii(tmp_path: Path) -> None:
    proc, root = _tree(
        tmp_path,
        "0::/c\u00f6ntainer\n",
        {"cgroup.controllers": "cpu\n", "c\u00f6ntainer/cpu.max": "100000 100000\n"},
    )
    assert cgroup_cpu_limit(proc, root) == 1.0
    proc.write_bytes(b"0::/c\xf6\n")  # not UTF-8 either: still the group's file name
    (root / os.fsdecode(b"c\xf6")).mkdir()
    (root / os.fsdecode(b"c\xf6") / "cpu.max").write_text("200000 100000\n")
    assert cgroup_cpu_limit(proc, root) == 2.0
