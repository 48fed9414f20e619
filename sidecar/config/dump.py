"""Dumping: a :class:`~sidecar.config.schema.Config` back to the TOML file's shape.

Derived from the dataclass fields like the loader: each TOML field under its key, fields that
are no TOML key (``toml`` metadata ``False``) left out, ``None`` and empty tables left out,
addresses and networks as the strings the loader reads.
``parse_config(tomllib.loads(tomli_w.dumps(config_to_dict(c)))) == c``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import is_dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from sidecar.config.schema import Binding, Config, HostPort, toml_fields
from sidecar.shaping.model import Rate


def config_to_dict(config: Config) -> dict[str, object]:
    """The effective configuration in the TOML file's shape (plain values, no ``None``), for
    ``sidecar check``; uses the current key names (never a deprecated one)."""
    return _table(config)


def _table(section: Any) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, f in toml_fields(type(section)):
        value = getattr(section, f.name)
        if value is None:
            continue
        if isinstance(section, Binding) and f.name == "ha_proxy_server" and len(value) == 1:
            # One HAProxy server is written as the string the operator most likely wrote.
            out[key] = _plain(value[0])
            continue
        plain = _plain(value)
        if plain == {}:
            continue  # an empty table (dns.static, status without address, no domains)
        out[key] = plain
    return out


def _plain(value: object) -> object:
    """A field's value as TOML holds it."""
    if isinstance(value, HostPort | IPv4Address | IPv6Address | IPv4Network | IPv6Network | Rate):
        return str(value)  # a Rate as "100/min", which the loader reads back
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        # Named tables (bindings, domains, dns.static): each entry kept, even when empty.
        return {str(name): _plain(item) for name, item in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        return _table(value)
    return value
