"""Exceptions told in words, for reply texts and log lines.

``str(error)`` is not enough: trio's ``BrokenResourceError`` after a failed TLS handshake has
no text at all (the reason, an ``ssl.SSLCertVerificationError``, is its ``__cause__``), a
``TooSlowError`` is empty too, and trio's connect failure keeps each address's error in an
exception group. :func:`describe_error` walks the whole chain.
"""

from __future__ import annotations

import re
import ssl

import trio

# A description is quoted in one reply line (RFC 5321 section 4.5.3.1.5: 512 octets in all).
MAX_DESCRIPTION = 300

# "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)" -> "wrong version number"
_SSL_PREFIX = re.compile(r"^\[[A-Za-z0-9_]+: [A-Za-z0-9_]+\] ")
_SSL_SUFFIX = re.compile(r" \(_ssl\.c:\d+\)$")


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
        text = str(error.args[1]) if len(error.args) > 1 else str(error)
        return _SSL_SUFFIX.sub("", _SSL_PREFIX.sub("", text))
    if isinstance(error, OSError) and error.strerror:
        if error.filename is not None:
            return f'{error.strerror}: "{error.filename}"'
        return error.strerror
    return str(error)
