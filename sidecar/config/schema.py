"""The configuration's schema: frozen dataclasses, one per TOML table.

Each field that is a TOML key carries its meaning and unit in ``metadata["doc"]`` (read by
``sidecar.config.load`` and ``sidecar.config.dump``, which derive the allowed keys and the
effective configuration from these fields). Metadata keys:

- ``doc``: what the key holds, with its unit (sizes in bytes, times in seconds);
- ``key``: the TOML key when it differs from the field name (``listeners`` is ``[[listener]]``);
- ``toml``: ``False`` for a field that is no TOML key (built from other keys, or the table's
  own name);
- ``missing``: the key is required; the text says what it must hold (for the error message);
- ``deprecated``: an older name of the key, still accepted with a warning.

Option names follow Momentum's ha_proxy_client module so that operators moving from Momentum
recognise them.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from dataclasses import Field, dataclass, field, fields
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Literal

from sidecar.cpus import available_cpus
from sidecar.shaping.model import PathLimits, Rate

# server.workers at most (and what "auto" starts at most): each worker is a process of about
# 40 MiB holding every worker's listening sockets, and worker i serves its status on port + i.
MAX_WORKERS = 1024

TlsPolicy = Literal["disabled", "opportunistic", "required", "verify"]
TLS_POLICIES: tuple[TlsPolicy, ...] = ("disabled", "opportunistic", "required", "verify")
# How a binding_group picks a member: in turn, or by a hash of the recipient domain (each
# domain keeps one member, so one source address, while that member is usable).
Selection = Literal["round-robin", "hash"]
SELECTIONS: tuple[Selection, ...] = ("round-robin", "hash")
# What a listener speaks: SMTP (RFC 5321), or LMTP (RFC 2033: one reply per recipient after
# the end of data, so one transaction may go to several routes at once).
ListenerProtocol = Literal["smtp", "lmtp"]
LISTENER_PROTOCOLS: tuple[ListenerProtocol, ...] = ("smtp", "lmtp")
# Where shaping state lives: this process, or a Redis/Valkey shared by every sidecar.
ShapingBackendKind = Literal["memory", "redis"]
SHAPING_BACKENDS: tuple[ShapingBackendKind, ...] = ("memory", "redis")
# What a [[shaping.rule]] does to the path when it matches an MX reply.
RuleAction = Literal["suspend", "set"]
RULE_ACTIONS: tuple[RuleAction, ...] = ("suspend", "set")
# Seconds a session may wait for a connection slot or a rate token. Each waiting session
# holds one of the MTA's delivery processes (Postfix: default_process_limit 100, shared by
# every destination), so a throttled site can delay other sites' mail by about this much:
# 2 s keeps that within "a few seconds", smooths bursts of every rate of 30/min or more (one
# admission per 2 s), and is far under the MTA's RCPT wait (Postfix smtp_rcpt_timeout 300 s)
# and delivery.setup_timeout.
DEFAULT_MAX_WAIT = 2.0

DEFAULT_DNS_PORT = 53


def doc(text: str, **extra: object) -> dict[str, object]:
    """Field metadata of a TOML key: its meaning and unit, plus ``extra`` (see the module)."""
    return {"doc": text, **extra}


# Field metadata of a dataclass field that is no configuration key (built from other keys).
NOT_TOML: dict[str, object] = {"toml": False}


def toml_fields(cls: type[Any]) -> Iterator[tuple[str, Field[Any]]]:
    """``(TOML key, field)`` for each field of the dataclass ``cls`` that is a TOML key, in
    declaration order."""
    for f in fields(cls):
        if f.metadata.get("toml", True):
            yield str(f.metadata.get("key", f.name)), f


def section_classes() -> tuple[type[Any], ...]:
    """Every dataclass of the schema that is a TOML table (for tests and tools)."""
    return (
        Config,
        ServerConfig,
        Listener,
        DnsConfig,
        DeliveryConfig,
        HealthConfig,
        Binding,
        BindingGroup,
        DomainPolicy,
        StatusConfig,
        ShapingConfig,
        ShapingSite,
        ShapingRule,
        BindingShaping,
        ShapingLimits,
    )


class ConfigError(Exception):
    """A configuration problem; ``str()`` is ``"<key path>: <problem>"``."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class HostPort:
    """``host:port`` or ``[v6]:port``; host is an IP literal or a DNS name."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class DomainPolicy:
    """Per-domain settings (``[domain."NAME"]``, also under a binding or binding_group);
    ``None`` means "not set here, ask the wider scope"."""

    ha_proxy_bypass: bool | None = field(
        default=None, metadata=doc("deliver straight to the MX, not through HAProxy")
    )
    tls: TlsPolicy | None = field(
        default=None, metadata=doc("STARTTLS policy towards this domain's MXes")
    )
    dane: bool | None = field(
        default=None,
        metadata=doc("DANE (RFC 7672) for this domain's MXes: overrides delivery.dane"),
    )
    mta_sts: bool | None = field(
        default=None,
        metadata=doc("MTA-STS (RFC 8461) for this domain: overrides delivery.mta_sts"),
    )


@dataclass(frozen=True)
class ShapingLimits:
    """The limits of one shaping scope (``[binding.NAME.shaping.site."NAME"]``; also the
    limit keys of ``[shaping]``, ``[shaping.site."NAME"]``, ``[binding.NAME.shaping]`` and a
    "set" rule). ``None``: not set here, ask the wider scope; unset everywhere: no limit."""

    connection_limit: int | None = field(
        default=None,
        metadata=doc("concurrent upstream connections per egress path (idle cached ones count)"),
    )
    max_connection_rate: Rate | None = field(
        default=None, metadata=doc('new upstream connections per egress path, e.g. "60/min"')
    )
    max_message_rate: Rate | None = field(
        default=None, metadata=doc('transactions per egress path, e.g. "20000/h"')
    )
    max_deliveries_per_connection: int | None = field(
        default=None,
        metadata=doc(
            "most transactions on one upstream connection, a count "
            "(default: delivery.connection_reuse_limit)"
        ),
    )


@dataclass(frozen=True)
class BindingShaping(ShapingLimits):
    """``[binding.NAME.shaping]``: the binding's limits, and per named site."""

    sites: dict[str, ShapingLimits] = field(
        default_factory=dict,
        metadata=doc("limits of this binding per named site", key="site"),
    )


@dataclass(frozen=True)
class ShapingSite(ShapingLimits):
    """``[shaping.site."NAME"]``: a named site (MX host patterns) and its limits."""

    name: str = field(default="", metadata=NOT_TOML)  # the table's name
    mx: tuple[str, ...] = field(
        default=(),
        metadata=doc(
            'MX host name patterns ("*.google.com"; fnmatch, case-insensitive)',
            missing='the MX host patterns, e.g. ["*.google.com"]',
        ),
    )


@dataclass(frozen=True)
class ShapingRule(ShapingLimits):
    """``[[shaping.rule]]``: a reaction to an MX reply: suspend the egress path, or use other
    limits on it ("set", with the limit keys), for ``duration`` seconds."""

    site: str | None = field(
        default=None, metadata=doc("named site the rule applies to (default: every site)")
    )
    match: str | None = field(
        default=None,
        metadata=doc(
            "regular expression searched in the MX reply as sent, one line per line "
            '("421-4.7.28 ..."; ^ and $ match at each line)'
        ),
    )
    code: int | None = field(default=None, metadata=doc("the MX reply code it needs, e.g. 421"))
    enhanced: str | None = field(
        default=None, metadata=doc('the enhanced status code it needs, e.g. "4.7.28"')
    )
    action: RuleAction = field(
        default="suspend",
        metadata=doc('"suspend" or "set" (the limit keys)', missing='"suspend" or "set"'),
    )
    duration: float = field(
        default=0.0,
        metadata=doc('seconds the action lasts ("90s", "2h" or a number)', missing='e.g. "2h"'),
    )
    # `match` compiled when the configuration was loaded (a bad regex is a config error).
    pattern: re.Pattern[str] | None = field(
        default=None, compare=False, repr=False, metadata=NOT_TOML
    )

    @property
    def limits(self) -> PathLimits:
        """The limits a "set" rule uses meanwhile (its limit keys)."""
        return PathLimits(
            self.connection_limit,
            self.max_connection_rate,
            self.max_message_rate,
            self.max_deliveries_per_connection,
        )


@dataclass(frozen=True)
class ShapingConfig(ShapingLimits):
    """``[shaping]``: traffic shaping per egress path (source address x site), the limits
    every path gets unless a narrower scope sets them. Default: no limit."""

    backend: ShapingBackendKind = field(
        default="memory",
        metadata=doc('"memory" (limits per sidecar process) or "redis" (shared through redis_url)'),
    )
    redis_url: str | None = field(
        default=None, metadata=doc('Redis/Valkey URL for backend = "redis", e.g. redis://host')
    )
    max_wait: float = field(
        default=DEFAULT_MAX_WAIT,
        metadata=doc("seconds a session may wait for a connection slot or a rate token"),
    )
    slot_lease: float = field(
        default=30.0,
        metadata=doc(
            "seconds a connection slot stays taken without renewal: how soon the slots of a "
            "sidecar that died (SIGKILL) are free again (renewed every third of it)"
        ),
    )
    sites: dict[str, ShapingSite] = field(
        default_factory=dict, metadata=doc('[shaping.site."NAME"]', key="site")
    )
    rules: tuple[ShapingRule, ...] = field(default=(), metadata=doc("[[shaping.rule]]", key="rule"))


@dataclass(frozen=True)
class Binding:
    """``[binding.NAME]``: an HAProxy egress and the source addresses it writes."""

    name: str = field(metadata=NOT_TOML)  # the table's name
    ha_proxy_server: tuple[HostPort, ...] = field(
        metadata=doc(
            "HAProxy host:port (or several, tried in turn)", missing="the HAProxy host:port"
        )
    )
    ha_proxy_src_addr: IPv4Address | None = field(
        default=None, metadata=doc("IPv4 source address written in the PROXY v2 header")
    )
    ha_proxy_ipv6_src_addr: IPv6Address | None = field(
        default=None, metadata=doc("IPv6 source address written in the PROXY v2 header")
    )
    ehlo_hostname: str | None = field(
        default=None, metadata=doc("host name sent in EHLO (default: server.hostname)")
    )
    domains: dict[str, DomainPolicy] = field(
        default_factory=dict, metadata=doc("per-domain settings for this binding", key="domain")
    )
    shaping: BindingShaping = field(
        default_factory=BindingShaping,
        metadata=doc("[binding.NAME.shaping]: this binding's traffic shaping limits"),
    )


@dataclass(frozen=True)
class BindingGroup:
    """``[binding_group.NAME]``: bindings used together, one picked per transaction."""

    name: str = field(metadata=NOT_TOML)  # the table's name
    bindings: tuple[str, ...] = field(
        metadata=doc("names of the member bindings", missing="the names of the group's bindings")
    )
    domains: dict[str, DomainPolicy] = field(
        default_factory=dict, metadata=doc("per-domain settings for this group", key="domain")
    )
    selection: Selection = field(
        default="round-robin",
        metadata=doc('how a member is picked: "round-robin" or "hash" of the recipient domain'),
    )


@dataclass(frozen=True)
class Listener:
    """``[[listener]]``: a local address and the binding or binding_group its mail uses."""

    address: HostPort = field(
        metadata=doc("local ip:port to listen on", missing="the local ip:port to listen on")
    )
    binding: str | None = field(default=None, metadata=doc("name of the binding used"))
    binding_group: str | None = field(default=None, metadata=doc("name of the binding_group used"))
    protocol: ListenerProtocol = field(
        default="smtp",
        metadata=doc(
            '"smtp", or "lmtp" (RFC 2033: LHLO, one reply per recipient, recipients of any'
            " domain in one transaction; never on port 25)"
        ),
    )
    max_routes: int = field(
        default=20,
        metadata=doc(
            "LMTP: most routes (MX connections) one transaction may use at once, a count; a"
            " recipient on one more route gets 452 4.5.3 (retried in another transaction)"
        ),
    )

    @property
    def target(self) -> str:
        """The binding or binding_group name this listener's mail uses."""
        name = self.binding if self.binding is not None else self.binding_group
        assert name is not None
        return name


@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: the client side. Limits and timeouts follow RFC 5321 section 4.5.3.2 by
    default."""

    hostname: str = field(
        default="localhost",
        metadata=doc("host name in the banner and EHLO reply (default: the host's FQDN)"),
    )
    allowed_clients: tuple[IPv4Network | IPv6Network, ...] = field(
        default=(IPv4Network("127.0.0.0/8"), IPv6Network("::1/128")),
        metadata=doc("networks whose clients may connect"),
    )
    max_connections: int = field(
        default=1000, metadata=doc("most client sessions at once (per worker), a count")
    )
    max_line_length: int = field(
        default=4096,
        metadata=doc("longest command line, in bytes with CRLF; DATA is relayed as it comes"),
    )
    max_message_size: int = field(
        default=52_428_800,
        metadata=doc("largest message, in bytes as SIZE counts them (RFC 1870)"),
    )
    max_recipients: int = field(
        default=1000, metadata=doc("most recipients per transaction, a count")
    )
    max_errors: int = field(
        default=100, metadata=doc("protocol errors tolerated in one session, a count")
    )
    client_command_timeout: float = field(
        default=300.0,
        metadata=doc(
            "seconds for a whole command line to arrive from the client (and for the client "
            "to take each reply)",
            deprecated="command_timeout",
        ),
    )
    data_timeout: float = field(
        default=180.0, metadata=doc("seconds to wait for each read of message data")
    )
    data_total_timeout: float = field(
        default=3600.0, metadata=doc("seconds the whole message data may take")
    )
    shutdown_grace: float = field(
        default=30.0,
        metadata=doc("seconds open sessions get to finish their transaction on shutdown"),
    )
    workers: int | Literal["auto"] = field(
        default=1,
        metadata=doc(
            "processes sharing the listeners (SO_REUSEPORT), each with its own event loop; "
            '"auto": one per CPU this process may use (affinity and cgroup CPU limit)'
        ),
    )

    @property
    def worker_count(self) -> int:
        """The number of worker processes ``workers`` means here ("auto" resolved with
        :func:`sidecar.cpus.available_cpus`, at most :data:`MAX_WORKERS`)."""
        if self.workers == "auto":
            return min(available_cpus(), MAX_WORKERS)
        return self.workers


@dataclass(frozen=True)
class DnsConfig:
    """``[dns]``: the resolver for MX/A/AAAA look-ups."""

    nameservers: tuple[HostPort, ...] = field(
        default=(), metadata=doc("resolvers (ip, ip:port, [v6]:port); empty: the system's")
    )
    timeout: float = field(default=5.0, metadata=doc("seconds to wait for one DNS answer"))
    static: dict[str, tuple[str, ...]] = field(
        default_factory=dict,
        metadata=doc("fixed MX hosts (names or IP addresses) per domain, instead of DNS"),
    )
    cache_size: int = field(
        default=10_000, metadata=doc("most DNS answers kept in the cache, a count")
    )


@dataclass(frozen=True)
class DeliveryConfig:
    """``[delivery]``: the MX side.

    Waits for the MX follow RFC 5321 section 4.5.3.2 (banner, MAIL, RCPT: 5 min; DATA: 2 min;
    a data block: 3 min; end of data: 10 min), each cut to fit the MTA's own wait for the same
    reply (Postfix: RCPT 300 s, DATA 120 s, data 180 s, end of data 600 s). The whole upstream
    set-up (DNS, connect, banner, EHLO, STARTTLS, MAIL, RCPT) happens while the MTA waits for
    its RCPT reply (Postfix smtp_rcpt_timeout, Exim's transport timeout: 300 s), so every
    set-up step is also cut to what is left of ``setup_timeout``: 240 s leaves a minute of
    margin and still gives a slow MX (policy service, tarpit) four minutes.
    """

    port: int = field(default=25, metadata=doc("TCP port of the MXes"))
    allow_private_destinations: bool = field(
        default=False,
        metadata=doc("allow MX addresses in loopback/private/reserved ranges (tests only)"),
    )
    tls: TlsPolicy = field(
        default="opportunistic", metadata=doc("STARTTLS policy towards the MXes")
    )
    tls_ca_file: str | None = field(
        default=None,
        metadata=doc('path of the CA bundle (PEM) for tls = "verify"; unset: the system\'s'),
    )
    dane: bool = field(
        default=False,
        metadata=doc(
            "DANE for SMTP (RFC 7672): authenticate MXes that publish TLSA records; needs a "
            "local DNSSEC-validating resolver in dns.nameservers"
        ),
    )
    mta_sts: bool = field(
        default=True,
        metadata=doc("MTA-STS (RFC 8461): fetch, cache and apply recipient domains' policies"),
    )
    state_dir: str = field(
        default="/var/lib/sidecar",
        metadata=doc(
            "directory of the on-disk state (MTA-STS policy cache, TLS-RPT results), an "
            "absolute path; created if missing"
        ),
    )
    # The TLS client context built from tls_ca_file when the configuration was loaded (so a
    # file that cannot be read fails `sidecar check`, start-up and SIGHUP, never a delivery).
    tls_verify_context: ssl.SSLContext | None = field(
        default=None, compare=False, repr=False, metadata=NOT_TOML
    )
    setup_timeout: float = field(
        default=240.0,
        metadata=doc("seconds for the whole set-up (DNS to RCPT); every set-up wait is cut to it"),
    )
    connect_timeout: float = field(
        default=10.0, metadata=doc("seconds to connect to HAProxy (or to a bypass MX)")
    )
    banner_timeout: float = field(
        default=300.0, metadata=doc("seconds to wait for the MX's 220 banner")
    )
    mx_command_timeout: float = field(
        default=300.0,
        metadata=doc(
            "seconds for each EHLO, STARTTLS (with its handshake), MAIL and RCPT exchange "
            "with the MX: the command sent and the MX's reply",
            deprecated="command_timeout",
        ),
    )
    data_init_timeout: float = field(
        default=100.0,
        metadata=doc("seconds to wait for the MX's 354 to DATA (under Postfix's 120)"),
    )
    data_send_timeout: float = field(
        default=150.0,
        metadata=doc("seconds each write of message data to the MX may take (under 180)"),
    )
    data_done_timeout: float = field(
        default=480.0,
        metadata=doc("seconds to wait for the MX's reply to the end of data (under 600)"),
    )
    max_mx_addresses: int = field(
        default=5, metadata=doc("most MX addresses tried for one transaction, a count")
    )
    # Finished upstream sessions are kept for reuse by the next transaction on the same route
    # (binding, MX hosts, TLS policy), from any client session: fewer connections, less setup.
    connection_cache: bool = field(
        default=True, metadata=doc("keep finished MX connections for the next message")
    )
    connection_cache_idle: float = field(
        default=5.0, metadata=doc("seconds an idle cached connection is kept")
    )
    connection_cache_size: int = field(
        default=100, metadata=doc("most idle cached connections at once, a count")
    )
    connection_reuse_limit: int = field(
        default=100, metadata=doc("most transactions on one MX connection, a count")
    )


@dataclass(frozen=True)
class HealthConfig:
    """``[ha_proxy_client]``: the health checks of the HAProxy servers."""

    health_check_interval: float = field(
        default=5.0, metadata=doc("seconds between two checks of a server")
    )
    health_check_timeout: float = field(default=1.0, metadata=doc("seconds one check may take"))
    health_check_failure_threshold: int = field(
        default=3, metadata=doc("failed checks in a row that mark a server down, a count")
    )
    health_check_success_threshold: int = field(
        default=3, metadata=doc("good checks in a row that mark a server up again, a count")
    )
    health_check_probe: HostPort | None = field(
        default=None,
        metadata=doc(
            "ip:port to reach through the server with a PROXY v2 header, expecting an SMTP "
            "220 banner; unset: a bare TCP connect"
        ),
    )


@dataclass(frozen=True)
class StatusConfig:
    """``[status]``: the HTTP status endpoint (/healthz, /status, /metrics)."""

    address: HostPort | None = field(
        default=None, metadata=doc("local ip:port of the endpoint; unset: off")
    )
    allow_control_from: tuple[IPv4Network | IPv6Network, ...] = field(
        default=(IPv4Network("127.0.0.0/8"), IPv6Network("::1/128")),
        metadata=doc(
            "networks whose callers may POST control requests (sidecar suspend/resume); "
            "others get 403; [] refuses every caller"
        ),
    )


@dataclass(frozen=True)
class Config:
    """The whole configuration file."""

    server: ServerConfig = field(metadata=doc("[server]"))
    listeners: tuple[Listener, ...] = field(metadata=doc("[[listener]]", key="listener"))
    dns: DnsConfig = field(metadata=doc("[dns]"))
    delivery: DeliveryConfig = field(metadata=doc("[delivery]"))
    ha_proxy_client: HealthConfig = field(metadata=doc("[ha_proxy_client]"))
    bindings: dict[str, Binding] = field(metadata=doc("[binding.NAME]", key="binding"))
    binding_groups: dict[str, BindingGroup] = field(
        default_factory=dict, metadata=doc("[binding_group.NAME]", key="binding_group")
    )
    domains: dict[str, DomainPolicy] = field(
        default_factory=dict, metadata=doc('[domain."NAME"]', key="domain")
    )
    status: StatusConfig = field(default_factory=StatusConfig, metadata=doc("[status]"))
    shaping: ShapingConfig = field(default_factory=ShapingConfig, metadata=doc("[shaping]"))
    # What the loader warned about (deprecated key names), for `sidecar check` to show.
    warnings: tuple[str, ...] = field(default=(), compare=False, repr=False, metadata=NOT_TOML)
