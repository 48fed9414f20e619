"""describe_error: every exception told in words, whole chain, bounded."""

from __future__ import annotations

import errno
import ssl

import pytest
import trio

from sidecar.errors import MAX_DESCRIPTION, describe_error


def _raised(make: type[BaseException] | BaseException, cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise make from inner
    except BaseException as outer:
        return outer


def _verify_error(message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(
        1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message} (_ssl.c:1006)"
    )
    error.verify_message = message
    error.reason = "CERTIFICATE_VERIFY_FAILED"
    return error


def test_an_empty_exception_is_named_by_its_class() -> None:
    assert describe_error(trio.BrokenResourceError()) == "BrokenResourceError"
    assert describe_error(RuntimeError("")) == "RuntimeError"


def test_timeouts_say_timed_out() -> None:
    assert describe_error(trio.TooSlowError()) == "timed out"


@pytest.mark.parametrize(
    "message", ["self-signed certificate", "unable to get local issuer certificate"]
)
def test_a_tls_failure_names_the_verification_reason(message: str) -> None:
    """trio's BrokenResourceError has no text; the reason is its __cause__."""
    error = _raised(trio.BrokenResourceError, _verify_error(message))
    assert str(error) == ""
    assert describe_error(error) == f"certificate verify failed: {message}"


def test_nested_causes_are_joined_outermost_first() -> None:
    inner = _raised(ValueError("middle"), OSError(errno.ECONNRESET, "Connection reset by peer"))
    error = _raised(RuntimeError("outer"), inner)
    assert describe_error(error) == "outer: middle: Connection reset by peer"


def test_an_implicit_context_counts_unless_suppressed() -> None:
    try:
        try:
            raise OSError(errno.EPIPE, "Broken pipe")
        except OSError:
            raise trio.BrokenResourceError  # noqa: B904 - the implicit context is the point
    except trio.BrokenResourceError as error:
        assert describe_error(error) == "Broken pipe"
    try:
        try:
            raise OSError(errno.EPIPE, "Broken pipe")
        except OSError:
            raise trio.BrokenResourceError from None
    except trio.BrokenResourceError as error:
        assert describe_error(error) == "BrokenResourceError"


def test_os_errors_give_their_strerror_and_file() -> None:
    assert describe_error(OSError(errno.ECONNREFUSED, "Connection refused")) == (
        "Connection refused"
    )
    assert describe_error(PermissionError(errno.EACCES, "Permission denied", "/x")) == (
        'Permission denied: "/x"'
    )
    assert describe_error(OSError("all attempts failed")) == "all attempts failed"


def test_ssl_errors_lose_their_library_tags() -> None:
    error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)")
    assert describe_error(error) == "wrong version number"


def test_an_exception_group_gives_each_attempt() -> None:
    group = ExceptionGroup(
        "all attempts to connect to mx:25 failed",
        [
            OSError(errno.ECONNREFUSED, "Connection refused"),
            OSError(errno.ENETUNREACH, "Network is unreachable"),
        ],
    )
    error = _raised(OSError("all attempts to connect to mx:25 failed"), group)
    assert describe_error(error) == (
        "all attempts to connect to mx:25 failed: Connection refused; Network is unreachable"
    )


def test_repeated_texts_appear_once() -> None:
    error = _raised(RuntimeError("reset"), OSError(errno.ECONNRESET, "reset"))
    assert describe_error(error) == "reset"


def test_the_description_is_bounded() -> None:
    text = describe_error(RuntimeError("x" * 10_000))
    assert len(text) == MAX_DESCRIPTION and text.endswith("...")
    assert describe_error(RuntimeError("abcdef"), limit=5) == "ab..."


def test_a_cycle_in_the_chain_ends() -> None:
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__cause__, second.__cause__ = second, first
    assert describe_error(first) == "a: b"


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (ssl.SSLError(), "SSLError"),  # was "()"
        (ssl.SSLError(1, "[SSL] (_ssl.c:1000)"), "SSLError"),  # was "[SSL]"
        (ssl.SSLError(1, ""), "SSLError"),
        (ssl.SSLError(1, "[SSL] record layer failure (_ssl.c:1000)"), "record layer failure"),
    ],
)
def test_a_tls_failure_never_has_an_empty_or_bare_reason(error: ssl.SSLError, text: str) -> None:
    """A TLS failure is followed by words, never "", "()" or "[SSL]" alone."""
    assert describe_error(error) == text
    wrapped = trio.BrokenResourceError()
    wrapped.__cause__ = error
    assert describe_error(wrapped) == text
