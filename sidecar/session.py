"""One client connection: the front SMTP dialogue, the route per transaction, the upstream
switching, and the DATA relay.

The sidecar answers EHLO, MAIL, RSET, NOOP, VRFY, HELP and QUIT itself. The first RCPT of a
transaction resolves the route and opens the upstream (all while the client waits for that RCPT
reply); from there every reply that decides the message's fate is the MX's own, byte for byte.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NoReturn

import trio

from sidecar.config import Config, Listener
from sidecar.health import HealthRegistry
from sidecar.logs import log_transaction, transaction_logging
from sidecar.metrics import RECIPIENT_OUTCOMES, Metrics, outcome_of, recipient_outcome
from sidecar.pool import UpstreamPool
from sidecar.routing import Route, RouteError, Router
from sidecar.smtp import replies
from sidecar.smtp.commands import (
    Address,
    Command,
    CommandError,
    MailFrom,
    RcptTo,
    parse_command,
    parse_mail_from,
    parse_rcpt_to,
)
from sidecar.smtp.data import DataScanner
from sidecar.smtp.lines import LineReader, LineTooLong
from sidecar.smtp.replies import Reply
from sidecar.tcp import TcpStream, close_now, receive_by, send_by
from sidecar.upstream import (
    Upstream,
    UpstreamError,
    UpstreamLost,
    UpstreamTimedOut,
    open_upstream,
)

log = logging.getLogger("sidecar.session")

RECEIVE_SIZE = 65_536
_session_ids = itertools.count(1)

# MAIL parameters the sidecar accepts, and the MX capability each needs to be replayed.
MAIL_PARAMETER_CAPABILITY = {"SIZE": "SIZE", "BODY": "8BITMIME", "SMTPUTF8": "SMTPUTF8"}
BODY_VALUES = ("7BIT", "8BITMIME")
# A SIZE value longer than this is over any max_message_size (and never reaches int()).
MAX_SIZE_DIGITS = 20
# Replies queued for one write at most; RFC 2920 lets the server flush whenever it likes.
MAX_QUEUED_REPLIES = 64
# How long a session that failed on an unexpected error may take to say 421 before closing.
LAST_WORD_TIMEOUT = 5.0
# Seconds for the MX's reply to the RSET the sidecar sends when the client resets an open
# transaction: the client waits for its own RSET reply meanwhile (Postfix: 20 s).
RSET_TIMEOUT = 10.0


def upstream_failed(when: str, error: UpstreamLost) -> Reply:
    """The client's 4xx for an MX connection that failed ``when`` (e.g. "at DATA"): the
    error's own reply when it has one (an unusable reply from the MX), "timed out" when a
    wait ran out, "connection lost" only when it was lost."""
    if error.reply is not None:
        return error.reply
    if isinstance(error, UpstreamTimedOut):
        return replies.mx_timed_out(when, str(error))
    return replies.mx_connection_lost(when)


@dataclass
class ServerContext:
    """What every session shares: built once per configuration."""

    config: Config
    router: Router
    health: HealthRegistry
    metrics: Metrics = field(default_factory=Metrics)
    pool: UpstreamPool | None = None  # idle upstreams shared by sessions (None: no reuse)
    shutting_down: trio.Event = field(default_factory=trio.Event)
    # Sessions waiting for a command between transactions (their stream, or a cancel scope
    # around the wait for other streams): a shutdown ends those waits at once.
    idle_sessions: set[TcpStream | trio.CancelScope] = field(default_factory=set)
    # Every running session (shared by the contexts of all configurations, like the above).
    sessions: set[Session] = field(default_factory=set)

    def begin_shutdown(self) -> None:
        """Idle sessions get 421 and close now; a transaction in progress may finish."""
        self.shutting_down.set()
        for idle in self.idle_sessions:
            if isinstance(idle, TcpStream):
                idle.interrupt()
            else:
                idle.cancel()

    def end_grace(self) -> int:
        """The shutdown grace is over: every session gets 421 and closes now (an open
        transaction is aborted, so its MX sees no end of data), except those whose end of
        data the MX already has: they wait for its reply (within ``data_done_timeout``) and
        pass it on, because the MX may have accepted the message (DESIGN.md invariant 1).
        Returns how many sessions are still owed a final reply."""
        owed = 0
        for session in self.sessions:
            if session.owes_final_reply:
                owed += 1
            else:
                session.stop()
        return owed


@dataclass
class Transaction:
    mail: MailFrom
    route: Route | None = None  # fixed by the first accepted RCPT
    recipients: int = 0
    accepted: int = 0
    mail_sent: bool = False  # MAIL replayed on the current upstream
    # The MX's reply to a DATA sent along with the last RCPT (the client had pipelined its
    # DATA after that RCPT), kept for when the client's DATA is handled.
    data_reply: Reply | None = None
    broken: bool = False  # the upstream was lost after a recipient was accepted
    started: float = field(default_factory=trio.current_time)
    recipient_outcomes: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(RECIPIENT_OUTCOMES, 0)
    )
    via: dict[str, object] = field(default_factory=dict)  # the upstream of accepted RCPTs
    size: int = 0
    logged: bool = False


def _has_param(mail: MailFrom, keyword: str) -> bool:
    return any(name == keyword for name, _ in mail.params)


@dataclass(frozen=True)
class _TryAnotherBinding:
    binding_name: str


class _CloseSession(Exception):
    pass


class Session:
    # A thousand idle sessions should cost little memory (issue 6: <= 40 MiB in all).
    __slots__ = (
        "_command_deadline",
        "_last_proxy_error",
        "_scope",
        "client",
        "config",
        "context",
        "errors",
        "greeted",
        "id",
        "listener",
        "out",
        "owes_final_reply",
        "reader",
        "stream",
        "txn",
        "upstream",
    )

    def __init__(
        self, stream: trio.abc.Stream, client: str, listener: Listener, context: ServerContext
    ) -> None:
        self.stream = stream
        self.client = client
        self.listener = listener
        self.context = context
        self.config = context.config
        self.id = f"{next(_session_ids):x}"
        self.reader = LineReader(self.config.server.max_line_length)
        self.out: list[bytes] = []
        self.greeted = False
        self.errors = 0
        self.txn: Transaction | None = None
        self.upstream: Upstream | None = None
        self._last_proxy_error: Reply | None = None
        self._command_deadline = 0.0
        # The end of data went to the MX and its reply has not been passed on yet.
        self.owes_final_reply = False
        self._scope: trio.CancelScope | None = None

    def stop(self) -> None:
        """End this session now (the end of the shutdown grace): see :meth:`run`."""
        if self._scope is not None:
            self._scope.cancel()

    # ---- I/O helpers -------------------------------------------------------------------------

    def queue(self, answer: Reply) -> None:
        self.out.append(answer.to_bytes())

    async def flush(self) -> None:
        if self.out:
            data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
            self.out.clear()
            deadline = trio.current_time() + self.config.server.client_command_timeout
            try:
                sent = await send_by(self.stream, data, deadline)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise _CloseSession from None
            if not sent:
                raise _CloseSession

    async def receive(self, timeout: float, deadline: float | None = None) -> bytes | bytearray:
        """Bytes from the client; on silence past ``timeout`` (or past ``deadline``), 421
        and close."""
        if deadline is None:
            deadline = trio.current_time() + timeout
        try:
            data = await receive_by(self.stream, RECEIVE_SIZE, deadline)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise _CloseSession from None
        if data is None:
            await self._give_up()
        if not data:
            raise _CloseSession
        return data

    async def _give_up(self) -> NoReturn:
        """421 and close: a wait ended by its deadline, or by a shutdown (which interrupts
        idle waits the way a deadline does)."""
        shutdown = self.context.shutting_down.is_set()
        self.queue(replies.SHUTTING_DOWN if shutdown else replies.TIMEOUT)
        await self.flush()
        raise _CloseSession

    async def receive_command(self) -> bytes | bytearray:
        """Like :meth:`receive` for the next command; between transactions a shutdown of the
        server ends the session with 421 instead of holding the shutdown up."""
        timeout = self.config.server.client_command_timeout
        # The whole command line must arrive within client_command_timeout: a client that trickles
        # a byte at a time (slowloris) does not get a new timeout for every byte.
        if not self.reader.buffered:
            self._command_deadline = trio.current_time() + timeout
        deadline = self._command_deadline
        if self.txn is not None:
            return await self.receive(timeout, deadline)
        if self.context.shutting_down.is_set():
            await self._give_up()
        if isinstance(self.stream, TcpStream):
            # No cancel scope: a shutdown interrupts the stream's wait like its deadline.
            self.context.idle_sessions.add(self.stream)
            try:
                return await self.receive(timeout, deadline)
            finally:
                self.context.idle_sessions.discard(self.stream)
        # One scope for both ways an idle wait ends early: the deadline, and a shutdown.
        with trio.CancelScope(deadline=deadline) as idle:
            self.context.idle_sessions.add(idle)
            try:
                return await self.receive(timeout, math.inf)
            finally:
                self.context.idle_sessions.discard(idle)
        await self._give_up()

    # ---- the session -------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the client until it quits, fails or times out. A :meth:`stop` (the end of the
        shutdown grace) ends it with 421, aborting any open transaction at the MX first."""
        sessions = self.context.sessions
        sessions.add(self)
        stopped = False
        try:
            with trio.CancelScope() as self._scope:
                await self._converse()
            stopped = self._scope.cancelled_caught
        finally:
            sessions.discard(self)
            try:
                await self._wind_up()
                if stopped:
                    await self._last_word(replies.SHUTTING_DOWN)
            finally:
                await close_now(self.stream)

    async def _converse(self) -> None:
        try:
            self.queue(replies.service_ready(self.config.server.hostname))
            while True:
                line = self.reader.next_line()
                if line is None:
                    await self.flush()
                    self.reader.feed(await self.receive_command())
                    continue
                await self.handle_line(line)
                if len(self.out) >= MAX_QUEUED_REPLIES:
                    # A client pipelining far ahead: its replies go out (or its session times
                    # out) before more are made, and the other sessions get their turn.
                    await self.flush()
        except _CloseSession:
            pass
        except Exception:
            # A bug must cost this one session, never the process: an exception escaping
            # from here would cancel the server's nursery and every other session with it.
            # The client gets a 4xx (it keeps its message); an upstream mid-DATA is aborted
            # below, so the MX sees no end of data.
            log.exception("session %s: unhandled error, closing the connection", self.id)
            # The upstream first: mid-DATA the MX must see no end of data.
            await self._wind_up()
            await self._last_word(replies.LOCAL_ERROR_CLOSING)

    async def _wind_up(self) -> None:
        """Count an unfinished transaction as aborted; park a clean upstream, abort one with an
        open transaction (the MX discards it)."""
        if self.txn is not None:
            self._end_transaction(self.txn, None)
        if self.upstream is not None:
            with trio.CancelScope(shield=True):
                if self.txn is None or not self.txn.mail_sent:
                    await self._release_upstream()
                else:
                    await self._drop_upstream(polite=False)

    async def _last_word(self, answer: Reply) -> None:
        """Send what is queued and ``answer``, best effort and briefly, before closing."""
        self.queue(answer)
        # _CloseSession, or a stream that is unusable: the connection is closed anyway.
        with trio.move_on_after(LAST_WORD_TIMEOUT), contextlib.suppress(Exception):
            await self.flush()

    async def handle_line(self, line: bytes | LineTooLong) -> None:
        if isinstance(line, LineTooLong):
            await self.error(replies.LINE_TOO_LONG)
            return
        try:
            command = parse_command(line)
        except CommandError as error:
            await self.error(error.reply)
            return
        handler = HANDLERS.get(command.verb)
        if handler is None:
            known = command.verb in NOT_IMPLEMENTED
            await self.error(replies.NOT_IMPLEMENTED if known else replies.UNKNOWN_COMMAND)
            return
        await handler(self, command)

    async def error(self, answer: Reply) -> None:
        self.queue(answer)
        self.errors += 1
        if self.errors >= self.config.server.max_errors:
            self.queue(replies.TOO_MANY_ERRORS)
            await self.flush()
            raise _CloseSession

    # ---- commands answered locally -----------------------------------------------------------

    async def do_ehlo(self, command: Command) -> None:
        if not command.argument.strip():
            await self.error(replies.EHLO_NEEDS_DOMAIN)
            return
        await self._reset()
        self.greeted = True
        server = self.config.server
        lines = [
            # The client's name, cut short: a reply line stays within RFC 5321's 512 octets.
            f"{server.hostname} greets {command.argument.split()[0][:64]}",
            "PIPELINING",
            "8BITMIME",
            f"SIZE {server.max_message_size}",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            f"LIMITS RCPTMAX={server.max_recipients} RCPTDOMAINMAX=1",
        ]
        self.queue(replies.ehlo_reply(lines[0], lines[1:]))

    async def do_helo(self, command: Command) -> None:
        if not command.argument.strip():
            await self.error(replies.HELO_NEEDS_DOMAIN)
            return
        await self._reset()
        self.greeted = True
        self.queue(replies.helo_reply(self.config.server.hostname))

    async def do_mail(self, command: Command) -> None:
        if self.context.shutting_down.is_set():
            # No new transaction once a shutdown began (one pipelined after the last).
            self.queue(replies.SHUTTING_DOWN)
            await self.flush()
            raise _CloseSession
        if not self.greeted:
            await self.error(replies.NEED_HELLO)
            return
        if self.txn is not None:
            await self.error(replies.NESTED_MAIL)
            return
        try:
            mail = parse_mail_from(command.argument)
        except CommandError as error:
            await self.error(error.reply)
            return
        sender = mail.sender
        if sender is not None and sender.needs_smtputf8 and not _has_param(mail, "SMTPUTF8"):
            await self.error(replies.NON_ASCII_ADDRESS)  # RFC 6531 section 3.5
            return
        for keyword, value in mail.params:
            if keyword not in MAIL_PARAMETER_CAPABILITY:
                await self.error(replies.unsupported_parameter("MAIL", keyword))
                return
            if keyword == "SIZE":
                # ASCII digits only: str.isdigit() also accepts "²" and other Unicode digits
                # that int() refuses, and int() refuses more than 4300 digits; either used to
                # raise out of the session and take the whole process down.
                if value is None or not (value.isascii() and value.isdigit()):
                    await self.error(replies.SIZE_NOT_A_NUMBER)
                    return
                digits = value.lstrip("0") or "0"
                too_big = len(digits) > MAX_SIZE_DIGITS
                if too_big or int(digits) > self.config.server.max_message_size:
                    self.queue(replies.MESSAGE_TOO_BIG)
                    return
            if keyword == "BODY" and (value or "").upper() not in BODY_VALUES:
                await self.error(replies.BAD_BODY)
                return
        self.txn = Transaction(mail)
        self.queue(replies.SENDER_OK)

    async def do_rset(self, command: Command) -> None:
        await self._reset()
        self.queue(replies.OK)

    async def do_noop(self, command: Command) -> None:
        self.queue(replies.OK)

    async def do_vrfy(self, command: Command) -> None:
        self.queue(replies.VRFY_CANNOT)

    async def do_help(self, command: Command) -> None:
        self.queue(replies.HELP)

    async def do_quit(self, command: Command) -> None:
        self.queue(replies.GOODBYE)
        await self.flush()
        if self.upstream is not None:
            if self.txn is not None and self.txn.mail_sent:
                await self._drop_upstream(polite=True)  # a transaction is open at the MX
            else:
                await self._release_upstream()
        raise _CloseSession

    # ---- RCPT: route, upstream, replay -------------------------------------------------------

    async def do_rcpt(self, command: Command) -> None:
        txn = self.txn
        if txn is None:
            await self.error(replies.NEED_MAIL_BEFORE_RCPT)
            return
        try:
            rcpt = parse_rcpt_to(command.argument)
        except CommandError as error:
            await self.error(error.reply)
            return
        if rcpt.params:
            await self.error(replies.unsupported_parameter("RCPT", rcpt.params[0][0]))
            return
        if rcpt.recipient.needs_smtputf8 and not _has_param(txn.mail, "SMTPUTF8"):
            await self.error(replies.NON_ASCII_ADDRESS)  # RFC 6531 section 3.5
            return
        if txn.recipients >= self.config.server.max_recipients:
            self._rcpt_reply(txn, replies.TOO_MANY_RECIPIENTS)
            return
        txn.recipients += 1
        if not rcpt.recipient.domain:
            self._rcpt_reply(txn, replies.RECIPIENT_NEEDS_DOMAIN)
            return
        # Earlier pipelined replies go out now: the upstream set-up may take a while.
        await self.flush()
        delivery = self.config.delivery
        answer: Reply | None = None
        self._last_proxy_error = None
        with trio.move_on_after(delivery.setup_timeout):
            answer = await self._route_and_replay(txn, rcpt.recipient, rcpt)
        if answer is None:
            if self.upstream is not None:
                await self._drop_upstream(polite=False)
            answer = replies.setup_timed_out(delivery.setup_timeout)
        self._rcpt_reply(txn, answer)

    def _rcpt_reply(self, txn: Transaction, answer: Reply) -> None:
        outcome = recipient_outcome(answer.code)
        txn.recipient_outcomes[outcome] += 1
        self.context.metrics.recipients[outcome] += 1
        self.queue(answer)

    async def _route_and_replay(self, txn: Transaction, recipient: Address, rcpt: RcptTo) -> Reply:
        excluded: set[str] = set()
        while True:
            answer = await self._route_and_replay_once(txn, recipient, rcpt, excluded)
            if isinstance(answer, Reply):
                return answer
            # A group member's HAProxy could not be reached: try another plumbed member
            # (DESIGN.md section 5) while the transaction has no route yet.
            excluded.add(answer.binding_name)

    async def _route_and_replay_once(
        self, txn: Transaction, recipient: Address, rcpt: RcptTo, excluded: set[str]
    ) -> Reply | _TryAnotherBinding:
        if txn.route is not None:
            prefer: str | None = txn.route.binding.name
        elif self.upstream is not None and self.upstream.route_key is not None:
            prefer = self.upstream.route_key[0]  # reuse the open connection when we may
        else:
            prefer = None
        try:
            route = await self.context.router.route(
                self.listener, recipient.routing_domain, recipient.literal, prefer, excluded
            )
        except RouteError as error:
            return self._last_proxy_error or error.reply
        if txn.route is not None and route.key != txn.route.key:
            return replies.OTHER_ROUTE
        if txn.broken:
            return replies.mx_connection_lost("earlier in this transaction")
        for attempt in (1, 2):
            upstream = self.upstream
            if upstream is not None and (upstream.closed or upstream.route_key != route.key):
                if txn.mail_sent:
                    await self._drop_upstream(polite=True)
                else:
                    await self._release_upstream()
                upstream = None
            if upstream is None and self.context.pool is not None and attempt == 1:
                upstream = self.upstream = self.context.pool.take(route.key)
                txn.mail_sent = False
            # A kept connection that the MX closed meanwhile (its idle timeout, a restart) may
            # be replaced once, while nothing of this transaction depends on it.
            stale_ok = upstream is not None and not txn.accepted and attempt == 1
            try:
                answer = await self._replay(txn, route, upstream, rcpt)
            except UpstreamError as error:
                if error.proxy_fault and self.listener.binding_group and txn.route is None:
                    self._last_proxy_error = error.reply
                    return _TryAnotherBinding(route.binding.name)
                return error.reply
            except UpstreamLost as error:
                log.info("session %s: upstream lost during RCPT: %r", self.id, str(error))
                await self._drop_upstream(polite=False)
                if stale_ok:
                    continue
                if txn.accepted:
                    txn.broken = True
                return upstream_failed("while sending the envelope", error)
            if answer.code == 421 and stale_ok:
                # Typically the MX's "421 timeout" sent while the connection sat idle.
                log.info("session %s: kept upstream answered 421, reconnecting", self.id)
                await self._drop_upstream(polite=False)
                continue
            break
        if answer.code == 421:
            # The MX is closing the connection: pass its reply on, never reuse the upstream.
            await self._drop_upstream(polite=False)
            if txn.accepted:
                txn.broken = True
        elif answer.code in (250, 251):
            txn.accepted += 1
            txn.route = route
            if not txn.via and self.upstream is not None:
                txn.via = self._describe_upstream(self.upstream)
        return answer

    async def _replay(
        self, txn: Transaction, route: Route, upstream: Upstream | None, rcpt: RcptTo
    ) -> Reply:
        """Open the upstream if needed, replay MAIL if not done on it yet, then send the RCPT.
        A negative reply to MAIL is returned as the RCPT's reply.

        SMTPUTF8 is used only when the client asked for it and the MX offers it; otherwise
        the parameter is dropped, domains go as A-labels, and an address whose local part is
        not ASCII is refused here with 553 5.6.7, before anything is sent for it."""
        if upstream is None:
            ehlo_name = route.binding.ehlo_hostname or self.config.server.hostname
            upstream = await open_upstream(
                route, ehlo_name, self.config.delivery, self.context.health, self.context.metrics
            )
            self.upstream = upstream
            txn.mail_sent = False
        txn.data_reply = None
        mail_line = None
        utf8 = _has_param(txn.mail, "SMTPUTF8") and upstream.supports("SMTPUTF8")
        if not utf8:
            sender = txn.mail.sender
            if sender is not None and sender.needs_smtputf8:
                return replies.SMTPUTF8_NOT_SUPPORTED_SENDER
            if rcpt.recipient.needs_smtputf8:
                return replies.SMTPUTF8_NOT_SUPPORTED_RECIPIENT
        line = rcpt.to_line(utf8=utf8)
        if not txn.mail_sent:
            mail_line = txn.mail.to_line(
                keep=lambda keyword: upstream.supports(MAIL_PARAMETER_CAPABILITY[keyword]),
                utf8=utf8,
            )
        if not upstream.supports("PIPELINING"):
            if mail_line is not None:
                answer = await upstream.command(mail_line)
                if not answer.is_positive:
                    return answer
                txn.mail_sent = True
            return await upstream.command(line)
        # RFC 2920: MAIL (if not sent yet), the RCPT and, when the client has already sent
        # DATA after this RCPT, DATA too, in one write: one round trip. After a refused MAIL
        # the MX answers the rest with 503s, which are not passed on.
        with_data = self.reader.next_is(b"DATA\r\n")
        lines = [line, b"DATA\r\n"] if with_data else [line]
        if mail_line is not None:
            lines.insert(0, mail_line)
        answers = await upstream.commands(*lines)
        data_reply = answers.pop() if with_data else None
        if mail_line is not None:
            mail_answer = answers.pop(0)
            if not mail_answer.is_positive:
                if data_reply is not None and data_reply.code == 354:
                    await self._drop_upstream(polite=False)  # in data mode without a MAIL?
                return mail_answer
            txn.mail_sent = True
        txn.data_reply = data_reply
        return answers[0]

    # ---- DATA: relay to the end marker, pass the MX's final reply ---------------------------

    async def do_data(self, command: Command) -> None:
        txn = self.txn
        if txn is None:
            await self.error(replies.NEED_MAIL_BEFORE_DATA)
            return
        if command.argument:
            await self.error(replies.DATA_TAKES_NO_ARGUMENT)
            return
        early, txn.data_reply = txn.data_reply, None  # DATA already sent with the last RCPT
        upstream = self.upstream
        if early is not None and early.code == 354 and (not txn.accepted or txn.broken):
            # The MX waits for data that will not come: it must not see an end of data.
            await self._drop_upstream(polite=False)
            upstream = None
        if not txn.accepted:
            if txn.recipients:
                self.queue(replies.NO_VALID_RECIPIENTS)
                self._end_transaction(txn, replies.NO_VALID_RECIPIENTS)
            else:
                await self.error(replies.NEED_RCPT_BEFORE_DATA)
            return
        if txn.broken or upstream is None or upstream.closed:
            self._end_transaction(txn, self._queued(replies.mx_connection_lost("before DATA")))
            await self._reset()
            return
        await self.flush()
        try:
            answer = early or await upstream.command(
                b"DATA\r\n", self.config.delivery.data_init_timeout
            )
        except UpstreamLost as error:
            await self._drop_upstream(polite=False)
            self._end_transaction(txn, self._queued(upstream_failed("at DATA", error)))
            self.txn = None
            return
        if answer.code != 354:
            self._end_transaction(txn, self._queued(answer))
            await self._reset()
            return
        if upstream.parser.buffered:
            # A reply before any data was sent (e.g. "354 ...\r\n250 ..."): whatever it says
            # could not be about this message, so it must not be taken as its final reply.
            await self._drop_upstream(polite=False)
            self._end_transaction(
                txn, self._queued(replies.mx_connection_lost("(it replied out of turn)"))
            )
            self.txn = None
            return
        self.queue(answer)
        await self.flush()
        final = await self._relay_data(upstream, txn)
        upstream.transactions += 1
        self._end_transaction(txn, self._queued(final))
        self.owes_final_reply = False  # queued: a stop still sends it before its 421
        self.txn = None
        if final.code == 421 and self.upstream is not None:
            await self._drop_upstream(polite=False)

    async def _relay_data(self, upstream: Upstream, txn: Transaction) -> Reply:
        """Copy the client's bytes to the MX up to and including ``<CRLF>.<CRLF>``; the reply
        that goes to the client is the MX's own, or a 4xx/5xx when the MX must not see an end."""
        server = self.config.server
        # A message whose header is not ASCII needs SMTPUTF8 (RFC 6532); an MX without it
        # must not get one. Only then is the header looked at (the body may be 8-bit).
        utf8_lost = _has_param(txn.mail, "SMTPUTF8") and not upstream.supports("SMTPUTF8")
        scanner = DataScanner(check_header=utf8_lost)
        forwarding = True
        lost: UpstreamLost | None = None
        chunk: bytes | bytearray = self.reader.take_buffer()
        # Each read waits at most data_timeout, and the whole data phase data_total_timeout,
        # so a client trickling bytes cannot hold the session (and its upstream) for ever.
        data_deadline = trio.current_time() + server.data_total_timeout
        while True:
            if not chunk:
                deadline = min(trio.current_time() + server.data_timeout, data_deadline)
                chunk = await self._receive_data(upstream, deadline)
            end = scanner.feed(chunk)
            part = chunk if end is None else chunk[:end]
            refused = scanner.bad_byte or scanner.non_ascii_header
            if refused or scanner.size > server.max_message_size:
                forwarding = False
            elif forwarding:
                if end is not None:
                    # From this write on the MX may accept the message: its reply is owed to
                    # the client even when the shutdown grace runs out (ServerContext.end_grace).
                    self.owes_final_reply = True
                try:
                    await upstream.send(part, self.config.delivery.data_send_timeout)
                except UpstreamLost as error:
                    forwarding = False
                    lost = error
            if end is not None:
                self.reader.feed(chunk[end:])
                break
            chunk = b""
        txn.size = scanner.size
        if scanner.bad_byte:
            await self._drop_upstream(polite=False)
            return replies.BARE_NEWLINE
        if scanner.size > server.max_message_size:
            await self._drop_upstream(polite=False)
            return replies.MESSAGE_TOO_BIG
        if scanner.non_ascii_header:
            await self._drop_upstream(polite=False)  # the MX sees no end of data
            return replies.NON_ASCII_HEADER
        if lost is not None:
            await self._drop_upstream(polite=False)
            return upstream_failed("during DATA", lost)
        try:
            return await upstream.read_reply(self.config.delivery.data_done_timeout)
        except UpstreamLost as error:
            log.warning("session %s: no final reply from the MX: %r", self.id, str(error))
            await self._drop_upstream(polite=False)
            return upstream_failed("before its final reply", error)

    async def _receive_data(self, upstream: Upstream, deadline: float) -> bytes | bytearray:
        """Like :meth:`receive`, but a client that vanishes or stalls mid-DATA makes the
        upstream close without an end of data, so the MX discards the partial message."""
        try:
            return await self.receive(0, deadline)
        except _CloseSession:
            await self._drop_upstream(polite=False)
            raise

    # ---- transaction and upstream housekeeping ----------------------------------------------

    def _queued(self, answer: Reply) -> Reply:
        self.queue(answer)
        return answer

    def _describe_upstream(self, upstream: Upstream) -> dict[str, object]:
        """The log line's fields about the upstream, worked out once per connection."""
        if upstream.description is None:
            candidate = upstream.candidate
            assert upstream.route_key is not None
            upstream.description = {
                "binding": upstream.route_key[0],
                "proxy": str(upstream.server) if upstream.server is not None else "direct",
                "source": str(candidate.source) if candidate.source is not None else None,
                "mx": candidate.mx,
                "mx_address": str(candidate.address),
                "tls": upstream.tls,
            }
        return upstream.description

    def _end_transaction(self, txn: Transaction, final: Reply | None) -> None:
        """Count the transaction and write its one log line (once)."""
        if txn.logged:
            return
        txn.logged = True
        outcome = "aborted" if final is None else outcome_of(final.code)
        self.context.metrics.transactions[outcome] += 1
        if not transaction_logging():
            return
        counts = txn.recipient_outcomes
        log_transaction(
            {
                "session": self.id,
                "client": self.client,
                "listener": str(self.listener.address),
                "binding": txn.via.get("binding"),
                "proxy": txn.via.get("proxy"),
                "source": txn.via.get("source"),
                "mx": txn.via.get("mx"),
                "mx_address": txn.via.get("mx_address"),
                "tls": txn.via.get("tls"),
                "rcpt": f"{counts['accepted']}/{counts['deferred']}/{counts['rejected']}",
                "outcome": outcome,
                "reply": "-" if final is None else f"{final.code} {final.text}"[:200],
                "bytes": txn.size,
                "duration": round(trio.current_time() - txn.started, 3),
            }
        )

    async def _reset(self) -> None:
        txn, self.txn = self.txn, None
        if txn is not None:
            self._end_transaction(txn, None)
        if txn is not None and txn.mail_sent and self.upstream is not None:
            try:
                answer = await self.upstream.command(b"RSET\r\n", RSET_TIMEOUT)
            except UpstreamLost:
                answer = None
            if answer is None or answer.code != 250:
                await self._drop_upstream(polite=False)

    async def _release_upstream(self) -> None:
        """Between transactions: park the upstream for reuse (or QUIT it)."""
        upstream, self.upstream = self.upstream, None
        if upstream is None:
            return
        if self.context.pool is None:
            await upstream.quit()
        else:
            await self.context.pool.put(upstream)

    async def _drop_upstream(self, polite: bool) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is None:
            return
        if polite:
            await upstream.quit()
        else:
            await upstream.abort()


Handler = Callable[[Session, Command], Awaitable[None]]

HANDLERS: dict[str, Handler] = {
    "EHLO": Session.do_ehlo,
    "HELO": Session.do_helo,
    "MAIL": Session.do_mail,
    "RCPT": Session.do_rcpt,
    "DATA": Session.do_data,
    "RSET": Session.do_rset,
    "NOOP": Session.do_noop,
    "QUIT": Session.do_quit,
    "VRFY": Session.do_vrfy,
    "HELP": Session.do_help,
}
NOT_IMPLEMENTED = frozenset({"EXPN", "TURN", "ETRN", "BDAT", "STARTTLS", "AUTH", "ATRN"})
