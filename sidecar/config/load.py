"""Loading: TOML -> the frozen dataclasses of :mod:`sidecar.config.schema`.

The keys a table allows, which are required, and the older names still accepted are derived
from the dataclass fields (:func:`sidecar.config.schema.toml_fields`); each field's value is
checked by the parser :func:`_parser` picks for it (by name where the value needs more than its
type says, else by its type: bool, positive int, positive float of seconds). Every error names
the key path (``binding.b1.ha_proxy_src_addr``) and the problem.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import ssl
import tomllib
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import Field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from sidecar.config.schema import (
    DEFAULT_DNS_PORT,
    LISTENER_PROTOCOLS,
    MAX_WORKERS,
    RULE_ACTIONS,
    SELECTIONS,
    SHAPING_BACKENDS,
    TLS_POLICIES,
    Binding,
    BindingGroup,
    BindingShaping,
    Config,
    ConfigError,
    DeliveryConfig,
    DnsConfig,
    DomainPolicy,
    HealthConfig,
    HostPort,
    Listener,
    ListenerProtocol,
    RuleAction,
    Selection,
    ServerConfig,
    ShapingBackendKind,
    ShapingConfig,
    ShapingLimits,
    ShapingRule,
    ShapingSite,
    StatusConfig,
    TlsPolicy,
    section_classes,
    toml_fields,
)
from sidecar.errors import describe_error
from sidecar.shaping.model import Rate, parse_duration, parse_rate

log = logging.getLogger("sidecar.config")

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

# The SMTP port, where an LMTP listener is refused (RFC 2033 section 5).
SMTP_PORT = 25

_Parser = Callable[[object, str], Any]
_T = TypeVar("_T")


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the TOML file at ``path``.

    Raises :class:`ConfigError` when the file cannot be read, is not TOML, or fails validation.
    Deprecated key names are logged as warnings (logger ``sidecar.config``) and kept in
    ``Config.warnings``.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            content = f.read()
    except OSError as e:
        raise ConfigError("", f"cannot read {name}: {e.strerror or describe_error(e)}") from e
    return load_config_bytes(content, name)


def load_config_bytes(content: bytes, name: str) -> Config:
    """Validate ``content``, the bytes of the TOML file ``name`` (for messages), as
    :func:`load_config` does; raises :class:`ConfigError`."""
    try:
        data = tomllib.loads(content.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError("", f"{name}: not valid TOML: the file is not UTF-8 ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"{name}: not valid TOML: {e}") from e
    return parse_config(data)


def parse_config(data: Mapping[str, object]) -> Config:
    """Validate parsed TOML (``tomllib`` output) and build the :class:`Config`.

    Each deprecated key name used is logged once as a warning (logger ``sidecar.config``) and
    listed in ``Config.warnings``.
    """
    warnings: list[str] = []
    root = _table(data, "")
    _check_keys(root, "", Config, warnings)

    server = _parse_server(root.get("server", {}), "server", warnings)
    dns = _parse_section(DnsConfig, root.get("dns", {}), "dns", warnings)
    delivery = _parse_delivery(root.get("delivery", {}), "delivery", warnings)
    health = _parse_section(
        HealthConfig, root.get("ha_proxy_client", {}), "ha_proxy_client", warnings
    )

    shaping = _parse_shaping(root.get("shaping", {}), "shaping", warnings)

    if "binding" not in root:
        raise ConfigError("binding", "at least one [binding.NAME] table is required")
    bindings_table = _table(root["binding"], "binding")
    if not bindings_table:
        raise ConfigError("binding", "at least one [binding.NAME] table is required")
    bindings: dict[str, Binding] = {}
    for name, value in bindings_table.items():
        bpath = _key("binding", name)
        _check_name(name, bpath, "binding")
        bindings[name] = _parse_binding(name, value, bpath, shaping.sites, warnings)

    groups: dict[str, BindingGroup] = {}
    for name, value in _table(root.get("binding_group", {}), "binding_group").items():
        gpath = _key("binding_group", name)
        _check_name(name, gpath, "binding_group")
        if name in bindings:
            raise ConfigError(gpath, f"the name {_show(name)} is already used by a binding")
        groups[name] = _parse_group(name, value, gpath, bindings, warnings)

    listeners = _parse_listeners(root.get("listener"), bindings, groups, warnings)
    domains = _parse_domains(root.get("domain", {}), "domain", warnings)
    status = _parse_section(StatusConfig, root.get("status", {}), "status", warnings)
    if (
        status.address is not None
        and isinstance(server.workers, int)
        and status.address.port + server.workers - 1 > 65535
    ):
        # worker i serves its status on port + i; getaddrinfo would wrap 65536 to 0 (a
        # random port) and 65537 to 1, silently
        raise ConfigError(
            "status.address",
            f"the port {status.address.port} leaves no room for the status ports of "
            f"{server.workers} workers (port + 0 to port + {server.workers - 1}, at most 65535)",
        )

    for warning in warnings:
        log.warning("%s", warning)
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
        shaping=shaping,
        warnings=tuple(warnings),
    )


# -- tables, derived from the dataclass fields -------------------------------------------------


def _check_keys(
    table: Mapping[str, object], path: str, cls: type[Any], warnings: list[str]
) -> dict[str, tuple[str, object]]:
    """The values of ``table`` (a table of ``cls``) by field name, each with the key it was
    written under (errors about the value name that key).

    A key that is no field of ``cls`` is an error; a deprecated name is mapped to its field's
    key with a warning, and an error when the current name is given too.
    """
    by_key: dict[str, Field[Any]] = {}
    old_names: dict[str, str] = {}
    for key, f in toml_fields(cls):
        by_key[key] = f
        old = f.metadata.get("deprecated")
        if old is not None:
            old_names[str(old)] = key
    found: dict[str, tuple[str, object]] = {}
    for key, raw in table.items():
        if key in by_key:
            f = by_key[key]
        elif key in old_names:
            new = old_names[key]
            if new in table:
                raise ConfigError(
                    _key(path, key),
                    f"deprecated name of {_key(path, new)}, which is set too: keep only {new}",
                )
            warnings.append(f"{_key(path, key)} is deprecated: rename it {_key(path, new)}")
            f = by_key[new]
        else:
            raise ConfigError(_key(path, key), "unknown key")
        found[f.name] = (key, raw)
    return found


def _table_kwargs(
    cls: type[Any],
    value: object,
    path: str,
    warnings: list[str],
    parsers: Mapping[str, _Parser] | None = None,
) -> dict[str, Any]:
    """The keyword arguments for ``cls`` from the TOML table ``value`` at ``path``.

    Keys are checked against the fields (:func:`_check_keys`); each value is parsed by
    ``parsers[field name]`` when given (a parser that needs the rest of the configuration),
    else by :func:`_parser`; a missing required key (field metadata ``missing``) is an error.
    """
    found = _check_keys(_table(value, path), path, cls, warnings)
    kwargs: dict[str, Any] = {}
    for key, f in toml_fields(cls):
        if f.name in found:
            written, raw = found[f.name]
            parse = (parsers or {}).get(f.name) or _parser(cls, f)
            kwargs[f.name] = parse(raw, _key(path, written))
        elif "missing" in f.metadata:
            raise ConfigError(_key(path, key), f"missing ({f.metadata['missing']})")
    return kwargs


def _parse_section(cls: type[_T], value: object, path: str, warnings: list[str]) -> _T:
    result: _T = cls(**_table_kwargs(cls, value, path, warnings))
    return result


def _parser(cls: type[Any], f: Field[Any]) -> _Parser:
    """The parser of a field's value: by name (:data:`_BY_NAME`), else by its type."""
    special = _BY_NAME.get((cls, f.name))
    if special is not None:
        return special
    kind = _without_none(_type_hints(cls)[f.name])
    if kind is bool:
        return _bool
    if kind is int:
        return _positive_int
    if kind is float:
        return _positive_float
    if kind is Rate:
        return _rate
    raise TypeError(f"no parser for {cls.__name__}.{f.name}")  # a schema programming error


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _type_hints(cls: type[Any]) -> dict[str, Any]:
    """The resolved field types of ``cls`` (the annotations are strings), computed once."""
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _without_none(kind: Any) -> Any:
    """``X`` for ``X | None``, else ``kind``."""
    if get_origin(kind) in (Union, types.UnionType):
        args = [a for a in get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


# -- sections -----------------------------------------------------------------------------------


def _parse_server(value: object, path: str, warnings: list[str]) -> ServerConfig:
    kwargs = _table_kwargs(ServerConfig, value, path, warnings)
    if "hostname" not in kwargs:
        kwargs["hostname"] = socket.getfqdn()
    return ServerConfig(**kwargs)


def _parse_delivery(value: object, path: str, warnings: list[str]) -> DeliveryConfig:
    delivery = _parse_section(DeliveryConfig, value, path, warnings)
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


def _parse_binding(
    name: str,
    value: object,
    path: str,
    sites: Mapping[str, ShapingSite],
    warnings: list[str],
) -> Binding:
    def domains(raw: object, dpath: str) -> dict[str, DomainPolicy]:
        return _parse_domains(raw, dpath, warnings)

    def shaping(raw: object, spath: str) -> BindingShaping:
        def per_site(raw_sites: object, sites_path: str) -> dict[str, ShapingLimits]:
            limits: dict[str, ShapingLimits] = {}
            for site, raw_limits in _table(raw_sites, sites_path).items():
                site_path = _key(sites_path, site)
                if site not in sites:
                    raise ConfigError(site_path, f"no [shaping.site.{_show(site)}] is configured")
                limits[site] = _parse_section(ShapingLimits, raw_limits, site_path, warnings)
            return limits

        return BindingShaping(
            **_table_kwargs(BindingShaping, raw, spath, warnings, {"sites": per_site})
        )

    kwargs = _table_kwargs(Binding, value, path, warnings, {"domains": domains, "shaping": shaping})
    if kwargs.get("ha_proxy_src_addr") is None and kwargs.get("ha_proxy_ipv6_src_addr") is None:
        raise ConfigError(
            path, "set ha_proxy_src_addr (IPv4), ha_proxy_ipv6_src_addr (IPv6) or both"
        )
    return Binding(name=name, **kwargs)


def _parse_group(
    name: str, value: object, path: str, bindings: Mapping[str, Binding], warnings: list[str]
) -> BindingGroup:
    def members(raw: object, mpath: str) -> tuple[str, ...]:
        items = _list(raw, mpath)
        if not items:
            raise ConfigError(mpath, "must name at least one binding")
        names: list[str] = []
        for i, item in enumerate(items):
            ipath = f"{mpath}[{i}]"
            member = _str(item, ipath)
            if member not in bindings:
                raise ConfigError(ipath, f"no binding named {_show(member)}")
            if member in names:
                raise ConfigError(ipath, f"{_show(member)} is listed twice")
            names.append(member)
        return tuple(names)

    def domains(raw: object, dpath: str) -> dict[str, DomainPolicy]:
        return _parse_domains(raw, dpath, warnings)

    kwargs = _table_kwargs(
        BindingGroup, value, path, warnings, {"bindings": members, "domains": domains}
    )
    return BindingGroup(name=name, **kwargs)


def _parse_listeners(
    value: object,
    bindings: Mapping[str, Binding],
    groups: Mapping[str, BindingGroup],
    warnings: list[str],
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

        def address(raw: object, apath: str, i: int = i) -> HostPort:
            parsed = parse_host_port(_str(raw, apath), apath, ip_only=True, default_port=None)
            if parsed in seen:
                raise ConfigError(apath, f"{_show(str(parsed))} is also listener[{seen[parsed]}]")
            seen[parsed] = i
            return parsed

        kwargs = _table_kwargs(Listener, item, path, warnings, {"address": address})
        binding, group = kwargs.get("binding"), kwargs.get("binding_group")
        if (binding is None) == (group is None):
            raise ConfigError(path, "set exactly one of binding, binding_group")
        if binding is not None and binding not in bindings:
            raise ConfigError(_key(path, "binding"), f"no binding named {_show(binding)}")
        if group is not None and group not in groups:
            raise ConfigError(_key(path, "binding_group"), f"no binding_group named {_show(group)}")
        if kwargs.get("protocol") == "lmtp" and kwargs["address"].port == SMTP_PORT:
            # RFC 2033 section 5: LMTP must not be offered on the SMTP port, where an SMTP
            # client would take its per-recipient replies for replies to other commands.
            raise ConfigError(
                _key(path, "protocol"),
                f'"lmtp" on port {SMTP_PORT} (RFC 2033 section 5: never on the SMTP port)',
            )
        listeners.append(Listener(**kwargs))
    return tuple(listeners)


def _parse_domains(value: object, path: str, warnings: list[str]) -> dict[str, DomainPolicy]:
    domains: dict[str, DomainPolicy] = {}
    for raw_name, raw_policy in _table(value, path).items():
        dpath = _key(path, raw_name)
        domain = _domain_name(raw_name, dpath)
        if domain in domains:
            raise ConfigError(dpath, f"{_show(domain)} is configured twice")
        domains[domain] = _parse_section(DomainPolicy, raw_policy, dpath, warnings)
    return domains


def _parse_shaping(value: object, path: str, warnings: list[str]) -> ShapingConfig:
    def sites(raw: object, sites_path: str) -> dict[str, ShapingSite]:
        parsed: dict[str, ShapingSite] = {}
        for name, raw_site in _table(raw, sites_path).items():
            site_path = _key(sites_path, name)
            _check_name(name, site_path, "site")
            kwargs = _table_kwargs(ShapingSite, raw_site, site_path, warnings)
            parsed[name] = ShapingSite(name=name, **kwargs)
        return parsed

    found_sites: dict[str, ShapingSite] = {}

    def rules(raw: object, rules_path: str) -> tuple[ShapingRule, ...]:
        if isinstance(raw, Mapping):
            raise ConfigError(rules_path, "must be an array of tables: write [[shaping.rule]]")
        parsed: list[ShapingRule] = []
        for i, item in enumerate(_list(raw, rules_path)):
            parsed.append(_parse_rule(item, f"{rules_path}[{i}]", found_sites, warnings))
        return tuple(parsed)

    table = _table(value, path)
    # Sites first: the rules name them (whatever order the TOML file has).
    found_sites.update(sites(table.get("site", {}), _key(path, "site")))
    kwargs = _table_kwargs(
        ShapingConfig,
        table,
        path,
        warnings,
        {"sites": lambda _raw, _path: dict(found_sites), "rules": rules},
    )
    if kwargs.get("backend") == "redis" and kwargs.get("redis_url") is None:
        raise ConfigError(_key(path, "redis_url"), 'missing (backend = "redis" needs it)')
    return ShapingConfig(**kwargs)


def _parse_rule(
    value: object, path: str, sites: Mapping[str, ShapingSite], warnings: list[str]
) -> ShapingRule:
    kwargs = _table_kwargs(ShapingRule, value, path, warnings)
    site = kwargs.get("site")
    if site is not None and site not in sites:
        raise ConfigError(_key(path, "site"), f"no [shaping.site.{_show(site)}] is configured")
    if all(kwargs.get(k) is None for k in ("match", "code", "enhanced")):
        raise ConfigError(path, "set match (a regular expression), code or enhanced")
    limit_keys = [key for key, _ in toml_fields(ShapingLimits) if key in kwargs]
    if kwargs["action"] == "set" and not limit_keys:
        raise ConfigError(
            path, 'action = "set" needs the limits to use meanwhile (e.g. connection_limit)'
        )
    if kwargs["action"] == "suspend" and limit_keys:
        raise ConfigError(_key(path, limit_keys[0]), 'only a rule with action = "set" takes limits')
    match = kwargs.get("match")
    if match is not None:
        try:
            kwargs["pattern"] = re.compile(match, re.MULTILINE)
        except re.error as e:
            raise ConfigError(
                _key(path, "match"), f"{_show(match)} is not a regular expression: {e}"
            ) from None
    return ShapingRule(**kwargs)


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


def _parse_control_networks(value: object, path: str) -> tuple[IPv4Network | IPv6Network, ...]:
    if isinstance(value, list) and not value:
        return ()  # nobody may control the sidecar through the endpoint
    return _parse_networks(value, path)


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


def _parse_listener_protocol(value: object, path: str) -> ListenerProtocol:
    return _choice(value, path, LISTENER_PROTOCOLS)


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


def _str(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"must be a string, got {_show(value)}")
    return value


def _absolute_path(value: object, path: str) -> str:
    """An absolute path: ``sidecar run`` (a service, working directory /), ``check`` and
    ``tls-report`` (a shell, cron) run in different directories, and a relative path would
    give each its own store."""
    text = _str(value, path)
    if not text.startswith("/"):
        raise ConfigError(path, f"must be an absolute path, got {_show(text)}")
    return text


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, f"must be true or false, got {_show(value)}")
    return value


def _parse_workers(value: object, path: str) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError(
            path,
            f'must be an integer from 1 to {MAX_WORKERS} or "auto" (one per CPU this process '
            f"may use), got {_show(value)}",
        )
    return value


def _positive_int(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(path, f"must be a positive integer, got {_show(value)}")
    return value


def _seconds(value: object, path: str, *, zero_ok: bool, expected: str) -> float:
    """A finite number of seconds, above 0 (or 0 too with ``zero_ok``); ``expected`` says
    what it must be in the error."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero_ok)
    ):
        raise ConfigError(path, f"must be {expected}, got {_show(value)}")
    return float(value)


def _positive_float(value: object, path: str) -> float:
    return _seconds(value, path, zero_ok=False, expected="a positive number of seconds")


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


def _rate(value: object, path: str) -> Rate:
    try:
        return parse_rate(_str(value, path))
    except ValueError as e:
        raise ConfigError(path, str(e)) from None


def _duration(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(path, f'must be a duration like "90s" or "2h", got {_show(value)}')
    try:
        seconds = parse_duration(value)
    except ValueError as e:
        raise ConfigError(path, str(e)) from None
    if not math.isfinite(seconds):
        raise ConfigError(path, f"must be a finite duration, got {_show(value)}")
    return seconds


def _non_negative_float(value: object, path: str) -> float:
    return _seconds(value, path, zero_ok=True, expected="a number of seconds, 0 or more")


def _parse_shaping_backend(value: object, path: str) -> ShapingBackendKind:
    return _choice(value, path, SHAPING_BACKENDS)


def _parse_rule_action(value: object, path: str) -> RuleAction:
    return _choice(value, path, RULE_ACTIONS)


def _redis_url(value: object, path: str) -> str:
    text = _str(value, path)
    scheme = text.partition("://")[0].lower()
    if not text.partition("://")[2] or scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(path, f"{_show(text)} is not a redis://, rediss:// or unix:// URL")
    return text


def _mx_patterns(value: object, path: str) -> tuple[str, ...]:
    items = _list(value, path, 'an array of MX host patterns like "*.google.com"')
    if not items:
        raise ConfigError(path, "must list at least one MX host pattern")
    patterns: list[str] = []
    for i, item in enumerate(items):
        ipath = f"{path}[{i}]"
        text = _str(item, ipath).strip().lower().rstrip(".")
        if not text or not text.isascii() or any(c.isspace() for c in text):
            raise ConfigError(ipath, f"{_show(item)} is not an MX host name pattern")
        patterns.append(text)
    return tuple(patterns)


def _reply_code(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 200 <= value <= 599:
        raise ConfigError(path, f"must be an SMTP reply code (200-599), got {_show(value)}")
    return value


_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")


def _enhanced_code(value: object, path: str) -> str:
    text = _str(value, path)
    if not _ENHANCED.fullmatch(text):
        raise ConfigError(path, f'{_show(text)} is not an enhanced status code like "4.7.28"')
    return text


def _status_address(value: object, path: str) -> HostPort:
    return parse_host_port(_str(value, path), path, ip_only=True, default_port=None)


# Parsers of the fields whose value needs more than its type says (the others: by type).
_BY_NAME: dict[tuple[type[Any], str], _Parser] = {
    (ServerConfig, "hostname"): _parse_hostname,
    (ServerConfig, "allowed_clients"): _parse_networks,
    (ServerConfig, "workers"): _parse_workers,
    (DnsConfig, "nameservers"): _parse_nameservers,
    (DnsConfig, "static"): _parse_static,
    (DeliveryConfig, "port"): _port,
    (DeliveryConfig, "tls"): _parse_tls,
    (DeliveryConfig, "tls_ca_file"): _str,
    (DeliveryConfig, "state_dir"): _absolute_path,
    (HealthConfig, "health_check_probe"): _parse_probe,
    (StatusConfig, "address"): _status_address,
    (StatusConfig, "allow_control_from"): _parse_control_networks,
    (DomainPolicy, "tls"): _parse_tls,
    (Binding, "ha_proxy_server"): _parse_servers,
    (Binding, "ha_proxy_src_addr"): _ipv4_source,
    (Binding, "ha_proxy_ipv6_src_addr"): _ipv6_source,
    (Binding, "ehlo_hostname"): _parse_hostname,
    (BindingGroup, "selection"): _parse_selection,
    (ShapingConfig, "backend"): _parse_shaping_backend,
    (ShapingConfig, "redis_url"): _redis_url,
    (ShapingConfig, "max_wait"): _non_negative_float,
    (ShapingSite, "mx"): _mx_patterns,
    (ShapingRule, "site"): _str,
    (ShapingRule, "match"): _str,
    (ShapingRule, "code"): _reply_code,
    (ShapingRule, "enhanced"): _enhanced_code,
    (ShapingRule, "action"): _parse_rule_action,
    (ShapingRule, "duration"): _duration,
    (Listener, "binding"): _str,
    (Listener, "binding_group"): _str,
    (Listener, "protocol"): _parse_listener_protocol,
}
# Given per call, with what they need of the rest of the configuration.
_IN_CONTEXT = {
    (Binding, "domains"),
    (Binding, "shaping"),
    (BindingShaping, "sites"),
    (ShapingConfig, "sites"),
    (ShapingConfig, "rules"),
    (BindingGroup, "bindings"),
    (BindingGroup, "domains"),
    (Listener, "address"),
}


def _check_schema() -> None:
    """Every TOML field of every table has a parser (a new field without one fails at import,
    not on the first configuration that sets it)."""
    for cls in section_classes():
        if cls is Config:
            continue  # the top level is parsed by parse_config itself
        for _key_name, f in toml_fields(cls):
            if (cls, f.name) not in _IN_CONTEXT:
                _parser(cls, f)


_check_schema()
