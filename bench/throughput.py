"""Throughput benchmark (issue 6): the sidecar path against a two-hop HAProxy chain and direct
delivery, in one run, alternating, with Postfix's smtp-source as the load and smtp-sink as the MX.

    sidecar:  smtp-source -> sidecar -> egress HAProxy (accept-proxy, usesrc clientip) -> smtp-sink
    chain:    smtp-source -> front HAProxy (set-src/set-dst, send-proxy-v2) -> egress HAProxy
              -> smtp-sink: what a C proxy does with no SMTP awareness at all
    direct:   smtp-source -> smtp-sink, the floor

As deployed by default (issue 15): the sidecar logs at INFO (one line per transaction, here to
a file as a container's stdout goes to one) and HAProxy runs with its default threading; one
HAProxy process serves both chain hops and is the sidecar's egress. Side by side:
    sidecar warn: the same sidecar at --log-level warning (no transaction lines)
    chain nt1:    the chain as two HAProxy processes with nbthread 1 each (earlier figures)

The same run then measures, against the same processes:
- latency: a small blocking raw-socket SMTP client sends messages one after another, one per
  connection, rotating over direct, chain and sidecar message by message; each is timed from
  connect to the end-of-data reply. Reports p50 and p99 per path and the added latency against
  direct (difference of the percentiles); once with one command at a time, once with MAIL,
  RCPT and DATA pipelined in one write as Postfix and Exim send them.
- idle sessions: the sidecar's VmRSS before and with 1000 open sessions that got their 220 and
  an EHLO reply (issue target: <= 40 MiB), once on the just-started sidecar and once after the
  throughput and latency loads (whose peaks leave the heap larger).
- soak: 100 000 messages through the sidecar (smtp-source, 100 sessions, new connection per
  message, 2 KB) with its VmRSS sampled every 2 s: at ~10% of the run, at the end and the
  maximum (issue target: no growth), and CPU seconds per 1000 messages.

Run as root from the repository root (HAProxy's usesrc clientip):
    .venv/bin/python bench/throughput.py [--rounds 3] [--messages 5000] [--quick]
        [--latency-messages 1000] [--idle-sessions 1000] [--soak-messages 100000]
        [--no-throughput] [--no-latency] [--no-idle] [--no-soak]
--quick uses small counts everywhere (latency 100, soak 10 000) unless given explicitly.
--baseline DIR makes the second sidecar of the throughput table DIR/.venv/bin/sidecar (a
checkout of an earlier commit with its venv, e.g. from `git worktree add`), one process, in
place of the workers one: a refactor's cost as a ratio against the previous commit, same run.
--profile runs the sidecar under py-spy for the throughput loads only (the other parts are
skipped). Prints a table and writes bench/throughput-results.txt. Everything listens on
127.0.9.x and stops when the script ends.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.cpus import available_cpus

ROOT = Path(__file__).resolve().parents[1]
SIDECAR = ROOT / ".venv" / "bin" / "sidecar"

# Loopback addresses of this benchmark (away from the test suite's 127.0.0.10+ counter).
MX = "127.0.9.1"
DNS = "127.0.9.2"
EGRESS = "127.0.9.3"
FRONT = "127.0.9.4"
SIDECAR_ADDRESS = "127.0.9.5"
WORKERS_ADDRESS = "127.0.9.6"  # a second sidecar, with server.workers = --workers
WARN_ADDRESS = "127.0.9.10"  # the sidecar at --log-level warning
EGRESS_NT1 = "127.0.9.11"  # the chain of two nbthread 1 HAProxy processes
FRONT_NT1 = "127.0.9.12"
SOURCE = "127.0.9.44"
MX_PORT, DNS_PORT, EGRESS_PORT, FRONT_PORT, SIDECAR_PORT = 10025, 5353, 5000, 2526, 2525

HAPROXY = ["haproxy", "-db", "-f"]
HAPROXY_GLOBAL = """\
global
    maxconn 8000
"""
HAPROXY_COMMON = (
    HAPROXY_GLOBAL
    + """\
defaults
    mode tcp
    timeout connect 2s
    timeout client 11m
    timeout server 11m
    retries 1
"""
)
HAPROXY_NT1 = HAPROXY_COMMON.replace("maxconn 8000\n", "maxconn 8000\n    nbthread 1\n")


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


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its live children (the workers of a supervisor)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(child) for child in children(pid))


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


def run_load(load: Load, host: str, port: int, timeout: float = 900.0) -> float:
    """Seconds smtp-source takes for the load."""
    argv = ["smtp-source", "-s", str(load.sessions), "-m", str(load.messages), "-l", str(load.size)]
    argv += ["-f", SENDER, "-t", RECIPIENT, "-M", HELO]
    if load.reuse:
        argv.append("-d")
    started_at = time.monotonic()
    result = subprocess.run(
        [*argv, f"{host}:{port}"], capture_output=True, text=True, timeout=timeout
    )
    elapsed = time.monotonic() - started_at
    if result.returncode != 0 or "fatal" in result.stderr:
        raise RuntimeError(f"smtp-source to {host}:{port} failed: {result.stderr[-500:]}")
    return elapsed


def egress_section(egress: str) -> str:
    return f"""frontend egress_in
    bind {egress}:{EGRESS_PORT} accept-proxy
    default_backend mx
backend mx
    source 0.0.0.0 usesrc clientip
    server mx 0.0.0.0:0
"""


def front_section(front: str, egress: str) -> str:
    return f"""frontend front
    bind {front}:{FRONT_PORT}
    tcp-request connection set-src ipv4({SOURCE})
    tcp-request connection set-dst ipv4({MX})
    tcp-request connection set-dst-port int({MX_PORT})
    default_backend to_egress
backend to_egress
    server egress {egress}:{EGRESS_PORT} send-proxy-v2
"""


def write_configs(workdir: Path, workers: int = 2, auto: bool = False) -> None:
    # Default threading: one process, both hops, and the sidecars' egress.
    (workdir / "haproxy.cfg").write_text(
        HAPROXY_COMMON + egress_section(EGRESS) + front_section(FRONT, EGRESS)
    )
    (workdir / "egress-nt1.cfg").write_text(HAPROXY_NT1 + egress_section(EGRESS_NT1))
    (workdir / "front-nt1.cfg").write_text(HAPROXY_NT1 + front_section(FRONT_NT1, EGRESS_NT1))
    (workdir / "sidecar.toml").write_text(sidecar_config(SIDECAR_ADDRESS, 1))
    (workdir / "sidecar-warn.toml").write_text(sidecar_config(WARN_ADDRESS, 1))
    second = sidecar_config(WORKERS_ADDRESS, '"auto"' if auto else str(workers))
    (workdir / "sidecar-workers.toml").write_text(second)


def sidecar_config(address: str, workers: int | str) -> str:
    return f"""[server]
hostname = "sidecar.bench.test"
max_connections = 8000
workers = {workers}

[[listener]]
address = "{address}:{SIDECAR_PORT}"
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


# The latency client's envelope (dnsmasq resolves bench.test to the MX).
SENDER, RECIPIENT, HELO = "bench@client.test", "rcpt@bench.test", "client.test"
EHLO = f"EHLO {HELO}\r\n".encode()
MAIL = f"MAIL FROM:<{SENDER}>\r\n".encode()
RCPT = f"RCPT TO:<{RECIPIENT}>\r\n".encode()
ISSUE_RSS_TARGET_MIB = 40


def workers_path(workers: int, baseline: Path | None = None, auto: bool = False) -> str:
    """The name (and column) of the second sidecar: the one with server.workers ("auto":
    one per CPU), or the baseline checkout's."""
    if baseline is not None:
        return "baseline"
    return "sidecar auto" if auto else f"sidecar x{workers}"


class SmtpError(RuntimeError):
    """A reply other than the expected one (or none) from a server under test."""


class SmtpClient:
    """A minimal blocking SMTP client on a plain socket: one command, one reply, no pipelining.

    Deliberately tiny so its overhead is small and the same for every path.
    """

    def __init__(self, label: str, host: str, port: int, timeout: float = 30.0) -> None:
        self.where = f"{label} ({host}:{port})"
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()

    def expect(self, code: int) -> None:
        """Read one reply (all its lines) and raise :class:`SmtpError` unless it is ``code``."""
        lines = [self._line()]
        while lines[-1][3:4] == b"-":
            lines.append(self._line())
        if any(line[:3] != b"%d" % code for line in lines):
            raise SmtpError(f"{self.where}: expected {code}, got {b' | '.join(lines)!r}")

    def send(self, data: bytes, code: int) -> None:
        self.sock.sendall(data)
        self.expect(code)

    def close(self) -> None:
        self.sock.close()

    def _line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            data = self.sock.recv(65536)
            if not data:
                raise SmtpError(f"{self.where}: connection closed after {bytes(self.buffer)!r}")
            self.buffer += data
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line


def message_data(size: int = 2048) -> bytes:
    """About ``size`` bytes of headers and body, then the end-of-data dot."""
    head = f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: latency\r\n\r\n".encode()
    line = b"x" * 78 + b"\r\n"
    full, rest = divmod(size - len(head), len(line))
    tail = b"y" * (rest - 2) + b"\r\n" if rest >= 2 else b""
    return head + line * full + tail + b".\r\n"


def timed_message(label: str, host: str, port: int, data: bytes, pipelined: bool) -> float:
    """Seconds from connect to the end-of-data reply of one message on a new connection;
    ``pipelined``: MAIL, RCPT and DATA in one write, as Postfix and Exim send them."""
    started_at = time.perf_counter()
    client = SmtpClient(label, host, port)
    try:
        client.expect(220)
        client.send(EHLO, 250)
        if pipelined:
            client.sock.sendall(MAIL + RCPT + b"DATA\r\n")
            for code in (250, 250, 354):
                client.expect(code)
        else:
            client.send(MAIL, 250)
            client.send(RCPT, 250)
            client.send(b"DATA\r\n", 354)
        client.send(data, 250)
        elapsed = time.perf_counter() - started_at
        client.send(b"QUIT\r\n", 221)
    finally:
        client.close()
    return elapsed


def measure_latency(
    paths: dict[str, tuple[str, int]], count: int, pipelined: bool, warmup: int = 5
) -> dict[str, list[float]]:
    """Milliseconds per message for each path; the order rotates message by message so that
    drift (other load on the machine, caches) hits every path alike."""
    data = message_data()
    names = list(paths)
    for _ in range(warmup):
        for name in names:
            timed_message(name, *paths[name], data, pipelined)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    for index in range(count):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            latencies[name].append(timed_message(name, *paths[name], data, pipelined) * 1000)
    return latencies


def percentile(values: list[float], pct: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


@dataclass(frozen=True)
class IdleRss:
    sessions: int
    before_kib: int
    with_sessions_kib: int
    open_seconds: float  # to open and greet them all


def measure_idle_rss(pid: int, host: str, port: int, sessions: int) -> IdleRss:
    """The sidecar's VmRSS before and with ``sessions`` open sessions, each greeted (220) and
    past EHLO, then idle; they are closed afterwards."""
    before = rss_kib(pid)
    started_at = time.monotonic()
    clients: list[SmtpClient] = []
    try:
        for _ in range(sessions):
            client = SmtpClient("sidecar (idle session)", host, port)
            clients.append(client)
            client.expect(220)
            client.send(EHLO, 250)
        open_seconds = time.monotonic() - started_at
        during = rss_kib(pid)
    finally:
        for client in clients:
            client.close()
    return IdleRss(sessions, before, during, open_seconds)


@contextmanager
def sampling_rss(pid: int, interval: float) -> Iterator[list[tuple[float, int]]]:
    """Sample VmRSS as (seconds since start, KiB) in a thread every ``interval`` s while
    inside, and once more on leaving."""
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    started_at = time.monotonic()

    def sample() -> None:
        while True:
            samples.append((time.monotonic() - started_at, rss_kib(pid)))
            if stop.wait(interval):
                return

    thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()
        samples.append((time.monotonic() - started_at, rss_kib(pid)))


@dataclass(frozen=True)
class Soak:
    load: Load
    seconds: float
    cpu_seconds: float
    interval: float
    samples: tuple[tuple[float, int], ...]  # (seconds since start, VmRSS KiB)

    def rss_at(self, fraction: float) -> int:
        """VmRSS of the first sample taken at or after ``fraction`` of the run's time."""
        at = fraction * self.samples[-1][0]
        return next(kib for seconds, kib in self.samples if seconds >= at)

    @property
    def rss_max(self) -> int:
        return max(kib for _, kib in self.samples)


def run_soak(pid: int, host: str, port: int, messages: int, interval: float) -> Soak:
    load = Load("soak", 100, messages, 2048, False)
    before = cpu_seconds(pid)
    with sampling_rss(pid, interval) as samples:
        seconds = run_load(load, host, port, timeout=max(900.0, messages / 50))
    return Soak(load, seconds, cpu_seconds(pid) - before, interval, tuple(samples))


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE (children inherit it) to the hard limit, and the hard limit to
    ``wanted`` if it is lower and we may; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft < target:
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Plan:
    """What this run measures; a zero count skips that part."""

    rounds: int
    loads: list[Load]  # the throughput table
    latency_messages: int
    idle_sessions: int
    soak_messages: int
    soak_interval: float
    profile: str | None
    workers: int  # of the second sidecar (server.workers); 1: no second sidecar
    baseline: Path | None = None  # the second sidecar is this checkout's, one process
    workers_auto: bool = False  # the second sidecar has workers = "auto" (= workers CPUs)


def throughput_loads(messages: int, big: int) -> list[Load]:
    return [
        Load("2 KB, 1 session, new connection per message", 1, messages // 5, 2048, False),
        Load("2 KB, 10 sessions, new connection per message", 10, messages, 2048, False),
        Load("2 KB, 100 sessions, new connection per message", 100, messages, 2048, False),
        Load("2 KB, 1 session, -d (many per connection)", 1, messages // 5, 2048, True),
        Load("2 KB, 100 sessions, -d (many per connection)", 100, messages, 2048, True),
        Load("10 MB, 4 sessions, -d", 4, big, 10 * 1024 * 1024, True),
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    parser.add_argument("--messages", type=int, default=5000, help="2 KB messages per run")
    parser.add_argument("--quick", action="store_true", help="small counts, to check it works")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="run the sidecar under py-spy, writing collapsed stacks to FILE (sidecar path and"
        " throughput loads only)",
    )
    parser.add_argument(
        "--latency-messages", type=int, help="messages per path (default 1000, --quick 100)"
    )
    parser.add_argument("--idle-sessions", type=int, default=1000, help="default 1000")
    parser.add_argument(
        "--soak-messages", type=int, help="sidecar soak (default 100000, --quick 10000)"
    )
    parser.add_argument(
        "--workers",
        default="auto",
        help='server.workers of a second sidecar in the throughput table: N or "auto" (one per '
        'CPU: on 1 CPU, none); 1: none; default "auto"',
    )
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        type=Path,
        help="second sidecar: DIR/.venv/bin/sidecar, one process (a checkout to compare with)",
    )
    for part in ("throughput", "latency", "idle", "soak"):
        parser.add_argument(f"--no-{part}", action="store_true", help=f"skip the {part} part")
    return parser.parse_args()


def plan_from(args: argparse.Namespace) -> Plan:
    quick: bool = args.quick
    only_throughput = args.profile is not None

    def count(given: int | None, skip: bool, quick_default: int, default: int) -> int:
        if skip or only_throughput:
            return 0
        if given is not None:
            return given
        return quick_default if quick else default

    auto = args.workers == "auto"
    workers = available_cpus() if auto else int(args.workers)
    loads = (
        []
        if args.no_throughput
        else throughput_loads(300 if quick else args.messages, 3 if quick else 20)
    )
    return Plan(
        rounds=args.rounds,
        loads=loads,
        latency_messages=count(args.latency_messages, args.no_latency, 100, 1000),
        idle_sessions=count(args.idle_sessions, args.no_idle, 1000, 1000),
        soak_messages=count(args.soak_messages, args.no_soak, 10_000, 100_000),
        soak_interval=0.5 if quick else 2.0,
        profile=args.profile,
        workers=1 if args.profile else (2 if args.baseline else workers),
        baseline=args.baseline,
        workers_auto=auto and not args.baseline,
    )


def missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "run as root (HAProxy's usesrc clientip)"
    for tool in ("smtp-source", "smtp-sink", "haproxy", "dnsmasq"):
        if shutil.which(tool) is None:
            return f"{tool} not found (./scripts/test.sh installs it)"
    return None


@contextmanager
def services(
    workdir: Path,
    profile: str | None,
    workers: int,
    baseline: Path | None = None,
    auto: bool = False,
) -> Iterator[dict[str, int]]:
    """smtp-sink, dnsmasq, both HAProxies and the sidecars; yields their pids by path."""
    profiler: list[str] = []
    if profile:
        py_spy = ROOT / ".venv" / "bin" / "py-spy"
        profiler = [str(py_spy), "record", "-r", "250", "-f", "raw", "-o", profile, "--"]
    write_configs(workdir, 1 if baseline is not None else workers, auto)
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
        started([*HAPROXY, "haproxy.cfg"], "haproxy", workdir, (FRONT, FRONT_PORT)),
        started([*HAPROXY, "egress-nt1.cfg"], "egress-nt1", workdir, (EGRESS_NT1, EGRESS_PORT)),
        started([*HAPROXY, "front-nt1.cfg"], "front-nt1", workdir, (FRONT_NT1, FRONT_PORT)),
        started(
            [*profiler, str(SIDECAR), "run", "-c", "sidecar.toml"],  # INFO, the default
            "sidecar",
            workdir,
            (SIDECAR_ADDRESS, SIDECAR_PORT),
            signal.SIGINT if profiler else signal.SIGTERM,  # py-spy writes on SIGINT
        ) as sidecar_pid,
    ):
        if profiler:
            yield {"sidecar": sidecar_pid}
            return
        warn = [str(SIDECAR), "run", "-c", "sidecar-warn.toml", "--log-level", "warning"]
        with started(warn, "sidecar-warn", workdir, (WARN_ADDRESS, SIDECAR_PORT)) as warn_pid:
            pids = {"sidecar": sidecar_pid, "sidecar warn": warn_pid}
            if workers == 1:
                yield pids
                return
            second = SIDECAR if baseline is None else baseline / ".venv" / "bin" / "sidecar"
            argv = [str(second), "run", "-c", "sidecar-workers.toml"]
            ready = (WORKERS_ADDRESS, SIDECAR_PORT)
            with started(argv, "sidecar-workers", workdir, ready) as workers_pid:
                yield {**pids, workers_path(workers, baseline, auto): workers_pid}


@dataclass
class Results:
    throughput: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    # CPU seconds of each sidecar path per throughput load and round
    cpu: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    peak_rss: int = 0  # VmHWM after the throughput loads, KiB
    latency: dict[str, list[float]] | None = None
    latency_pipelined: dict[str, list[float]] | None = None
    idle_fresh: IdleRss | None = None  # measured first, on the just-started sidecar
    idle: IdleRss | None = None  # measured after the throughput and latency loads
    soak: Soak | None = None


# A sidecar keeps its idle upstream connections for delivery.connection_cache_idle (5 s by
# default) after a load. Measured right after another sidecar's run, a path ran at half speed
# or less for the whole run while those connections were still open at the egress and the
# sink (100 sessions with -d: 1040-1850 msg/s against 3640-3840 with a pause; bench/NOTES.md),
# so every run waits until the last sidecar run's cache has expired.
CACHE_SETTLE = 5.0 + 1.5


def run_throughput(
    plan: Plan, paths: dict[str, tuple[str, int]], pids: dict[str, int], results: Results
) -> None:
    sidecar_ended = -math.inf
    for load in plan.loads:
        progress(f"throughput: {load.name}")
        for _ in range(plan.rounds):
            for path, (host, port) in paths.items():
                settle = sidecar_ended + CACHE_SETTLE - time.monotonic()
                if settle > 0:
                    time.sleep(settle)
                before = cpu_seconds(pids[path]) if path in pids else 0.0
                seconds = run_load(load, host, port)
                if path in pids:
                    sidecar_ended = time.monotonic()
                if path in pids:
                    used = cpu_seconds(pids[path]) - before
                    results.cpu.setdefault((load.name, path), []).append(used)
                results.throughput.setdefault((load.name, path), []).append(seconds)
    results.peak_rss = rss_kib(pids["sidecar"], "VmHWM")


def run_plan(plan: Plan, paths: dict[str, tuple[str, int]], pids: dict[str, int]) -> Results:
    sidecar_pid = pids["sidecar"]
    results = Results()
    if plan.idle_sessions:
        progress(f"idle sessions on the fresh sidecar: {plan.idle_sessions}")
        results.idle_fresh = measure_idle_rss(
            sidecar_pid, SIDECAR_ADDRESS, SIDECAR_PORT, plan.idle_sessions
        )
    if plan.loads:
        run_throughput(plan, paths, pids, results)
    if plan.latency_messages:
        progress(f"latency: {plan.latency_messages} messages per path")
        latency_paths = {name: paths[name] for name in ("direct", "chain", "sidecar")}
        results.latency = measure_latency(latency_paths, plan.latency_messages, False)
        results.latency_pipelined = measure_latency(latency_paths, plan.latency_messages, True)
    if plan.idle_sessions:
        progress(f"idle sessions: {plan.idle_sessions}")
        results.idle = measure_idle_rss(
            sidecar_pid, SIDECAR_ADDRESS, SIDECAR_PORT, plan.idle_sessions
        )
    if plan.soak_messages:
        progress(f"soak: {plan.soak_messages} messages through the sidecar")
        results.soak = run_soak(
            sidecar_pid, SIDECAR_ADDRESS, SIDECAR_PORT, plan.soak_messages, plan.soak_interval
        )
    return results


def main() -> int:
    args = parse_args()
    if (problem := missing_prerequisite()) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    plan = plan_from(args)
    # Before any child starts, so that the sidecar inherits it: one descriptor per session.
    fd_limit = raise_fd_limit(2 * plan.idle_sessions + 1024)
    if fd_limit < plan.idle_sessions + 256:
        print(f"error: RLIMIT_NOFILE is {fd_limit}, too low for the idle sessions", file=sys.stderr)
        return 2
    paths = {
        "sidecar": (SIDECAR_ADDRESS, SIDECAR_PORT),
        "chain": (FRONT, FRONT_PORT),
        "direct": (MX, MX_PORT),
        "sidecar warn": (WARN_ADDRESS, SIDECAR_PORT),
        "chain nt1": (FRONT_NT1, FRONT_PORT),
    }
    if plan.workers > 1:
        second = workers_path(plan.workers, plan.baseline, plan.workers_auto)
        paths[second] = (WORKERS_ADDRESS, SIDECAR_PORT)
    if plan.profile:
        paths = {"sidecar": paths["sidecar"]}
    with (
        tempfile.TemporaryDirectory(prefix="sidecar-bench-") as tmp,
        services(Path(tmp), plan.profile, plan.workers, plan.baseline, plan.workers_auto) as pids,
    ):
        results = run_plan(plan, paths, pids)
    if plan.profile:
        print(f"collapsed stacks in {plan.profile}")
        return 0
    lines = report(plan, results)
    print("\n".join(lines))
    (ROOT / "bench" / "throughput-results.txt").write_text("\n".join(lines) + "\n")
    return 0


def report(plan: Plan, results: Results) -> list[str]:
    rounds = f", median of {plan.rounds} rounds" if plan.loads else ""
    lines = [
        f"sidecar throughput benchmark, {time.strftime('%Y-%m-%d')}, {platform.node()}, "
        f"{os.cpu_count()} cores, python {platform.python_version()}{rounds}",
    ]
    if plan.loads:
        lines += report_throughput(
            plan.loads, results, plan.workers, plan.baseline, plan.workers_auto
        )
    if results.latency is not None:
        lines += report_latency(results.latency, "one command at a time")
    if results.latency_pipelined is not None:
        lines += report_latency(results.latency_pipelined, "MAIL, RCPT and DATA pipelined")
    if results.idle is not None and results.idle_fresh is not None:
        lines += report_idle(results.idle_fresh, results.idle)
    if results.soak is not None:
        lines += report_soak(results.soak)
    return lines


def report_throughput(
    loads: list[Load],
    results: Results,
    workers: int,
    baseline: Path | None = None,
    auto: bool = False,
) -> list[str]:
    """One row per load: each path's rate, and for each sidecar its ratio to the chain (default
    threading) and its CPU seconds per 1000 messages (all its processes); then the sidecar's
    ratio to the nbthread 1 chain and what its INFO log costs (CPU against ``sidecar warn``)."""
    sidecars = ["sidecar", "sidecar warn"]
    sidecars += [workers_path(workers, baseline, auto)] if workers > 1 else []
    header = f"{'load':48} {'direct':>8} {'chain':>8}"
    for path in sidecars:
        header += f" | {path:>12} {'vs chain':>8} {'CPU/1000':>8}"
    header += f" | {'chain nt1':>9} {'sidecar vs nt1':>14} {'INFO log CPU':>12}"
    lines = ["", header]
    for load in loads:
        rates = {}
        for path in ("direct", "chain", "chain nt1", *sidecars):
            seconds = statistics.median(results.throughput[(load.name, path)])
            if load.size >= 1024 * 1024:
                rates[path] = load.messages * load.size / seconds / 1e6  # MB/s
            else:
                rates[path] = load.messages / seconds  # msg/s
        unit = "MB/s" if load.size >= 1024 * 1024 else "msg/s"
        row = f"{load.name:48} {rates['direct']:>8.1f} {rates['chain']:>8.1f}"
        for path in sidecars:
            per_1000 = statistics.median(results.cpu[(load.name, path)]) / load.messages * 1000
            row += f" | {rates[path]:>12.1f} {rates[path] / rates['chain']:>7.2f}x {per_1000:>8.2f}"
        info, warn = (statistics.median(results.cpu[(load.name, p)]) for p in sidecars[:2])
        row += f" | {rates['chain nt1']:>9.1f} {rates['sidecar'] / rates['chain nt1']:>13.2f}x"
        row += f" {(info - warn) / info:>+11.0%}"
        lines.append(f"{row}  ({unit})")
    lines += [
        "",
        "sidecar: the default (INFO, a line per transaction to a file); sidecar warn: at"
        " --log-level warning; chain: one HAProxy, default threading, both hops (the sidecars'"
        " egress too); chain nt1: two HAProxy processes with nbthread 1.",
        "INFO log CPU: (sidecar - sidecar warn) / sidecar, CPU per message.",
        "CPU/1000: the sidecar's CPU seconds per 1000 messages, all its processes together.",
        *(
            [f'sidecar auto: server.workers = "auto", here {workers} worker processes (INFO).']
            if auto and baseline is None
            else []
        ),
        f"sidecar peak RSS (one process): {mib(results.peak_rss)} MiB",
    ]
    return lines


def report_latency(latencies: dict[str, list[float]], client: str) -> list[str]:
    count = len(latencies["direct"])
    lines = [
        "",
        f"latency per message in ms, from connect to the end-of-data reply; client: {client}",
        f"({count} messages per path, 1 session, new connection each, 2 KB, paths rotated)",
        f"{'path':10} {'p50':>7} {'p99':>7} {'added p50':>10} {'added p99':>10}",
    ]
    direct_p50, direct_p99 = (percentile(latencies["direct"], pct) for pct in (50, 99))
    for path in ("direct", "chain", "sidecar"):
        p50, p99 = (percentile(latencies[path], pct) for pct in (50, 99))
        added = (
            "" if path == "direct" else f" {p50 - direct_p50:>+10.2f} {p99 - direct_p99:>+10.2f}"
        )
        lines.append(f"{path:10} {p50:>7.2f} {p99:>7.2f}{added}")
    return lines


def report_idle(fresh: IdleRss, loaded: IdleRss) -> list[str]:
    def line(when: str, idle: IdleRss) -> str:
        return (
            f"  {when:34} {mib(idle.before_kib):>5} -> {mib(idle.with_sessions_kib):>5} MiB"
            f" (opened and greeted in {idle.open_seconds:.1f} s)"
        )

    return [
        "",
        f"sidecar RSS with {fresh.sessions} idle sessions (target <= {ISSUE_RSS_TARGET_MIB} MiB):",
        line("just started:", fresh),
        line("after the loads above:", loaded),
    ]


def report_soak(soak: Soak) -> list[str]:
    load = soak.load
    per_1000 = soak.cpu_seconds / load.messages * 1000
    return [
        "",
        f"soak: {load.messages} messages, {load.sessions} sessions, new connection per message,"
        f" 2 KB: {load.messages / soak.seconds:.0f} msg/s, sidecar CPU {per_1000:.2f} s/1000",
        f"  RSS {mib(soak.rss_at(0.1))} MiB at 10%, {mib(soak.samples[-1][1])} MiB at the end,"
        f" max {mib(soak.rss_max)} MiB (start {mib(soak.samples[0][1])} MiB,"
        f" {len(soak.samples)} samples every {soak.interval:g} s)",
    ]


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


if __name__ == "__main__":
    sys.exit(main())
