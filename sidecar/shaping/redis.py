"""The Redis/Valkey shaping backend: limits shared by every sidecar that uses one Redis.

Keeps the contract of :class:`~sidecar.shaping.backend.ShapingBackend`. Every decision that
depends on time is one Lua script run atomically by Redis, with Redis's own clock (``TIME``
inside the script), so sidecars on several hosts agree whatever their clocks say; times given
and returned are seconds from now.

Keys (``key_prefix`` defaults to ``"sidecar:shaping:"``; each script touches one key, so it
works on Redis Cluster too):

- ``<prefix>rate:<key>``: a GCRA's theoretical arrival time (TAT, seconds on Redis's clock);
  it expires when the TAT has passed (a fresh key behaves the same).
- ``<prefix>slots:<path>``: a sorted set of connection slots, member = holder, score = the
  lease's expiry on Redis's clock; the key expires with its last lease. A holder whose sidecar
  died (SIGKILL) stops renewing, and its slot is free once its lease has run out.
- ``<prefix>suspend:<path>``, ``<prefix>override:<path>``: JSON with a Redis expiry.

Every call is bounded (``timeout``, default 1 s); an error or a timeout raises
:class:`~sidecar.shaping.backend.BackendUnavailable` (the caller then falls back to
per-process limits). The client is coredis (anyio-based, so it runs on trio). URLs:

- ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS), ``unix:///path``:
  one node (Redis or Valkey);
- ``redis+cluster://[[user]:password@]host[:port]`` (or ``rediss+cluster://``): a Redis
  Cluster, reached through any of its nodes;
- ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service``: the primary of
  ``service`` as the Sentinels at those addresses (default port 26379) name it; the password
  is the primary's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from types import TracebackType
from typing import Any, Final, Self, TypeVar
from urllib.parse import unquote, urlsplit

import coredis
import coredis.exceptions
import trio
from coredis.connection import TCPLocation
from coredis.retry import ConstantRetryPolicy

from sidecar.shaping.backend import BackendUnavailable, ShapingBackend
from sidecar.shaping.model import PathLimits, Rate

__all__ = ["DEFAULT_KEY_PREFIX", "DEFAULT_TIMEOUT", "RedisBackend"]

DEFAULT_KEY_PREFIX: Final = "sidecar:shaping:"
DEFAULT_TIMEOUT: Final = 1.0  # seconds: the bound of every call to Redis
_SENTINEL_PORT: Final = 26379

T = TypeVar("T")

# Redis's clock in seconds (a float), and a number written with full double precision (Redis
# would turn a Lua number into a string with 14 digits only: 0.1 ms at today's epoch).
# redis.replicate_commands() lets Redis 3.2-4.x write after TIME (Redis >= 5 always does).
_PRELUDE: Final = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function fmt(x) return string.format('%.17g', x) end
local function keep_for(key, seconds)
  local ms = math.ceil(seconds * 1000)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
"""

# GCRA, the same algorithm as sidecar.shaping.gcra: KEYS[1] the rate key; ARGV interval,
# tau = per - interval (the burst tolerance), max_wait (seconds). Admit when the wait
# (TAT - tau - now) is at most 0; reserve when it is at most max_wait; else nothing changes.
# Returns the wait as a string (seconds), or nil (false) when not admitted within max_wait.
_RESERVE: Final = (
    _PRELUDE
    + """
local interval, tau, max_wait = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local wait = tat - tau - now
if wait <= 1e-9 then
  wait = 0
elseif wait > max_wait + 1e-9 then
  return false
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], fmt(new_tat), 'PX', math.max(1, math.ceil((new_tat - now) * 1000)))
return fmt(wait)
"""
)

# Several admissions due now at once: KEYS[1] the rate key; ARGV interval, tau, n. Takes the
# burst room left (at most n) in one step; returns how many (0..n).
_TAKE: Final = (
    _PRELUDE
    + """
local interval, tau, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local room = math.floor((now + tau - tat) / interval + 1e-9) + 1
local taken = math.max(0, math.min(n, room))
if taken > 0 then
  local new_tat = tat + taken * interval
  redis.call('SET', KEYS[1], fmt(new_tat), 'PX', math.max(1, math.ceil((new_tat - now) * 1000)))
end
return taken
"""
)

# Slots: KEYS[1] the path's sorted set; ARGV holder, limit, lease (seconds). Expired leases go
# first; a holder already in the set only has its lease extended. Returns 1 taken, 0 full.
_ACQUIRE: Final = (
    _PRELUDE
    + """
local holder, limit, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
if not redis.call('ZSCORE', KEYS[1], holder) and redis.call('ZCARD', KEYS[1]) >= limit then
  return 0
end
redis.call('ZADD', KEYS[1], fmt(now + lease), holder)
keep_for(KEYS[1], lease)
return 1
"""
)

# KEYS[1] the path's sorted set; ARGV lease (seconds), then the holders whose lease to extend.
# Only unexpired slots are renewed (XX: an expired one is gone, its place may be taken).
_RENEW: Final = (
    _PRELUDE
    + """
local lease = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
local expiry = fmt(now + lease)
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i]) end
if redis.call('ZCARD', KEYS[1]) > 0 then keep_for(KEYS[1], lease) end
return 1
"""
)

_IN_USE: Final = (
    _PRELUDE
    + """
return redis.call('ZCOUNT', KEYS[1], '(' .. fmt(now), '+inf')
"""
)

# A value and its milliseconds left, read together: {value, pttl} or nil.
_GET_WITH_TTL: Final = """
local value = redis.call('GET', KEYS[1])
if not value then return false end
return {value, redis.call('PTTL', KEYS[1])}
"""


def _rate_text(rate: Rate | None) -> str | None:
    return None if rate is None else f"{rate.count}/{rate.per!r}"


def _rate_value(text: object) -> Rate | None:
    if text is None:
        return None
    count, per = str(text).split("/")
    return Rate(int(count), float(per))


def _int_or_none(value: object) -> int | None:
    return None if value is None else int(str(value))


def limits_to_json(limits: PathLimits) -> dict[str, Any]:
    """PathLimits as JSON values (a Rate as ``"count/per"``, per in seconds)."""
    return {
        "connection_limit": limits.connection_limit,
        "max_connection_rate": _rate_text(limits.max_connection_rate),
        "max_message_rate": _rate_text(limits.max_message_rate),
        "max_deliveries_per_connection": limits.max_deliveries_per_connection,
    }


def limits_from_json(data: dict[str, Any]) -> PathLimits:
    """The inverse of :func:`limits_to_json`."""
    return PathLimits(
        connection_limit=_int_or_none(data.get("connection_limit")),
        max_connection_rate=_rate_value(data.get("max_connection_rate")),
        max_message_rate=_rate_value(data.get("max_message_rate")),
        max_deliveries_per_connection=_int_or_none(data.get("max_deliveries_per_connection")),
    )


def _milliseconds(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` -> (host, port)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    return host, int(port) if port else default_port


def make_client(url: str, timeout: float) -> tuple[Any, list[Any]]:
    """The coredis client for ``url`` (see the module docstring for the forms), and the
    context managers to enter before using it (outermost first). ValueError for an unknown
    scheme or a Sentinel URL without a service name."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "connect_timeout": timeout,
        "stream_timeout": timeout,
        # Retry only a failed connection (a server restarted under a pooled one), never a
        # timeout: a script that ran but whose answer was late must not run twice.
        "retry_policy": ConstantRetryPolicy(
            (coredis.exceptions.ConnectionError,), retries=1, delay=0.01
        ),
    }
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        client: Any = coredis.Redis.from_url(url, **options)
        return client, [client]
    if scheme in ("redis+cluster", "rediss+cluster"):
        base = scheme.removesuffix("+cluster") + url[len(scheme) :]
        cluster: Any = coredis.RedisCluster.from_url(base, **options)
        return cluster, [cluster]
    if scheme == "redis+sentinel":
        service = parts.path.strip("/")
        if not service:
            raise ValueError(f"{url!r}: a Sentinel URL names the service: .../SERVICE")
        hosts = parts.netloc.rpartition("@")[2]
        sentinels = [TCPLocation(*_host_port(item, _SENTINEL_PORT)) for item in hosts.split(",")]
        sentinel: Any = coredis.Sentinel(
            sentinels,
            sentinel_kwargs={"connect_timeout": timeout, "stream_timeout": timeout},
            **options,
        )
        primary_options: dict[str, Any] = {}
        if parts.username:
            primary_options["username"] = unquote(parts.username)
        if parts.password:
            primary_options["password"] = unquote(parts.password)
        primary = sentinel.primary_for(service, **primary_options)
        return primary, [sentinel, primary]
    raise ValueError(
        f"{url!r}: not a Redis URL (redis://, rediss://, unix://, redis+cluster://, "
        "rediss+cluster://, redis+sentinel://)"
    )


class RedisBackend:
    """A :class:`~sidecar.shaping.backend.ShapingBackend` in Redis or Valkey at ``url``.

    Use as ``async with RedisBackend(url) as backend:``. Inside, a task keeps the client
    connected: it enters the client (coredis runs its connection pool in a task group of that
    task), and when that fails (a Cluster with no reachable node) or the client's tasks fail,
    it tries again every ``reconnect_delay`` seconds; meanwhile calls raise
    BackendUnavailable. So entering never needs Redis up, and no error of the client escapes
    into the caller's nursery. Entering waits up to ``timeout`` for the first connection.
    ``timeout`` (seconds) bounds every call; past it, or on any Redis error, a call raises
    BackendUnavailable. ValueError at once for a URL that is not one of the forms above."""

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        reconnect_delay: float = 1.0,
    ) -> None:
        make_client(url, timeout)  # the URL's errors now, not in the background task
        self.url = url
        self.key_prefix = key_prefix
        self.timeout = timeout
        self.reconnect_delay = reconnect_delay
        self._client: Any = None  # set while connected (by _keep_connected)
        self._last_error = "not connected yet"
        self._stack: AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None

    async def __aenter__(self) -> Self:
        stack = AsyncExitStack()
        self._nursery = await stack.enter_async_context(trio.open_nursery())
        first_attempt = trio.Event()
        self._nursery.start_soon(self._keep_connected, first_attempt)
        self._stack = stack
        with trio.move_on_after(self.timeout):
            await first_attempt.wait()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
            self._nursery = None
        self._client = None
        if stack is not None:
            await stack.__aexit__(exc_type, exc, traceback)

    async def _keep_connected(self, first_attempt: trio.Event) -> None:
        """Enter a client and hold it; on failure forget it, wait, and enter a new one."""
        while True:
            client, contexts = make_client(self.url, self.timeout)
            try:
                async with AsyncExitStack() as stack:
                    for context in contexts:
                        await stack.enter_async_context(context)
                    register = client.register_script
                    self._reserve = register(_RESERVE)
                    self._take = register(_TAKE)
                    self._acquire = register(_ACQUIRE)
                    self._renew = register(_RENEW)
                    self._in_use = register(_IN_USE)
                    self._get_with_ttl_script = register(_GET_WITH_TTL)
                    self._client = client
                    first_attempt.set()
                    await trio.sleep_forever()
            except Exception as error:  # any failure of the client: connect again later
                self._last_error = f"{type(error).__name__}: {error}"
            finally:
                self._client = None
            first_attempt.set()
            await trio.sleep(self.reconnect_delay)

    # -- keys ---------------------------------------------------------------------------------

    def _key(self, kind: str, name: str) -> str:
        return f"{self.key_prefix}{kind}:{name}"

    async def _call(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation within ``timeout`` seconds; BackendUnavailable otherwise."""
        if self._stack is None:
            raise RuntimeError("RedisBackend used outside its 'async with' block")
        if self._client is None:
            raise BackendUnavailable(
                f"Redis {self.url_for_logs}: not connected ({self._last_error})"
            )
        try:
            with trio.fail_after(self.timeout):
                return await operation()
        except trio.TooSlowError:
            raise BackendUnavailable(
                f"Redis {self.url_for_logs}: no answer to {what} within {self.timeout:g}s"
            ) from None
        except (coredis.exceptions.RedisError, OSError) as error:
            raise BackendUnavailable(
                f"Redis {self.url_for_logs}: {what} failed: {type(error).__name__}: {error}"
            ) from error

    @property
    def url_for_logs(self) -> str:
        """The URL without its password."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.rpartition("@")[2]
        user = parts.username or ""
        return parts._replace(netloc=f"{user}:***@{netloc}").geturl()

    # -- connection slots ---------------------------------------------------------------------

    async def acquire_slot(self, path: str, holder: str, limit: int, lease: float) -> bool:
        """Take one of ``limit`` slots of ``path`` for ``holder`` for ``lease`` seconds (one
        atomic script); False when all are taken."""
        key = self._key("slots", path)
        result = await self._call(
            "acquire_slot",
            lambda: self._acquire(keys=[key], args=[holder, str(limit), repr(float(lease))]),
        )
        return int(result) == 1

    async def renew_slots(self, slots: list[tuple[str, str]], lease: float) -> None:
        """Extend these (path, holder) leases to ``lease`` seconds from now: one script per
        path (a Cluster keeps each path's set on one node); an expired slot is not revived."""
        by_path: dict[str, list[str]] = {}
        for path, holder in slots:
            by_path.setdefault(path, []).append(holder)
        for path, holders in by_path.items():
            key = self._key("slots", path)
            await self._call(
                "renew_slots", partial(self._renew, keys=[key], args=[repr(float(lease)), *holders])
            )

    async def release_slot(self, path: str, holder: str) -> None:
        """Give the slot back (no error if it had expired)."""
        key = self._key("slots", path)
        await self._call("release_slot", lambda: self._client.zrem(key, [holder]))

    async def slots_in_use(self, path: str) -> int:
        """Unexpired slots of ``path`` (by Redis's clock)."""
        key = self._key("slots", path)
        result = await self._call("slots_in_use", lambda: self._in_use(keys=[key], args=[]))
        return int(result)

    # -- rates --------------------------------------------------------------------------------

    async def reserve(self, key: str, rate: Rate, max_wait: float) -> float | None:
        """GCRA at ``rate`` for ``key`` in one atomic script: 0.0 admitted now; a reserved
        wait <= ``max_wait`` seconds; None (nothing reserved)."""
        redis_key = self._key("rate", key)
        args = [repr(rate.interval), repr(rate.per - rate.interval), repr(float(max_wait))]
        result = await self._call("reserve", lambda: self._reserve(keys=[redis_key], args=args))
        return None if result is None else float(result)

    async def take(self, key: str, rate: Rate, n: int) -> int:
        """Up to ``n`` admissions of ``key`` due now, in one atomic script: how many."""
        redis_key = self._key("rate", key)
        args = [repr(rate.interval), repr(rate.per - rate.interval), str(int(n))]
        result = await self._call("take", lambda: self._take(keys=[redis_key], args=args))
        return int(result or 0)

    # -- suspensions and overrides ------------------------------------------------------------

    async def suspend(self, path: str, duration: float, reason: str) -> None:
        """No new connection or transaction on ``path`` for ``duration`` seconds."""
        key = self._key("suspend", path)
        value = json.dumps({"reason": reason})
        await self._call(
            "suspend", lambda: self._client.set(key, value, px=_milliseconds(duration))
        )

    async def resume(self, path: str) -> None:
        """End the suspension and the limit override of ``path`` now."""
        for kind in ("suspend", "override"):
            key = self._key(kind, path)
            await self._call("resume", partial(self._client.delete, [key]))

    async def _get_with_ttl(self, what: str, key: str) -> tuple[dict[str, Any], float] | None:
        result = await self._call(what, lambda: self._get_with_ttl_script(keys=[key], args=[]))
        if result is None:
            return None
        value, pttl = result
        if int(pttl) < 0:  # gone between GET and PTTL cannot happen (atomic); no expiry: ours?
            return None
        try:
            data = json.loads(value)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        return data, int(pttl) / 1000

    async def suspension(self, path: str) -> tuple[float, str] | None:
        """(seconds left, reason) of the path's suspension, or None."""
        found = await self._get_with_ttl("suspension", self._key("suspend", path))
        if found is None:
            return None
        data, remaining = found
        return remaining, str(data.get("reason", ""))

    async def override(self, path: str, limits: PathLimits, duration: float, reason: str) -> None:
        """Use ``limits`` (non-None fields replace the configured ones) for ``duration``."""
        key = self._key("override", path)
        value = json.dumps({"limits": limits_to_json(limits), "reason": reason})
        await self._call(
            "override", lambda: self._client.set(key, value, px=_milliseconds(duration))
        )

    async def overrides(self, path: str) -> tuple[PathLimits, float, str] | None:
        """(limits, seconds left, reason) of the path's override, or None."""
        found = await self._get_with_ttl("overrides", self._key("override", path))
        if found is None:
            return None
        data, remaining = found
        try:
            limits = limits_from_json(dict(data.get("limits") or {}))
        except (ValueError, TypeError):
            return None
        return limits, remaining, str(data.get("reason", ""))


def _keeps_the_contract(backend: RedisBackend) -> ShapingBackend:
    """(For mypy: RedisBackend is a ShapingBackend.)"""
    return backend
