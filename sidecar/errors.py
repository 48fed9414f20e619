"""The sidecar's exceptions, and exceptions told in words for reply texts and log lines.

Every failure that reaches the client as an SMTP reply is a :class:`Refusal` carrying that
reply (DESIGN.md rule 4: errors that reach a client are ``Reply`` values, built in one place):

- :class:`CommandError`: the client's command cannot be accepted (sans-IO parsing);
- :class:`RouteError`: no route for the recipient now or ever (binding unplumbed, no usable
  MX address, ...), and its kind :class:`ResolutionError` (DNS: NXDOMAIN, null MX, SERVFAIL);
- :class:`UpstreamError`: no usable MX connection for the route;
- :class:`Deferred`: traffic shaping says not now on this egress path.

An MX connection that fails half-way is :class:`UpstreamLost` (:class:`UpstreamTimedOut` when
a wait ran out): the session words its 4xx after what was lost when. A shortage of the
process's own resources (EMFILE...) is :class:`LocalResourceError`, never a peer's fault.

``str(error)`` is not enough: trio's ``BrokenResourceError`` after a failed TLS handshake has
no text at all (the reason, an ``ssl.SSLCertVerificationError``, is its ``__cause__``), a
``TooSlowError`` is empty too, and trio's connect failure keeps each address's error in an
exception group. :func:`describe_error` walks the whole chain.
"""

from __future__ import annotations

import errno
import os
import re
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:  # smtp.commands imports this module: no import of sidecar.smtp at run time
    from sidecar.smtp.replies import Reply

__all__ = [
    "CommandError",
    "Deferred",
    "LocalResourceError",
    "Refusal",
    "ResolutionError",
    "RouteError",
    "UpstreamError",
    "UpstreamLost",
    "UpstreamTimedOut",
    "describe_error",
]


class Refusal(Exception):
    """A failure the client is told with ``reply``: a 4xx when a retry can succeed, a 5xx
    only when none can (DESIGN.md invariant 1)."""

    def __init__(self, reply: Reply, message: str | None = None) -> None:
        super().__init__(reply.text if message is None else message)
        self.reply = reply


class CommandError(Refusal):
    """A client command that cannot be accepted (RFC 5321 section 4.1 syntax, parameters)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply, f"{reply.code} {reply.text}")


class RouteError(Refusal):
    """No route for the recipient: its binding or group is unplumbed, no MX address is usable
    (a family without a source address, private destinations), ..."""


class ResolutionError(RouteError):
    """The recipient's domain cannot be routed now (4xx: SERVFAIL, timeout) or ever (5xx:
    NXDOMAIN, null MX, RFC 7505)."""


class UpstreamError(Refusal):
    """No usable MX connection for the route. ``proxy_fault``: no HAProxy server of the
    binding could be reached (another binding of a group may do). ``mx_replies``: the MXes'
    own refusals met on the way (greetings, EHLO replies), for traffic shaping's rules."""

    def __init__(
        self, reply: Reply, proxy_fault: bool = False, mx_replies: Sequence[Reply] = ()
    ) -> None:
        super().__init__(reply)
        self.proxy_fault = proxy_fault
        self.mx_replies = tuple(mx_replies)


class Deferred(Refusal):
    """Traffic shaping says not now on this egress path (a limit's wait is over max_wait, or
    the path is suspended): a 4xx; another binding of a group may have room."""


class UpstreamLost(Exception):
    """The MX connection closed, timed out or spoke garbage; the text says which. ``reply``,
    when set, is what the client is told instead of "connection lost" (e.g. the MX sent an
    oversized reply)."""

    def __init__(self, message: str, reply: Reply | None = None) -> None:
        super().__init__(message)
        self.reply = reply


class UpstreamTimedOut(UpstreamLost):
    """The MX did not answer, or did not take our bytes, within the step's time limit."""


class LocalResourceError(Exception):
    """An operation failed for want of a local resource (``errno`` is one of
    ``sidecar.limits.LOCAL_RESOURCE_ERRNOS``): the sidecar's own shortage, never a peer's
    fault (DESIGN.md invariant 5)."""

    def __init__(self, code: int) -> None:
        self.errno = code
        self.name = errno.errorcode.get(code, str(code))
        super().__init__(f"{self.name}: {os.strerror(code)}")


# A description is quoted in one reply line (RFC 5321 section 4.5.3.1.5: 512 octets in all).
MAX_DESCRIPTION = 300

# "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)" -> "wrong version number"
_SSL_PREFIX = re.compile(r"^\[[A-Za-z0-9_]+(: [A-Za-z0-9_]+)?\] ?")
_SSL_SUFFIX = re.compile(r" ?\(_ssl\.c:\d+\)$")


def describe_error(error: BaseException, limit: int = MAX_DESCRIPTION) -> str:
    """What went wrong, in words: each exception of the chain (``__cause__``, else the
    ``__context__`` unless suppressed) that adds something, joined with ``": "``; the class
    name when none has any text. At most ``limit`` characters.

    >>> describe_error(trio.TooSlowError())
    'timed out'
    """
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        _add(parts, _describe_one(current, limit))
        if current.__cause__ is not None:
            current = current.__cause__
        elif current.__suppress_context__:
            current = None
        else:
            current = current.__context__
    text = ": ".join(parts) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _add(parts: list[str], text: str) -> None:
    """Append ``text`` unless it says nothing new; a text that repeats earlier parts and adds
    to them replaces them."""
    if not text or any(text in part for part in parts):
        return
    while parts and parts[-1] in text:
        parts.pop()
    parts.append(text)


def _describe_one(error: BaseException, limit: int) -> str:
    if isinstance(error, trio.TooSlowError):
        return "timed out"
    if isinstance(error, BaseExceptionGroup):
        # The group's message usually repeats the wrapper's (trio's "all attempts to connect
        # to ... failed"); what each attempt met is the news.
        children: list[str] = []
        for child in error.exceptions:
            _add(children, describe_error(child, limit))
        return "; ".join(children) or error.message
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return f"certificate verify failed: {error.verify_message}"
    if isinstance(error, ssl.SSLError):
        text = str(error.args[1]) if len(error.args) > 1 else " ".join(map(str, error.args))
        text = _SSL_SUFFIX.sub("", _SSL_PREFIX.sub("", text)).strip()
        bare = text.strip("[]() ")
        if bare and bare != (getattr(error, "library", None) or "SSL"):
            return text
        # Nothing but OpenSSL's decoration: its reason code says more than "" or "[SSL]".
        reason = (getattr(error, "reason", None) or "").replace("_", " ").lower()
        return f"{type(error).__name__}: {reason}" if reason else type(error).__name__
    if isinstance(error, OSError) and error.strerror:
        if error.filename is not None:
            return f'{error.strerror}: "{error.filename}"'
        return error.strerror
    return str(error)
