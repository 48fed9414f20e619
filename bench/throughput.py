"""Throughput benchmark (issue 6): the sidecar path against a two-hop HAProxy chain and direct
delivery, in one run, alternating, with Postfix's smtp-source as the load and smtp-sink as the MX.

    sidecar:  smtp-source -> sidecar -> egress HAProxy (accept-proxy, usesrc clientip) -> smtp-sink
    chain:    smtp-source -> front HAProxy (set-src/set-dst, send-proxy-v2) -> egress HAProxy
              -> smtp-sink: what a C proxy does with no SMTP awareness at all
    direct:   smtp-source -> smtp-sink, the floor

Run as root from the repository root (HAProxy's usesrc clientip):
    .venv/bin/python bench/throughput.py [--rounds 3] [--messages 5000] [--quick]
Prints a table and writes bench/throughput-results.txt. Everything listens on 127.0.0.x and
stops when the script ends.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDECAR = ROOT / ".venv" / "bin" / "sidecar"

# Loopback addresses of this benchmark (away from the test suite's 127.0.0.10+ counter).
MX = "127.0.9.1"
DNS = "127.0.9.2"
EGRESS = "127.0.9.3"
FRONT = "127.0.9.4"
SIDECAR_ADDRESS = "127.0.9.5"
SOURCE = "127.0.9.44"
MX_PORT, DNS_PORT, EGRESS_PORT, FRONT_PORT, SIDECAR_PORT = 10025, 5353, 5000, 2526, 2525

HAPROXY = ["haproxy", "-db", "-f"]
HAPROXY_COMMON = """\
global
    maxconn 8000
    nbthread 1
defaults
    mode tcp
    timeout connect 2s
    timeout client 11m
    timeout server 11m
    retries 1
"""


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{host}:{port} did not start")


@contextmanager
def started(
    argv: list[str],
    name: str,
    workdir: Path,
    ready: tuple[str, int],
    stop: signal.Signals = signal.SIGTERM,
) -> Iterator[int]:
    log = (workdir / f"{name}.log").open("wb")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        wait_port(*ready)
        yield process.pid
    finally:
        process.send_signal(stop)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


@dataclass(frozen=True)
class Load:
    name: str
    sessions: int
    messages: int
    size: int
    reuse: bool  # smtp-source -d: many messages per connection


def run_load(load: Load, host: str, port: int) -> float:
    """Seconds smtp-source takes for the load."""
    argv = ["smtp-source", "-s", str(load.sessions), "-m", str(load.messages), "-l", str(load.size)]
    argv += ["-f", "bench@client.test", "-t", "rcpt@bench.test", "-M", "client.test"]
    if load.reuse:
        argv.append("-d")
    started_at = time.monotonic()
    result = subprocess.run([*argv, f"{host}:{port}"], capture_output=True, text=True, timeout=900)
    elapsed = time.monotonic() - started_at
    if result.returncode != 0 or "fatal" in result.stderr:
        raise RuntimeError(f"smtp-source failed: {result.stderr[-500:]}")
    return elapsed


def write_configs(workdir: Path) -> None:
    (workdir / "egress.cfg").write_text(
        HAPROXY_COMMON
        + f"""frontend egress
    bind {EGRESS}:{EGRESS_PORT} accept-proxy
    default_backend mx
backend mx
    source 0.0.0.0 usesrc clientip
    server mx 0.0.0.0:0
"""
    )
    (workdir / "front.cfg").write_text(
        HAPROXY_COMMON
        + f"""frontend front
    bind {FRONT}:{FRONT_PORT}
    tcp-request connection set-src ipv4({SOURCE})
    tcp-request connection set-dst ipv4({MX})
    tcp-request connection set-dst-port int({MX_PORT})
    default_backend egress
backend egress
    server egress {EGRESS}:{EGRESS_PORT} send-proxy-v2
"""
    )
    (workdir / "sidecar.toml").write_text(
        f"""[server]
hostname = "sidecar.bench.test"
max_connections = 8000

[[listener]]
address = "{SIDECAR_ADDRESS}:{SIDECAR_PORT}"
binding = "b1"

[dns]
nameservers = ["{DNS}:{DNS_PORT}"]

[delivery]
port = {MX_PORT}
allow_private_destinations = true
tls = "disabled"

[ha_proxy_client]
health_check_interval = 5

[binding.b1]
ha_proxy_server = "{EGRESS}:{EGRESS_PORT}"
ha_proxy_src_addr = "{SOURCE}"
"""
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    parser.add_argument("--messages", type=int, default=5000, help="2 KB messages per run")
    parser.add_argument("--quick", action="store_true", help="small counts, to check it works")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="run the sidecar under py-spy, writing collapsed stacks to FILE (sidecar path only)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("error: run as root (HAProxy's usesrc clientip)", file=sys.stderr)
        return 2
    for tool in ("smtp-source", "smtp-sink", "haproxy", "dnsmasq"):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found (./scripts/test.sh installs it)", file=sys.stderr)
            return 2
    messages = 300 if args.quick else args.messages
    big = 3 if args.quick else 20
    loads = [
        Load("2 KB, 1 session, new connection per message", 1, messages // 5, 2048, False),
        Load("2 KB, 10 sessions, new connection per message", 10, messages, 2048, False),
        Load("2 KB, 100 sessions, new connection per message", 100, messages, 2048, False),
        Load("2 KB, 1 session, -d (many per connection)", 1, messages // 5, 2048, True),
        Load("2 KB, 100 sessions, -d (many per connection)", 100, messages, 2048, True),
        Load("10 MB, 4 sessions, -d", 4, big, 10 * 1024 * 1024, True),
    ]
    profiler: list[str] = []
    if args.profile:
        py_spy = ROOT / ".venv" / "bin" / "py-spy"
        profiler = [str(py_spy), "record", "-r", "250", "-f", "raw", "-o", args.profile, "--"]
    paths = {
        "sidecar": (SIDECAR_ADDRESS, SIDECAR_PORT),
        "chain": (FRONT, FRONT_PORT),
        "direct": (MX, MX_PORT),
    }
    if args.profile:
        paths = {"sidecar": paths["sidecar"]}
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as tmp:
        workdir = Path(tmp)
        write_configs(workdir)
        dnsmasq = [
            "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--bind-interfaces", f"--listen-address={DNS}", f"--port={DNS_PORT}",
            "--local=/test/", "--mx-host=bench.test,mx.bench.test,10",
            f"--host-record=mx.bench.test,{MX}", "--local-ttl=300",
        ]  # fmt: skip
        sink = ["smtp-sink", "-u", "nobody", "-c", f"{MX}:{MX_PORT}", "4096"]
        with (
            started(sink, "smtp-sink", workdir, (MX, MX_PORT)),
            started(dnsmasq, "dnsmasq", workdir, (MX, MX_PORT)),  # UDP: no TCP probe
            started([*HAPROXY, "egress.cfg"], "egress", workdir, (EGRESS, EGRESS_PORT)),
            started([*HAPROXY, "front.cfg"], "front", workdir, (FRONT, FRONT_PORT)),
            started(
                [*profiler, str(SIDECAR), "run", "-c", "sidecar.toml", "--log-level", "warning"],
                "sidecar",
                workdir,
                (SIDECAR_ADDRESS, SIDECAR_PORT),
                signal.SIGINT if profiler else signal.SIGTERM,  # py-spy writes on SIGINT
            ) as sidecar_pid,
        ):
            results: dict[tuple[str, str], list[float]] = {}
            cpu: dict[str, float] = {}
            for load in loads:
                for _ in range(args.rounds):
                    for path, (host, port) in paths.items():
                        before = cpu_seconds(sidecar_pid)
                        seconds = run_load(load, host, port)
                        if path == "sidecar":
                            cpu[load.name] = cpu_seconds(sidecar_pid) - before
                        results.setdefault((load.name, path), []).append(seconds)
            peak_rss = rss_kib(sidecar_pid, "VmHWM")
    if args.profile:
        print(f"collapsed stacks in {args.profile}")
        return 0
    lines = report(loads, results, cpu, peak_rss, args.rounds)
    print("\n".join(lines))
    (ROOT / "bench" / "throughput-results.txt").write_text("\n".join(lines) + "\n")
    return 0


def report(
    loads: list[Load],
    results: dict[tuple[str, str], list[float]],
    cpu: dict[str, float],
    peak_rss: int,
    rounds: int,
) -> list[str]:
    lines = [
        f"sidecar throughput benchmark, {time.strftime('%Y-%m-%d')}, {platform.node()}, "
        f"{os.cpu_count()} cores, python {platform.python_version()}, median of {rounds} rounds",
        "",
        f"{'load':48} {'direct':>10} {'chain':>10} {'sidecar':>10} {'vs chain':>9}"
        f" {'CPU s/1000':>11}",
    ]
    for load in loads:
        rates = {}
        for path in ("direct", "chain", "sidecar"):
            seconds = statistics.median(results[(load.name, path)])
            if load.size >= 1024 * 1024:
                rates[path] = load.messages * load.size / seconds / 1e6  # MB/s
            else:
                rates[path] = load.messages / seconds  # msg/s
        unit = "MB/s" if load.size >= 1024 * 1024 else "msg/s"
        per_1000 = cpu.get(load.name, 0.0) / load.messages * 1000
        lines.append(
            f"{load.name:48} {rates['direct']:>10.1f} {rates['chain']:>10.1f} "
            f"{rates['sidecar']:>10.1f} {rates['sidecar'] / rates['chain']:>8.2f}x "
            f"{per_1000:>11.2f}  ({unit})"
        )
    lines += ["", f"sidecar peak RSS: {peak_rss / 1024:.1f} MiB"]
    return lines


if __name__ == "__main__":
    sys.exit(main())
