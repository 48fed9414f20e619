"""One client connection: its I/O, the route per transaction, the upstream switching, and the
DATA relay.

The SMTP dialogue itself is :class:`sidecar.smtp.server.SmtpServer` (sans-IO): it answers
EHLO, MAIL, RSET, NOOP, VRFY, HELP, QUIT and every error, and hands the session an event for
the rest. The first RCPT of a transaction resolves the route and opens the upstream (all while
the client waits for that RCPT reply); from there every reply that decides the message's fate
is the MX's own, byte for byte.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, NoReturn

import trio

from sidecar import replies
from sidecar.config import Listener
from sidecar.context import ServerContext
from sidecar.errors import Deferred, RouteError, UpstreamError, UpstreamLost, UpstreamTimedOut
from sidecar.logs import log_transaction, transaction_logging
from sidecar.metrics import RECIPIENT_OUTCOMES, outcome_of, recipient_outcome
from sidecar.mxtls.sts_verify import check_testing
from sidecar.routing import Route
from sidecar.shaping.model import EgressPath
from sidecar.shaping.shaper import Grant
from sidecar.smtp.commands import MailFrom, RcptTo
from sidecar.smtp.replies import Reply
from sidecar.smtp.server import (
    NEED_DATA,
    SEND_REPLIES,
    Close,
    DataChunk,
    DataCommand,
    EndOfData,
    Event,
    MailOpened,
    Quit,
    RcptRefused,
    RcptRequested,
    SmtpServer,
    TransactionReset,
)
from sidecar.tcp import close_now, deadline_stream
from sidecar.upstream import Upstream, UpstreamDescription, open_upstream

log = logging.getLogger("sidecar.session")

RECEIVE_SIZE = 65_536
_session_ids = itertools.count(1)

# The MX capability each MAIL parameter the sidecar accepts needs to be replayed.
MAIL_PARAMETER_CAPABILITY = {"SIZE": "SIZE", "BODY": "8BITMIME", "SMTPUTF8": "SMTPUTF8"}
# How long a session that failed on an unexpected error may take to say 421 before closing.
LAST_WORD_TIMEOUT = 5.0


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
class Transaction:
    mail: MailFrom
    route: Route | None = None  # fixed by the first accepted RCPT
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
    via: UpstreamDescription | None = None  # the upstream of accepted RCPTs
    # Traffic shaping: the egress path whose message rate this transaction counted, and the
    # seconds it waited for shaping (a rate token, a connection slot).
    path: EgressPath | None = None
    shaping_wait: float = 0.0
    size: int = 0
    logged: bool = False
    # LMTP: the client's transaction this one is a route of (one log line per route, each
    # with this id); None for SMTP, where the two are the same.
    ident: str | None = None


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
        "_counted",
        "_last_proxy_error",
        "_scope",
        "client",
        "config",
        "context",
        "id",
        "listener",
        "owes_final_reply",
        "smtp",
        "stream",
        "txn",
        "upstream",
    )

    def __init__(
        self, stream: trio.abc.Stream, client: str, listener: Listener, context: ServerContext
    ) -> None:
        self.stream = deadline_stream(stream)
        self.client = client
        self.listener = listener
        self.context = context
        self.config = context.config
        self.id = f"{next(_session_ids):x}"
        self.smtp = SmtpServer(context.limits, lmtp=listener.protocol == "lmtp")
        if context.shutting_down.is_set():
            self.smtp.closing = replies.SHUTTING_DOWN
        self.txn: Transaction | None = None
        self.upstream: Upstream | None = None
        self._last_proxy_error: Reply | None = None
        self._command_deadline = 0.0
        # The end of data went to the MX and its reply has not been passed on yet.
        self.owes_final_reply = False
        self._scope: trio.CancelScope | None = None
        self._counted = False  # counted as a client session (it said more than NOOP/QUIT)

    def stop(self) -> None:
        """End this session now (the end of the shutdown grace): see :meth:`run`."""
        if self._scope is not None:
            self._scope.cancel()

    # ---- I/O helpers -------------------------------------------------------------------------

    async def flush(self) -> None:
        """Send the queued replies (close if the client does not take them in time)."""
        data = self.smtp.take_output()
        if data:
            deadline = trio.current_time() + self.config.server.client_command_timeout
            try:
                sent = await self.stream.send_by(data, deadline)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise _CloseSession from None
            if not sent:
                raise _CloseSession

    async def receive(self, deadline: float) -> bytes | bytearray:
        """Bytes from the client; on silence past ``deadline`` (trio time), or an interrupted
        wait (a shutdown), 421 and close."""
        try:
            data = await self.stream.receive_by(RECEIVE_SIZE, deadline)
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
        self.smtp.send(replies.SHUTTING_DOWN if shutdown else replies.TIMEOUT)
        await self.flush()
        raise _CloseSession

    async def receive_command(self) -> bytes | bytearray:
        """Like :meth:`receive` for the next command; between transactions a shutdown of the
        server ends the session with 421 instead of holding the shutdown up."""
        # The whole command line must arrive within client_command_timeout: a client that
        # trickles a byte at a time (slowloris) does not get a new timeout for every byte.
        if not self.smtp.buffered:
            timeout = self.config.server.client_command_timeout
            self._command_deadline = trio.current_time() + timeout
        deadline = self._command_deadline
        if self.txn is not None:
            return await self.receive(deadline)
        if self.context.shutting_down.is_set():
            await self._give_up()
        # A shutdown interrupts this wait the way its deadline would (begin_shutdown).
        self.context.idle_sessions.add(self.stream)
        try:
            return await self.receive(deadline)
        finally:
            self.context.idle_sessions.discard(self.stream)

    # ---- the session -------------------------------------------------------------------------

    @property
    def probe(self) -> bool:
        """Whether this connection said nothing but NOOP or QUIT (a health check): counted
        as a probe in the metrics, never as a client session."""
        return not self._counted

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
        smtp = self.smtp
        try:
            smtp.send(replies.service_ready(self.config.server.hostname, lmtp=smtp.lmtp))
            while True:
                event = smtp.next_event()
                if not self._counted and smtp.spoke:
                    self._counted = True
                    self.context.metrics.sessions += 1
                if event is NEED_DATA:
                    await self.flush()
                    smtp.receive_data(await self.receive_command())
                elif event is SEND_REPLIES:
                    # A client pipelining far ahead: its replies go out (or its session times
                    # out) before more are made, and the other sessions get their turn.
                    await self.flush()
                else:
                    # By name, so that a subclass (the LMTP session) answers with its own.
                    await getattr(self, _ON_EVENT[type(event)])(event)
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
        self.smtp.send(answer)
        # _CloseSession, or a stream that is unusable: the connection is closed anyway.
        with trio.move_on_after(LAST_WORD_TIMEOUT), contextlib.suppress(Exception):
            await self.flush()

    # ---- events of the SMTP dialogue ---------------------------------------------------------

    async def on_reset(self, event: TransactionReset) -> None:
        await self.flush()  # the client's reply first: an MX's RSET may take seconds
        await self._reset()

    async def on_mail(self, event: MailOpened) -> None:
        self.txn = Transaction(event.mail)

    async def on_quit(self, event: Quit) -> None:
        await self.flush()
        if self.upstream is not None:
            if self.txn is not None and self.txn.mail_sent:
                await self._drop_upstream(polite=True)  # a transaction is open at the MX
            else:
                await self._release_upstream()
        raise _CloseSession

    async def on_close(self, event: Close) -> None:
        await self.flush()
        raise _CloseSession

    async def on_unexpected(self, event: Event) -> None:
        raise RuntimeError(f"{event!r} outside the DATA phase")

    # ---- RCPT: route, upstream, replay -------------------------------------------------------

    async def on_rcpt_refused(self, event: RcptRefused) -> None:
        assert self.txn is not None
        self._count_recipient(self.txn, event.reply)

    async def on_rcpt(self, event: RcptRequested) -> None:
        txn = self.txn
        assert txn is not None
        rcpt = event.rcpt
        # Earlier pipelined replies go out now: the upstream set-up may take a while.
        await self.flush()
        delivery = self.config.delivery
        answer: Reply | None = None
        self._last_proxy_error = None
        # The set-up budget: one deadline for DNS, connect, banner, EHLO, STARTTLS, MAIL and
        # RCPT. Each MX step is also cut to it (Upstream), so its own reply can say which
        # step timed out; the scope enforces it for everything else (DNS above all).
        setup_deadline = trio.current_time() + delivery.setup_timeout
        with trio.move_on_at(setup_deadline):
            answer = await self._route_and_replay(txn, rcpt, setup_deadline)
        if answer is None:
            if self.upstream is not None:
                await self._drop_upstream(polite=False)
                # The recipients accepted so far were on that connection: a later RCPT must
                # not go out on a new one (its DATA would reach the MX without them).
                if txn.accepted:
                    txn.broken = True
            answer = replies.setup_timed_out(delivery.setup_timeout)
        self._count_recipient(txn, answer)
        self.smtp.answer_rcpt(answer)

    def _count_recipient(self, txn: Transaction, answer: Reply) -> None:
        outcome = recipient_outcome(answer.code)
        txn.recipient_outcomes[outcome] += 1
        self.context.metrics.recipients[outcome] += 1

    async def _route_and_replay(self, txn: Transaction, rcpt: RcptTo, by: float) -> Reply:
        excluded: set[str] = set()
        while True:
            answer = await self._route_and_replay_once(txn, rcpt, excluded, by)
            if isinstance(answer, Reply):
                return answer
            # A group member's HAProxy could not be reached: try another plumbed member
            # (DESIGN.md section 5) while the transaction has no route yet.
            excluded.add(answer.binding_name)

    async def _route_and_replay_once(
        self, txn: Transaction, rcpt: RcptTo, excluded: set[str], by: float
    ) -> Reply | _TryAnotherBinding:
        recipient = rcpt.recipient
        if txn.route is not None:
            prefer: str | None = txn.route.binding.name
        elif self.upstream is not None and self.upstream.route_key is not None:
            prefer = self.upstream.route_key.binding  # reuse the open connection when we may
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
        return await self._replay_on_route(txn, route, rcpt, by)

    async def _replay_on_route(
        self, txn: Transaction, route: Route, rcpt: RcptTo, by: float
    ) -> Reply | _TryAnotherBinding:
        """Send ``rcpt`` on ``route``'s upstream (``self.upstream``, opened or taken from the
        cache when needed, its slot from traffic shaping), replaying MAIL there first."""
        if txn.broken:
            return replies.mx_connection_lost("earlier in this transaction")
        shaper = self.context.shaper
        path = None
        if shaper is not None:
            first = route.candidates[0]
            path = shaper.path(None if first.source is None else str(first.source), route.mx.site)
            if txn.path is None:  # the transaction's message counts once, on its first path
                began = trio.current_time()
                refusal = await shaper.start_transaction(route.binding.name, path)
                txn.shaping_wait += trio.current_time() - began
                if refusal is not None:
                    return self._another_binding_or(txn, route, refusal)
                txn.path = path
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
                if upstream is not None:
                    self.context.metrics.connection_cache_hits += 1
                txn.mail_sent = False
            # A kept connection that the MX closed meanwhile (its idle timeout, a restart) may
            # be replaced once, while nothing of this transaction depends on it.
            stale_ok = upstream is not None and not txn.accepted and attempt == 1
            try:
                answer = await self._replay(txn, route, upstream, rcpt, path, by)
            except Deferred as error:
                return self._another_binding_or(txn, route, error.reply)
            except UpstreamError as error:
                if shaper is not None and path is not None:
                    for mx_reply in error.mx_replies:  # e.g. a throttling 421 greeting
                        await shaper.observe(route.binding.name, path, mx_reply)
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
        if shaper is not None and path is not None and answer.code >= 400 and answer.raw:
            await shaper.observe(route.binding.name, path, answer)  # the MX's own reply
        if answer.code == 421:
            # The MX is closing the connection: pass its reply on, never reuse the upstream.
            await self._drop_upstream(polite=False)
            if txn.accepted:
                txn.broken = True
        elif 200 <= answer.code < 300:  # 250, 251 (and an odd 252): the MX took it
            txn.accepted += 1
            txn.route = route
            if txn.via is None and self.upstream is not None:
                txn.via = self.upstream.description
        return answer

    def _another_binding_or(
        self, txn: Transaction, route: Route, refusal: Reply
    ) -> Reply | _TryAnotherBinding:
        """Traffic shaping said not now on this route's path: a group member whose path has
        room may take the transaction while it has no route yet; else ``refusal``."""
        if self.listener.binding_group and txn.route is None:
            self._last_proxy_error = refusal
            return _TryAnotherBinding(route.binding.name)
        return refusal

    async def _new_upstream(
        self, txn: Transaction, route: Route, path: EgressPath | None, by: float
    ) -> Upstream:
        """A connection for ``route``: a new one once traffic shaping grants a slot on
        ``path`` (raises :class:`Deferred` when it will not within max_wait), or the one
        another session parks for the route meanwhile."""
        context = self.context
        shaper, pool = context.shaper, context.pool
        grant: Grant | None = None
        if shaper is not None and path is not None:
            # One max_wait for all the asks: a parked connection that another session took
            # first sends this one back to the queue, not to a new wait of its own.
            deadline = trio.current_time() + shaper.max_wait
            while True:
                wake = pool.parked_event(route.key) if pool is not None else None
                began = trio.current_time()
                try:
                    got = await shaper.open_connection(
                        route.binding.name, path, wake, deadline=deadline
                    )
                finally:
                    if pool is not None and wake is not None:
                        pool.forget_event(route.key, wake)
                txn.shaping_wait += trio.current_time() - began
                if isinstance(got, Reply):
                    raise Deferred(got)
                if got is not None:
                    grant = got
                    break
                parked = pool.take(route.key) if pool is not None else None
                if parked is not None:
                    context.metrics.connection_cache_hits += 1
                    return parked
        ehlo_name = route.binding.ehlo_hostname or self.config.server.hostname
        try:
            upstream = await open_upstream(
                route,
                ehlo_name,
                self.config.delivery,
                context.health,
                context.metrics,
                by=by,
                reporter=context.tls_reporter,
            )
        except BaseException:
            if grant is not None:
                with trio.CancelScope(shield=True):
                    await grant.release()
            raise
        if grant is not None:
            upstream.grant = grant
            upstream.max_transactions = grant.deliveries_left
        check_testing(route, upstream, context.tls_reporter)  # MTA-STS "testing" mode
        return upstream

    async def _replay(
        self,
        txn: Transaction,
        route: Route,
        upstream: Upstream | None,
        rcpt: RcptTo,
        path: EgressPath | None,
        by: float,
    ) -> Reply:
        """Open the upstream if needed, replay MAIL if not done on it yet, then send the RCPT.
        A negative reply to MAIL is returned as the RCPT's reply.

        SMTPUTF8 is used only when the client asked for it and the MX offers it; otherwise
        the parameter is dropped, domains go as A-labels, and an address whose local part is
        not ASCII is refused here with 553 5.6.7, before anything is sent for it."""
        if upstream is None:
            upstream = self.upstream = await self._new_upstream(txn, route, path, by)
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
                answer = await upstream.command(mail_line, by=by)
                if not answer.is_positive:
                    return answer
                txn.mail_sent = True
            return await upstream.command(line, by=by)
        # RFC 2920: MAIL (if not sent yet), the RCPT and, when the client has already sent
        # DATA after this RCPT, DATA too, in one write: one round trip. After a refused MAIL
        # the MX answers the rest with 503s, which are not passed on.
        with_data = self.smtp.next_is(b"DATA\r\n")
        lines = [line, b"DATA\r\n"] if with_data else [line]
        if mail_line is not None:
            lines.insert(0, mail_line)
        answers = await upstream.commands(*lines, by=by)
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

    async def on_data(self, event: DataCommand) -> None:
        txn = self.txn
        assert txn is not None
        smtp = self.smtp
        early, txn.data_reply = txn.data_reply, None  # DATA already sent with the last RCPT
        upstream = self.upstream
        if early is not None and early.code == 354 and (not txn.accepted or txn.broken):
            # The MX waits for data that will not come: it must not see an end of data.
            await self._drop_upstream(polite=False)
            upstream = None
        if not txn.accepted:
            # The transaction stays open: the client may still add recipients.
            smtp.answer_data(replies.NO_VALID_RECIPIENTS, ends=False)
            self._end_transaction(txn, replies.NO_VALID_RECIPIENTS)
            return
        if txn.broken or upstream is None or upstream.closed:
            self._refuse_data(txn, replies.mx_connection_lost("before DATA"))
            await self.flush()  # the client's reply first: an MX's RSET may take seconds
            await self._reset()
            return
        await self.flush()
        try:
            answer = early or await upstream.data_command()
        except UpstreamLost as error:
            await self._drop_upstream(polite=False)
            self._refuse_data(txn, upstream_failed("at DATA", error))
            self.txn = None
            return
        if answer.code != 354:
            await self._observe(txn, answer)
            self._refuse_data(txn, answer)
            await self.flush()  # the client's reply first: an MX's RSET may take seconds
            await self._reset()
            return
        if upstream.parser.buffered:
            # A reply before any data was sent (e.g. "354 ...\r\n250 ..."): whatever it says
            # could not be about this message, so it must not be taken as its final reply.
            await self._drop_upstream(polite=False)
            self._refuse_data(txn, replies.mx_connection_lost("(it replied out of turn)"))
            self.txn = None
            return
        # A message whose header is not ASCII needs SMTPUTF8 (RFC 6532); an MX without it
        # must not get one. Only then is the header looked at (the body may be 8-bit).
        utf8_lost = _has_param(txn.mail, "SMTPUTF8") and not upstream.supports("SMTPUTF8")
        smtp.answer_data(answer, check_header=utf8_lost)
        await self.flush()
        final = await self._relay_data(upstream, txn)
        upstream.transactions += 1
        smtp.answer_final(final)
        await self._observe(txn, final)
        self._end_transaction(txn, final)
        self.owes_final_reply = False  # queued: a stop still sends it before its 421
        self.txn = None
        if final.code == 421 and self.upstream is not None:
            await self._drop_upstream(polite=False)

    async def _observe(self, txn: Transaction, answer: Reply) -> None:
        """Let traffic shaping's rules see a refusal the MX itself sent for this transaction."""
        shaper = self.context.shaper
        if shaper is None or txn.path is None or answer.code < 400 or answer.raw is None:
            return
        binding = txn.route.binding.name if txn.route is not None else None
        if binding is not None:
            await shaper.observe(binding, txn.path, answer)

    def _refuse_data(self, txn: Transaction, answer: Reply) -> None:
        """``answer`` (not 354) to DATA ends the transaction."""
        self.smtp.answer_data(answer)
        self._end_transaction(txn, answer)

    async def _relay_data(self, upstream: Upstream, txn: Transaction) -> Reply:
        """Copy the client's bytes to the MX up to and including ``<CRLF>.<CRLF>``; the reply
        that goes to the client is the MX's own, or a 4xx/5xx when the MX must not see an end."""
        server = self.config.server
        smtp = self.smtp
        lost: UpstreamLost | None = None
        # Each read waits at most data_timeout, and the whole data phase data_total_timeout,
        # so a client trickling bytes cannot hold the session (and its upstream) for ever.
        data_deadline = trio.current_time() + server.data_total_timeout
        while True:
            event = smtp.next_event()
            if event is NEED_DATA:
                deadline = min(trio.current_time() + server.data_timeout, data_deadline)
                smtp.receive_data(await self._receive_data(upstream, deadline))
            elif isinstance(event, DataChunk):
                if lost is not None:
                    continue  # the MX is gone: the rest of the data is read and dropped
                if event.last:
                    # From this write on the MX may accept the message: its reply is owed to
                    # the client even when the shutdown grace runs out (ServerContext.end_grace).
                    self.owes_final_reply = True
                try:
                    await upstream.send_data(event.data)
                except UpstreamLost as error:
                    lost = error
            else:
                assert isinstance(event, EndOfData), event
                break
        txn.size = event.size
        if event.refusal is not None:
            await self._drop_upstream(polite=False)  # the MX sees no end of data
            return event.refusal
        if lost is not None:
            await self._drop_upstream(polite=False)
            return upstream_failed("during DATA", lost)
        try:
            return await upstream.read_final_reply()
        except UpstreamLost as error:
            log.warning("session %s: no final reply from the MX: %r", self.id, str(error))
            await self._drop_upstream(polite=False)
            return upstream_failed("before its final reply", error)

    async def _receive_data(self, upstream: Upstream, deadline: float) -> bytes | bytearray:
        """Like :meth:`receive`, but a client that vanishes or stalls mid-DATA makes the
        upstream close without an end of data, so the MX discards the partial message."""
        try:
            return await self.receive(deadline)
        except _CloseSession:
            await self._drop_upstream(polite=False)
            raise

    # ---- transaction and upstream housekeeping ----------------------------------------------

    def _end_transaction(self, txn: Transaction, final: Reply | None) -> None:
        """Count the transaction and write its one log line (once)."""
        if txn.logged:
            return
        txn.logged = True
        outcome = "aborted" if final is None else outcome_of(final.code)
        via = txn.via
        binding = via.binding if via is not None else None
        if binding is None and txn.route is not None:
            binding = txn.route.binding.name
        self.context.metrics.count_transaction(binding, outcome)
        if via is not None:
            self.context.metrics.count_tls_policy(via.tls_policy)
        if not transaction_logging():
            return
        counts = txn.recipient_outcomes
        line: dict[str, object] = {"session": self.id}
        if txn.ident is not None:
            line["transaction"] = txn.ident
        line.update(
            {
                "client": self.client,
                "listener": str(self.listener.address),
                "binding": None if via is None else via.binding,
                "proxy": None if via is None else via.proxy,
                "source": None if via is None else via.source,
                "mx": None if via is None else via.mx,
                "mx_address": None if via is None else via.mx_address,
                "tls": None if via is None else via.tls,
                "tls_fallback": None if via is None else via.tls_fallback,
                "tls_policy": None if via is None else via.tls_policy,
                "site": None if txn.path is None else txn.path.site,
                "shaping_wait": round(txn.shaping_wait, 3),
                "rcpt": f"{counts['accepted']}/{counts['deferred']}/{counts['rejected']}",
                "outcome": outcome,
                "reply": "-" if final is None else f"{final.code} {final.text}"[:200],
                "bytes": txn.size,
                "duration": round(trio.current_time() - txn.started, 3),
            }
        )
        log_transaction(line)

    async def _reset(self) -> None:
        txn, self.txn = self.txn, None
        if txn is not None:
            self._end_transaction(txn, None)
        if txn is not None and txn.mail_sent and self.upstream is not None:
            try:
                answer = await self.upstream.rset()
            except UpstreamLost:
                answer = None
            if answer is None or answer.code != 250:
                await self._drop_upstream(polite=False)

    async def _release_upstream(self) -> None:
        """Between transactions: park the upstream for reuse (or QUIT it)."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            await self._park(upstream)

    async def _park(self, upstream: Upstream) -> None:
        """An upstream with no transaction open: into the connection cache for reuse, or
        QUIT when caching is off."""
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


# The method that answers each event.
_ON_EVENT: dict[type[Any], str] = {
    TransactionReset: "on_reset",
    MailOpened: "on_mail",
    RcptRequested: "on_rcpt",
    RcptRefused: "on_rcpt_refused",
    DataCommand: "on_data",
    Quit: "on_quit",
    Close: "on_close",
    DataChunk: "on_unexpected",
    EndOfData: "on_unexpected",
}
