"""How many CPUs this process may use: what ``server.workers = "auto"`` starts.

The CPUs of the affinity mask (``taskset``, a container's ``--cpuset-cpus``), capped by the
CPU bandwidth limit of the process's control group (a container's ``--cpus``, Kubernetes'
``limits.cpu``): cgroup v2 ``cpu.max`` or cgroup v1 ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us``, rounded up, the smallest along the group and its ancestors.
``os.cpu_count()`` says neither (it counts the host's CPUs).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may use, at least 1. ``proc_cgroup`` and ``root`` are the
    process's cgroup membership file and the cgroup mount (parameters for tests); an
    unreadable or malformed cgroup file means no bandwidth limit."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit(proc_cgroup, root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def cgroup_cpu_limit(proc_cgroup: Path, root: Path) -> float | None:
    """The CPU bandwidth limit in CPUs (quota / period) of the process's cgroup, the
    smallest of it and its ancestors' below ``root``; ``None`` when there is none."""
    try:
        # a group's name may be any bytes but "/" (a container runtime's, not only systemd's
        # escaped ones): decoded as the file system names them, not refused as not ASCII
        membership = os.fsdecode(proc_cgroup.read_bytes())
    except OSError:
        return None
    limits: list[float] = []
    for line in membership.splitlines():
        # "hierarchy-ID:controllers:path"; v2 is "0::path", v1 lists "cpu,cpuacct"
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if parts[0] == "0" and controllers == "":
            # a hybrid host mounts the v2 hierarchy at unified/ (no cpu controller there)
            unified = root if (root / "cgroup.controllers").exists() else root / "unified"
            limits += _walk(unified, path, _v2_limit)
        elif "cpu" in controllers.split(","):
            mount = next(
                (
                    root / name
                    for name in (controllers, "cpu", "cpu,cpuacct")
                    if (root / name).is_dir()
                ),
                None,
            )
            if mount is not None:
                limits += _walk(mount, path, _v1_limit)
    return min(limits) if limits else None


def _walk(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The limits ``read`` finds in the group ``path`` under ``mount`` and its ancestors.
    None for a path with ".." (a process outside its cgroup namespace's root): the groups
    this mount shows are not its own nor its ancestors."""
    found: list[float] = []
    parts = [part for part in path.split("/") if part]
    if ".." in parts:
        return found
    group = mount.joinpath(*parts)
    while True:
        limit = read(group)
        if limit is not None:
            found.append(limit)
        if group == mount or mount not in group.parents:
            return found
        group = group.parent


def _v2_limit(group: Path) -> float | None:
    """``cpu.max`` is "QUOTA PERIOD" in microseconds, or "max PERIOD" for no limit."""
    try:
        quota, period = (group / "cpu.max").read_text(encoding="ascii").split()
        if quota == "max":
            return None
        return _ratio(int(quota), int(period))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _v1_limit(group: Path) -> float | None:
    """``cpu.cfs_quota_us`` (-1: no limit) over ``cpu.cfs_period_us``."""
    try:
        quota = int((group / "cpu.cfs_quota_us").read_text(encoding="ascii"))
        period = int((group / "cpu.cfs_period_us").read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return _ratio(quota, period)


def _ratio(quota: int, period: int) -> float | None:
    if quota <= 0 or period <= 0:
        return None
    return quota / period
