"""Traffic shaping benchmark (issue 12): what shaping costs when its limits never bind.

Three sidecars run side by side, one process each, same configuration but for ``[shaping]``:

    off:     no [shaping] at all (sessions skip shaping altogether)
    memory:  backend = "memory" with limits far above the load
    redis:   backend = "redis" (a private redis-server on 127.0.9.9, started here), same limits

    smtp-source -> sidecar -> egress HAProxy (accept-proxy, usesrc clientip) -> smtp-sink

The limits on (``connection_limit = 100000``, ``max_connection_rate`` and
``max_message_rate`` ``"10000000/h"``) are all checked on every connection and transaction,
so the whole cost of shaping is paid (a slot lease per upstream connection, a GCRA per new
connection and per transaction, the suspension and override look-ups) but nobody ever waits.
Each round runs every load through every sidecar, the order rotating round by round; the
table gives the median of the rounds, the cost of each backend against "off" in the same
run, and each sidecar's CPU seconds per 1000 messages. Issue targets: memory < 5%, Redis <
15%.

Run as root from the repository root (HAProxy's usesrc clientip):
    .venv/bin/python bench/shaping.py [--rounds 5] [--messages 10000] [--quick] [--no-redis]
The redis column needs ``redis-server`` (Debian's package; ./scripts/test.sh installs it);
without it, or with --no-redis, the table has the memory column only. Writes
bench/shaping-results.txt. Everything listens on 127.0.9.x and stops when the script ends.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from throughput import (
    CACHE_SETTLE,
    DNS,
    DNS_PORT,
    EGRESS,
    EGRESS_PORT,
    HAPROXY,
    HAPROXY_NT1,
    MX,
    MX_PORT,
    ROOT,
    SIDECAR,
    SIDECAR_PORT,
    Load,
    cpu_seconds,
    missing_prerequisite,
    progress,
    raise_fd_limit,
    run_load,
    started,
)
from throughput import sidecar_config as throughput_config

# Loopback addresses of this benchmark (throughput.py uses .1 to .6, .10 to .12 and .44).
SIDECARS = {"off": "127.0.9.5", "memory": "127.0.9.7", "redis": "127.0.9.8"}
REDIS, REDIS_PORT = "127.0.9.9", 6379

# Limits far above anything 100 sessions on one machine can reach: checked, never binding.
LIMITS = """connection_limit = 100000
max_connection_rate = "10000000/h"
max_message_rate = "10000000/h"
"""


def shaping_section(backend: str) -> str:
    """The ``[shaping]`` table of the sidecar of ``backend`` ("off": none)."""
    if backend == "off":
        return ""
    url = f'redis_url = "redis://{REDIS}:{REDIS_PORT}"\n' if backend == "redis" else ""
    return f'\n[shaping]\nbackend = "{backend}"\n{url}{LIMITS}'


def sidecar_config(address: str, backend: str) -> str:
    """throughput.py's one-process sidecar config, with the ``[shaping]`` of ``backend``."""
    return throughput_config(address, 1) + shaping_section(backend)


def loads(messages: int) -> list[Load]:
    return [
        Load("2 KB, 100 sessions, new connection per message", 100, messages, 2048, False),
        Load("2 KB, 100 sessions, -d (many per connection)", 100, messages, 2048, True),
    ]


@contextmanager
def services(workdir: Path, backends: list[str]) -> Iterator[dict[str, int]]:
    """smtp-sink, dnsmasq, the egress HAProxy, redis-server (for the redis column) and one
    sidecar per backend; yields the sidecars' pids by backend."""
    (workdir / "egress.cfg").write_text(
        HAPROXY_NT1  # nbthread 1, as its figures were measured
        + f"""frontend egress
    bind {EGRESS}:{EGRESS_PORT} accept-proxy
    default_backend mx
backend mx
    source 0.0.0.0 usesrc clientip
    server mx 0.0.0.0:0
"""
    )
    dnsmasq = [
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        "--bind-interfaces", f"--listen-address={DNS}", f"--port={DNS_PORT}",
        "--local=/test/", "--mx-host=bench.test,mx.bench.test,10",
        f"--host-record=mx.bench.test,{MX}", "--local-ttl=300",
    ]  # fmt: skip
    sink = ["smtp-sink", "-u", "nobody", "-c", f"{MX}:{MX_PORT}", "4096"]
    redis = [
        "redis-server", "--bind", REDIS, "--port", str(REDIS_PORT), "--save", "",
        "--appendonly", "no", "--protected-mode", "no", "--dir", str(workdir),
    ]  # fmt: skip
    with ExitStack() as stack:
        stack.enter_context(started(sink, "smtp-sink", workdir, (MX, MX_PORT)))
        stack.enter_context(started(dnsmasq, "dnsmasq", workdir, (MX, MX_PORT)))  # UDP
        stack.enter_context(
            started([*HAPROXY, "egress.cfg"], "egress", workdir, (EGRESS, EGRESS_PORT))
        )
        if "redis" in backends:
            stack.enter_context(started(redis, "redis", workdir, (REDIS, REDIS_PORT)))
        pids = {}
        for backend in backends:
            address = SIDECARS[backend]
            config = f"sidecar-{backend}.toml"
            (workdir / config).write_text(sidecar_config(address, backend))
            argv = [str(SIDECAR), "run", "-c", config, "--log-level", "warning"]
            name = f"sidecar-{backend}"
            pids[backend] = stack.enter_context(
                started(argv, name, workdir, (address, SIDECAR_PORT))
            )
        yield pids


@dataclass
class Results:
    seconds: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    cpu: dict[tuple[str, str], list[float]] = field(default_factory=dict)


def run(backends: list[str], plan: list[Load], rounds: int, pids: dict[str, int]) -> Results:
    """Every load through every sidecar, ``rounds`` times, the order of the sidecars rotating
    from round to round (so drift on a shared machine hits each alike)."""
    results = Results()
    for number in range(rounds):
        shift = number % len(backends)
        order = backends[shift:] + backends[:shift]
        for load in plan:
            progress(f"round {number + 1}/{rounds}: {load.name} ({', '.join(order)})")
            for backend in order:
                time.sleep(CACHE_SETTLE)  # the last sidecar's idle upstreams expire first
                before = cpu_seconds(pids[backend])
                seconds = run_load(load, SIDECARS[backend], SIDECAR_PORT)
                results.cpu.setdefault((load.name, backend), []).append(
                    cpu_seconds(pids[backend]) - before
                )
                results.seconds.setdefault((load.name, backend), []).append(seconds)
    return results


def report(backends: list[str], plan: list[Load], rounds: int, results: Results) -> list[str]:
    lines = [
        f"sidecar traffic shaping benchmark, {time.strftime('%Y-%m-%d')}, {platform.node()}, "
        f"{os.cpu_count()} cores, python {platform.python_version()}, median of {rounds} rounds",
        f"limits on (never binding): {LIMITS.strip().replace(chr(10), ', ')}",
        "",
    ]
    header = f"{'load (msg/s)':48} {'off':>8} {'CPU/1000':>8}"
    for backend in backends[1:]:
        header += f" | {backend:>8} {'cost':>7} {'CPU/1000':>8} {'CPU cost':>8}"
    lines.append(header)
    for load in plan:
        rate = {
            b: load.messages / statistics.median(results.seconds[(load.name, b)]) for b in backends
        }
        cpu = {
            b: statistics.median(results.cpu[(load.name, b)]) / load.messages * 1000
            for b in backends
        }
        row = f"{load.name:48} {rate['off']:>8.1f} {cpu['off']:>8.3f}"
        for backend in backends[1:]:
            cost = (1 - rate[backend] / rate["off"]) * 100
            cpu_cost = (cpu[backend] / cpu["off"] - 1) * 100
            row += (
                f" | {rate[backend]:>8.1f} {cost:>+6.1f}% {cpu[backend]:>8.3f} {cpu_cost:>+7.1f}%"
            )
        lines.append(row)
    lines += [
        "",
        "cost: throughput lost against off, same run (targets: memory < 5%, redis < 15%);",
        "CPU/1000: the sidecar's CPU seconds per 1000 messages (redis-server's not counted);",
        "CPU cost: CPU/1000 against off's (the steadier figure when the machine is shared).",
        "",
        "seconds per round:",
    ]
    for load in plan:
        for backend in backends:
            each = " ".join(f"{s:.2f}" for s in results.seconds[(load.name, backend)])
            lines.append(f"  {load.name:48} {backend:>8}: {each}")
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (median)")
    parser.add_argument("--messages", type=int, default=10000, help="2 KB messages per load")
    parser.add_argument("--quick", action="store_true", help="1000 messages, 1 round")
    parser.add_argument("--no-redis", action="store_true", help="skip the redis column")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if (problem := missing_prerequisite()) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    backends = ["off", "memory"]
    if not args.no_redis:
        if shutil.which("redis-server") is None:
            progress("redis-server not found: no redis column (./scripts/test.sh installs it)")
        else:
            backends.append("redis")
    rounds = 1 if args.quick else args.rounds
    plan = loads(1000 if args.quick else args.messages)
    raise_fd_limit(4096)
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-shaping-") as tmp:
        try:
            with services(Path(tmp), backends) as pids:
                results = run(backends, plan, rounds, pids)
        except Exception:
            for log in sorted(Path(tmp).glob("*.log")):
                print(f"--- {log.name} ---\n{log.read_text(errors='replace')[-3000:]}")
            raise
    lines = report(backends, plan, rounds, results)
    print("\n".join(lines))
    (ROOT / "bench" / "shaping-results.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
