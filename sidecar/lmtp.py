"""An LMTP listener's session (RFC 2033): one client transaction fans out to every route its
recipients need, and each recipient gets its own MX's reply to the end of data.

The dialogue is :class:`sidecar.smtp.server.SmtpServer` in LMTP mode; everything per route is
the SMTP session's own code (:class:`sidecar.session.Session`), run once per route. A route
of the transaction is a :class:`Leg`: its own :class:`~sidecar.session.Transaction` (the
route, the MAIL replayed, the recipients accepted, its shaping path, its log line) on its own
upstream, opened (or taken from the cache, with traffic shaping's slot) by the first RCPT
for that route, which replays MAIL there.

DATA goes to every leg with an accepted recipient, at once; the client gets ``354`` when at
least one MX said ``354``. The data is scanned once and each chunk is written to every leg
before the next is read: the slowest MX sets the pace, and a transaction holds one chunk of
client data (at most :data:`sidecar.session.RECEIVE_SIZE` octets) whatever its number of
routes. At the end of data each leg's final reply is read at once (each within
``delivery.data_done_timeout``), and the client gets one reply per accepted recipient, in
RCPT order: its MX's final reply byte for byte, its MX's refusal of DATA, or a 4xx for a
route lost or timed out, only for that route's recipients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from sidecar import replies
from sidecar.errors import RouteError, UpstreamLost
from sidecar.routing import Route, RouteKey
from sidecar.session import (
    Session,
    Transaction,
    _CloseSession,
    _has_param,
    _TryAnotherBinding,
    log,
    upstream_failed,
)
from sidecar.smtp.commands import RcptTo
from sidecar.smtp.replies import Reply
from sidecar.smtp.server import (
    NEED_DATA,
    DataChunk,
    DataCommand,
    EndOfData,
    MailOpened,
    Quit,
    RcptRequested,
)
from sidecar.upstream import Upstream

__all__ = ["Leg", "LmtpSession"]


@dataclass(eq=False)
class Leg:
    """One route of an LMTP transaction: its MX transaction and the upstream that carries it,
    and how DATA went there."""

    txn: Transaction
    upstream: Upstream | None = None
    go_ahead: Reply | None = None  # the MX's 354
    # What this route's recipients are told at the end of data: the MX's final reply, its
    # refusal of DATA, or the sidecar's 4xx for a route lost or timed out.
    final: Reply | None = None
    lost: UpstreamLost | None = None  # the connection failed while data was written
    finished: bool = False  # the MX's final reply was read: the connection is clean


@dataclass(eq=False)
class _Fanout:
    """The client's transaction: its legs by route, and the leg of each accepted recipient
    in RCPT order (the order of the replies after the end of data)."""

    legs: dict[RouteKey, Leg] = field(default_factory=dict)
    order: list[Leg] = field(default_factory=list)


def _takes_utf8(leg: Leg) -> bool:
    """Whether the leg's MX offered SMTPUTF8 (a header that is not ASCII may go there)."""
    return leg.upstream is not None and leg.upstream.supports("SMTPUTF8")


def _data_refusal(refusals: Sequence[Reply]) -> Reply:
    """The one reply to a DATA that every route refused (RFC 2033 section 4.2: a failed DATA
    gets no per-recipient replies): the first temporary refusal, so that no recipient whose
    MX may still take the message bounces; else the first."""
    for refusal in refusals:
        if not refusal.is_permanent:
            return refusal
    return refusals[0]


class LmtpSession(Session):
    """A session on an LMTP listener (see the module docstring)."""

    __slots__ = ("_fanout", "_max_routes", "_rcpt_leg", "_transactions")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_routes = self.listener.max_routes
        self._fanout = _Fanout()
        self._rcpt_leg: Leg | None = None  # the leg of the RCPT being answered
        self._transactions = 0

    # ---- MAIL, RCPT: a leg per route ---------------------------------------------------------

    async def on_mail(self, event: MailOpened) -> None:
        await super().on_mail(event)
        assert self.txn is not None
        self._transactions += 1
        self.txn.ident = f"{self.id}.{self._transactions}"
        self._fanout = _Fanout()

    async def on_rcpt(self, event: RcptRequested) -> None:
        front = self.txn
        assert front is not None
        await self.flush()  # earlier pipelined replies: the set-up may take a while
        delivery = self.config.delivery
        self._last_proxy_error = None
        self._rcpt_leg = None
        answer: Reply | None = None
        setup_deadline = trio.current_time() + delivery.setup_timeout
        with trio.move_on_at(setup_deadline):
            answer = await self._route_and_replay(front, event.rcpt, setup_deadline)
        leg = self._rcpt_leg
        if answer is None:
            if leg is not None and leg.upstream is not None:
                upstream, leg.upstream = leg.upstream, None
                await upstream.abort()
                if leg.txn.accepted:
                    leg.txn.broken = True  # its recipients were on that connection
            answer = replies.setup_timed_out(delivery.setup_timeout)
        self._count_recipient(front if leg is None else leg.txn, answer)
        if 200 <= answer.code < 300 and leg is not None:
            self._fanout.order.append(leg)
        self.smtp.answer_rcpt(answer)

    async def _route_and_replay_once(
        self, txn: Transaction, rcpt: RcptTo, excluded: set[str], by: float
    ) -> Reply | _TryAnotherBinding:
        recipient = rcpt.recipient
        legs = self._fanout.legs
        # A binding group keeps the transaction on one member while it may.
        first = next(iter(legs.values()), None)
        prefer = first.txn.route.binding.name if first and first.txn.route else None
        try:
            route: Route = await self.context.router.route(
                self.listener, recipient.routing_domain, recipient.literal, prefer, excluded
            )
        except RouteError as error:
            return self._last_proxy_error or error.reply
        leg = legs.get(route.key)
        if leg is None:
            held = sum(1 for other in legs.values() if other.upstream or other.txn.accepted)
            if held >= self._max_routes:
                # Every outside input is bounded: so are the MX connections of one session
                # (the descriptor budget counts 1 + max_routes per LMTP session).
                return replies.OTHER_ROUTE
            leg = legs[route.key] = Leg(Transaction(txn.mail, ident=txn.ident))
        self._rcpt_leg = leg
        # The per-route code of the SMTP session runs on this leg's upstream.
        self.upstream = leg.upstream
        try:
            return await self._replay_on_route(leg.txn, route, rcpt, by)
        finally:
            leg.upstream, self.upstream = self.upstream, None

    # ---- DATA: every leg at once --------------------------------------------------------------

    async def on_data(self, event: DataCommand) -> None:
        front = self.txn
        assert front is not None
        fanout = self._fanout
        smtp = self.smtp
        for leg in fanout.legs.values():
            early = leg.txn.data_reply
            if not leg.txn.accepted and early is not None and early.code == 354:
                # The MX waits for data that will not come: it must not see an end of data.
                leg.txn.data_reply = None
                await self._abort_leg(leg)
        if not fanout.order:
            # The transaction stays open: the client may still add recipients.
            smtp.answer_data(replies.NO_VALID_RECIPIENTS_LMTP, ends=False)
            self._end_transaction(front, replies.NO_VALID_RECIPIENTS_LMTP)
            return
        await self.flush()
        active = [leg for leg in fanout.legs.values() if leg.txn.accepted]
        async with trio.open_nursery() as nursery:
            for leg in active:
                nursery.start_soon(self._start_data, leg)
        going = [leg for leg in active if leg.go_ahead is not None]
        if not going:
            answer = _data_refusal([leg.final for leg in active if leg.final is not None])
            smtp.answer_data(answer)
            self._end_legs(None)  # each route's line with its own MX's refusal
            await self.flush()  # the client's reply first, then the RSETs
            await self._finish_legs()
            return
        # A header that is not ASCII needs SMTPUTF8 (RFC 6532) at every MX that gets it: the
        # routes whose MX lacks it are stopped before their end of data, the others go on.
        without = [leg for leg in going if not _takes_utf8(leg)]
        utf8_lost = _has_param(front.mail, "SMTPUTF8") and bool(without)
        go_ahead = going[0].go_ahead
        assert go_ahead is not None
        smtp.answer_data(go_ahead, check_header=utf8_lost, header_stops=len(without) == len(going))
        await self.flush()
        size = await self._relay_to_legs(going, without if utf8_lost else [])
        for leg in fanout.legs.values():
            leg.txn.size = size
        answers = [leg.final or replies.mx_connection_lost("(no reply)") for leg in fanout.order]
        smtp.answer_recipients(answers)
        self.owes_final_reply = False  # queued: a stop still sends them before its 421
        for leg in fanout.legs.values():
            if leg.final is not None:
                await self._observe(leg.txn, leg.final)
        self._end_legs(None)
        await self.flush()  # the client's replies first, then the RSETs and the cache
        await self._finish_legs()

    async def _start_data(self, leg: Leg) -> None:
        """DATA on one leg (or the MX's reply to a DATA sent with its last RCPT): its 354 in
        ``go_ahead``, else its recipients' reply in ``final``."""
        txn = leg.txn
        early, txn.data_reply = txn.data_reply, None
        upstream = leg.upstream
        if txn.broken or upstream is None or upstream.closed:
            leg.final = replies.mx_connection_lost("before DATA")
            await self._abort_leg(leg)
            return
        try:
            answer = early or await upstream.data_command()
        except UpstreamLost as error:
            await self._abort_leg(leg)
            leg.final = upstream_failed("at DATA", error)
            return
        if answer.code != 354:
            await self._observe(txn, answer)
            leg.final = answer  # the MX's own refusal, for its recipients
            return
        if upstream.parser.buffered:
            # A reply before any data was sent: it could not be about this message.
            await self._abort_leg(leg)
            leg.final = replies.mx_connection_lost("(it replied out of turn)")
            return
        leg.go_ahead = answer

    async def _relay_to_legs(self, going: list[Leg], without_utf8: list[Leg]) -> int:
        """Copy the client's data to every leg in ``going``, each chunk to all of them before
        the next is read; then read their final replies. Returns the message size. The legs
        ``without_utf8`` are stopped (no end of data) once the header proves not ASCII."""
        server = self.config.server
        smtp = self.smtp
        data_deadline = trio.current_time() + server.data_total_timeout
        while True:
            event = smtp.next_event()
            if event is NEED_DATA:
                deadline = min(trio.current_time() + server.data_timeout, data_deadline)
                try:
                    data = await self.receive(deadline)
                except _CloseSession:
                    # The client vanished or stalled: no MX may see an end of data.
                    for leg in going:
                        await self._abort_leg(leg)
                    raise
                smtp.receive_data(data)
            elif isinstance(event, DataChunk):
                if without_utf8 and smtp.header_not_ascii:
                    for leg in without_utf8:
                        if leg.final is None and leg.lost is None:
                            await self._abort_leg(leg)  # its MX sees no end of data
                            leg.final = replies.NON_ASCII_HEADER
                    without_utf8 = []
                if event.last:
                    # From this write on an MX may accept the message: the replies are owed
                    # even when the shutdown grace runs out (ServerContext.end_grace).
                    self.owes_final_reply = True
                sending = [leg for leg in going if leg.lost is None and leg.final is None]
                if len(sending) == 1:
                    await self._send(sending[0], event.data)
                elif sending:
                    async with trio.open_nursery() as nursery:
                        for leg in sending:
                            nursery.start_soon(self._send, leg, event.data)
            else:
                assert isinstance(event, EndOfData), event
                break
        if event.refusal is not None:
            for leg in going:
                await self._abort_leg(leg)  # no MX sees an end of data
                leg.final = event.refusal
            return event.size
        async with trio.open_nursery() as nursery:
            for leg in going:
                if leg.final is not None:
                    continue  # stopped already (a header its MX cannot take)
                if leg.lost is not None:
                    leg.final = upstream_failed("during DATA", leg.lost)
                else:
                    nursery.start_soon(self._read_final, leg)
        return event.size

    async def _send(self, leg: Leg, data: bytes | bytearray) -> None:
        """One chunk to one leg; a leg that fails is closed at once (its MX sees no end of
        data) and gets no more."""
        assert leg.upstream is not None
        try:
            await leg.upstream.send_data(data)
        except UpstreamLost as error:
            log.info("session %s: route lost during DATA: %r", self.id, str(error))
            leg.lost = error
            await self._abort_leg(leg)

    async def _read_final(self, leg: Leg) -> None:
        upstream = leg.upstream
        assert upstream is not None
        try:
            leg.final = await upstream.read_final_reply()
        except UpstreamLost as error:
            log.warning("session %s: no final reply from the MX: %r", self.id, str(error))
            await self._abort_leg(leg)
            leg.final = upstream_failed("before its final reply", error)
            return
        leg.finished = True
        upstream.transactions += 1
        if leg.final.code == 421:
            await self._abort_leg(leg)  # the MX is closing the connection

    # ---- the end of the transaction -----------------------------------------------------------

    def _end_legs(self, final: Reply | None) -> None:
        """One log line (and transaction count) per route, each with its route's reply
        (``final`` when given); the client's transaction itself only when it had no route."""
        front = self.txn
        self.txn = None
        legs = [
            leg
            for leg in self._fanout.legs.values()
            # A route tried for no recipient in the end (a group member that handed the
            # recipient on to another) is no transaction of its own.
            if any(leg.txn.recipient_outcomes.values())
        ]
        for leg in legs:
            self._end_transaction(leg.txn, final if final is not None else leg.final)
        if front is not None:
            if legs:
                front.logged = True
            else:
                self._end_transaction(front, final)

    async def _finish_legs(self) -> None:
        """Every leg's connection back to the cache (after RSET when its MX transaction is
        still open), or closed when it cannot be reused."""
        legs = list(self._fanout.legs.values())
        self._fanout = _Fanout()
        async with trio.open_nursery() as nursery:
            for leg in legs:
                nursery.start_soon(self._finish_leg, leg)

    async def _finish_leg(self, leg: Leg) -> None:
        upstream = leg.upstream
        if upstream is None or upstream.closed:
            leg.upstream = None
            return
        early = leg.txn.data_reply
        if early is not None and early.code == 354:
            await self._abort_leg(leg)
            return
        if leg.txn.mail_sent and not leg.finished:
            try:
                answer: Reply | None = await upstream.rset()
            except UpstreamLost:
                answer = None
            if answer is None or answer.code != 250:
                await self._abort_leg(leg)
                return
        leg.upstream = None
        await self._park(upstream)

    async def _abort_leg(self, leg: Leg) -> None:
        """Close the leg's connection without QUIT (mid-DATA: its MX discards the message)."""
        upstream, leg.upstream = leg.upstream, None
        if upstream is not None:
            await upstream.abort()

    async def _reset(self) -> None:
        """RSET, LHLO or a refusal ended the transaction: every leg's MX transaction too."""
        if self.txn is not None:
            self._end_legs(None)
        await self._finish_legs()

    async def on_quit(self, event: Quit) -> None:
        await self.flush()
        for leg in list(self._fanout.legs.values()):
            upstream, leg.upstream = leg.upstream, None
            if upstream is None:
                continue
            if leg.txn.mail_sent:
                await upstream.quit()  # a transaction is open at the MX
            else:
                await self._park(upstream)
        raise _CloseSession

    async def _wind_up(self) -> None:
        """Count an unfinished transaction (a line per route) as aborted; park the clean
        connections, abort those with an open transaction (the MX discards it)."""
        if self.txn is not None:
            self._end_legs(None)
        legs = list(self._fanout.legs.values())
        self._fanout = _Fanout()
        with trio.CancelScope(shield=True):
            for leg in legs:
                upstream, leg.upstream = leg.upstream, None
                if upstream is None:
                    continue
                if leg.txn.mail_sent and not leg.finished:
                    await upstream.abort()
                else:
                    await self._park(upstream)
        await super()._wind_up()
