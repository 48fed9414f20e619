"""TOML configuration -> frozen dataclasses.

Option names follow Momentum's ha_proxy_client module so that operators moving from Momentum
recognise them. Every validation error names the key path (``binding.b1.ha_proxy_src_addr``).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import ssl
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import Any, Literal, TypeVar

from sidecar.errors import describe_error

TlsPolicy = Literal["disabled", "opportunistic", "required", "verify"]
TLS_POLICIES: tuple[TlsPolicy, ...] = ("disabled", "opportunistic", "required", "verify")
# How a binding_group picks a member: in turn, or by a hash of the recipient domain (each
# domain keeps one member, so one source address, while that member is usable).
Selection = Literal["round-robin", "hash"]
SELECTIONS: tuple[Selection, ...] = ("round-robin", "hash")
# Field metadata of a dataclass field that is no configuration key (built from other keys).
_NOT_TOML = {"toml": False}


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
    """Per-domain settings; ``None`` means "not set here, ask the wider scope"."""

    ha_proxy_bypass: bool | None = None
    tls: TlsPolicy | None = None


@dataclass(frozen=True)
class Binding:
    name: str
    ha_proxy_server: tuple[HostPort, ...]
    ha_proxy_src_addr: IPv4Address | None = None
    ha_proxy_ipv6_src_addr: IPv6Address | None = None
    ehlo_hostname: str | None = None
    domains: dict[str, DomainPolicy] = field(default_factory=dict)


@dataclass(frozen=True)
class BindingGroup:
    name: str
    bindings: tuple[str, ...]
    domains: dict[str, DomainPolicy] = field(default_factory=dict)
    selection: Selection = "round-robin"


@dataclass(frozen=True)
class Listener:
    address: HostPort
    binding: str | None = None
    binding_group: str | None = None

    @property
    def target(self) -> str:
        """The binding or binding_group name this listener's mail uses."""
        name = self.binding if self.binding is not None else self.binding_group
        assert name is not None
        return name


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = "localhost"
    allowed_clients: tuple[IPv4Network | IPv6Network, ...] = (
        IPv4Network("127.0.0.0/8"),
        IPv6Network("::1/128"),
    )
    max_connections: int = 1000
    # Limits and timeouts on the client side (RFC 5321 section 4.5.3.2 values by default).
    max_line_length: int = 4096  # command lines; DATA is relayed as it comes (README)
    max_message_size: int = 52_428_800
    max_recipients: int = 1000
    max_errors: int = 100
    command_timeout: float = 300.0
    data_timeout: float = 180.0
    data_total_timeout: float = 3600.0
    shutdown_grace: float = 30.0
    # Processes sharing the listeners (SO_REUSEPORT), each with its own event loop.
    workers: int = 1


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[HostPort, ...] = ()
    timeout: float = 5.0
    static: dict[str, tuple[str, ...]] = field(default_factory=dict)
    cache_size: int = 10_000


@dataclass(frozen=True)
class DeliveryConfig:
    port: int = 25
    allow_private_destinations: bool = False
    tls: TlsPolicy = "opportunistic"
    # CA bundle for tls = "verify" (PEM); None: the system's trust store.
    tls_ca_file: str | None = None
    # The TLS client context built from tls_ca_file when the configuration was loaded (so a
    # file that cannot be read fails `sidecar check`, start-up and SIGHUP, never a delivery).
    # Not a TOML key.
    tls_verify_context: ssl.SSLContext | None = field(
        default=None, compare=False, repr=False, metadata=_NOT_TOML
    )
    # Seconds. Waits for the MX follow RFC 5321 section 4.5.3.2 (banner, MAIL, RCPT: 5 min; DATA:
    # 2 min; a data block: 3 min; end of data: 10 min), each cut to fit the MTA's own wait for
    # the same reply (Postfix: RCPT 300 s, DATA 120 s, data 180 s, end of data 600 s).
    # The whole upstream set-up (DNS, connect, banner, EHLO, STARTTLS, MAIL, RCPT) happens while
    # the MTA waits for its RCPT reply (Postfix smtp_rcpt_timeout, Exim's transport timeout:
    # 300 s), so every set-up step is also cut to what is left of setup_timeout: 240 s leaves
    # a minute of margin and still gives a slow MX (policy service, tarpit) four minutes.
    setup_timeout: float = 240.0
    connect_timeout: float = 10.0
    banner_timeout: float = 300.0
    command_timeout: float = 300.0
    # The MX's 354 to DATA (RFC: 2 min), under Postfix's smtp_data_init_timeout of 120 s.
    data_init_timeout: float = 100.0
    # Each write of message data to the MX (RFC: 3 min per block), under Postfix's
    # smtp_data_xfer_timeout of 180 s (while the MX does not read, the MTA cannot write).
    data_send_timeout: float = 150.0
    # The MX's reply to the end of data (RFC: 10 min), under the MTA's 600 s.
    data_done_timeout: float = 480.0
    max_mx_addresses: int = 5
    # Finished upstream sessions are kept for reuse by the next transaction on the same route
    # (binding, MX hosts, TLS policy), from any client session: fewer connections, less setup.
    connection_cache: bool = True
    connection_cache_idle: float = 5.0
    connection_cache_size: int = 100
    connection_reuse_limit: int = 100


@dataclass(frozen=True)
class HealthConfig:
    health_check_interval: float = 5.0
    health_check_timeout: float = 1.0
    health_check_failure_threshold: int = 3
    health_check_success_threshold: int = 3
    # When set, each check writes a PROXY v2 header towards this ip:port through the HAProxy
    # server and requires an SMTP 220 banner (instead of a bare TCP connect).
    health_check_probe: HostPort | None = None


@dataclass(frozen=True)
class StatusConfig:
    """The HTTP status endpoint (/healthz, /status, /metrics); off when ``address`` is None."""

    address: HostPort | None = None


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    listeners: tuple[Listener, ...]
    dns: DnsConfig
    delivery: DeliveryConfig
    ha_proxy_client: HealthConfig
    bindings: dict[str, Binding]
    binding_groups: dict[str, BindingGroup] = field(default_factory=dict)
    domains: dict[str, DomainPolicy] = field(default_factory=dict)
    status: StatusConfig = field(default_factory=StatusConfig)


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------

DEFAULT_DNS_PORT = 53

_TOP_LEVEL_KEYS = (
    "server",
    "listener",
    "dns",
    "delivery",
    "ha_proxy_client",
    "binding",
    "binding_group",
    "domain",
    "status",
)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the TOML file at ``path``.

    Raises :class:`ConfigError` when the file cannot be read, is not TOML, or fails validation.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError("", f"cannot read {name}: {e.strerror or describe_error(e)}") from e
    except UnicodeDecodeError as e:
        raise ConfigError("", f"{name}: not valid TOML: the file is not UTF-8 ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"{name}: not valid TOML: {e}") from e
    return parse_config(data)


def parse_config(data: Mapping[str, object]) -> Config:
    """Validate parsed TOML (``tomllib`` output) and build the :class:`Config`."""
    root = _table(data, "")
    _check_keys(root, "", _TOP_LEVEL_KEYS)

    server = _parse_server(root.get("server", {}), "server")
    dns = _parse_dns(root.get("dns", {}), "dns")
    delivery = _parse_delivery(root.get("delivery", {}), "delivery")
    health = _parse_section(
        root.get("ha_proxy_client", {}),
        "ha_proxy_client",
        HealthConfig,
        {"health_check_probe": _parse_probe},
    )

    if "binding" not in root:
        raise ConfigError("binding", "at least one [binding.NAME] table is required")
    bindings_table = _table(root["binding"], "binding")
    if not bindings_table:
        raise ConfigError("binding", "at least one [binding.NAME] table is required")
    bindings: dict[str, Binding] = {}
    for name, value in bindings_table.items():
        bpath = _key("binding", name)
        _check_name(name, bpath, "binding")
        bindings[name] = _parse_binding(name, value, bpath)

    groups: dict[str, BindingGroup] = {}
    for name, value in _table(root.get("binding_group", {}), "binding_group").items():
        gpath = _key("binding_group", name)
        _check_name(name, gpath, "binding_group")
        if name in bindings:
            raise ConfigError(gpath, f"the name {_show(name)} is already used by a binding")
        groups[name] = _parse_group(name, value, gpath, bindings)

    listeners = _parse_listeners(root.get("listener"), bindings, groups)
    domains = _parse_domains(root.get("domain", {}), "domain")
    status = _parse_status(root.get("status", {}), "status")

    return Config(
        server=server,
        listeners=listeners,
        dns=dns,
        delivery=delivery,
        ha_proxy_client=health,
        bindings=bindings,
        binding_groups=groups,
        domains=domains,
        status=status,
    )


def config_to_dict(config: Config) -> dict[str, object]:
    """The effective configuration in the TOML file's shape (plain values, no ``None``).

    ``parse_config(tomllib.loads(tomli_w.dumps(config_to_dict(c)))) == c``.
    """
    server = _plain_fields(config.server)
    server["allowed_clients"] = [str(n) for n in config.server.allowed_clients]

    dns = _plain_fields(config.dns)
    dns["nameservers"] = [str(ns) for ns in config.dns.nameservers]
    if config.dns.static:
        dns["static"] = {domain: list(hosts) for domain, hosts in config.dns.static.items()}
    else:
        del dns["static"]

    health = _plain_fields(config.ha_proxy_client)
    if config.ha_proxy_client.health_check_probe is None:
        del health["health_check_probe"]
    else:
        health["health_check_probe"] = str(config.ha_proxy_client.health_check_probe)

    out: dict[str, object] = {
        "server": server,
        "dns": dns,
        "delivery": {k: v for k, v in _plain_fields(config.delivery).items() if v is not None},
        "ha_proxy_client": health,
    }
    if config.status.address is not None:
        out["status"] = {"address": str(config.status.address)}

    listeners: list[dict[str, object]] = []
    for listener in config.listeners:
        item: dict[str, object] = {"address": str(listener.address)}
        if listener.binding is not None:
            item["binding"] = listener.binding
        if listener.binding_group is not None:
            item["binding_group"] = listener.binding_group
        listeners.append(item)
    out["listener"] = listeners

    bindings: dict[str, object] = {}
    for name, binding in config.bindings.items():
        servers = [str(s) for s in binding.ha_proxy_server]
        b: dict[str, object] = {"ha_proxy_server": servers[0] if len(servers) == 1 else servers}
        if binding.ha_proxy_src_addr is not None:
            b["ha_proxy_src_addr"] = str(binding.ha_proxy_src_addr)
        if binding.ha_proxy_ipv6_src_addr is not None:
            b["ha_proxy_ipv6_src_addr"] = str(binding.ha_proxy_ipv6_src_addr)
        if binding.ehlo_hostname is not None:
            b["ehlo_hostname"] = binding.ehlo_hostname
        if binding.domains:
            b["domain"] = _domains_to_dict(binding.domains)
        bindings[name] = b
    out["binding"] = bindings

    if config.binding_groups:
        groups: dict[str, object] = {}
        for name, group in config.binding_groups.items():
            g: dict[str, object] = {"bindings": list(group.bindings), "selection": group.selection}
            if group.domains:
                g["domain"] = _domains_to_dict(group.domains)
            groups[name] = g
        out["binding_group"] = groups

    if config.domains:
        out["domain"] = _domains_to_dict(config.domains)
    return out


# -- sections ---------------------------------------------------------------------------------


def _parse_server(value: object, path: str) -> ServerConfig:
    table = _table(value, path)
    kwargs = _section_kwargs(
        table,
        path,
        ServerConfig,
        {"hostname": _parse_hostname, "allowed_clients": _parse_networks},
    )
    if "hostname" not in kwargs:
        kwargs["hostname"] = socket.getfqdn()
    return ServerConfig(**kwargs)


def _parse_dns(value: object, path: str) -> DnsConfig:
    return _parse_section(
        value,
        path,
        DnsConfig,
        {"nameservers": _parse_nameservers, "static": _parse_static},
    )


def _parse_status(value: object, path: str) -> StatusConfig:
    def address(raw: object, kpath: str) -> HostPort:
        return parse_host_port(_str(raw, kpath), kpath, ip_only=True, default_port=None)

    table = _table(value, path)
    _check_keys(table, path, ("address",))
    if "address" not in table:
        return StatusConfig()
    return StatusConfig(address(table["address"], _key(path, "address")))


def _parse_delivery(value: object, path: str) -> DeliveryConfig:
    delivery = _parse_section(
        value,
        path,
        DeliveryConfig,
        {"port": _port, "tls": _parse_tls, "tls_ca_file": _str},
    )
    if delivery.tls_ca_file is None:
        return delivery
    context = load_ca_file(delivery.tls_ca_file, _key(path, "tls_ca_file"))
    return replace(delivery, tls_verify_context=context)


def verifying_context(ca_file: str | None) -> ssl.SSLContext:
    """The TLS client context for ``tls = "verify"``: the MX certificate must chain to the CA
    bundle ``ca_file`` (PEM; ``None``: the system's trust store) and name the MX host
    (RFC 3207, RFC 6125). Raises ``OSError`` or ``ssl.SSLError`` when the bundle cannot be
    read or holds no certificate."""
    return ssl.create_default_context(cafile=ca_file)


def load_ca_file(name: str, path: str) -> ssl.SSLContext:
    """Read the CA bundle ``name`` as it will be used (as this process's user), or raise
    :class:`ConfigError` naming the key ``path`` and the reason."""
    try:
        return verifying_context(name)
    except ssl.SSLError as e:  # before OSError: SSLError is one
        raise ConfigError(
            path, f"{_show(name)} is not a PEM CA bundle: {describe_error(e)}"
        ) from None
    except OSError as e:
        raise ConfigError(
            path, f"cannot read {_show(name)}: {e.strerror or describe_error(e)}"
        ) from None


_T = TypeVar("_T")
_Parser = Callable[[object, str], object]


def _parse_section(value: object, path: str, cls: type[_T], special: Mapping[str, _Parser]) -> _T:
    return cls(**_section_kwargs(_table(value, path), path, cls, special))


def _section_kwargs(
    table: Mapping[str, object], path: str, cls: type[Any], special: Mapping[str, _Parser]
) -> dict[str, Any]:
    """Parse the keys of a flat section whose dataclass fields all have defaults.

    Fields listed in ``special`` use their own parser; the others are typed by their default:
    bool -> true/false, int -> positive integer, float -> positive number.
    """
    known = {f.name: f for f in fields(cls) if f.metadata.get("toml", True)}
    _check_keys(table, path, known)
    kwargs: dict[str, Any] = {}
    for name, raw in table.items():
        kpath = _key(path, name)
        default = known[name].default
        if name in special:
            kwargs[name] = special[name](raw, kpath)
        elif isinstance(default, bool):
            kwargs[name] = _bool(raw, kpath)
        elif isinstance(default, int):
            kwargs[name] = _positive_int(raw, kpath)
        elif isinstance(default, float):
            kwargs[name] = _positive_float(raw, kpath)
        else:  # pragma: no cover - a new field without a parser is a programming error
            raise TypeError(f"no parser for {cls.__name__}.{name}")
    return kwargs


def _parse_binding(name: str, value: object, path: str) -> Binding:
    table = _table(value, path)
    _check_keys(
        table,
        path,
        (
            "ha_proxy_server",
            "ha_proxy_src_addr",
            "ha_proxy_ipv6_src_addr",
            "ehlo_hostname",
            "domain",
        ),
    )
    if "ha_proxy_server" not in table:
        raise ConfigError(_key(path, "ha_proxy_server"), "missing (the HAProxy host:port)")
    servers = _parse_servers(table["ha_proxy_server"], _key(path, "ha_proxy_server"))

    src4: IPv4Address | None = None
    if "ha_proxy_src_addr" in table:
        src4 = _ipv4_source(table["ha_proxy_src_addr"], _key(path, "ha_proxy_src_addr"))
    src6: IPv6Address | None = None
    if "ha_proxy_ipv6_src_addr" in table:
        src6 = _ipv6_source(table["ha_proxy_ipv6_src_addr"], _key(path, "ha_proxy_ipv6_src_addr"))
    if src4 is None and src6 is None:
        raise ConfigError(
            path, "set ha_proxy_src_addr (IPv4), ha_proxy_ipv6_src_addr (IPv6) or both"
        )

    ehlo: str | None = None
    if "ehlo_hostname" in table:
        ehlo = _parse_hostname(table["ehlo_hostname"], _key(path, "ehlo_hostname"))

    return Binding(
        name=name,
        ha_proxy_server=servers,
        ha_proxy_src_addr=src4,
        ha_proxy_ipv6_src_addr=src6,
        ehlo_hostname=ehlo,
        domains=_parse_domains(table.get("domain", {}), _key(path, "domain")),
    )


def _parse_group(
    name: str, value: object, path: str, bindings: Mapping[str, Binding]
) -> BindingGroup:
    table = _table(value, path)
    _check_keys(table, path, ("bindings", "selection", "domain"))
    mpath = _key(path, "bindings")
    if "bindings" not in table:
        raise ConfigError(mpath, "missing (the names of the group's bindings)")
    items = _list(table["bindings"], mpath)
    if not items:
        raise ConfigError(mpath, "must name at least one binding")
    members: list[str] = []
    for i, item in enumerate(items):
        ipath = f"{mpath}[{i}]"
        member = _str(item, ipath)
        if member not in bindings:
            raise ConfigError(ipath, f"no binding named {_show(member)}")
        if member in members:
            raise ConfigError(ipath, f"{_show(member)} is listed twice")
        members.append(member)
    selection: Selection = "round-robin"
    if "selection" in table:
        selection = _parse_selection(table["selection"], _key(path, "selection"))
    return BindingGroup(
        name=name,
        bindings=tuple(members),
        domains=_parse_domains(table.get("domain", {}), _key(path, "domain")),
        selection=selection,
    )


def _parse_listeners(
    value: object, bindings: Mapping[str, Binding], groups: Mapping[str, BindingGroup]
) -> tuple[Listener, ...]:
    if value is None:
        raise ConfigError("listener", "at least one [[listener]] is required")
    if isinstance(value, Mapping):
        raise ConfigError("listener", "must be an array of tables: write [[listener]]")
    items = _list(value, "listener")
    if not items:
        raise ConfigError("listener", "at least one [[listener]] is required")
    listeners: list[Listener] = []
    seen: dict[HostPort, int] = {}
    for i, item in enumerate(items):
        path = f"listener[{i}]"
        table = _table(item, path)
        _check_keys(table, path, ("address", "binding", "binding_group"))
        apath = _key(path, "address")
        if "address" not in table:
            raise ConfigError(apath, "missing (the local ip:port to listen on)")
        address = parse_host_port(
            _str(table["address"], apath), apath, ip_only=True, default_port=None
        )
        if address in seen:
            raise ConfigError(apath, f"{_show(str(address))} is also listener[{seen[address]}]")
        seen[address] = i

        binding = group = None
        if "binding" in table:
            binding = _str(table["binding"], _key(path, "binding"))
        if "binding_group" in table:
            group = _str(table["binding_group"], _key(path, "binding_group"))
        if (binding is None) == (group is None):
            raise ConfigError(path, "set exactly one of binding, binding_group")
        if binding is not None and binding not in bindings:
            raise ConfigError(_key(path, "binding"), f"no binding named {_show(binding)}")
        if group is not None and group not in groups:
            raise ConfigError(_key(path, "binding_group"), f"no binding_group named {_show(group)}")
        listeners.append(Listener(address=address, binding=binding, binding_group=group))
    return tuple(listeners)


def _parse_domains(value: object, path: str) -> dict[str, DomainPolicy]:
    domains: dict[str, DomainPolicy] = {}
    for raw_name, raw_policy in _table(value, path).items():
        dpath = _key(path, raw_name)
        domain = _domain_name(raw_name, dpath)
        if domain in domains:
            raise ConfigError(dpath, f"{_show(domain)} is configured twice")
        table = _table(raw_policy, dpath)
        _check_keys(table, dpath, ("ha_proxy_bypass", "tls"))
        bypass: bool | None = None
        if "ha_proxy_bypass" in table:
            bypass = _bool(table["ha_proxy_bypass"], _key(dpath, "ha_proxy_bypass"))
        tls: TlsPolicy | None = None
        if "tls" in table:
            tls = _parse_tls(table["tls"], _key(dpath, "tls"))
        domains[domain] = DomainPolicy(ha_proxy_bypass=bypass, tls=tls)
    return domains


# -- values -----------------------------------------------------------------------------------


def parse_host_port(text: str, path: str, *, ip_only: bool, default_port: int | None) -> HostPort:
    """Parse ``host:port``, ``[v6]:port`` (or, with ``default_port``, ``host``, ``v6``, ``[v6]``).

    The host is an IP literal (normalised) or, unless ``ip_only``, a DNS name (lower-cased).
    ``path`` names the key in error messages.
    """
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(path, f"{_show(text)} has an unclosed [")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigError(path, f"{_show(text)} is not [ipv6]:port")
        port_text = rest[1:] if rest else None
        try:
            host = str(IPv6Address(host))
        except ValueError:
            raise ConfigError(path, f"{_show(host)} in brackets is not an IPv6 address") from None
    else:
        if text.count(":") > 1:
            try:
                host = str(IPv6Address(text))
            except ValueError:
                raise ConfigError(path, f"{_show(text)} is not host:port") from None
            if default_port is None:
                raise ConfigError(
                    path, f"{_show(text)} has no port (write an IPv6 address as [{text}]:port)"
                )
            port_text = None
        else:
            host, sep, port_text_ = text.partition(":")
            port_text = port_text_ if sep else None
            try:
                host = str(IPv4Address(host))
            except ValueError:
                if ip_only:
                    raise ConfigError(
                        path, f"host must be an IP address, got {_show(host)}"
                    ) from None
                if not _is_host_name(host.lower()):
                    raise ConfigError(
                        path, f"{_show(host)} is not an IP address or host name"
                    ) from None
                host = host.lower()
    if port_text is None:
        if default_port is None:
            raise ConfigError(path, f"{_show(text)} has no port (write host:port)")
        return HostPort(host, default_port)
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(path, f"{_show(port_text)} in {_show(text)} is not a port (1-65535)")
    return HostPort(host, int(port_text))


def _parse_servers(value: object, path: str) -> tuple[HostPort, ...]:
    if isinstance(value, str):
        return (parse_host_port(value, path, ip_only=False, default_port=None),)
    items = _list(value, path, "a host:port string or an array of them")
    if not items:
        raise ConfigError(path, "must name at least one HAProxy host:port")
    servers: list[HostPort] = []
    for i, item in enumerate(items):
        ipath = f"{path}[{i}]"
        server = parse_host_port(_str(item, ipath), ipath, ip_only=False, default_port=None)
        if server in servers:
            raise ConfigError(ipath, f"{_show(str(server))} is listed twice")
        servers.append(server)
    return tuple(servers)


def _ipv4_source(value: object, path: str) -> IPv4Address:
    text = _str(value, path)
    try:
        addr = IPv4Address(text)
    except ValueError:
        raise ConfigError(path, f"{_show(text)} is not an IPv4 address") from None
    _check_source(addr, text, path)
    return addr


def _ipv6_source(value: object, path: str) -> IPv6Address:
    text = _str(value, path)
    try:
        addr = IPv6Address(text)
    except ValueError:
        raise ConfigError(path, f"{_show(text)} is not an IPv6 address") from None
    _check_source(addr, text, path)
    return addr


def _check_source(addr: IPv4Address | IPv6Address, text: str, path: str) -> None:
    if addr.is_unspecified or addr.is_multicast:
        raise ConfigError(path, f"{_show(text)} cannot be a source address")


def _parse_hostname(value: object, path: str) -> str:
    text = _str(value, path)
    name = text.lower()
    if not _is_host_name(name):
        raise ConfigError(path, f"{_show(text)} is not a valid host name")
    return name


def _parse_networks(value: object, path: str) -> tuple[IPv4Network | IPv6Network, ...]:
    items = _list(value, path)
    if not items:
        raise ConfigError(path, "must list at least one network (no client could connect)")
    networks: list[IPv4Network | IPv6Network] = []
    for i, item in enumerate(items):
        ipath = f"{path}[{i}]"
        text = _str(item, ipath)
        try:
            networks.append(ip_network(text, strict=True))
        except ValueError:
            try:
                loose = ip_network(text, strict=False)
            except ValueError:
                raise ConfigError(
                    ipath, f"{_show(text)} is not an IP network (address/prefix length)"
                ) from None
            raise ConfigError(
                ipath, f"{_show(text)} has host bits set (did you mean {loose}?)"
            ) from None
    return tuple(networks)


def _parse_nameservers(value: object, path: str) -> tuple[HostPort, ...]:
    servers: list[HostPort] = []
    for i, item in enumerate(_list(value, path)):
        ipath = f"{path}[{i}]"
        servers.append(
            parse_host_port(_str(item, ipath), ipath, ip_only=True, default_port=DEFAULT_DNS_PORT)
        )
    return tuple(servers)


def _parse_static(value: object, path: str) -> dict[str, tuple[str, ...]]:
    static: dict[str, tuple[str, ...]] = {}
    for raw_name, raw_hosts in _table(value, path).items():
        dpath = _key(path, raw_name)
        domain = _domain_name(raw_name, dpath)
        if domain in static:
            raise ConfigError(dpath, f"{_show(domain)} is configured twice")
        items = _list(raw_hosts, dpath, "an array of MX host names or IP addresses")
        if not items:
            raise ConfigError(dpath, "must list at least one MX host name or IP address")
        hosts: list[str] = []
        for i, item in enumerate(items):
            ipath = f"{dpath}[{i}]"
            text = _str(item, ipath)
            try:
                host = str(ip_address(text))
            except ValueError:
                host = text.lower()
                if not _is_host_name(host):
                    raise ConfigError(
                        ipath, f"{_show(text)} is not a host name or IP address"
                    ) from None
            hosts.append(host)
        static[domain] = tuple(hosts)
    return static


def _parse_probe(value: object, path: str) -> HostPort:
    probe = parse_host_port(_str(value, path), path, ip_only=True, default_port=None)
    address = ip_address(probe.host)
    if address.is_unspecified or address.is_multicast:
        raise ConfigError(path, f"{_show(probe.host)} cannot be a probe destination")
    return probe


_Choice = TypeVar("_Choice", bound=str)


def _choice(value: object, path: str, choices: tuple[_Choice, ...]) -> _Choice:
    """``value`` if it is one of ``choices`` (strings), else a ConfigError listing them."""
    for choice in choices:
        if value == choice and isinstance(value, str):
            return choice
    listed = ", ".join(_show(c) for c in choices)
    raise ConfigError(path, f"must be one of {listed}, got {_show(value)}")


def _parse_selection(value: object, path: str) -> Selection:
    return _choice(value, path, SELECTIONS)


def _parse_tls(value: object, path: str) -> TlsPolicy:
    return _choice(value, path, TLS_POLICIES)


def _domain_name(text: str, path: str) -> str:
    """A domain table key: lower-cased, one trailing dot dropped, must look like a domain."""
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        raise ConfigError(
            path, f"{_show(text)} is not a valid domain name (write it in A-label form, xn--...)"
        )
    if not _is_host_name(name):
        raise ConfigError(path, f"{_show(text)} is not a valid domain name")
    return name


def _is_host_name(name: str) -> bool:
    """LDH labels of 1-63 characters, at most 253 in all, top label not all digits."""
    if not name or len(name) > 253 or not name.isascii():
        return False
    labels = name.split(".")
    return all(_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def _check_name(name: str, path: str, what: str) -> None:
    if not _NAME.fullmatch(name):
        raise ConfigError(path, f'a {what} name may use only letters, digits, "_", "-" and "."')


# -- primitive checks -------------------------------------------------------------------------


def _table(value: object, path: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"must be a table, got {_show(value)}")
    return value


def _list(value: object, path: str, what: str = "an array") -> Sequence[object]:
    if not isinstance(value, list | tuple):
        raise ConfigError(path, f"must be {what}, got {_show(value)}")
    return value


def _check_keys(table: Mapping[str, object], path: str, allowed: Iterable[str]) -> None:
    known = set(allowed)
    for key in table:
        if key not in known:
            raise ConfigError(_key(path, key), "unknown key")


def _str(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"must be a string, got {_show(value)}")
    return value


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, f"must be true or false, got {_show(value)}")
    return value


def _positive_int(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(path, f"must be a positive integer, got {_show(value)}")
    return value


def _positive_float(value: object, path: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(path, f"must be a positive number of seconds, got {_show(value)}")
    return float(value)


def _port(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(path, f"must be a port number (1-65535), got {_show(value)}")
    return value


def _key(path: str, key: str) -> str:
    """Append ``key`` to a dotted key path, quoting it as TOML would when it is not bare."""
    part = key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{path}.{part}" if path else part


def _show(value: object) -> str:
    """A value as the operator wrote it in TOML, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a {type(value).__name__}"


# -- back to plain values ---------------------------------------------------------------------


def _plain_fields(
    section: ServerConfig | DnsConfig | DeliveryConfig | HealthConfig,
) -> dict[str, object]:
    return {
        f.name: getattr(section, f.name) for f in fields(section) if f.metadata.get("toml", True)
    }


def _domains_to_dict(domains: Mapping[str, DomainPolicy]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, policy in domains.items():
        entry: dict[str, object] = {}
        if policy.ha_proxy_bypass is not None:
            entry["ha_proxy_bypass"] = policy.ha_proxy_bypass
        if policy.tls is not None:
            entry["tls"] = policy.tls
        out[name] = entry
    return out
