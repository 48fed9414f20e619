"""The connection to the MX: through the binding's HAProxy (PROXY v2 header) or direct for
bypass domains; banner, EHLO, STARTTLS, EHLO again. Failures are told apart as DESIGN.md
section 5 says: a proxy that cannot be reached is the proxy's fault (no next MX), an MX that
closes or stays silent before its banner is the MX's fault (next address), and so is an MX
that greets with 4xx/5xx or refuses EHLO: when no MX is left the client gets a 4xx, never an
MX's 5xx greeting (Postfix's ``smtp_skip_5xx_greeting``)."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import socket
import ssl
from dataclasses import dataclass, field

import trio

from sidecar import proxy_v2, replies
from sidecar.config import DeliveryConfig, HostPort, TlsPolicy, verifying_context
from sidecar.errors import (
    LocalResourceError,
    UpstreamError,
    UpstreamLost,
    UpstreamTimedOut,
    describe_error,
)
from sidecar.health import HealthRegistry
from sidecar.limits import local_resource_errno
from sidecar.metrics import Metrics
from sidecar.mxtls.dane import DanePolicy, PeerChainUnavailable, match_chain, peer_chain
from sidecar.mxtls.outcome import PolicyLabel, PolicyType, ResultType, TlsOutcome, TlsReporter
from sidecar.mxtls.tlsrpt import handshake_failure
from sidecar.routing import Candidate, Route, RouteKey
from sidecar.shaping.shaper import Grant
from sidecar.smtp.replies import Reply, ReplyError, ReplyParser, parse_ehlo_capabilities
from sidecar.tcp import (
    DeadlineStream,
    ScopedStream,
    TcpStream,
    close_now,
    stream_from,
)

log = logging.getLogger("sidecar.upstream")

# Seconds for the MX's 221 to QUIT (a courtesy: the connection closes either way), and for
# its reply to RSET (the client waits for its own RSET reply meanwhile: Postfix gives 20 s).
QUIT_TIMEOUT = 5.0
RSET_TIMEOUT = 10.0

# Replies are small (at most replies.MAX_REPLY_SIZE): a reply being read costs at most that
# plus one chunk of this size.
RECEIVE_SIZE = 16_384


class _CandidateFailed(Exception):
    """This MX address did not work out; try the next one. ``reply``: the MX's own refusal
    (a banner, an EHLO reply), for traffic shaping's rules."""

    def __init__(self, problem: str, reply: Reply | None = None) -> None:
        super().__init__(problem)
        self.reply = reply


class _PolicyFailed(_CandidateFailed):
    """This MX did not meet the TLS policy that applies to it (DANE, or a configured
    "required"/"verify"): skipped, and when no MX is left the client's 4xx names the policy,
    with ``enhanced`` as its RFC 3463 code (X.7.5 a failed check, X.7.4 no STARTTLS)."""

    def __init__(self, problem: str, enhanced: str = "4.7.5") -> None:
        super().__init__(problem)
        self.enhanced = enhanced


class _MxRefused(_CandidateFailed):
    """The MX refused to talk to us (a 5xx banner, EHLO and HELO refused) on a connection that
    is still open: it gets a polite QUIT (RFC 5321 section 3.1), then the next MX is tried."""


# At most this much of an MX's reply text is quoted in a problem (a reply line of ours).
QUOTED_REPLY_CHARS = 200


def _quote(answer: Reply) -> str:
    """``"554 5.7.1 go away"``: an MX reply for a problem text, bounded."""
    text = answer.text
    if len(text) > QUOTED_REPLY_CHARS:
        text = text[:QUOTED_REPLY_CHARS] + "..."
    return f"{answer.code} {text}".rstrip()


@functools.cache
def _unverified_context() -> ssl.SSLContext:
    # "opportunistic" and "required" (RFC 3207 as MTAs practise it): encrypt, but do not
    # authenticate the MX.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# "verify" with the system's trust store; a configured tls_ca_file was loaded with the
# configuration (DeliveryConfig.tls_verify_context).
_cached_verifying_context = functools.cache(verifying_context)


def effective_policy(route: Route, candidate: Candidate) -> tuple[TlsPolicy, PolicyLabel]:
    """The STARTTLS policy for ``candidate`` and its name in the log line and /metrics
    (``tls_policy=``). DANE takes precedence over the configured ``tls`` (DESIGN.md section
    2, RFC 8461 section 2): with usable TLSA records STARTTLS is required and the chain is
    checked against them ("dane"); with only unusable ones it is required, unauthenticated
    (RFC 7672 section 3.1.3: "required"), unless the configuration asks for "verify"."""
    dane = candidate.dane
    if dane is not None:
        if dane.authenticates:
            return "required", "dane"
        if route.tls != "verify":
            return "required", "required"
    if route.sts_label is not None and route.tls == "verify":
        return "verify", route.sts_label  # an enforced MTA-STS policy (RFC 8461 section 4)
    return route.tls, _LABELS[route.tls]


_LABELS: dict[TlsPolicy, PolicyLabel] = {
    "disabled": "none",
    "opportunistic": "opportunistic",
    "required": "required",
    "verify": "verify",
}


def tls_context(policy: TlsPolicy, delivery: DeliveryConfig) -> ssl.SSLContext:
    """The client context for ``policy``. Raises ``OSError``/``ssl.SSLError`` only for a
    ``tls_ca_file`` that was not loaded with the configuration and cannot be read."""
    if policy != "verify":
        return _unverified_context()
    if delivery.tls_verify_context is not None:
        return delivery.tls_verify_context
    return _cached_verifying_context(delivery.tls_ca_file)


@dataclass(frozen=True, slots=True)
class UpstreamDescription:
    """Where a connection goes, for the transaction log line: the binding, the HAProxy
    server ("direct" for a bypass domain), the PROXY header's source address, the MX host
    and address, the TLS protocol and cipher (``None``: plaintext), why an opportunistic
    STARTTLS failed when the connection fell back to plaintext (``None``: it did not), and
    the TLS policy it was opened under (``tls_policy=`` of the log line)."""

    binding: str
    proxy: str
    source: str | None
    mx: str
    mx_address: str
    tls: str | None
    tls_fallback: str | None = None
    tls_policy: PolicyLabel = "opportunistic"  # the policy it was opened under


@dataclass
class Upstream:
    """An SMTP session with an MX (through HAProxy, or direct), after its EHLO. It owns every
    wait on the MX: one named method per step, each with its time limit from [delivery]."""

    stream: DeadlineStream
    candidate: Candidate
    server: HostPort | None
    delivery: DeliveryConfig
    parser: ReplyParser = field(default_factory=ReplyParser)
    capabilities: dict[str, str] = field(default_factory=dict)
    tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384" once encrypted
    tls_settled: bool = False  # the EHLO after the TLS handshake has been answered
    # Why an opportunistic STARTTLS failed, when this connection went on in plaintext.
    tls_fallback: str | None = None
    route_key: RouteKey | None = None
    tls_policy: TlsPolicy = "opportunistic"
    # The policy's name for the log line and /metrics; the MX host's DANE policy (checked
    # after the handshake when it authenticates); who records TLS-RPT outcomes, and for
    # which policy domain (the recipient domain).
    policy_label: PolicyLabel = "opportunistic"
    dane: DanePolicy | None = None
    reporter: TlsReporter | None = None
    policy_domain: str = ""
    # The domain's MTA-STS policy lines when one applies to this MX (TLS-RPT's policy type
    # "sts"); under "testing" the outcome is reported by sidecar.mxtls.sts_verify instead.
    sts_strings: tuple[str, ...] = ()
    sts_testing: bool = False
    closed: bool = False
    metrics: Metrics | None = None
    transactions: int = 0  # final replies received: how often it was used
    # Transactions allowed on this connection (shaping's max_deliveries_per_connection);
    # None: delivery.connection_reuse_limit.
    max_transactions: int | None = None
    # The traffic-shaping slot this connection holds (connection_limit), released when it
    # is closed, however that happens.
    grant: Grant | None = None
    _description: UpstreamDescription | None = None

    @property
    def description(self) -> UpstreamDescription:
        """Where this connection goes (worked out once, on first use)."""
        if self._description is None:
            candidate = self.candidate
            self._description = UpstreamDescription(
                binding=self.route_key.binding if self.route_key is not None else "-",
                proxy=str(self.server) if self.server is not None else "direct",
                source=str(candidate.source) if candidate.source is not None else None,
                mx=candidate.mx,
                mx_address=str(candidate.address),
                tls=self.tls,
                tls_fallback=self.tls_fallback,
                tls_policy=self.policy_label,
            )
        return self._description

    # ---- the waits on the MX --------------------------------------------------------------
    # Each named step has its own time limit (seconds, from [delivery]) and takes ``by``, an
    # absolute trio time it must end by too (what is left of the RCPT set-up budget). The
    # deadline goes down to the stream as it is; a wait that runs out is UpstreamTimedOut.

    def _deadline(self, seconds: float, by: float) -> tuple[float, float]:
        """(absolute deadline, the seconds it gives) for a step of ``seconds``, cut to ``by``."""
        now = trio.current_time()
        deadline = min(now + seconds, by)
        return deadline, deadline - now

    async def read_banner(self, *, by: float = math.inf) -> Reply:
        """The MX's greeting (``banner_timeout``; RFC 5321 section 4.5.3.2.1: 5 minutes)."""
        return await self._read_reply(*self._deadline(self.delivery.banner_timeout, by))

    async def command(self, line: bytes, *, by: float = math.inf) -> Reply:
        """One command and its reply (``mx_command_timeout``: EHLO, STARTTLS, MAIL, RCPT)."""
        (answer,) = await self.commands(line, by=by)
        return answer

    async def commands(self, *lines: bytes, by: float = math.inf) -> list[Reply]:
        """Commands in one write (several only when the MX advertised PIPELINING), then
        each reply, all within ``mx_command_timeout`` (cut to ``by``).

        Raises :class:`UpstreamLost` before sending anything when the MX's reply stream is
        out of step: bytes nobody asked for are waiting (an extra reply, sent while the
        connection sat idle or after more replies than commands), so the next reply would
        be taken for this command's (DESIGN.md invariant 1). The caller closes it."""
        problem = self.out_of_step()
        if problem is not None:
            raise UpstreamLost(problem)
        deadline = self._deadline(self.delivery.mx_command_timeout, by)
        await self._send(b"".join(lines) if len(lines) > 1 else lines[0], *deadline)
        return [await self._read_reply(*deadline) for _ in lines]

    async def data_command(self) -> Reply:
        """DATA and the MX's 354 (``data_init_timeout``; RFC: 2 minutes)."""
        problem = self.out_of_step()
        if problem is not None:
            raise UpstreamLost(problem)
        deadline = self._deadline(self.delivery.data_init_timeout, math.inf)
        await self._send(b"DATA\r\n", *deadline)
        return await self._read_reply(*deadline)

    async def send_data(self, data: bytes | bytearray) -> None:
        """One piece of message data (``data_send_timeout`` for each; RFC: 3 minutes)."""
        await self._send(data, *self._deadline(self.delivery.data_send_timeout, math.inf))

    async def read_final_reply(self) -> Reply:
        """The MX's reply to the end of data (``data_done_timeout``; RFC: 10 minutes)."""
        return await self._read_reply(*self._deadline(self.delivery.data_done_timeout, math.inf))

    async def rset(self) -> Reply:
        """RSET, when the client ends an open transaction (the client waits for its own RSET
        reply meanwhile: Postfix gives 20 s)."""
        (answer,) = await self.commands(b"RSET\r\n", by=trio.current_time() + RSET_TIMEOUT)
        return answer

    async def _read_reply(self, deadline: float, seconds: float) -> Reply:
        try:
            while (answer := self.parser.next_reply()) is None:
                data = await self.stream.receive_by(RECEIVE_SIZE, deadline)
                if data is None:
                    raise UpstreamTimedOut(f"no reply within {seconds:g}s")
                if not data:
                    raise UpstreamLost("connection closed by the MX")
                if self.metrics is not None:
                    self.metrics.bytes_from_mx += len(data)
                self.parser.feed(data)
            return answer
        except ReplyError as error:
            # Closed by the callers, and never passed on (DESIGN.md invariant 5).
            raise UpstreamLost(
                f"bad reply: {describe_error(error)}", replies.mx_bad_reply(str(error))
            ) from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
            raise UpstreamLost(f"connection lost: {describe_error(error)}") from None

    async def _send(self, data: bytes | bytearray, deadline: float, seconds: float) -> None:
        try:
            sent = await self.stream.send_by(data, deadline)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
            raise UpstreamLost(f"connection lost: {describe_error(error)}") from None
        if not sent:
            raise UpstreamTimedOut(f"the MX took nothing for {seconds:g}s")
        if self.metrics is not None:
            self.metrics.bytes_to_mx += len(data)

    def supports(self, keyword: str) -> bool:
        return keyword in self.capabilities

    def out_of_step(self) -> str | None:
        """Why this connection cannot carry a command now, without waiting: bytes from the
        MX that answer no command (in the parser, in the TLS layer or in the socket), or an
        end of stream; ``None`` when it is idle and clean.

        A look into the socket (``MSG_PEEK``) costs one system call that fails at once on a
        clean connection. Under TLS any record that arrived is taken as unsolicited, once the
        EHLO after the handshake has been answered: before that, the server's TLS 1.3
        session tickets may still be on their way (reading the EHLO reply consumes them)."""
        if self.parser.buffered:
            return "unsolicited bytes from the MX"
        stream: trio.abc.Stream = self.stream
        if isinstance(stream, ScopedStream):
            stream = stream.inner
        if isinstance(stream, trio.SSLStream):
            if stream._ssl_object.pending():  # decrypted bytes nobody read
                return "unsolicited bytes from the MX"
            if not self.tls_settled:
                return None
            stream = stream.transport_stream
        if not isinstance(stream, TcpStream):
            return None  # a test's memory stream: the parser check is all there is
        try:
            peeked = stream.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as error:
            return f"connection lost: {error}"
        return "unsolicited bytes from the MX" if peeked else "connection closed by the MX"

    async def quit(self) -> None:
        """Polite close: QUIT, wait briefly (QUIT_TIMEOUT) for 221, close."""
        if not self.closed:
            with contextlib.suppress(UpstreamLost):
                await self.commands(b"QUIT\r\n", by=trio.current_time() + QUIT_TIMEOUT)
        await self.abort()

    async def abort(self) -> None:
        """Close without QUIT; mid-DATA this makes the MX discard the partial message. Gives
        back the connection's shaping slot."""
        self.closed = True
        await close_now(self.stream)
        grant, self.grant = self.grant, None
        if grant is not None:
            with trio.CancelScope(shield=True):
                await grant.release()


async def _connect_via_proxy(
    route: Route,
    candidate: Candidate,
    delivery: DeliveryConfig,
    health: HealthRegistry,
    by: float,
) -> tuple[TcpStream, HostPort]:
    assert candidate.source is not None
    errors = []
    for server in route.servers:
        if not health.is_plumbed(server):
            errors.append(f"{server} unplumbed")
            continue
        try:
            with trio.fail_at(min(trio.current_time() + delivery.connect_timeout, by)):
                stream = stream_from(await trio.open_tcp_stream(server.host, server.port))
        except (OSError, trio.TooSlowError) as error:
            _raise_if_local(error, f"HAProxy {server}")
            why = describe_error(error)
            health.record(server, False, f"delivery connect failed: {why}")
            errors.append(f"{server}: {why}")
            continue
        health.record(server, True)
        header = proxy_v2.encode(candidate.source, 0, candidate.address, delivery.port)
        try:
            await stream.send_all(header)
        except (OSError, trio.BrokenResourceError) as error:
            await trio.aclose_forcefully(stream)
            errors.append(f"{server}: {describe_error(error)}")
            continue
        return stream, server
    raise UpstreamError(
        replies.proxy_unreachable(route.binding.name, "; ".join(errors)), proxy_fault=True
    )


async def _connect_direct(candidate: Candidate, delivery: DeliveryConfig, by: float) -> TcpStream:
    try:
        with trio.fail_at(min(trio.current_time() + delivery.connect_timeout, by)):
            return stream_from(await trio.open_tcp_stream(str(candidate.address), delivery.port))
    except (OSError, trio.TooSlowError) as error:
        _raise_if_local(error, f"{candidate.mx}[{candidate.address}]")
        raise _CandidateFailed(f"connect failed: {describe_error(error)}") from None


def _raise_if_local(error: BaseException, peer: str) -> None:
    """A connect that failed for want of a local resource (EMFILE, ENOBUFS...) is the
    sidecar's own shortage (DESIGN.md invariant 5): not counted against HAProxy's health,
    no next MX (it would fail alike), and the client is told so."""
    code = local_resource_errno(error)
    if code is None:
        return
    shortage = LocalResourceError(code)
    log.warning("connecting to %s failed: local resource shortage (%s)", peer, shortage)
    raise UpstreamError(replies.local_resource_shortage(str(shortage))) from None


async def _greet(upstream: Upstream, ehlo_name: str, by: float) -> None:
    """EHLO (HELO if EHLO is refused with a 5xx, RFC 5321 section 4.1.4); fills
    ``capabilities``. A refusal makes this MX fail over to the next one, never a final reply
    for the client (DESIGN.md section 5): another MX of the domain may take the mail."""
    answer = await upstream.command(f"EHLO {ehlo_name}\r\n".encode(), by=by)
    if answer.code == 250:
        upstream.capabilities = parse_ehlo_capabilities(answer)
        return
    if answer.is_permanent:
        helo = await upstream.command(f"HELO {ehlo_name}\r\n".encode(), by=by)
        if helo.code == 250:
            upstream.capabilities = {}
            return
        if helo.is_permanent:
            # A HELO that is merely not implemented leaves the EHLO reply as the refusal.
            refusal = answer if helo.code in (500, 502) else helo
            raise _MxRefused(f"EHLO refused: {_quote(refusal)}", refusal)
        answer = helo
    raise _CandidateFailed(f"EHLO refused: {_quote(answer)}", answer)


async def _start_tls(upstream: Upstream, ehlo_name: str, by: float) -> None:
    try:
        # Before STARTTLS: a local fault must not leave the MX waiting for a handshake.
        context = tls_context(upstream.tls_policy, upstream.delivery)
        tls_stream = trio.SSLStream(upstream.stream, context, server_hostname=_sni(upstream))
    except (OSError, ssl.SSLError, ValueError) as error:
        # Ours, not the MX's (no next MX would fare better): a 4xx naming the cause.
        why = describe_error(error)
        log.error("cannot start TLS towards %s: %s", upstream.candidate.mx, why)
        raise UpstreamError(replies.local_tls_error(why)) from None
    answer = await upstream.command(b"STARTTLS\r\n", by=by)
    if answer.code != 220:
        problem = f"{_policy_prefix(upstream)}STARTTLS refused: {_quote(answer)}"
        _report(upstream, "starttls-not-supported", problem)
        if answer.code != 421 and upstream.tls_policy == "opportunistic":
            # RFC 3207: the session is still the plaintext one; go on as MTAs do.
            _fell_back(upstream, f"STARTTLS refused: {_quote(answer)}")
            return
        if answer.code == 421:
            raise _CandidateFailed(problem)
        raise _PolicyFailed(problem, "4.7.4")
    # Whatever the MX sent before the handshake is discarded (CVE-2011-0411 class), and so is
    # everything learnt from the plaintext EHLO.
    upstream.parser.take_unparsed()
    upstream.parser = ReplyParser()
    upstream.capabilities = {}
    # The one wait on the MX in a cancel scope of its own: trio's handshake is no stream read.
    try:
        with trio.fail_at(min(trio.current_time() + upstream.delivery.mx_command_timeout, by)):
            await tls_stream.do_handshake()
    except (trio.TooSlowError, trio.BrokenResourceError, OSError) as error:
        result, reason = handshake_failure(error)
        _report(upstream, result, f"{_policy_prefix(upstream)}{reason}")
        raise _TlsFailed(
            f"{_policy_prefix(upstream)}TLS handshake failed: {describe_error(error)}"
        ) from None
    upstream.stream = ScopedStream(tls_stream)
    ssl_object = tls_stream._ssl_object  # the stdlib SSLObject behind trio's SSLStream
    cipher = ssl_object.cipher()
    upstream.tls = f"{ssl_object.version()} {cipher[0] if cipher else ''}".strip()
    if upstream.dane is not None and upstream.dane.authenticates:
        _check_dane(upstream, upstream.dane, ssl_object)
    elif upstream.dane is not None:
        _report(upstream, None, "DANE: only unusable TLSA records, encrypted")
    else:
        _report(upstream, None)
    await _greet(upstream, ehlo_name, by)
    upstream.tls_settled = True


def _sni(upstream: Upstream) -> str:
    """The name sent as SNI (and, under ``verify``, checked against the certificate): the
    TLSA base domain under DANE (RFC 7672 section 8.1; the CNAME-expanded MX host when its
    TLSA records were found there), else the MX host name (RFC 7817, RFC 8461 section 4.2)."""
    dane = upstream.dane
    if dane is not None and upstream.tls_policy != "verify":
        return dane.base_domain
    return upstream.candidate.mx


class _TlsFailed(_CandidateFailed):
    pass


def _policy_prefix(upstream: Upstream) -> str:
    """``"DANE: "`` when the MX host is under DANE, so that a failure names the policy."""
    return "DANE: " if upstream.dane is not None else ""


def _check_dane(upstream: Upstream, dane: DanePolicy, ssl_object: ssl.SSLObject) -> None:
    """The MX's chain against its usable TLSA records (RFC 7672 section 3), after a
    handshake that verified nothing (CERT_NONE); :class:`_PolicyFailed` when it does not
    match. The chain must be readable: a Python that cannot give it is a local fault."""
    try:
        chain = peer_chain(ssl_object)
    except PeerChainUnavailable as error:
        log.error("DANE towards %s: %s", upstream.candidate.mx, error)
        raise UpstreamError(replies.local_tls_error(str(error))) from None
    check = match_chain(dane, chain)
    if not check.ok:
        problem = f"DANE: {check.problem}"
        result: ResultType = (
            "certificate-host-mismatch"
            if check.result_type == "certificate-host-mismatch"
            else "validation-failure"
        )
        _report(upstream, result, problem)
        raise _PolicyFailed(problem, "4.7.5")
    log.debug("DANE: %s matched %s", upstream.candidate.mx, check.matched)
    _report(upstream, None, f"DANE: matched {check.matched}")


def _report(upstream: Upstream, result: ResultType | None, detail: str = "") -> None:
    """The outcome of ``upstream``'s TLS session attempt, for TLS-RPT (RFC 8460): ``None``
    for a session that was established (and, under DANE, authenticated), else the section
    4.3 result type and the reason. The policy type is "tlsa" for an MX host under DANE,
    "sts" under an enforced MTA-STS policy, else "no-policy-found". A reporting fault never
    fails a delivery."""
    reporter = upstream.reporter
    if reporter is None or upstream.sts_testing:
        return
    candidate = upstream.candidate
    dane = upstream.dane
    policy_type: PolicyType = "no-policy-found"
    strings: tuple[str, ...] = ()
    if dane is not None:
        policy_type, strings = "tlsa", dane.strings
    elif upstream.sts_strings:
        policy_type, strings = "sts", upstream.sts_strings
    outcome = TlsOutcome(
        policy_domain=upstream.policy_domain or candidate.mx,
        policy_type=policy_type,
        mx_host=candidate.mx,
        receiving_ip=str(candidate.address),
        sending_ip=None if candidate.source is None else str(candidate.source),
        result=result,
        policy_strings=strings,
        detail=detail if result is None else (detail or result),
    )
    try:
        reporter.record(outcome)
    except Exception:  # the reporter must not raise; should it, the delivery goes on
        log.exception("TLS-RPT reporter failed")


def _fell_back(upstream: Upstream, why: str) -> None:
    """An opportunistic STARTTLS failed and ``upstream`` carries the mail in plaintext: say
    so in the log (and in the transaction line) and count it."""
    upstream.tls_fallback = why
    binding = upstream.route_key.binding if upstream.route_key is not None else "-"
    log.info(
        "opportunistic STARTTLS with %s[%s] failed, delivering in plaintext: %s",
        upstream.candidate.mx,
        upstream.candidate.address,
        why,
    )
    if upstream.metrics is not None:
        upstream.metrics.count_starttls_fallback(binding)


async def _open_one(
    route: Route,
    candidate: Candidate,
    ehlo_name: str,
    delivery: DeliveryConfig,
    health: HealthRegistry,
    use_tls: bool,
    metrics: Metrics | None,
    by: float,
    tls_failed: str | None = None,
    reporter: TlsReporter | None = None,
) -> Upstream:
    """One MX address. ``tls_failed``: why STARTTLS with it just failed (the plaintext retry
    of an opportunistic policy), so the connection says it fell back."""
    policy, label = effective_policy(route, candidate)
    started = trio.current_time()
    if route.bypass:
        stream = await _connect_direct(candidate, delivery, by)
        server = None
    else:
        stream, server = await _connect_via_proxy(route, candidate, delivery, health, by)
    upstream = Upstream(
        stream,
        candidate,
        server,
        delivery,
        route_key=route.key,
        tls_policy=policy,
        metrics=metrics,
        policy_label=label,
        dane=candidate.dane,
        reporter=reporter,
        policy_domain=route.domain,
    )
    sts = route.sts
    if sts is not None and sts.mode in ("enforce", "testing") and candidate.dane is None:
        upstream.sts_strings = sts.text
        upstream.sts_testing = sts.mode == "testing"
    connected = trio.current_time()
    try:
        banner = await upstream.read_banner(by=by)
        if metrics is not None:
            metrics.upstream_connect_seconds.observe(connected - started)
            metrics.upstream_banner_seconds.observe(trio.current_time() - connected)
        if banner.code != 220:
            # Postfix's smtp_skip_5xx_greeting (default yes): a 5xx greeting is this MX
            # refusing us, not the domain refusing the mail; the next MX is tried and, when
            # none takes it, the client gets a 4xx (DESIGN.md section 5).
            if banner.is_permanent:
                raise _MxRefused(f"banner {_quote(banner)}", banner)
            raise _CandidateFailed(f"banner {_quote(banner)}", banner)
        await _greet(upstream, ehlo_name, by)
        if tls_failed is not None:
            _fell_back(upstream, tls_failed)
        if use_tls:
            if upstream.supports("STARTTLS"):
                await _start_tls(upstream, ehlo_name, by)
            else:
                _report(
                    upstream,
                    "starttls-not-supported",
                    f"{_policy_prefix(upstream)}STARTTLS not offered",
                )
                if policy in ("required", "verify"):
                    # RFC 7672 section 2.2: a DANE MX that offers no STARTTLS gets no mail.
                    name = "DANE" if candidate.dane is not None else policy
                    problem = f"STARTTLS not offered and the TLS policy is {name}"
                    raise _PolicyFailed(problem, "4.7.4")
        return upstream
    except (UpstreamError, _MxRefused):
        await upstream.quit()
        raise
    except (UpstreamLost, _CandidateFailed):
        await upstream.abort()
        raise


async def open_upstream(
    route: Route,
    ehlo_name: str,
    delivery: DeliveryConfig,
    health: HealthRegistry,
    metrics: Metrics | None = None,
    *,
    by: float = math.inf,
    reporter: TlsReporter | None = None,
) -> Upstream:
    """The first candidate that gives a usable SMTP session, or :class:`UpstreamError`.
    Every step (connect, banner, EHLO, STARTTLS) has its own time limit from ``delivery``,
    and all of them end by ``by`` (an absolute trio time: the RCPT set-up budget).

    An MX that fails its TLS policy (:func:`effective_policy`) is skipped; when an MX failed
    one and none took the mail, the client's 4xx names the policy (RFC 3463 X.7.x).
    ``reporter`` receives the TLS-RPT outcomes of MX hosts under DANE."""
    problems: list[str] = []
    refusals: list[Reply] = []  # the MXes' own (banners, EHLO replies)
    policy_code: str | None = None  # the enhanced code of the last policy failure
    for candidate in route.candidates:
        policy, _ = effective_policy(route, candidate)
        use_tls = policy != "disabled"
        tls_failed: str | None = None
        while True:
            try:
                return await _open_one(
                    route,
                    candidate,
                    ehlo_name,
                    delivery,
                    health,
                    use_tls,
                    metrics,
                    by,
                    tls_failed,
                    reporter,
                )
            except _TlsFailed as error:
                problems.append(f"{candidate.mx}[{candidate.address}]: {error}")
                if error.reply is not None:
                    refusals.append(error.reply)
                if policy == "opportunistic" and use_tls:
                    use_tls = False  # as MTAs do: the same MX again, in plaintext
                    tls_failed = str(error)
                    continue
                policy_code = "4.7.5"  # a TLS policy required this handshake
            except _PolicyFailed as error:
                problems.append(f"{candidate.mx}[{candidate.address}]: {error}")
                policy_code = error.enhanced
            except (UpstreamLost, _CandidateFailed) as error:
                problems.append(f"{candidate.mx}[{candidate.address}]: {error}")
                if isinstance(error, _CandidateFailed) and error.reply is not None:
                    refusals.append(error.reply)
            break
        log.info("MX attempt failed for %s: %r", route.domain, problems[-1])
    detail = "; ".join(problems[-3:])
    if route.sts is not None and route.sts_enforced:  # the failure names the policy
        answer = replies.sts_no_mx_reachable(route.domain, route.sts.id or "-", detail)
    elif policy_code is not None:
        answer = replies.tls_policy_failed(route.domain, policy_code, detail)
    else:
        answer = replies.no_mx_reachable(route.domain, detail)
    raise UpstreamError(answer, mx_replies=refusals)
