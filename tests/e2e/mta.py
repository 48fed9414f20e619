"""Real MTAs as the sidecar's clients in e2e tests: a private Postfix instance, a private Exim
(run per delivery, no daemon), a recording SMTP tap between an MTA and a sidecar listener, and
a ready-made stack (three recipient domains, each with its own TestMX; dnsmasq; HAProxy; the
sidecar in-process with one listener per binding).

Facts this module relies on (Debian 12: Postfix 3.7, Exim 4.96; the tests in
``test_postfix.py`` / ``test_exim.py`` prove the rest):

* Postfix runs as ``postfix -c DIR start`` with its own config, queue and data directories in
  a fresh directory under /tmp, mode 0755: its daemons run as user ``postfix`` and must reach
  the queue, and pytest's own temporary directories are 0700. ``data_directory`` must belong
  to ``postfix`` (``master.lock`` lives there). ``inet_interfaces`` must name interface
  addresses (``127.0.0.5`` is refused; ``loopback-only`` works); the instance has no ``inet``
  service at all: mail is injected with ``sendmail -C DIR``. There is no syslog here, so it
  logs with ``maillog_file`` (which needs ``maillog_file_prefixes`` and the ``postlog``
  service); the ``postfix`` command itself writes its errors there too (or to a tty).
  Postfix waits until main.cf/master.cf are a few seconds old before reading them (in case
  they are still being written): fresh files cost ~2 s per command, so they are dated back.
* Exim is Debian's ``exim4-daemon-light`` binary unpacked by ``scripts/lib.sh`` into
  /opt/sidecar-test/exim4 (it conflicts with the postfix package). It needs the
  ``Debian-exim`` user (compiled in), ``exim_path`` in its configuration (it re-executes
  itself for deliveries; the compiled-in path is /usr/sbin/exim4), and spool and log
  directories owned by ``Debian-exim``. ``-C FILE`` works for root: Exim says "exim user lost
  privilege for using -C option" and goes on as the caller, root.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from .harness import (
    FAST_DELIVERY,
    FAST_SERVER,
    Dnsmasq,
    Endpoint,
    HAProxy,
    Lab,
    RunningSidecar,
    TestMX,
)

INSTALL_HINT = "install it with ./scripts/test.sh (scripts/lib.sh: install_system_packages)"
POSTFIX = "/usr/sbin/postfix"
POSTFIX_SENDMAIL = "/usr/sbin/sendmail"
POSTQUEUE = "/usr/sbin/postqueue"
EXIM_DIRECTORY = Path("/opt/sidecar-test/exim4")  # EXIM_TEST_DIR in scripts/lib.sh
EXIM_USER = "Debian-exim"
COMMAND_TIMEOUT = 20.0

# Three recipient domains, each with its own MX host: three routes for one binding.
DOMAINS = ("one.test", "two.test", "three.test")
RECIPIENTS = [f"user@{domain}" for domain in DOMAINS]
ALICE = "alice@client.test"
BOB = "bob@client.test"

_started_masters: set[int] = set()


def message_text(sender: str, recipients: Sequence[str], subject: str) -> bytes:
    """A small message in local (LF) line endings, as sendmail and exim read it on stdin."""
    return (
        f"From: {sender}\nTo: {', '.join(recipients)}\nSubject: {subject}\n\n"
        f"Sent by a real MTA through the sidecar.\n"
    ).encode()


async def run(argv: Sequence[str], *, stdin: bytes = b"", what: str) -> str:
    """Run a command (never blocking the trio loop, which serves the sidecar meanwhile);
    return its stdout, fail the test with its output when it exits non-zero."""
    with trio.fail_after(COMMAND_TIMEOUT):
        done = await trio.run_process(
            list(argv), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )
    out = done.stdout.decode("utf-8", "replace")
    if done.returncode != 0:
        err = done.stderr.decode("utf-8", "replace")
        pytest.fail(f"{what}: {' '.join(argv)} exited {done.returncode}\n{out}\n{err}")
    return out


async def poll(
    probe: Callable[[], Awaitable[Any]],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
    describe: Callable[[], Awaitable[str]] | None = None,
) -> Any:
    """Await ``probe()`` until it returns something truthy (returned); fail after ``timeout``."""
    with trio.move_on_after(timeout):
        while True:
            result = await probe()
            if result:
                return result
            await trio.sleep(interval)
    detail = "" if describe is None else f"\n{await describe()}"
    pytest.fail(f"{what}: not true after {timeout:.0f}s{detail}")


def _processes_in_group(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


# -- Postfix ----------------------------------------------------------------------------------

_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

# One delivery attempt per recipient and one line per attempt in the maillog.
_POSTFIX_DELIVERY = re.compile(
    r"postfix/(?P<agent>[\w-]+)\[\d+\]: (?P<queue_id>[0-9A-Za-z]+): to=<(?P<recipient>[^>]*)>,"
    r".*? relay=(?P<relay>[^,]+),.*? dsn=(?P<dsn>[0-9.]+), status=(?P<status>\w+) "
    r"\((?P<text>.*)\)$"
)


@dataclass(frozen=True)
class Delivery:
    """One delivery attempt of one recipient, as the MTA logged it."""

    recipient: str
    status: str  # Postfix: sent / deferred / bounced; Exim: sent / deferred / failed
    text: str


class Postfix:
    """A private Postfix instance: ``postfix -c DIR`` with its own queue, relaying to the
    sidecar. ``main`` adds to / overrides main.cf; ``services`` are extra master.cf lines."""

    def __init__(
        self,
        root: Path,
        *,
        name: str,
        main: Mapping[str, str],
        services: Sequence[str] = (),
    ) -> None:
        self.root = root
        self.name = name
        self.config_directory = root / "etc"
        self.queue_directory = root / "queue"
        self.data_directory = root / "data"
        self.maillog = root / "maillog"
        self.main: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_directory),
            "data_directory": str(self.data_directory),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": f"{name}.client.test",
            "mydomain": "client.test",
            "myorigin": "$mydomain",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "smtp_dns_support_level": "disabled",
            "smtp_tls_security_level": "none",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(root),
            **main,
        }
        self.services = list(services)
        self.started = False

    @property
    def args(self) -> list[str]:
        return ["-c", str(self.config_directory)]

    def write_config(self) -> None:
        self.config_directory.mkdir(parents=True, exist_ok=True)
        self.queue_directory.mkdir(exist_ok=True)
        self.data_directory.mkdir(exist_ok=True)
        shutil.chown(self.data_directory, "postfix")
        lines = [f"{key} = {value}" for key, value in self.main.items()]
        (self.config_directory / "main.cf").write_text("\n".join(lines) + "\n")
        (self.config_directory / "master.cf").write_text(
            _MASTER_CF + "".join(line + "\n" for line in self.services)
        )
        # Postfix waits (in 0.3 s steps) until a configuration file is a few seconds old, in
        # case it is still being written: date them back.
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_directory / name, (past, past))

    async def start(self) -> None:
        """``postfix start``: it runs Postfix's own checks first (``postfix check``, which
        also creates the queue directories) and waits for the master's start-up."""
        self.write_config()
        try:
            await run([POSTFIX, *self.args, "start"], what="postfix start")
        except pytest.fail.Exception:
            pytest.fail(f"{self.name}: postfix start failed; maillog:\n{self.log()}")
        self.started = True
        pid = self.master_pid()
        assert pid is not None, self.log()
        _started_masters.add(pid)

    def master_pid(self) -> int | None:
        """The running master's pid, from its pid file (None when it is not running)."""
        try:
            pid = int((self.queue_directory / "pid" / "master.pid").read_text().split()[0])
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError, IndexError):
            return None
        return pid if comm == "master" else None

    async def stop(self) -> None:
        """SIGTERM the master (it stops its children) and wait until its whole process group
        is gone; SIGKILL the group if it takes more than 5 s."""
        self.started = False
        pid = self.master_pid()  # also after a failed start: the master may be up anyway
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        with trio.move_on_after(5):
            while _processes_in_group(pid):
                await trio.sleep(0.05)
        if _processes_in_group(pid):
            _kill_group(pid)
            with trio.move_on_after(2):
                while _processes_in_group(pid):
                    await trio.sleep(0.05)
        _started_masters.discard(pid)

    async def sendmail(self, sender: str, recipients: Sequence[str], message: bytes) -> None:
        """Queue one message with Postfix's ``sendmail -C DIR`` (pickup takes it at once)."""
        await run(
            [
                POSTFIX_SENDMAIL,
                "-C",
                str(self.config_directory),
                "-i",
                "-f",
                sender,
                "--",
                *recipients,
            ],
            stdin=message,
            what="sendmail",
        )

    async def queue(self) -> list[dict[str, Any]]:
        """``postqueue -j``: one JSON object per queued message (empty when all is done)."""
        out = await run([POSTQUEUE, *self.args, "-j"], what="postqueue -j")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    async def flush(self) -> None:
        """``postqueue -f``: retry every deferred message now."""
        await run([POSTQUEUE, *self.args, "-f"], what="postqueue -f")

    async def wait_queue_empty(self, timeout: float = 15) -> None:
        """Until ``postqueue -j`` lists nothing. Only reliable while no message moves from the
        deferred back to the active queue (a retry): showq scans one queue after another and
        can miss a message moving then. So wait for the deliveries first."""

        async def empty() -> bool:
            return not await self.queue()

        await poll(empty, timeout=timeout, what=f"{self.name}: queue empty", describe=self.report)

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def deliveries(self) -> list[Delivery]:
        found = []
        for line in self.log().splitlines():
            match = _POSTFIX_DELIVERY.search(line)
            if match:
                found.append(Delivery(match["recipient"], match["status"], match["text"]))
        return found

    async def report(self) -> str:
        queue = await self.queue() if self.started else []
        return f"--- {self.name} queue ---\n{queue}\n--- {self.name} maillog ---\n{self.log()}"


class PostfixFactory:
    """``await postfix_factory(main={...}, services=[...])`` -> a started private Postfix
    (``main`` must set its ``relayhost``). ``stop_all`` stops them all and removes their
    directories."""

    def __init__(self) -> None:
        self.instances: list[Postfix] = []
        for program in (POSTFIX, POSTFIX_SENDMAIL, POSTQUEUE):
            if not os.access(program, os.X_OK):
                pytest.fail(f"{program} not found: {INSTALL_HINT}", pytrace=False)

    async def __call__(self, *, main: Mapping[str, str], services: Sequence[str] = ()) -> Postfix:
        root = Path(tempfile.mkdtemp(prefix="sidecar-postfix-", dir="/tmp"))
        root.chmod(0o755)
        name = f"postfix{len(self.instances) + 1}"
        instance = Postfix(root, name=name, main=main, services=services)
        self.instances.append(instance)
        await instance.start()
        return instance

    async def stop_all(self) -> None:
        for instance in self.instances:
            with trio.CancelScope(shield=True):
                await instance.stop()
            print(f"--- {instance.name} maillog ---\n{instance.log()}")
            shutil.rmtree(instance.root, ignore_errors=True)


# -- Exim -------------------------------------------------------------------------------------

# Exim's main log: "<date> <time> <message id> <flag> <address> <rest>"; => delivered (first
# recipient of a delivery), -> delivered (another in the same delivery), == deferred, ** failed.
_EXIM_DELIVERY = re.compile(
    r"^\S+ \S+ (?P<message_id>\S+) (?P<flag>=>|->|==|\*\*) (?P<recipient>\S+) (?P<rest>.*)$"
)
_EXIM_STATUS = {"=>": "sent", "->": "sent", "==": "deferred", "**": "failed"}


def exim_binary() -> Path:
    binary = EXIM_DIRECTORY / "usr/sbin/exim4"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{binary} not found: {INSTALL_HINT}", pytrace=False)
    try:
        pwd.getpwnam(EXIM_USER)
    except KeyError:
        pytest.fail(f"user {EXIM_USER} does not exist: {INSTALL_HINT}", pytrace=False)
    return binary


def exim_route(name: str, listener: Endpoint, *, condition: str = "") -> str:
    """A manualroute router sending every remote domain to a sidecar listener."""
    return (
        f"{name}:\n"
        f"  driver = manualroute\n"
        f"{condition}"
        f"  route_list = * {listener.host}::{listener.port}\n"
        f"  transport = remote_smtp\n"
        f"  self = send\n"
    )


class Exim:
    """A private Exim: its own configuration, spool and log directory. No daemon: each message
    is delivered in the foreground by the ``exim -odf`` that receives it."""

    def __init__(self, root: Path, binary: Path, *, routers: str, transport: str = "") -> None:
        self.root = root
        self.binary = binary
        self.config = root / "exim.conf"
        self.spool = root / "spool"
        self.logs = root / "log"
        self.config_text = (
            f"exim_path = {binary}\n"
            f"primary_hostname = exim.client.test\n"
            f"qualify_domain = client.test\n"
            f"spool_directory = {self.spool}\n"
            f"log_file_path = {self.logs}/%slog\n"
            f"pid_file_path = {root}/exim.pid\n"
            f"trusted_users = root\n"
            f"host_lookup =\n"
            f"keep_environment =\n"
            f"\nbegin routers\n\n{routers}\n"
            f"begin transports\n\n"
            f"remote_smtp:\n  driver = smtp\n{transport}\n"
            f"begin retry\n\n* * F,1h,1m\n"
        )

    def write_config(self) -> None:
        for directory in (self.spool, self.logs):
            directory.mkdir(exist_ok=True)
            shutil.chown(directory, EXIM_USER, EXIM_USER)
        self.config.write_text(self.config_text)

    @property
    def args(self) -> list[str]:
        return [str(self.binary), "-C", str(self.config)]

    async def version(self) -> tuple[tuple[int, int], bool]:
        """``exim -bV``: (major, minor) and whether the build supports the LIMITS extension
        (its "Support for:" line lists ``ESMTP_Limits``)."""
        out = await run([*self.args, "-bV"], what="exim -bV")
        match = re.search(r"Exim version (\d+)\.(\d+)", out)
        assert match, out
        limits = re.search(r"^Support for:.*\bESMTP_Limits\b", out, re.MULTILINE | re.IGNORECASE)
        return (int(match[1]), int(match[2])), limits is not None

    async def send(self, sender: str, recipients: Sequence[str], message: bytes) -> None:
        """Receive one message and deliver it in the foreground (``-odf``): when this returns,
        every recipient is delivered, deferred or failed, as the main log says."""
        await run(
            [*self.args, "-odf", "-oi", "-f", sender, "--", *recipients],
            stdin=message,
            what="exim -odf",
        )

    async def queue(self) -> str:
        """``exim -bp``: the messages still in the spool (empty when all is done)."""
        return await run([*self.args, "-bp"], what="exim -bp")

    def log(self) -> str:
        path = self.logs / "mainlog"
        return path.read_text(errors="replace") if path.exists() else ""

    def deliveries(self) -> list[Delivery]:
        found = []
        for line in self.log().splitlines():
            match = _EXIM_DELIVERY.match(line)
            if match:
                found.append(
                    Delivery(match["recipient"], _EXIM_STATUS[match["flag"]], match["rest"])
                )
        return found


class EximFactory:
    """``exim_factory(routers=..., transport=...)`` -> a configured private Exim."""

    def __init__(self) -> None:
        self.binary = exim_binary()
        self.instances: list[Exim] = []

    def __call__(self, *, routers: str, transport: str = "") -> Exim:
        root = Path(tempfile.mkdtemp(prefix="sidecar-exim-", dir="/tmp"))
        root.chmod(0o755)
        instance = Exim(root, self.binary, routers=routers, transport=transport)
        instance.write_config()
        self.instances.append(instance)
        return instance

    def remove_all(self) -> None:
        for instance in self.instances:
            print(f"--- exim mainlog ({instance.root}) ---\n{instance.log()}")
            shutil.rmtree(instance.root, ignore_errors=True)


# -- a recording tap between an MTA and a sidecar listener ------------------------------------


@dataclass(frozen=True)
class Exchange:
    """One command (or ``<data>`` for the message up to its end) and the reply it got."""

    command: str
    reply: str

    @property
    def code(self) -> int:
        return int(self.reply[:3]) if self.reply[:3].isdigit() else 0


@dataclass
class TapSession:
    client: bytearray = field(default_factory=bytearray)  # MTA -> sidecar
    server: bytearray = field(default_factory=bytearray)  # sidecar -> MTA
    closed: bool = False

    def replies(self) -> list[str]:
        replies, current = [], []
        for line in bytes(self.server).decode("utf-8", "replace").split("\r\n")[:-1]:
            current.append(line)
            if len(line) < 4 or line[3] != "-":
                replies.append("\r\n".join(current))
                current = []
        return replies

    def exchanges(self) -> list[Exchange]:
        """Commands paired with their replies in order (pipelined or not); the banner and the
        message data are left out, the reply to the end of data is paired with ``<data>``
        (LMTP: one ``<data>`` per recipient accepted, RFC 2033 section 4.2)."""
        replies = iter(self.replies()[1:])
        lines = iter(bytes(self.client).decode("utf-8", "replace").split("\r\n")[:-1])
        exchanges = []
        lmtp = False
        accepted = 0
        for command in lines:
            reply = next(replies, "")
            exchanges.append(Exchange(command, reply))
            verb = command.split(" ", 1)[0].upper()
            if verb == "LHLO":
                lmtp = True
            elif verb == "MAIL":
                accepted = 0
            elif verb == "RCPT" and reply.startswith("2"):
                accepted += 1
            if verb == "DATA" and reply.startswith("354"):
                for line in lines:
                    if line == ".":
                        break
                for _ in range(accepted if lmtp else 1):
                    exchanges.append(Exchange("<data>", next(replies, "")))
        return exchanges


@dataclass(frozen=True)
class Transaction:
    """One MAIL ... end of data (or RSET/QUIT) as the client saw it."""

    session: int  # index of the tap session (one per MTA connection)
    client: str  # the MTA's EHLO name
    sender: str
    recipients: list[tuple[str, int]]  # (address, RCPT reply code)
    final: int | None  # reply code to the end of data, None when no data was sent
    # LMTP: every reply code to the end of data, one per accepted recipient in RCPT order.
    finals: tuple[int, ...] = ()

    @property
    def accepted(self) -> list[str]:
        return [address for address, code in self.recipients if code == 250]

    @property
    def deferred(self) -> list[str]:
        return [address for address, code in self.recipients if code == 452]


_RCPT = re.compile(r"^RCPT TO:<([^>]*)>", re.IGNORECASE)


class SMTPTap:
    """Listens on ``listen`` and relays every connection to ``target`` byte for byte, keeping
    what each side said: the MTA's view of the sidecar's replies (452s included)."""

    def __init__(self, listen: Endpoint, target: Endpoint) -> None:
        self.listen = listen
        self.target = target
        self.sessions: list[TapSession] = []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.listen.port, host=self.listen.host)
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._relay, listeners, handler_nursery=nursery)

    async def _relay(self, client: trio.SocketStream) -> None:
        session = TapSession()
        self.sessions.append(session)
        try:
            upstream = await trio.open_tcp_stream(self.target.host, self.target.port)
        except OSError:
            await trio.aclose_forcefully(client)
            session.closed = True
            return

        async def pump(source: trio.SocketStream, sink: trio.SocketStream, log: bytearray) -> None:
            try:
                while data := await source.receive_some(65536):
                    log += data
                    await sink.send_all(data)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await sink.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream, session.client)
            nursery.start_soon(pump, upstream, client, session.server)
        session.closed = True

    def transactions(self) -> list[Transaction]:
        found = []
        for index, session in enumerate(self.sessions):
            recipients: list[tuple[str, int]] | None = None
            client = sender = ""
            exchanges = session.exchanges()
            for at, exchange in enumerate(exchanges):
                verb = exchange.command.split(" ", 1)[0].upper()
                if verb in ("EHLO", "HELO", "LHLO"):
                    client = exchange.command[5:].strip()
                elif verb == "MAIL":
                    recipients = [] if exchange.code == 250 else None
                    match = _PATH.match(exchange.command)
                    sender = match[1] if match else ""
                elif recipients is not None and (match := _RCPT.match(exchange.command)):
                    recipients.append((match[1], exchange.code))
                elif recipients is not None and exchange.command == "<data>":
                    finals = [exchange.code]
                    for after in exchanges[at + 1 :]:
                        if after.command != "<data>":
                            break
                        finals.append(after.code)
                    found.append(
                        Transaction(index, client, sender, recipients, exchange.code, tuple(finals))
                    )
                    recipients = None
                elif recipients is not None and verb in ("RSET", "QUIT"):
                    found.append(Transaction(index, client, sender, recipients, None))
                    recipients = None
        return found

    def dialogue(self) -> str:
        """Everything said through the tap, for failure messages."""
        parts = []
        for index, session in enumerate(self.sessions):
            parts.append(f"--- tap session {index} ---")
            parts.extend(f"{e.command!r} -> {e.reply!r}" for e in session.exchanges())
        return "\n".join(parts)


# -- the stack: MXes for three domains, dnsmasq, HAProxy, the sidecar, one tap per listener ----


@dataclass(frozen=True, order=True)
class Arrival:
    """One recipient of one message as an MX received it."""

    domain: str  # the MX's domain
    recipient: str
    sender: str
    source: str  # the address the MX saw the connection come from


def expected(sender: str, source: str) -> list[Arrival]:
    """Every recipient exactly once, from ``sender``, seen coming from ``source``."""
    return sorted(Arrival(r.split("@")[1], r, sender, source) for r in RECIPIENTS)


_PATH = re.compile(r"^(?:MAIL FROM|RCPT TO):<([^>]*)>", re.IGNORECASE)


@dataclass
class Egress:
    """One binding: its sidecar listener, the tap in front of it (MTAs connect to the tap),
    and its source address (what the MXes must see)."""

    name: str
    listener: Endpoint
    tap: SMTPTap
    source: str

    @property
    def endpoint(self) -> Endpoint:
        return self.tap.listen


@dataclass
class MailStack:
    sidecar: RunningSidecar
    haproxy: HAProxy
    dns: Dnsmasq
    mx: dict[str, TestMX]  # recipient domain -> its MX
    egress: dict[str, Egress]  # binding name -> listener, tap, source

    def arrivals(self) -> list[Arrival]:
        """One entry per recipient of every message the MXes got, sorted."""
        found = []
        for domain, mx in self.mx.items():
            for message in mx.messages:
                sender = _PATH.match(message.mail_from.decode())
                assert sender, message.mail_from
                for rcpt in message.rcpt_to:
                    match = _PATH.match(rcpt.decode())
                    assert match, rcpt
                    found.append(Arrival(domain, match[1], sender[1], message.peer_host))
        return sorted(found)

    def transactions(self) -> list[Transaction]:
        return [t for egress in self.egress.values() for t in egress.tap.transactions()]

    def dialogue(self) -> str:
        return "\n".join(egress.tap.dialogue() for egress in self.egress.values())


async def make_mail_stack(
    nursery: trio.Nursery,
    lab: Lab,
    *,
    domains: Iterable[str] = DOMAINS,
    bindings: Sequence[str] = ("b1",),
    tls_contexts: Mapping[str, ssl.SSLContext] | None = None,
    tls: str = "disabled",
    mx_options: Mapping[str, dict[str, Any]] | None = None,
    sections: dict[str, Any] | None = None,
    protocol: str = "smtp",
) -> MailStack:
    """One TestMX per domain (``mx.<domain>``, its own 127.0.0.x, one shared port), dnsmasq
    with their MX and A records, one HAProxy, and the sidecar with one listener per binding,
    each binding with its own source address. ``tls_contexts``: the MXes (by domain) that offer
    STARTTLS; ``tls``: the sidecar's ``delivery.tls``; ``mx_options``: more TestMX options by
    domain (``delays``...); ``sections``: more config tables (``shaping``...); ``protocol``: the
    listeners' (``"lmtp"``: RFC 2033)."""
    domains = list(domains)
    stack = await lab.build(
        mxes=[
            {"tls_context": (tls_contexts or {}).get(domain), **(mx_options or {}).get(domain, {})}
            for domain in domains
        ],
        hosts=[f"mx.{domain}" for domain in domains],
        domains={domain: index for index, domain in enumerate(domains)},
        bindings=bindings,
        delivery={**FAST_DELIVERY, "tls": tls},
        server=FAST_SERVER,
        sections=sections,
        protocol=protocol,
    )
    egress = {}
    for name in bindings:
        tap = SMTPTap(lab.addresses.endpoint(), stack.listeners[name])
        await nursery.start(tap.serve)
        egress[name] = Egress(name, stack.listeners[name], tap, stack.sources[name])
    return MailStack(
        stack.sidecar, stack.haproxy, stack.dns, dict(zip(domains, stack.mxes, strict=True)), egress
    )


def kill_leftover_masters() -> None:
    """Last resort (atexit): SIGKILL the process group of any Postfix master still running."""
    for pid in list(_started_masters):
        _kill_group(pid)


atexit.register(kill_leftover_masters)
