"""Fetching an MTA-STS policy (RFC 8461 section 3.3): ``GET
https://mta-sts.<domain>/.well-known/mta-sts.txt`` with httpx (on trio, through httpcore's
trio backend), everything bounded.

- The host name is looked up with the sidecar's own resolver (``dns.nameservers``), like the
  MX hosts; addresses in loopback/private/reserved ranges are refused unless
  ``delivery.allow_private_destinations`` (DESIGN.md invariant 6). The connection goes to the
  address with the SNI and the certificate check on ``mta-sts.<domain>`` (httpcore's
  ``sni_hostname`` request extension).
- The certificate must chain to the same trust store as ``tls = "verify"``: the system's, or
  ``delivery.tls_ca_file``. Its own :class:`ssl.SSLContext` (built once, at start-up): httpcore
  sets ALPN protocols on the context it is given, which must not leak into SMTP STARTTLS.
- No redirect is followed (a 3xx is a failure, section 3.3); only a 200 with a ``text/plain``
  media type counts; the body is read raw (``Accept-Encoding: identity``: no decompression
  bomb) up to :data:`~sidecar.mxtls.sts.MAX_POLICY_BYTES`, more is a failure; connect and the
  whole fetch are time bounded. No proxy from the environment is used.
"""

from __future__ import annotations

import logging
import math
import ssl
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING

import trio

from sidecar.errors import RouteError, describe_error
from sidecar.mxtls.outcome import ResultType
from sidecar.mxtls.sts import MAX_POLICY_BYTES, StsError, StsPolicy, parse_policy
from sidecar.resolver import Resolver
from sidecar.routing import refused_destination

# httpx (with httpcore, h11, certifi: ~5 MiB of RSS) is imported on the first policy fetch.
if TYPE_CHECKING:
    import httpx

log = logging.getLogger("sidecar.mta_sts")

# Seconds: connecting (TCP + TLS) to one address, and the whole fetch (look-up, connect,
# request, body). Both are cut to what the caller has left (the RCPT set-up budget).
CONNECT_TIMEOUT = 5.0
FETCH_TIMEOUT = 15.0
# At most this many addresses of mta-sts.<domain> are tried.
MAX_ADDRESSES = 2

IPAddress = IPv4Address | IPv6Address


class StsFetchError(Exception):
    """The policy could not be fetched or is not valid. ``result``: the RFC 8460 result type
    for TLS-RPT (sts-policy-fetch-error, sts-webpki-invalid or sts-policy-invalid)."""

    def __init__(self, problem: str, result: ResultType = "sts-policy-fetch-error") -> None:
        super().__init__(problem)
        self.result: ResultType = result


@dataclass(frozen=True, slots=True)
class FetchedPolicy:
    """A policy as fetched: parsed, and the body's text (its lines for TLS-RPT)."""

    policy: StsPolicy
    text: str


def policy_host(domain: str) -> str:
    """``mta-sts.<domain>``: the policy host (RFC 8461 section 3.3)."""
    return f"mta-sts.{domain.lower().rstrip('.')}"


def _url_host(address: IPAddress) -> str:
    return f"[{address}]" if isinstance(address, IPv6Address) else str(address)


def _tls_verification(error: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind ``error`` (httpx wraps it), if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        current = current.__cause__ or current.__context__
    return None


def media_type(content_type: str | None) -> str:
    """``text/plain`` of ``text/plain; charset=utf-8``, lower-case ("" when absent)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


class StsFetcher:
    """Fetches policies over HTTPS. ``context``: a verifying client context of its own (see
    the module's docstring); ``allow_private``: ``delivery.allow_private_destinations``."""

    def __init__(
        self,
        resolver: Resolver,
        context: ssl.SSLContext,
        *,
        allow_private: bool = False,
        port: int = 443,
        connect_timeout: float = CONNECT_TIMEOUT,
        fetch_timeout: float = FETCH_TIMEOUT,
    ) -> None:
        self.resolver = resolver
        self.context = context
        self.allow_private = allow_private
        self.port = port
        self.connect_timeout = connect_timeout
        self.fetch_timeout = fetch_timeout
        self.fetches = 0

    async def fetch(self, domain: str, *, by: float = math.inf) -> FetchedPolicy:
        """The policy of ``domain``, fetched now within ``fetch_timeout`` seconds (and by the
        absolute trio time ``by``), or :class:`StsFetchError` saying why not."""
        self.fetches += 1
        deadline = min(trio.current_time() + self.fetch_timeout, by)
        host = policy_host(domain)
        with trio.move_on_at(deadline):
            return await self._fetch(host)
        raise StsFetchError(f"{host}: no policy within {self.fetch_timeout:g}s (timed out)")

    async def _fetch(self, host: str) -> FetchedPolicy:
        try:
            addresses = await self.resolver.host_addresses(host)
        except RouteError as error:
            raise StsFetchError(f"{host}: {error.reply.text}") from None
        problems: list[str] = []
        usable: list[IPAddress] = []
        for address in addresses:
            why = None if self.allow_private else refused_destination(address)
            if why is None:
                usable.append(address)
            else:
                problems.append(f"{address}: {why} destination refused")
        if not addresses:
            raise StsFetchError(f"{host}: no address")
        for address in usable[:MAX_ADDRESSES]:
            try:
                return await self._get(host, address)
            except _ConnectFailed as error:
                problems.append(f"{address}: {error}")
        raise StsFetchError(f"{host}: {'; '.join(problems)}")

    async def _get(self, host: str, address: IPAddress) -> FetchedPolicy:
        url = f"https://{_url_host(address)}:{self.port}/.well-known/mta-sts.txt"
        if self.port == 443:
            url = f"https://{_url_host(address)}/.well-known/mta-sts.txt"
        import httpx

        timeout = httpx.Timeout(self.fetch_timeout, connect=self.connect_timeout)
        headers = {"Host": host, "Accept-Encoding": "identity", "User-Agent": "sidecar"}
        async with httpx.AsyncClient(
            verify=self.context,
            trust_env=False,
            follow_redirects=False,
            timeout=timeout,
            http1=True,
            http2=False,
        ) as client:
            try:
                async with client.stream(
                    "GET", url, headers=headers, extensions={"sni_hostname": host}
                ) as response:
                    return await self._read(host, response)
            except httpx.ConnectError as error:
                invalid = _tls_verification(error)
                if invalid is not None:
                    why = invalid.verify_message or describe_error(invalid)
                    raise StsFetchError(
                        f"{host}: certificate not valid: {why}", "sts-webpki-invalid"
                    ) from None
                raise _ConnectFailed(describe_error(error)) from None
            except httpx.TimeoutException as error:
                raise _ConnectFailed(f"timed out ({type(error).__name__})") from None
            except httpx.HTTPError as error:
                raise StsFetchError(f"{host}: {describe_error(error)}") from None

    async def _read(self, host: str, response: httpx.Response) -> FetchedPolicy:
        if response.status_code != 200:
            extra = ""
            if response.is_redirect:
                extra = " (redirects are not followed, RFC 8461 section 3.3)"
            raise StsFetchError(f"{host}: HTTP {response.status_code}{extra}")
        kind = media_type(response.headers.get("content-type"))
        if kind != "text/plain":
            raise StsFetchError(f"{host}: Content-Type {kind[:60]!r} is not text/plain")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise StsFetchError(f"{host}: Content-Encoding {encoding[:30]!r} not asked for")
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_POLICY_BYTES:
            raise StsFetchError(f"{host}: policy of {length} bytes, more than {MAX_POLICY_BYTES}")
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > MAX_POLICY_BYTES:
                raise StsFetchError(f"{host}: policy larger than {MAX_POLICY_BYTES} bytes")
        try:
            policy = parse_policy(bytes(body))
        except StsError as error:
            raise StsFetchError(f"{host}: invalid policy: {error}", "sts-policy-invalid") from None
        return FetchedPolicy(policy, bytes(body).decode("utf-8"))


class _ConnectFailed(Exception):
    """This address could not be reached: the next one is tried."""
