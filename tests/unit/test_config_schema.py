"""sidecar.config derived from the schema: the allowed keys of every table, the dump of every
field, and the deprecated key names (issue 11, items 3 and 4)."""

from __future__ import annotations

import copy
import logging
import re
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import trustme
from click.testing import CliRunner

from sidecar.cli import main
from sidecar.config import (
    Binding,
    BindingGroup,
    Config,
    ConfigError,
    DeliveryConfig,
    DnsConfig,
    DomainPolicy,
    HealthConfig,
    Listener,
    ServerConfig,
    StatusConfig,
    config_to_dict,
    parse_config,
)
from sidecar.config.schema import (
    BindingShaping,
    ShapingConfig,
    ShapingLimits,
    ShapingRule,
    ShapingSite,
    section_classes,
    toml_fields,
)

# Every key of every table, each set to a value other than its default (a key the dump
# dropped would come back as the default and fail the round trip).
EVERY_KEY: dict[str, Any] = {
    "server": {
        "hostname": "mta1.example.com",
        "allowed_clients": ["10.0.0.0/8", "2001:db8::/32"],
        "max_connections": 50,
        "max_line_length": 2048,
        "max_message_size": 1_000_000,
        "max_recipients": 10,
        "max_errors": 5,
        "client_command_timeout": 120.5,
        "data_timeout": 60.0,
        "data_total_timeout": 600.0,
        "shutdown_grace": 5.0,
        "workers": 2,
    },
    "listener": [
        {"address": "127.0.0.1:2525", "binding": "b1"},
        {"address": "[::1]:2526", "binding_group": "pool"},
    ],
    "dns": {
        "nameservers": ["127.0.0.1:5353"],
        "timeout": 2.0,
        "static": {"partner.example": ["mx.partner.example", "192.0.2.25"]},
        "cache_size": 100,
    },
    "delivery": {
        "port": 2525,
        "allow_private_destinations": True,
        "tls": "required",
        "dane": True,
        "mta_sts": False,
        "state_dir": "/srv/sidecar-state",
        # tls_ca_file: in test_every_key_with_a_ca_file (it needs a readable bundle)
        "setup_timeout": 100.0,
        "connect_timeout": 3.0,
        "banner_timeout": 30.0,
        "mx_command_timeout": 31.0,
        "data_init_timeout": 32.0,
        "data_send_timeout": 33.0,
        "data_done_timeout": 34.0,
        "max_mx_addresses": 3,
        "connection_cache": False,
        "connection_cache_idle": 2.5,
        "connection_cache_size": 7,
        "connection_reuse_limit": 9,
    },
    "ha_proxy_client": {
        "health_check_interval": 2.0,
        "health_check_timeout": 0.5,
        "health_check_failure_threshold": 4,
        "health_check_success_threshold": 2,
        "health_check_probe": "[2001:db8::25]:25",
    },
    "binding": {
        "b1": {
            "ha_proxy_server": ["10.0.0.5:5000", "haproxy.example:5000"],
            "ha_proxy_src_addr": "192.0.2.10",
            "ha_proxy_ipv6_src_addr": "2001:db8::10",
            "ehlo_hostname": "out1.example.com",
            "domain": {"internal.example": {"ha_proxy_bypass": True, "tls": "disabled"}},
            "shaping": {
                "connection_limit": 5,
                "max_connection_rate": "30/min",
                "max_message_rate": "1000/h",
                "max_deliveries_per_connection": 50,
                "site": {
                    "google": {
                        "connection_limit": 3,
                        "max_connection_rate": "10/min",
                        "max_message_rate": "500/h",
                        "max_deliveries_per_connection": 20,
                    }
                },
            },
        },
    },
    "binding_group": {
        "pool": {
            "bindings": ["b1"],
            "selection": "hash",
            "domain": {"x.example": {"tls": "verify"}},
        }
    },
    "domain": {
        "y.example": {
            "ha_proxy_bypass": False,
            "tls": "opportunistic",
            "dane": True,
            "mta_sts": False,
        }
    },
    "status": {"address": "127.0.0.1:9925"},
    "shaping": {
        "backend": "redis",
        "redis_url": "redis://127.0.0.1:6379",
        "max_wait": 4.5,
        "connection_limit": 10,
        "max_connection_rate": "60/min",
        "max_message_rate": "20000/h",
        "max_deliveries_per_connection": 100,
        "site": {
            "google": {
                "mx": ["*.google.com", "*.googlemail.com"],
                "connection_limit": 20,
                "max_connection_rate": "2/s",
                "max_message_rate": "10/30s",
                "max_deliveries_per_connection": 10,
            }
        },
        "rule": [
            {
                "site": "google",
                "match": "^421[ -]4\\.7\\.28 ",
                "code": 421,
                "enhanced": "4.7.28",
                "action": "set",
                "duration": "2h",
                "connection_limit": 1,
                "max_connection_rate": "1/min",
                "max_message_rate": "100/h",
                "max_deliveries_per_connection": 5,
            }
        ],
    },
}

MINIMAL: dict[str, Any] = {
    "listener": [{"address": "127.0.0.1:2525", "binding": "b1"}],
    "binding": {"b1": {"ha_proxy_server": "127.0.0.1:5000", "ha_proxy_src_addr": "192.0.2.10"}},
}

# Where a table of each schema class sits, as (the config, the table in it, its key path).
_Place = tuple[dict[str, Any], dict[str, Any], str]


def _place(cls: type[Any]) -> _Place:
    data = copy.deepcopy(EVERY_KEY)
    tables: dict[type[Any], tuple[dict[str, Any], str]] = {
        Config: (data, ""),
        ServerConfig: (data["server"], "server"),
        Listener: (data["listener"][0], "listener[0]"),
        DnsConfig: (data["dns"], "dns"),
        DeliveryConfig: (data["delivery"], "delivery"),
        HealthConfig: (data["ha_proxy_client"], "ha_proxy_client"),
        Binding: (data["binding"]["b1"], "binding.b1"),
        BindingGroup: (data["binding_group"]["pool"], "binding_group.pool"),
        DomainPolicy: (data["domain"]["y.example"], 'domain."y.example"'),
        StatusConfig: (data["status"], "status"),
        ShapingConfig: (data["shaping"], "shaping"),
        ShapingSite: (data["shaping"]["site"]["google"], "shaping.site.google"),
        ShapingRule: (data["shaping"]["rule"][0], "shaping.rule[0]"),
        BindingShaping: (data["binding"]["b1"]["shaping"], "binding.b1.shaping"),
        ShapingLimits: (
            data["binding"]["b1"]["shaping"]["site"]["google"],
            "binding.b1.shaping.site.google",
        ),
    }
    table, path = tables[cls]
    return data, table, path


@pytest.mark.parametrize("cls", section_classes(), ids=lambda c: c.__name__)
def test_an_unknown_key_in_any_table_is_an_error_naming_its_path(cls: type[Any]) -> None:
    data, table, path = _place(cls)
    parse_config(data)  # valid as it is
    table["no_such_key"] = 1
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert str(info.value) == f"{path}.no_such_key: unknown key".lstrip(".")


@pytest.mark.parametrize("cls", section_classes(), ids=lambda c: c.__name__)
def test_each_table_allows_exactly_its_fields(cls: type[Any]) -> None:
    """The keys come from the dataclass fields: each TOML field is a key; a field marked
    not-TOML (the table's name, what is built from other keys) is not."""
    data, table, _path = _place(cls)
    keys = {key for key, _ in toml_fields(cls)}
    not_toml = {f.name for f in fields(cls) if f.metadata.get("toml", True) is False}
    assert keys.isdisjoint(not_toml)
    for name in not_toml:
        table[name] = "x"
        with pytest.raises(ConfigError, match="unknown key"):
            parse_config(data)
        del table[name]


def test_the_tables_cover_every_schema_class() -> None:
    """Every dataclass the TOML fields hold is in section_classes() (so the tests above
    reach it)."""
    classes = set(section_classes())
    for cls in classes:
        for f in fields(cls):
            for other in (
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
            ):
                if other.__name__ in str(f.type):
                    assert other in classes


def _keys_by_class(dump: dict[str, Any]) -> dict[type[Any], set[str]]:
    """The keys the dump holds for each schema class, over all its tables."""
    seen: dict[type[Any], set[str]] = {cls: set() for cls in section_classes()}

    def domains(table: dict[str, Any]) -> None:
        for policy in table.get("domain", {}).values():
            seen[DomainPolicy] |= set(policy)

    seen[Config] |= set(dump)
    for key, cls in (
        ("server", ServerConfig),
        ("dns", DnsConfig),
        ("delivery", DeliveryConfig),
        ("ha_proxy_client", HealthConfig),
        ("status", StatusConfig),
        ("shaping", ShapingConfig),
    ):
        seen[cls] |= set(dump[key])
    for site in dump["shaping"]["site"].values():
        seen[ShapingSite] |= set(site)
    for rule in dump["shaping"]["rule"]:
        seen[ShapingRule] |= set(rule)
    for listener in dump["listener"]:
        seen[Listener] |= set(listener)
    for binding in dump["binding"].values():
        seen[Binding] |= set(binding)
        domains(binding)
        seen[BindingShaping] |= set(binding["shaping"])
        for limits in binding["shaping"]["site"].values():
            seen[ShapingLimits] |= set(limits)
    for group in dump["binding_group"].values():
        seen[BindingGroup] |= set(group)
        domains(group)
    domains(dump)
    return seen


def test_every_field_of_every_table_is_dumped_and_reparses_to_the_same(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    data = copy.deepcopy(EVERY_KEY)
    data["delivery"]["tls_ca_file"] = str(ca)
    config = parse_config(data)
    for cls in (ServerConfig, DnsConfig, DeliveryConfig, HealthConfig):
        section = next(v for v in vars(config).values() if isinstance(v, cls))
        for _, f in toml_fields(cls):
            if f.name != "hostname":  # its loaded default is the host's name
                assert getattr(section, f.name) != f.default, f"{cls.__name__}.{f.name}"
    dump = config_to_dict(config)
    seen = _keys_by_class(dump)
    for cls in section_classes():
        assert seen[cls] == {key for key, _ in toml_fields(cls)}, cls.__name__
    assert parse_config(tomllib.loads(tomli_w.dumps(dump))) == config
    assert "tls_verify_context" not in dump["delivery"]  # type: ignore[operator]


def test_every_field_has_a_doc_with_its_meaning() -> None:
    """Units in docstrings (issue 11): every TOML key says what it holds; every duration is
    in seconds and says so, every size in bytes."""
    for cls in section_classes():
        for key, f in toml_fields(cls):
            text = str(f.metadata.get("doc", ""))
            assert text, f"{cls.__name__}.{f.name} has no doc"
            if key.endswith(("_timeout", "_interval", "_grace", "_idle")) or key == "timeout":
                assert "seconds" in text, f"{cls.__name__}.{f.name}: {text}"
            if key.endswith("_size") and cls is ServerConfig:
                assert "bytes" in text, f"{cls.__name__}.{f.name}: {text}"
            if key == "max_line_length":
                assert "bytes" in text


# -- deprecated key names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "old", "new"),
    [
        ("server", "command_timeout", "client_command_timeout"),
        ("delivery", "command_timeout", "mx_command_timeout"),
    ],
)
def test_a_deprecated_name_is_mapped_with_a_warning(
    caplog: pytest.LogCaptureFixture, section: str, old: str, new: str
) -> None:
    data = {**copy.deepcopy(MINIMAL), section: {old: 42}}
    with caplog.at_level(logging.WARNING, logger="sidecar.config"):
        config = parse_config(data)
    assert getattr(getattr(config, section), new) == 42.0
    warning = f"{section}.{old} is deprecated: rename it {section}.{new}"
    assert config.warnings == (warning,)
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("sidecar.config", "WARNING", warning)
    ]
    # The same as written with the new name; the dump uses the new name only.
    assert config == parse_config({**copy.deepcopy(MINIMAL), section: {new: 42}})
    dumped = config_to_dict(config)[section]
    assert isinstance(dumped, dict) and dumped[new] == 42.0 and old not in dumped


@pytest.mark.parametrize(
    ("section", "old", "new"),
    [
        ("server", "command_timeout", "client_command_timeout"),
        ("delivery", "command_timeout", "mx_command_timeout"),
    ],
)
def test_a_deprecated_name_checks_its_value_under_its_own_path(
    section: str, old: str, new: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**copy.deepcopy(MINIMAL), section: {old: 0}})
    assert str(info.value) == f"{section}.{old}: must be a positive number of seconds, got 0"


@pytest.mark.parametrize(
    ("section", "old", "new"),
    [
        ("server", "command_timeout", "client_command_timeout"),
        ("delivery", "command_timeout", "mx_command_timeout"),
    ],
)
def test_old_and_new_name_together_are_an_error_naming_both(
    section: str, old: str, new: str
) -> None:
    for table in ({old: 1, new: 2}, {new: 2, old: 1}):
        with pytest.raises(ConfigError) as info:
            parse_config({**copy.deepcopy(MINIMAL), section: table})
        assert str(info.value) == (
            f"{section}.{old}: deprecated name of {section}.{new}, which is set too: "
            f"keep only {new}"
        )


def test_no_warning_without_deprecated_names(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sidecar.config"):
        assert parse_config(copy.deepcopy(EVERY_KEY)).warnings == ()
    assert caplog.records == []


def test_check_shows_the_deprecation_on_stderr_and_dumps_the_new_names(tmp_path: Path) -> None:
    data = {
        **copy.deepcopy(MINIMAL),
        "server": {"hostname": "mta1.example.com", "command_timeout": 60},
        "delivery": {"command_timeout": 30},
    }
    path = tmp_path / "sidecar.toml"
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    result = CliRunner().invoke(main, ["check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        "warning: server.command_timeout is deprecated: rename it server.client_command_timeout\n"
        "warning: delivery.command_timeout is deprecated: rename it delivery.mx_command_timeout\n"
    )
    effective = tomllib.loads(result.stdout)
    assert effective["server"]["client_command_timeout"] == 60.0
    assert effective["delivery"]["mx_command_timeout"] == 30.0
    assert "command_timeout" not in effective["server"]
    assert "command_timeout" not in effective["delivery"]
    # Once the handler is gone, the logger propagates again (sidecar run's log after SIGHUP).
    assert logging.getLogger("sidecar.config").propagate


def test_the_starter_config_shows_every_key() -> None:
    """`sidecar init` writes every option with its default and meaning (README): each key of
    each table appears in it (set or commented out), under its current name."""
    from sidecar.starter import STARTER_CONFIG

    written = set(re.findall(r"\b([a-z_0-9]+) = ", STARTER_CONFIG))
    for cls in section_classes():
        if cls is Config:
            continue
        for key, f in toml_fields(cls):
            # tables: [dns.static], [domain."NAME"], [binding.b1.shaping], [[shaping.rule]]
            if not str(f.type).startswith(("dict", "BindingShaping", "tuple[ShapingRule")):
                assert key in written, f"{cls.__name__}: {key} not in starter.toml"
    assert "[dns.static]" in STARTER_CONFIG and '[domain."' in STARTER_CONFIG
    for table in ('[shaping.site."', "[[shaping.rule]]", "[binding.b1.shaping]"):
        assert table in STARTER_CONFIG
    assert '[binding.b1.shaping.site."' in STARTER_CONFIG
    assert "command_timeout" not in written
