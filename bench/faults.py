#!/usr/bin/env python3
"""The fault battery (issue 5): a real ``sidecar run`` process behind real HAProxy and dnsmasq,
with trio test MXes, gets every kind of bad input and fault many times over; the figures say
whether it kept its promises.

Run as root from the repository root::

    .venv/bin/python bench/faults.py              # full run: 30 rounds, under 3 minutes
    .venv/bin/python bench/faults.py --rounds 2   # quick run (CI: tests/e2e/test_faults_battery.py)

Each round throws, concurrently: SMTP smuggling variants at an MX that accepts bare-LF
endings, over-long lines, NUL and non-UTF-8 bytes, random garbage, pipelining bursts,
thousands of recipients, slow, idle and non-reading clients, clients stalling, vanishing
mid-DATA or right after it, an MX that closes, hangs, answers 421 or speaks garbage at every
stage, an MX that vanishes mid-DATA, and DNS answering garbage, nothing, truncated or
oversized answers. Then, on its own, HAProxy is killed (SIGKILL) with transactions in flight
and restarted. The sidecar runs with short timeouts (``SERVER``, ``DELIVERY`` below) so that
the slow cases take seconds.

Every message carries a unique token, so the messages the MXes saw can be matched with what
each client was told. Must be 0: sidecar crashes (process exit or an unhandled error in its
log), messages an MX saw twice or in part, messages a client was told 250 for that the MX did
not accept, sessions whose replies were not the expected ones. Reported: messages an MX
accepted whose client was not told 250 (the connection was lost around the final reply: the
client retries, a duplicate RFC 5321 section 6.1 accepts), peak RSS. The figures are printed
and written to ``bench/faults-results.txt`` (``--output``); the exit status is 1 when a
must-be-0 figure is not 0.
"""

from __future__ import annotations

import argparse
import contextvars
import datetime
import hashlib
import os
import platform
import random
import re
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testkit import (  # noqa: E402
    Addresses,
    Dnsmasq,
    Endpoint,
    HAProxy,
    HostRecord,
    ManagedProcess,
    MXRecord,
    RawSMTPClient,
    TestMX,
    free_port,
    smtp_reply,
)
from testkit.dns_stub import StubDns, by_suffix, forward, garbage, truncating, zone  # noqa: E402

STAGES = ("CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "END")
# The step of a transaction (MAIL=0, RCPT=1, DATA=2, end of data=3) whose reply shows an MX
# fault at each stage: the whole upstream set-up happens while the client waits for RCPT.
FAILING_STEP = {"CONNECT": 1, "EHLO": 1, "MAIL": 1, "RCPT": 1, "DATA": 2, "END": 3}
TOKEN_RE = re.compile(rb"X-Battery-Token: (\S+)")
SCENARIO_TIMEOUT = 40.0
CONNECTION_ERRORS = (OSError, EOFError, trio.BrokenResourceError, trio.ClosedResourceError)

SERVER = {"client_command_timeout": 2, "data_timeout": 2, "shutdown_grace": 2}
DELIVERY = {
    "setup_timeout": 8,
    "connect_timeout": 1,
    "banner_timeout": 1,
    "mx_command_timeout": 1.5,
    "data_init_timeout": 1.5,
    "data_send_timeout": 1.5,
    "data_done_timeout": 2,
    "max_mx_addresses": 3,
}

SMUGGLED = (
    b"MAIL FROM:<evil@client.test>\r\nRCPT TO:<victim@good.test>\r\nDATA\r\n"
    b"From: ceo@good.test\r\nSubject: smuggled\r\n\r\nSmuggled!\r\n"
)
# The data before the client's real "<CRLF>.<CRLF>", as in tests/e2e/test_data_relay.py.
SMUGGLING = {
    "lf-dot-lf": b"\n.\n" + SMUGGLED,
    "lf-dot-crlf": b"\n.\r\n" + SMUGGLED,
    "crlf-dot-lf": b"\r\n.\n" + SMUGGLED,
    "cr-dot-cr": b"\r.\r" + SMUGGLED,
    "crlf-dot-cr": b"\r\n.\r" + SMUGGLED,
    "cr-dot-crlf": b"\r.\r\n" + SMUGGLED,
    "crlf-nul-dot-crlf": b"\r\n\x00.\r\n" + SMUGGLED,
    "lf-lf-dot-lf-lf": b"\n\n.\n\n" + SMUGGLED,
    "bare-lf-in-body": b"\r\nbo\ndy\r\n",
    "bare-cr-in-body": b"\r\nbo\rdy\r\n",
    "nul-in-body": b"\r\nbo\x00dy\r\n",
    "bare-cr-before-end": b"\r\nbody\r",
}
BAD_LINES = [
    b"NOOP\x00",
    b"\x00\x00\x00",
    b"EHLO cli\x00ent.test",
    b"MAIL FROM:<a\x00b@client.test>",
    b"\xff\xfe\xfd\xfc",
    b"EHLO \xc0\x80",
    b"NOOP \xed\xa0\x80",
    b"RCPT TO:<r@ex\xe4mple.test>",
    b"H\xc3\xa9LO client.test",
    b"MAIL FROM:<a@client.test> SIZE=\xc2\xb2",
    "MAIL FROM:<a@client.test> SIZE=١٢٣".encode(),
    b"MAIL FROM:<a@client.test> SIZE=" + b"9" * 4000,
    b"MAIL FROM:<a@client.test> BODY=\xc3\xa9",
    b"RCPT TO:<a@b@c.test>",
    b"DATA",
    b"BDAT 10 LAST",
    b"AUTH PLAIN AGFhAGI=",
    b"FROBNICATE",
]


GROUPS = {
    "smuggling": f"smuggling ({len(SMUGGLING)} variants, then a clean message)",
    "mx-hang": "MX silent at each of 6 stages",
    "mx-close": "MX closes at each of 6 stages",
    "mx-421": "MX says 421 at each of 6 stages",
    "mx-junk": "MX speaks garbage at each of 6 stages",
    "haproxy-killed": "HAProxy SIGKILLed mid-traffic, restarted *",
}
# Not SMTP, each at one stage: what an MX (or something else listening on port 25) might say.
JUNK = {
    "CONNECT": b"SSH-2.0-OpenSSH_9.2p1\r\n",
    "EHLO": b"250-" + b"x" * 10_000 + b"\r\n250 ok\r\n",
    "MAIL": b"\x00\x01\x02\xff\r\n",
    "RCPT": b"2500 ok\r\n",
    "DATA": b"354-go ahead\r\n250 or not\r\n",
    "END": b"Hello? Is this thing on?\r\n",
}
_scenario: contextvars.ContextVar[str] = contextvars.ContextVar("scenario")


def group_of(scenario: str) -> str:
    """The table row of a scenario: "mx-hang-ehlo/after" -> "mx-hang"."""
    name = scenario.split("/")[0]
    for prefix in ("mx-hang", "mx-close", "mx-421", "mx-junk"):
        if name.startswith(prefix + "-"):
            return prefix
    return name


class Unexpected(Exception):
    """The sidecar's behaviour was not what the scenario expects."""


def check(condition: bool, what: str) -> None:
    if not condition:
        raise Unexpected(what)


@dataclass
class Sent:
    """A message a client sent: (the digest of) what the MX must see as its data, and what the
    client was told at the end of data (``None``: no reply, the connection was lost)."""

    scenario: str
    digest: bytes  # SHA-256 of the data the MX must see
    must_not_arrive: bool = False  # refused by design: any MX copy is a partial/smuggled one
    final: bytes | None = None


@dataclass
class Tally:
    tried: int = 0
    expected: int = 0
    unexpected: list[str] = field(default_factory=list)


class SidecarRun(ManagedProcess):
    """``sidecar run -c FILE``; ready when the listener answers 220."""

    name = "sidecar"

    def __init__(self, workdir: Path, config_path: Path, listener: Endpoint) -> None:
        super().__init__(workdir)
        self.config_path = config_path
        self.listener = listener

    def argv(self) -> list[str]:
        entry = Path(sys.executable).parent / "sidecar"
        command = [str(entry)] if entry.exists() else [sys.executable, "-m", "sidecar.cli"]
        return [*command, "run", "-c", str(self.config_path)]

    def ready(self) -> bool:
        try:
            with socket.create_connection(self.listener.as_tuple(), timeout=1) as sock:
                return sock.recv(4).startswith(b"220")
        except OSError:
            return False

    def status_kib(self, field_name: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
        raise LookupError(field_name)


class Battery:
    def __init__(self, workdir: Path, rounds: int, seed: int) -> None:
        self.workdir = workdir
        self.rounds = rounds
        self.rng = random.Random(seed)
        self.addresses = Addresses()
        self.ledger: dict[str, Sent] = {}
        self.tallies: dict[str, Tally] = {}
        self.mxes: dict[str, TestMX] = {}
        self.all_mxes: list[TestMX] = []  # every TestMX ever started (vanish.test restarts)
        self.numbers = iter(range(1, 10**9))
        self.recoveries: list[float] = []
        self.dns_queries_per_big_lookup: list[int] = []
        self.nursery: trio.Nursery | None = None
        # What the MXes saw, matched with the ledger by collect().
        self.collected: dict[int, int] = {}
        self.seen: Counter[str] = Counter()
        self.accepted_by_mx: dict[str, bytes] = {}
        self.partial: list[str] = []
        self.limiter = trio.CapacityLimiter(32)

    # -- the stack --------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        behaviours: dict[str, dict[str, Any]] = {
            "good": {},
            "lf": {"accept_bare_lf": True},
            "vanish": {},
        }
        for stage in STAGES:
            low = stage.lower()
            behaviours[f"hang-{low}"] = {"hang_at": stage}
            behaviours[f"close-{low}"] = {"close_at": stage}
            if stage == "CONNECT":
                behaviours["421-connect"] = {"banner": smtp_reply(421, "4.3.2 too busy")}
                behaviours["junk-connect"] = {"banner": JUNK[stage]}
            else:
                behaviours[f"421-{low}"] = {"replies": {stage: smtp_reply(421, "4.3.2 closing")}}
                behaviours[f"junk-{low}"] = {"replies": {stage: JUNK[stage]}}
        addresses = {name: self.addresses.ipv4() for name in behaviours}
        self.port = free_port(addresses["good"])
        for name, options in behaviours.items():
            await self.start_mx(name, Endpoint(addresses[name], self.port), options)
        records: list[Any] = []
        for name, address in addresses.items():
            records += [
                MXRecord(f"{name}.test", f"mx.{name}.test"),
                HostRecord(f"mx.{name}.test", [address]),
            ]
        self.dnsmasq = Dnsmasq(
            self.workdir / "dnsmasq", self.addresses.endpoint(udp=True), records, ttl=5
        )
        self.dnsmasq.start()
        good = addresses["good"]
        big: dict[tuple[str, str], list[str]] = {
            ("big.test", "MX"): [f"10 h{i}.big.test." for i in range(200)],
            ("tc.test", "MX"): ["10 mx.tc.test."],
            ("mx.tc.test", "A"): [good],
        }
        for i in range(200):
            big[(f"h{i}.big.test", "A")] = [good]
        hostile = zone(big, ttl=0)
        self.stub = StubDns(
            self.addresses.endpoint(udp=True),
            by_suffix(
                {
                    "garbage.test": garbage(1),
                    "garbage-id.test": garbage(2, echo_id=True),
                    "silent.test": lambda query, transport: None,
                    "tc.test": truncating(hostile),
                    "tc-garbage.test": truncating(garbage(3, max_size=3000)),
                    "big.test": hostile,
                },
                forward(self.dnsmasq.endpoint),
            ),
        )
        self.stub.start()
        self.haproxy = HAProxy(self.workdir / "haproxy", self.addresses.endpoint())
        self.haproxy.start()
        self.listener = self.addresses.endpoint()
        config = {
            "server": {"hostname": "sidecar.test", **SERVER},
            "listener": [{"address": str(self.listener), "binding": "b1"}],
            "dns": {"nameservers": [str(self.stub.endpoint)], "timeout": 1},
            "delivery": {
                "port": self.port,
                "allow_private_destinations": True,
                "tls": "disabled",
                **DELIVERY,
            },
            "ha_proxy_client": {"health_check_interval": 0.5, "health_check_timeout": 0.5},
            "binding": {
                "b1": {
                    "ha_proxy_server": str(self.haproxy.bind),
                    "ha_proxy_src_addr": self.addresses.ipv4(),
                }
            },
        }
        config_path = self.workdir / "sidecar.toml"
        config_path.write_text(tomli_w.dumps(config), encoding="utf-8")
        self.sidecar = SidecarRun(self.workdir / "sidecar", config_path, self.listener)
        self.sidecar.start()

    async def start_mx(self, name: str, endpoint: Endpoint, options: dict[str, Any]) -> TestMX:
        assert self.nursery is not None
        mx = TestMX(endpoint, hostname=f"mx.{name}.test", **options)
        await self.nursery.start(mx.serve)
        self.mxes[name] = mx
        self.all_mxes.append(mx)
        return mx

    def stop(self) -> None:
        """Stop (or kill) whatever was started; safe after a partial start."""
        names = ("sidecar", "haproxy", "dnsmasq")
        for process in (getattr(self, name, None) for name in names):
            if process is not None:
                process.stop()
        stub = getattr(self, "stub", None)
        if stub is not None:
            stub.stop()

    # -- bookkeeping --------------------------------------------------------------------------

    def message(self, what: str = "", size: int = 0, *, must_not_arrive: bool = False) -> bytes:
        """A fresh message body (ending in CRLF) with a unique token, put in the ledger under
        the running scenario's name (``/what`` appended)."""
        scenario = _scenario.get() + (f"/{what}" if what else "")
        token = f"{scenario}#{next(self.numbers)}"
        body = f"X-Battery-Token: {token}\r\nSubject: {scenario}\r\n\r\nHello.\r\n".encode()
        if size:
            line = b"The quick brown fox jumps over the lazy dog 0123456789.\r\n"
            body += line * (size // len(line))
        self.ledger[token] = Sent(scenario, hashlib.sha256(body).digest(), must_not_arrive)
        return body

    def told(self, body: bytes, final: bytes | None) -> None:
        match = TOKEN_RE.search(body)
        assert match is not None
        self.ledger[match[1].decode()].final = final

    async def run_scenario(self, name: str, scenario: Callable[[], Awaitable[None]]) -> None:
        tally = self.tallies.setdefault(group_of(name), Tally())
        tally.tried += 1
        _scenario.set(name)
        async with self.limiter:
            try:
                with trio.fail_after(SCENARIO_TIMEOUT):
                    await scenario()
            except Exception as error:
                leaf: BaseException = error
                while isinstance(leaf, BaseExceptionGroup):
                    leaf = leaf.exceptions[0]
                if isinstance(leaf, Unexpected):
                    what = str(leaf)
                elif isinstance(leaf, trio.TooSlowError):
                    what = f"no outcome within {SCENARIO_TIMEOUT:g}s"
                elif isinstance(leaf, CONNECTION_ERRORS):
                    what = f"connection error: {leaf!r}"
                else:
                    raise  # a bug in the battery itself
                tally.unexpected.append(f"{name}: {what}"[:300])
                return
        tally.expected += 1

    # -- client helpers -------------------------------------------------------------------------

    async def connect(self, *, ehlo: bool = True) -> RawSMTPClient:
        client = await RawSMTPClient.connect(self.listener)
        banner = await client.read_reply()
        check(banner.startswith(b"220 "), f"banner {banner!r}")
        if ehlo:
            answer = await client.command(b"EHLO client.test")
            check(answer.startswith(b"250"), f"EHLO {answer!r}")
        return client

    async def transaction(
        self, client: RawSMTPClient, rcpt: str, body: bytes, payload: bytes | None = None
    ) -> list[bytes]:
        """MAIL, RCPT, DATA and the data; the replies up to the first negative one or the
        final reply (recorded in the ledger). ``payload`` replaces ``body + b".\\r\\n"``."""
        answers = [await client.command(b"MAIL FROM:<battery@client.test>")]
        check(answers[0].startswith(b"250 "), f"MAIL {answers[0]!r}")
        answers.append(await client.command(f"RCPT TO:<{rcpt}>".encode()))
        if not answers[-1].startswith(b"25"):
            self.told(body, None)
            await client.command(b"RSET")
            return answers
        answers.append(await client.command(b"DATA"))
        if not answers[-1].startswith(b"354"):
            self.told(body, None)
            return answers
        await client.send(payload if payload is not None else body + b".\r\n")
        final = await client.read_reply()
        answers.append(final)
        self.told(body, final or None)
        return answers

    async def deliver(self, client: RawSMTPClient, what: str = "", size: int = 0) -> None:
        """A clean message to good.test that must be delivered."""
        body = self.message(what, size)
        answers = await self.transaction(client, "rcpt@good.test", body)
        check(answers[-1].startswith(b"250 "), f"clean delivery: {answers!r}")

    # -- client-side bad input --------------------------------------------------------------------

    async def normal(self) -> None:
        async with await self.connect() as client:
            await self.deliver(client)
            await client.command(b"QUIT")

    async def smuggling(self, variant: str, split: bool) -> None:
        body = self.message(must_not_arrive=True)
        data = body[:-2] + SMUGGLING[variant]  # the token's message, then the smuggling bytes
        payload = data + (b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n")
        async with await self.connect() as client:
            for line in (b"MAIL FROM:<battery@client.test>", b"RCPT TO:<rcpt@lf.test>", b"DATA"):
                answer = await client.command(line)
                check(answer[:1] in (b"2", b"3"), f"{line!r}: {answer!r}")
            if split:
                for start in range(0, len(payload), 7):
                    await client.send(payload[start : start + 7])
                    await trio.sleep(0.001)
            else:
                await client.send(payload)
            final = await client.read_reply()
            self.told(body, final or None)
            check(final.startswith(b"554 5.6.0 "), f"{variant}: {final!r}")
            await self.deliver(client, "after")
            await client.command(b"QUIT")

    async def long_lines(self) -> None:
        async with await self.connect() as client:
            answer = await client.command(b"NOOP " + b"x" * 5000)
            check(answer.startswith(b"500 5.5.6 "), f"5000-byte line: {answer!r}")
            await client.send(b"y" * 100_000)
            await client.send(b"y" * 100_000 + b"\r\n")
            answer = await client.read_reply()
            check(answer.startswith(b"500 5.5.6 "), f"200 kB line: {answer!r}")
            await self.deliver(client, "after")
            await client.command(b"QUIT")

    async def bad_bytes(self) -> None:
        lines = [*BAD_LINES]
        self.rng.shuffle(lines)
        async with await self.connect() as client:
            await client.send(b"".join(line + b"\r\n" for line in lines))
            for line in lines:
                answer = await client.read_reply()
                check(answer[:1] == b"5", f"{line[:40]!r}: {answer!r}")
            await self.deliver(client, "after")
            await client.command(b"QUIT")

    async def garbage_input(self, seed: int) -> None:
        rng = random.Random(seed)
        alphabet = b"\r\n\x00 .:<>@\xff\xc3MAILRCPTDATA" + bytes(range(256))
        data = bytes(rng.choice(alphabet) for _ in range(4000))
        async with await self.connect(ehlo=rng.random() < 0.5) as client:
            replies = b""
            try:
                for start in range(0, len(data), 500):
                    await client.send(data[start : start + 500])
                await client.send(b"\r\nQUIT\r\n")
                while chunk := await client.stream.receive_some(65536):
                    replies += chunk
            except CONNECTION_ERRORS:
                pass  # closed after too many errors (421) while we were still sending
        # Whatever came back is a sequence of well-formed replies, and none of them a 354.
        check(re.fullmatch(rb"([2-5]\d\d[ -][^\r\n]*\r\n)*", replies) is not None, "reply syntax")
        check(re.search(rb"(^|\n)354", replies) is None, "garbage reached DATA")

    async def pipelining(self) -> None:
        cycle = [(b"NOOP", b"250 "), (b"RSET", b"250 "), (b"VRFY x", b"252 "), (b"HELP", b"214")]
        commands = [cycle[i % len(cycle)] for i in range(2000)]
        body = self.message()
        burst = b"".join(line + b"\r\n" for line, _ in commands)
        burst += b"MAIL FROM:<battery@client.test>\r\nRCPT TO:<rcpt@good.test>\r\nDATA\r\n"
        async with await self.connect() as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send, burst)
                for index, (line, expected) in enumerate(commands):
                    answer = await client.read_reply()
                    check(answer.startswith(expected), f"#{index} {line!r}: {answer!r}")
                envelope = [await client.read_reply() for _ in range(3)]
            check([a[:3] for a in envelope] == [b"250", b"250", b"354"], f"{envelope!r}")
            await client.send(body + b".\r\n")
            final = await client.read_reply()
            self.told(body, final)
            check(final.startswith(b"250 "), f"final {final!r}")
            await client.command(b"QUIT")

    async def many_recipients(self) -> None:
        count, limit = 1200, 1000
        body = self.message()
        burst = b"MAIL FROM:<battery@client.test>\r\n" + b"".join(
            f"RCPT TO:<r{i}@good.test>\r\n".encode() for i in range(count)
        )
        async with await self.connect() as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send, burst)
                check((await client.read_reply()).startswith(b"250 "), "MAIL")
                answers = [await client.read_reply() for _ in range(count)]
            check(all(a.startswith(b"250 ") for a in answers[:limit]), "first 1000 RCPTs")
            check(all(a.startswith(b"452 4.5.3 ") for a in answers[limit:]), "RCPTs over 1000")
            check((await client.command(b"DATA")).startswith(b"354"), "DATA")
            await client.send(body + b".\r\n")
            final = await client.read_reply()
            self.told(body, final)
            check(final.startswith(b"250 "), f"final {final!r}")
            await client.command(b"QUIT")

    async def slowloris(self) -> None:
        async with await self.connect() as client:
            began = trio.current_time()
            answer = b""

            async def trickle() -> None:
                for byte in b"NOOP NOOP NOOP NOOP NOOP NOOP NOOP\r\n":
                    await client.send(bytes([byte]))
                    await trio.sleep(0.25)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                answer = await client.read_reply()
                nursery.cancel_scope.cancel()
            check(answer.startswith(b"421 4.4.2 "), f"slowloris: {answer!r}")
            elapsed = trio.current_time() - began
            check(elapsed < SERVER["client_command_timeout"] + 1.5, f"421 after {elapsed:.1f}s")

    async def idle(self) -> None:
        async with await self.connect() as client:
            answer = await client.read_reply()
            check(answer.startswith(b"421 4.4.2 "), f"idle: {answer!r}")
            check(await client.read_reply() == b"", "idle: not closed")

    async def stop_reading(self) -> None:
        burst = b"NOOP\r\n" * (1 << 20)  # 6 MiB of commands, 14 MiB of replies due
        async with await self.connect() as client:
            began = trio.current_time()
            try:
                for _ in range(8):
                    await client.send(burst)
            except (trio.BrokenResourceError, OSError):
                elapsed = trio.current_time() - began
                check(elapsed < 20, f"cut off after {elapsed:.1f}s")
                return
            raise Unexpected("48 MiB of commands taken without the replies being read")

    async def vanish_mid_data(self) -> None:
        body = self.message(size=200_000)
        async with await self.connect() as client:
            answers = [
                await client.command(b"MAIL FROM:<battery@client.test>"),
                await client.command(b"RCPT TO:<rcpt@good.test>"),
                await client.command(b"DATA"),
            ]
            check([a[:3] for a in answers] == [b"250", b"250", b"354"], f"{answers!r}")
            cut = self.rng.randrange(1, len(body))
            await client.send(body[:cut])
            await trio.sleep(0.05)

    async def slow_data(self) -> None:
        """The client stalls in the middle of its data: 421 after data_timeout, and the MX
        sees no end of data."""
        body = self.message(size=20_000)
        async with await self.connect() as client:
            for line in (b"MAIL FROM:<battery@client.test>", b"RCPT TO:<rcpt@good.test>", b"DATA"):
                answer = await client.command(line)
                check(answer[:1] in (b"2", b"3"), f"{line!r}: {answer!r}")
            began = trio.current_time()
            await client.send(body[:10_000])
            answer = await client.read_reply()
            self.told(body, answer or None)
            elapsed = trio.current_time() - began
            check(answer.startswith(b"421 4.4.2 "), f"stalled DATA: {answer!r}")
            check(elapsed < SERVER["data_timeout"] + 1.5, f"421 after {elapsed:.1f}s")
            check(await client.read_reply() == b"", "not closed after 421")

    async def vanish_after_end(self) -> None:
        """The client leaves right after its end of data: the MX may well accept the message
        (the sidecar cannot stop that) and the client never hears of it."""
        body = self.message()
        async with await self.connect() as client:
            for line in (b"MAIL FROM:<battery@client.test>", b"RCPT TO:<rcpt@good.test>"):
                check((await client.command(line)).startswith(b"250"), line.decode())
            check((await client.command(b"DATA")).startswith(b"354"), "DATA")
            await client.send(body + b".\r\n")

    async def big_message(self) -> None:
        async with await self.connect() as client:
            await self.deliver(client, size=5_000_000)
            await client.command(b"QUIT")

    # -- faults on the far side --------------------------------------------------------------------

    async def mx_fault(self, kind: str, stage: str) -> None:
        body = self.message()
        async with await self.connect() as client:
            answers = await self.transaction(client, f"rcpt@{kind}-{stage.lower()}.test", body)
            step = FAILING_STEP[stage]
            check(len(answers) == step + 1, f"failed at step {len(answers) - 1}: {answers!r}")
            check(answers[-1][:1] == b"4", f"not a 4xx: {answers!r}")
            if step == 2:
                await client.command(b"RSET")
            await self.deliver(client, "after")
            await client.command(b"QUIT")

    async def mx_vanishes(self) -> None:
        body = self.message(size=100_000)
        mx = self.mxes["vanish"]
        try:
            async with await self.connect() as client:
                answers = [
                    await client.command(b"MAIL FROM:<battery@client.test>"),
                    await client.command(b"RCPT TO:<rcpt@vanish.test>"),
                    await client.command(b"DATA"),
                ]
                check([a[:3] for a in answers] == [b"250", b"250", b"354"], f"{answers!r}")
                await client.send(body[:50_000])
                await trio.sleep(0.05)
                mx.close()  # every connection of this MX dropped, mid-DATA
                await trio.sleep(0.05)
                await client.send(body[50_000:] + b".\r\n")
                final = await client.read_reply()
                self.told(body, final or None)
                check(final.startswith(b"451 4.4.2 "), f"final {final!r}")
        finally:
            await trio.sleep(0.05)
            await self.start_mx("vanish", mx.endpoint, {})

    async def dns_fault(self, domain: str, expected: bytes, max_seconds: float) -> None:
        body = self.message()
        async with await self.connect() as client:
            began = trio.current_time()
            before = self.stub_queries(domain)
            answers = await self.transaction(client, f"rcpt@{domain}", body)
            elapsed = trio.current_time() - began
            if domain == "big.test":
                self.dns_queries_per_big_lookup.append(self.stub_queries(domain) - before)
            check(answers[-1].startswith(expected), f"{domain}: {answers!r}")
            check(elapsed < max_seconds, f"{domain}: {elapsed:.2f}s")
            await client.command(b"QUIT")

    def stub_queries(self, domain: str) -> int:
        return sum(1 for _, name, _ in self.stub.queries if name.endswith(domain))

    async def haproxy_killed(self) -> None:
        """Transactions in flight (mid-DATA, waiting for the final reply, deliveries in a
        loop), HAProxy SIGKILLed at a random moment, then restarted: every client told 4xx
        or the MX's own reply; the sidecar delivers again once its health checks agree."""
        clients: list[RawSMTPClient] = []
        bodies: list[bytes] = []
        stop_loop = trio.Event()
        try:
            for rcpt in ("rcpt@good.test", "rcpt@good.test", "rcpt@hang-end.test"):
                client = await self.connect()
                clients.append(client)
                body = self.message("in-flight", size=50_000)
                bodies.append(body)
                for line in (b"MAIL FROM:<battery@client.test>", f"RCPT TO:<{rcpt}>".encode()):
                    check((await client.command(line)).startswith(b"250"), f"{rcpt}: {line!r}")
                check((await client.command(b"DATA")).startswith(b"354"), "DATA")
            await clients[0].send(bodies[0][:20_000])
            await clients[1].send(bodies[1][:40_000])
            await clients[2].send(bodies[2] + b".\r\n")  # the MX never answers it

            async def loop() -> None:
                while not stop_loop.is_set():
                    body = self.message("race")
                    try:
                        async with await self.connect() as client:
                            answers = await self.transaction(client, "rcpt@good.test", body)
                    except CONNECTION_ERRORS:
                        continue
                    # A delivery racing the kill: the MX's 250 or a 4xx, nothing else.
                    check(answers[-1][:1] in (b"2", b"4"), f"race: {answers!r}")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(loop)
                await trio.sleep(self.rng.uniform(0.05, 0.3))
                self.haproxy.kill()
                await trio.sleep(0.2)
                stop_loop.set()
            for client, body in zip(clients[:2], bodies[:2], strict=True):
                await client.send(body[len(body) // 2 :] + b".\r\n")
            for client, body in zip(clients, bodies, strict=True):
                final = await client.read_reply()
                self.told(body, final or None)
                check(final[:1] == b"4", f"in flight when HAProxy died: {final!r}")
        finally:
            for client in clients:
                await client.aclose()
            if not self.haproxy.running:
                self.haproxy.start()
        began = trio.current_time()
        with trio.fail_after(20):
            while True:
                body = self.message("recovery")
                async with await self.connect() as client:
                    answers = await self.transaction(client, "rcpt@good.test", body)
                if answers[-1].startswith(b"250 "):
                    break
                check(answers[-1][:1] == b"4", f"while HAProxy comes back: {answers!r}")
                await trio.sleep(0.1)
        self.recoveries.append(trio.current_time() - began)

    # -- the rounds --------------------------------------------------------------------------------

    def round_scenarios(self, index: int) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        def bind(
            function: Callable[..., Awaitable[None]], *args: Any
        ) -> Callable[[], Awaitable[None]]:
            return lambda: function(*args)

        scenarios: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        scenarios += [("normal", self.normal)] * 4
        for variant in SMUGGLING:
            scenarios.append(
                (f"smuggling/{variant}", bind(self.smuggling, variant, index % 2 == 1))
            )
        scenarios += [
            ("long-lines", self.long_lines),
            ("bad-bytes", self.bad_bytes),
            ("bad-bytes", self.bad_bytes),
            ("garbage", bind(self.garbage_input, index * 7 + 1)),
            ("garbage", bind(self.garbage_input, index * 7 + 2)),
            ("pipelining-2000", self.pipelining),
            ("rcpts-1200", self.many_recipients),
            ("slowloris", self.slowloris),
            ("idle", self.idle),
            ("stop-reading", self.stop_reading),
            ("vanish-mid-data", self.vanish_mid_data),
            ("vanish-mid-data", self.vanish_mid_data),
            ("vanish-after-end", self.vanish_after_end),
            ("slow-data", self.slow_data),
            ("big-5MB", self.big_message),
            ("mx-vanishes-mid-data", self.mx_vanishes),
        ]
        for kind in ("hang", "close", "421", "junk"):
            for stage in STAGES:
                scenarios.append((f"mx-{kind}-{stage.lower()}", bind(self.mx_fault, kind, stage)))
        scenarios += [
            ("dns-garbage", bind(self.dns_fault, "garbage.test", b"451 4.4.3 ", 3)),
            ("dns-garbage-id", bind(self.dns_fault, "garbage-id.test", b"451 4.4.3 ", 3)),
            ("dns-silent", bind(self.dns_fault, "silent.test", b"451 4.4.3 ", 3)),
            ("dns-tc-garbage", bind(self.dns_fault, "tc-garbage.test", b"451 4.4.3 ", 2)),
            ("dns-tc-then-tcp", bind(self.dns_fault, "tc.test", b"250 ", 3)),
            ("dns-200-mx", bind(self.dns_fault, "big.test", b"250 ", 5)),
        ]
        return scenarios

    async def run(self) -> None:
        for index in range(self.rounds):
            scenarios = self.round_scenarios(index)
            self.rng.shuffle(scenarios)
            async with trio.open_nursery() as nursery:
                for name, scenario in scenarios:
                    nursery.start_soon(self.run_scenario, name, scenario)
            if self.sidecar.running:
                await self.run_scenario("haproxy-killed", self.haproxy_killed)
            if not self.sidecar.running:
                print(f"round {index + 1}: the sidecar process died", file=sys.stderr)
                break
            await trio.sleep(0.2)  # let the MXes finish recording
            self.collect()
            print(f"round {index + 1}/{self.rounds} done", file=sys.stderr, flush=True)
        await trio.sleep(0.5)

    # -- figures -----------------------------------------------------------------------------------

    def collect(self) -> None:
        """Match the messages the MXes saw since the last call with the ledger, then drop their
        data (the 5 MB messages would pile up over the rounds)."""
        for mx in self.all_mxes:
            start = self.collected.get(id(mx), 0)
            self.collected[id(mx)] = len(mx.messages)
            for message in mx.messages[start:]:
                tokens = TOKEN_RE.findall(message.data)
                if len(tokens) != 1:
                    self.partial.append(f"{mx.hostname} saw a message with {len(tokens)} tokens")
                    continue
                token = tokens[0].decode()
                sent = self.ledger.get(token)
                self.seen[token] += 1
                digest = hashlib.sha256(message.data).digest()
                if sent is None or sent.must_not_arrive or digest != sent.digest:
                    self.partial.append(f"{token}: {mx.hostname} saw {len(message.data)} bytes")
                if message.accepted:
                    self.accepted_by_mx[token] = message.reply
                message.data = b""

    def figures(self) -> dict[str, Any]:
        self.collect()
        accepted_by_mx = self.accepted_by_mx
        told_250: Counter[str] = Counter()
        mx_accepted: Counter[str] = Counter()
        not_told: Counter[str] = Counter()
        false_250: list[str] = []
        for token, sent in self.ledger.items():
            group = group_of(sent.scenario)
            if sent.final is not None and sent.final.startswith(b"250"):
                told_250[group] += 1
                if accepted_by_mx.get(token) != sent.final:  # byte for byte, the MX's reply
                    false_250.append(token)
            if token in accepted_by_mx:
                mx_accepted[group] += 1
                if sent.final is None or not sent.final.startswith(b"250"):
                    not_told[group] += 1
        return {
            "twice": [token for token, count in self.seen.items() if count > 1],
            "partial": self.partial,
            "false_250": false_250,
            "not_told": not_told,
            "told_250": told_250,
            "mx_accepted": mx_accepted,
        }


def crash_lines(log: str) -> list[str]:
    """Log lines that show an error escaping from a session (or worse)."""
    return [
        line
        for line in log.splitlines()
        if "unhandled error" in line
        or "Traceback" in line
        or line.startswith(("ERROR", "CRITICAL"))
        or " ERROR " in line
        or " CRITICAL " in line
    ]


def report(battery: Battery, figures: dict[str, Any], extra: dict[str, Any]) -> tuple[str, bool]:
    told, accepted = figures["told_250"], figures["mx_accepted"]
    width = 46
    lines = [
        f"sidecar fault battery, {extra['date']}",
        f"machine: {extra['machine']}",
        f"rounds: {battery.rounds} (seed {extra['seed']}), {extra['seconds']:.0f} s",
        "",
        f"{'scenario':<{width}}{'tried':>6}{'as expected':>12}{'told 250':>10}{'MX accepted':>12}",
    ]
    tried_total = expected_total = 0
    for group in sorted(battery.tallies):
        tally = battery.tallies[group]
        tried_total += tally.tried
        expected_total += tally.expected
        lines.append(
            f"{GROUPS.get(group, group):<{width}}{tally.tried:>6}{tally.expected:>12}"
            f"{told[group]:>10}{accepted[group]:>12}"
        )
    lines.append(
        f"{'total':<{width}}{tried_total:>6}{expected_total:>12}"
        f"{sum(told.values()):>10}{sum(accepted.values()):>12}"
    )
    lines.append(
        "* each run also delivers in a loop across the kill; those messages are in its"
        " told-250 and MX-accepted counts"
    )
    crashes = extra["crash_lines"]
    must_be_zero = {
        "sidecar crashes (process died, unhandled errors logged)": len(crashes)
        + (0 if extra["exit_status"] == 0 else 1),
        "messages an MX saw twice or partially completed": len(figures["twice"])
        + len(figures["partial"]),
        "messages told 250 that the MX did not accept": len(figures["false_250"]),
        "sessions with another outcome than expected": tried_total - expected_total,
    }
    not_told = figures["not_told"]
    label = 58
    lines += ["", f"{'figure':<{label}}{'value':>8}  must be"]
    lines.append(f"{'inputs tried (sessions)':<{label}}{tried_total:>8}")
    for name, value in must_be_zero.items():
        lines.append(f"{name:<{label}}{value:>8}  0")
    detail = ", ".join(f"{k} {v}" for k, v in sorted(not_told.items())) or "-"
    lines.append(
        f"{'messages an MX accepted, client not told 250':<{label}}"
        f"{sum(not_told.values()):>8}  (report: {detail})"
    )
    lines.append(
        f"{'peak RSS of the sidecar process (VmHWM)':<{label}}{extra['peak_kib'] / 1024:>7.1f}M"
    )
    lines.append(f"{'sidecar exit status after SIGTERM':<{label}}{extra['exit_status']!s:>8}  0")
    if battery.recoveries:
        lines.append(
            f"{'HAProxy restarted -> next delivery, worst':<{label}}"
            f"{max(battery.recoveries):>7.1f}s"
        )
    if battery.dns_queries_per_big_lookup:
        lines.append(
            f"{'DNS queries for one 200-host MX answer, worst':<{label}}"
            f"{max(battery.dns_queries_per_big_lookup):>8}"
        )
    problems = []
    for _, tally in sorted(battery.tallies.items()):
        problems += [f"  {what}" for what in tally.unexpected[:3]]
    problems += [f"  MX: {what}" for what in (figures["partial"] + figures["twice"])[:10]]
    problems += [f"  told 250, not accepted: {token}" for token in figures["false_250"][:10]]
    problems += [f"  sidecar log: {line}" for line in crashes[:10]]
    if problems:
        lines += ["", "problems:", *problems]
    failed = any(must_be_zero.values())
    lines += [
        "",
        "FAILED: a must-be-0 figure is not 0" if failed else "OK: every must-be-0 figure is 0",
    ]
    return "\n".join(lines) + "\n", failed


async def main_async(args: argparse.Namespace, workdir: Path) -> tuple[str, bool]:
    battery = Battery(workdir, args.rounds, args.seed)
    started = time.monotonic()
    try:
        async with trio.open_nursery() as nursery:
            await battery.start(nursery)
            await battery.run()
            peak = battery.sidecar.status_kib("VmHWM") if battery.sidecar.running else 0
            battery.sidecar.stop(timeout=10)  # SIGTERM: a graceful exit, status 0
            nursery.cancel_scope.cancel()
    finally:
        battery.stop()
    log = battery.sidecar.stderr_path.read_text(errors="replace")
    extra = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}, {platform.system()} {platform.release()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        "seed": args.seed,
        "seconds": time.monotonic() - started,
        "crash_lines": crash_lines(log),
        "exit_status": battery.sidecar.returncode,
        "peak_kib": peak,
    }
    return report(battery, battery.figures(), extra)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="rounds of the whole set")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "faults-results.txt")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/faults.py needs root (HAProxy's usesrc clientip)", file=sys.stderr)
        return 2
    for tool in ("haproxy", "dnsmasq"):
        if shutil.which(tool) is None:
            print(f"bench/faults.py needs {tool} installed", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-faults-"))
    try:
        text, failed = trio.run(main_async, args, workdir)
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(text, end="")
    args.output.write_text(text, encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
