"""sidecar.config: TOML -> frozen dataclasses, validation messages naming the key path."""

from __future__ import annotations

import copy
import socket
import ssl
import tomllib
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import trustme

from sidecar.config import (
    Binding,
    BindingGroup,
    Config,
    ConfigError,
    DeliveryConfig,
    DnsConfig,
    DomainPolicy,
    HealthConfig,
    HostPort,
    Listener,
    ServerConfig,
    config_to_dict,
    load_config,
    parse_config,
)

FULL_TOML = """
[server]
hostname = "MTA1.example.com"
allowed_clients = ["127.0.0.0/8", "::1/128", "192.0.2.7"]
max_connections = 50
max_line_length = 2048
max_message_size = 1000000
max_recipients = 100
max_errors = 10
client_command_timeout = 120
data_timeout = 60.5
shutdown_grace = 5

[[listener]]
address = "127.0.0.1:2525"
binding = "b1"

[[listener]]
address = "[::1]:2526"
binding_group = "pool"

[dns]
nameservers = ["127.0.0.1:5353", "192.0.2.53", "[2001:db8::53]:5300", "2001:db8::54"]
timeout = 2
cache_size = 100

[dns.static]
"Partner.Example" = ["MX.partner.example", "192.0.2.25", "2001:DB8::25"]

[delivery]
port = 2500
allow_private_destinations = true
tls = "required"
setup_timeout = 100
connect_timeout = 3
banner_timeout = 30
mx_command_timeout = 30
data_done_timeout = 400
max_mx_addresses = 3

[ha_proxy_client]
health_check_interval = 2
health_check_timeout = 0.5
health_check_failure_threshold = 4
health_check_success_threshold = 2
health_check_probe = "[2001:db8::25]:25"

[binding.b1]
ha_proxy_server = "10.0.0.5:5000"
ha_proxy_src_addr = "192.0.2.10"
ha_proxy_ipv6_src_addr = "2001:db8::10"
ehlo_hostname = "out1.example.com"

[binding.b1.domain."Internal.Example"]
ha_proxy_bypass = true

[binding.b2]
ha_proxy_server = ["haproxy1.example.com:5000", "[2001:db8::5]:5000"]
ha_proxy_ipv6_src_addr = "2001:db8::11"

[binding_group.pool]
bindings = ["b1", "b2"]
selection = "hash"

[binding_group.pool.domain."x.example"]
ha_proxy_bypass = false

[domain."y.example."]
ha_proxy_bypass = true

[domain."z.example"]
"""

MINIMAL: dict[str, Any] = {
    "listener": [{"address": "127.0.0.1:2525", "binding": "b1"}],
    "binding": {"b1": {"ha_proxy_server": "127.0.0.1:5000", "ha_proxy_src_addr": "192.0.2.10"}},
}


def minimal(**sections: Any) -> dict[str, Any]:
    """The minimal valid config with some top-level sections replaced or added."""
    data = copy.deepcopy(MINIMAL)
    data.update(copy.deepcopy(sections))
    return data


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def with_binding(**fields: Any) -> dict[str, Any]:
    """Minimal config whose binding b1 is exactly ``fields``."""
    return minimal(binding={"b1": fields})


# -- valid configurations ----------------------------------------------------------------------


def test_full_config_parses_to_expected_dataclasses() -> None:
    config = parse_config(tomllib.loads(FULL_TOML))
    assert config == Config(
        server=ServerConfig(
            hostname="mta1.example.com",
            allowed_clients=(
                IPv4Network("127.0.0.0/8"),
                IPv6Network("::1/128"),
                IPv4Network("192.0.2.7/32"),
            ),
            max_connections=50,
            max_line_length=2048,
            max_message_size=1_000_000,
            max_recipients=100,
            max_errors=10,
            client_command_timeout=120.0,
            data_timeout=60.5,
            shutdown_grace=5.0,
        ),
        listeners=(
            Listener(address=HostPort("127.0.0.1", 2525), binding="b1"),
            Listener(address=HostPort("::1", 2526), binding_group="pool"),
        ),
        dns=DnsConfig(
            nameservers=(
                HostPort("127.0.0.1", 5353),
                HostPort("192.0.2.53", 53),
                HostPort("2001:db8::53", 5300),
                HostPort("2001:db8::54", 53),
            ),
            timeout=2.0,
            static={"partner.example": ("mx.partner.example", "192.0.2.25", "2001:db8::25")},
            cache_size=100,
        ),
        delivery=DeliveryConfig(
            port=2500,
            allow_private_destinations=True,
            tls="required",
            setup_timeout=100.0,
            connect_timeout=3.0,
            banner_timeout=30.0,
            mx_command_timeout=30.0,
            data_done_timeout=400.0,
            max_mx_addresses=3,
        ),
        ha_proxy_client=HealthConfig(
            health_check_interval=2.0,
            health_check_timeout=0.5,
            health_check_failure_threshold=4,
            health_check_success_threshold=2,
            health_check_probe=HostPort("2001:db8::25", 25),
        ),
        bindings={
            "b1": Binding(
                name="b1",
                ha_proxy_server=(HostPort("10.0.0.5", 5000),),
                ha_proxy_src_addr=IPv4Address("192.0.2.10"),
                ha_proxy_ipv6_src_addr=IPv6Address("2001:db8::10"),
                ehlo_hostname="out1.example.com",
                domains={"internal.example": DomainPolicy(ha_proxy_bypass=True)},
            ),
            "b2": Binding(
                name="b2",
                ha_proxy_server=(
                    HostPort("haproxy1.example.com", 5000),
                    HostPort("2001:db8::5", 5000),
                ),
                ha_proxy_ipv6_src_addr=IPv6Address("2001:db8::11"),
            ),
        },
        binding_groups={
            "pool": BindingGroup(
                name="pool",
                bindings=("b1", "b2"),
                domains={"x.example": DomainPolicy(ha_proxy_bypass=False)},
                selection="hash",
            )
        },
        domains={
            "y.example": DomainPolicy(ha_proxy_bypass=True),
            "z.example": DomainPolicy(ha_proxy_bypass=None),
        },
    )
    assert config.listeners[1].target == "pool"
    assert isinstance(config.server.client_command_timeout, float)


def test_minimal_config_uses_dataclass_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: "host.example.net")
    config = parse_config(MINIMAL)
    assert config.server == ServerConfig(hostname="host.example.net")
    assert config.dns == DnsConfig()
    assert config.delivery == DeliveryConfig()
    assert config.ha_proxy_client == HealthConfig()
    assert config.binding_groups == {}
    assert config.ha_proxy_client.health_check_probe is None
    assert config.domains == {}
    assert config.bindings["b1"].ha_proxy_ipv6_src_addr is None
    assert config.bindings["b1"].ehlo_hostname is None


def test_ints_are_accepted_where_floats_are_expected() -> None:
    config = parse_config(minimal(ha_proxy_client={"health_check_timeout": 2}))
    assert config.ha_proxy_client.health_check_timeout == 2.0
    assert isinstance(config.ha_proxy_client.health_check_timeout, float)


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text(FULL_TOML, encoding="utf-8")
    assert load_config(path) == parse_config(tomllib.loads(FULL_TOML))
    assert load_config(str(path)) == load_config(path)


def test_example_config_validates() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "sidecar.toml"
    config = load_config(example)
    assert config.listeners == (Listener(address=HostPort("127.0.0.1", 2525), binding="b1"),)
    assert config.bindings["b1"].ha_proxy_src_addr == IPv4Address("192.0.2.10")


# -- load_config errors ------------------------------------------------------------------------


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"cannot read {path}: No such file or directory"


def test_directory_is_not_readable_as_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot read {tmp_path}"):
        load_config(tmp_path)


def test_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nhostname = \n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid TOML: ")
    assert "line 2" in message


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nhostname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=f"^{path}: not valid TOML"):
        load_config(path)


# -- unknown keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (minimal(bogus=1), "bogus: unknown key"),
        (minimal(server={"hostnme": "x"}), "server.hostnme: unknown key"),
        (minimal(dns={"static": {}, "ttl": 5}), "dns.ttl: unknown key"),
        (minimal(delivery={"tls_mode": "required"}), "delivery.tls_mode: unknown key"),
        (minimal(ha_proxy_client={"interval": 5}), "ha_proxy_client.interval: unknown key"),
        (
            minimal(listener=[{"address": "127.0.0.1:25", "binding": "b1", "port": 1}]),
            "listener[0].port: unknown key",
        ),
        (
            with_binding(ha_proxy_server="127.0.0.1:5000", ha_proxy_src_addr="192.0.2.1", src="x"),
            "binding.b1.src: unknown key",
        ),
        (
            with_binding(
                ha_proxy_server="127.0.0.1:5000",
                ha_proxy_src_addr="192.0.2.1",
                domain={"a.example": {"bypass": True}},
            ),
            'binding.b1.domain."a.example".bypass: unknown key',
        ),
        (
            minimal(binding_group={"g": {"bindings": ["b1"], "members": []}}),
            "binding_group.g.members: unknown key",
        ),
        (
            minimal(domain={"a.example": {"ha_proxy_bypass": True, "x y": 1}}),
            'domain."a.example"."x y": unknown key',
        ),
    ],
)
def test_unknown_keys_are_errors(data: dict[str, Any], message: str) -> None:
    assert error_of(data) == message


# -- types and ranges --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("server", "max_connections", -1, "must be a positive integer, got -1"),
        (
            "server",
            "workers",
            0,
            'must be an integer from 1 to 1024 or "auto" (one per CPU this process may use), got 0',
        ),
        (
            "server",
            "workers",
            "all",
            'must be an integer from 1 to 1024 or "auto" (one per CPU this process may use), '
            'got "all"',
        ),
        (
            "server",
            "workers",
            1025,
            'must be an integer from 1 to 1024 or "auto" (one per CPU this process may use), '
            "got 1025",
        ),
        (
            "server",
            "workers",
            " auto",
            'must be an integer from 1 to 1024 or "auto" (one per CPU this process may use), '
            'got " auto"',
        ),
        (
            "server",
            "workers",
            True,
            'must be an integer from 1 to 1024 or "auto" (one per CPU this process may use), '
            "got true",
        ),
        ("server", "max_connections", 0, "must be a positive integer, got 0"),
        ("server", "max_connections", True, "must be a positive integer, got true"),
        ("server", "max_connections", 1.5, "must be a positive integer, got 1.5"),
        ("server", "max_connections", "10", 'must be a positive integer, got "10"'),
        ("server", "max_line_length", 0, "must be a positive integer, got 0"),
        ("server", "max_message_size", -5, "must be a positive integer, got -5"),
        ("server", "max_recipients", 0, "must be a positive integer, got 0"),
        ("server", "max_errors", 0, "must be a positive integer, got 0"),
        ("server", "client_command_timeout", 0, "must be a positive number of seconds, got 0"),
        ("server", "data_timeout", -1.0, "must be a positive number of seconds, got -1.0"),
        ("server", "shutdown_grace", False, "must be a positive number of seconds, got false"),
        ("server", "client_command_timeout", "5", 'must be a positive number of seconds, got "5"'),
        (
            "server",
            "client_command_timeout",
            float("inf"),
            "must be a positive number of seconds, got inf",
        ),
        ("server", "hostname", 5, "must be a string, got 5"),
        ("server", "hostname", "bad_host!", '"bad_host!" is not a valid host name'),
        ("server", "hostname", "", '"" is not a valid host name'),
        ("dns", "timeout", 0, "must be a positive number of seconds, got 0"),
        ("dns", "cache_size", 0, "must be a positive integer, got 0"),
        ("dns", "nameservers", "127.0.0.1", 'must be an array, got "127.0.0.1"'),
        ("delivery", "port", 0, "must be a port number (1-65535), got 0"),
        ("delivery", "port", 65536, "must be a port number (1-65535), got 65536"),
        ("delivery", "port", True, "must be a port number (1-65535), got true"),
        ("delivery", "allow_private_destinations", "yes", 'must be true or false, got "yes"'),
        (
            "delivery",
            "tls",
            "yes",
            'must be one of "disabled", "opportunistic", "required", "verify", got "yes"',
        ),
        (
            "delivery",
            "tls",
            True,
            'must be one of "disabled", "opportunistic", "required", "verify", got true',
        ),
        ("delivery", "setup_timeout", 0, "must be a positive number of seconds, got 0"),
        ("delivery", "connect_timeout", -1, "must be a positive number of seconds, got -1"),
        ("delivery", "banner_timeout", 0, "must be a positive number of seconds, got 0"),
        ("delivery", "mx_command_timeout", 0, "must be a positive number of seconds, got 0"),
        ("delivery", "data_done_timeout", 0, "must be a positive number of seconds, got 0"),
        ("delivery", "max_mx_addresses", 0, "must be a positive integer, got 0"),
        (
            "ha_proxy_client",
            "health_check_interval",
            0,
            "must be a positive number of seconds, got 0",
        ),
        (
            "ha_proxy_client",
            "health_check_timeout",
            -0.5,
            "must be a positive number of seconds, got -0.5",
        ),
        (
            "ha_proxy_client",
            "health_check_failure_threshold",
            0,
            "must be a positive integer, got 0",
        ),
        (
            "ha_proxy_client",
            "health_check_success_threshold",
            0,
            "must be a positive integer, got 0",
        ),
        (
            "ha_proxy_client",
            "health_check_success_threshold",
            2.0,
            "must be a positive integer, got 2.0",
        ),
    ],
)
def test_scalar_types_and_ranges(section: str, key: str, value: object, message: str) -> None:
    assert error_of(minimal(**{section: {key: value}})) == f"{section}.{key}: {message}"


@pytest.mark.parametrize("port", [1, 65535])
def test_delivery_port_bounds_are_inclusive(port: int) -> None:
    assert parse_config(minimal(delivery={"port": port})).delivery.port == port


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**MINIMAL, "server": []}, "server: must be a table, got an array"),
        ({**MINIMAL, "dns": "x"}, 'dns: must be a table, got "x"'),
        ({**MINIMAL, "delivery": 1}, "delivery: must be a table, got 1"),
        ({**MINIMAL, "ha_proxy_client": True}, "ha_proxy_client: must be a table, got true"),
        ({**MINIMAL, "binding": []}, "binding: must be a table, got an array"),
        ({**MINIMAL, "binding": {"b1": "x"}}, 'binding.b1: must be a table, got "x"'),
        ({**MINIMAL, "domain": []}, "domain: must be a table, got an array"),
        ({**MINIMAL, "listener": ["x"]}, 'listener[0]: must be a table, got "x"'),
        (
            {**MINIMAL, "listener": {"address": "127.0.0.1:25", "binding": "b1"}},
            "listener: must be an array of tables: write [[listener]]",
        ),
    ],
)
def test_sections_must_be_tables(data: dict[str, Any], message: str) -> None:
    assert error_of(data) == message


# -- server.allowed_clients --------------------------------------------------------------------


def test_allowed_clients_bare_addresses_are_host_networks() -> None:
    config = parse_config(minimal(server={"allowed_clients": ["10.1.2.3", "2001:db8::1"]}))
    assert config.server.allowed_clients == (
        IPv4Network("10.1.2.3/32"),
        IPv6Network("2001:db8::1/128"),
    )


@pytest.mark.parametrize(
    ("clients", "message"),
    [
        (["127.0.0.0/8", "nope"], '[1]: "nope" is not an IP network (address/prefix length)'),
        (["10.0.0.1/8"], '[0]: "10.0.0.1/8" has host bits set (did you mean 10.0.0.0/8?)'),
        (["10.0.0.0/33"], '[0]: "10.0.0.0/33" is not an IP network (address/prefix length)'),
        ([5], "[0]: must be a string, got 5"),
        ([], ": must list at least one network (no client could connect)"),
        ("127.0.0.1", ': must be an array, got "127.0.0.1"'),
    ],
)
def test_allowed_clients_errors(clients: object, message: str) -> None:
    assert error_of(minimal(server={"allowed_clients": clients})) == (
        f"server.allowed_clients{message}"
    )


# -- listeners ---------------------------------------------------------------------------------


def listeners(*items: dict[str, Any]) -> dict[str, Any]:
    return minimal(listener=list(items), binding_group={"pool": {"bindings": ["b1"]}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"binding": MINIMAL["binding"]}, "listener: at least one [[listener]] is required"),
        (listeners(), "listener: at least one [[listener]] is required"),
        (
            listeners({"binding": "b1"}),
            "listener[0].address: missing (the local ip:port to listen on)",
        ),
        (
            listeners({"address": "127.0.0.1:2525"}),
            "listener[0]: set exactly one of binding, binding_group",
        ),
        (
            listeners({"address": "127.0.0.1:2525", "binding": "b1", "binding_group": "pool"}),
            "listener[0]: set exactly one of binding, binding_group",
        ),
        (
            listeners(
                {"address": "127.0.0.1:2525", "binding": "b1"},
                {"address": "127.0.0.1:2526", "binding": "b9"},
            ),
            'listener[1].binding: no binding named "b9"',
        ),
        (
            listeners({"address": "127.0.0.1:2525", "binding_group": "b1"}),
            'listener[0].binding_group: no binding_group named "b1"',
        ),
        (
            listeners({"address": "127.0.0.1:2525", "binding": 1}),
            "listener[0].binding: must be a string, got 1",
        ),
        (
            listeners(
                {"address": "127.0.0.1:2525", "binding": "b1"},
                {"address": "127.0.0.1:2525", "binding_group": "pool"},
            ),
            'listener[1].address: "127.0.0.1:2525" is also listener[0]',
        ),
        (
            listeners(
                {"address": "[::1]:2525", "binding": "b1"},
                {"address": "[0:0::1]:2525", "binding": "b1"},
            ),
            'listener[1].address: "[::1]:2525" is also listener[0]',
        ),
        (
            listeners({"address": "localhost:2525", "binding": "b1"}),
            'listener[0].address: host must be an IP address, got "localhost"',
        ),
        (
            listeners({"address": "127.0.0.1", "binding": "b1"}),
            'listener[0].address: "127.0.0.1" has no port (write host:port)',
        ),
        (
            listeners({"address": "::1", "binding": "b1"}),
            'listener[0].address: "::1" has no port (write an IPv6 address as [::1]:port)',
        ),
        (
            listeners({"address": "127.0.0.1:0", "binding": "b1"}),
            'listener[0].address: "0" in "127.0.0.1:0" is not a port (1-65535)',
        ),
        (
            listeners({"address": "127.0.0.1:65536", "binding": "b1"}),
            'listener[0].address: "65536" in "127.0.0.1:65536" is not a port (1-65535)',
        ),
        (
            listeners({"address": "127.0.0.1:smtp", "binding": "b1"}),
            'listener[0].address: "smtp" in "127.0.0.1:smtp" is not a port (1-65535)',
        ),
        (
            listeners({"address": "[127.0.0.1]:25", "binding": "b1"}),
            'listener[0].address: "127.0.0.1" in brackets is not an IPv6 address',
        ),
        (
            listeners({"address": "[::1:25", "binding": "b1"}),
            'listener[0].address: "[::1:25" has an unclosed [',
        ),
        (
            listeners({"address": "[::1]25", "binding": "b1"}),
            'listener[0].address: "[::1]25" is not [ipv6]:port',
        ),
    ],
)
def test_listener_errors(data: dict[str, Any], message: str) -> None:
    assert error_of(data) == message


def test_listener_addresses_are_normalised() -> None:
    config = parse_config(listeners({"address": "[0:0::1]:2525", "binding_group": "pool"}))
    assert config.listeners == (Listener(address=HostPort("::1", 2525), binding_group="pool"),)
    assert str(config.listeners[0].address) == "[::1]:2525"


# -- bindings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"ha_proxy_src_addr": "192.0.2.1"},
            "binding.b1.ha_proxy_server: missing (the HAProxy host:port)",
        ),
        (
            {"ha_proxy_server": [], "ha_proxy_src_addr": "192.0.2.1"},
            "binding.b1.ha_proxy_server: must name at least one HAProxy host:port",
        ),
        (
            {"ha_proxy_server": 5000, "ha_proxy_src_addr": "192.0.2.1"},
            "binding.b1.ha_proxy_server: must be a host:port string or an array of them, got 5000",
        ),
        (
            {"ha_proxy_server": "10.0.0.5", "ha_proxy_src_addr": "192.0.2.1"},
            'binding.b1.ha_proxy_server: "10.0.0.5" has no port (write host:port)',
        ),
        (
            {"ha_proxy_server": ["10.0.0.5:5000", "haproxy"], "ha_proxy_src_addr": "192.0.2.1"},
            'binding.b1.ha_proxy_server[1]: "haproxy" has no port (write host:port)',
        ),
        (
            {"ha_proxy_server": ["10.0.0.5:5000", 1], "ha_proxy_src_addr": "192.0.2.1"},
            "binding.b1.ha_proxy_server[1]: must be a string, got 1",
        ),
        (
            {
                "ha_proxy_server": ["10.0.0.5:5000", "10.0.0.5:5000"],
                "ha_proxy_src_addr": "192.0.2.1",
            },
            'binding.b1.ha_proxy_server[1]: "10.0.0.5:5000" is listed twice',
        ),
        (
            {"ha_proxy_server": "bad_name:5000", "ha_proxy_src_addr": "192.0.2.1"},
            'binding.b1.ha_proxy_server: "bad_name" is not an IP address or host name',
        ),
        (
            {"ha_proxy_server": "2001:db8::5:5000", "ha_proxy_src_addr": "192.0.2.1"},
            'binding.b1.ha_proxy_server: "2001:db8::5:5000" has no port '
            "(write an IPv6 address as [2001:db8::5:5000]:port)",
        ),
        (
            {"ha_proxy_server": "10.0.0.5:5000"},
            "binding.b1: set ha_proxy_src_addr (IPv4), ha_proxy_ipv6_src_addr (IPv6) or both",
        ),
        (
            {"ha_proxy_server": "10.0.0.5:5000", "ha_proxy_src_addr": "1.2.3"},
            'binding.b1.ha_proxy_src_addr: "1.2.3" is not an IPv4 address',
        ),
        (
            {"ha_proxy_server": "10.0.0.5:5000", "ha_proxy_src_addr": "2001:db8::1"},
            'binding.b1.ha_proxy_src_addr: "2001:db8::1" is not an IPv4 address',
        ),
        (
            {"ha_proxy_server": "10.0.0.5:5000", "ha_proxy_src_addr": "0.0.0.0"},
            'binding.b1.ha_proxy_src_addr: "0.0.0.0" cannot be a source address',
        ),
        (
            {"ha_proxy_server": "10.0.0.5:5000", "ha_proxy_src_addr": 3221225985},
            "binding.b1.ha_proxy_src_addr: must be a string, got 3221225985",
        ),
        (
            {"ha_proxy_server": "10.0.0.5:5000", "ha_proxy_ipv6_src_addr": "192.0.2.1"},
            'binding.b1.ha_proxy_ipv6_src_addr: "192.0.2.1" is not an IPv6 address',
        ),
        (
            {"ha_proxy_server": "10.0.0.5:5000", "ha_proxy_ipv6_src_addr": "ff02::1"},
            'binding.b1.ha_proxy_ipv6_src_addr: "ff02::1" cannot be a source address',
        ),
        (
            {
                "ha_proxy_server": "10.0.0.5:5000",
                "ha_proxy_src_addr": "192.0.2.1",
                "ehlo_hostname": "out 1",
            },
            'binding.b1.ehlo_hostname: "out 1" is not a valid host name',
        ),
    ],
)
def test_binding_errors(fields: dict[str, Any], message: str) -> None:
    assert error_of(with_binding(**fields)) == message


def test_binding_with_only_ipv6_source_is_valid() -> None:
    config = parse_config(
        with_binding(ha_proxy_server="[2001:db8::5]:5000", ha_proxy_ipv6_src_addr="2001:db8::10")
    )
    binding = config.bindings["b1"]
    assert binding.ha_proxy_src_addr is None
    assert binding.ha_proxy_ipv6_src_addr == IPv6Address("2001:db8::10")
    assert binding.ha_proxy_server == (HostPort("2001:db8::5", 5000),)


def test_ha_proxy_server_dns_name_is_lower_cased() -> None:
    config = parse_config(
        with_binding(ha_proxy_server="HAProxy.Example.com:5000", ha_proxy_src_addr="192.0.2.1")
    )
    assert config.bindings["b1"].ha_proxy_server == (HostPort("haproxy.example.com", 5000),)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (minimal(binding={}), "binding: at least one [binding.NAME] table is required"),
        (
            {"listener": MINIMAL["listener"]},
            "binding: at least one [binding.NAME] table is required",
        ),
        (
            minimal(binding={"b 1": MINIMAL["binding"]["b1"]}),
            'binding."b 1": a binding name may use only letters, digits, "_", "-" and "."',
        ),
    ],
)
def test_binding_table_errors(data: dict[str, Any], message: str) -> None:
    assert error_of(data) == message


# -- binding groups ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("group", "message"),
    [
        ({}, "binding_group.pool.bindings: missing (the names of the group's bindings)"),
        ({"bindings": []}, "binding_group.pool.bindings: must name at least one binding"),
        ({"bindings": "b1"}, 'binding_group.pool.bindings: must be an array, got "b1"'),
        ({"bindings": ["b1", "b9"]}, 'binding_group.pool.bindings[1]: no binding named "b9"'),
        ({"bindings": ["b1", "b1"]}, 'binding_group.pool.bindings[1]: "b1" is listed twice'),
        ({"bindings": [1]}, "binding_group.pool.bindings[0]: must be a string, got 1"),
        (
            {"bindings": ["b1"], "selection": "random"},
            'binding_group.pool.selection: must be one of "round-robin", "hash", got "random"',
        ),
        (
            {"bindings": ["b1"], "selection": "Hash"},
            'binding_group.pool.selection: must be one of "round-robin", "hash", got "Hash"',
        ),
        (
            {"bindings": ["b1"], "selection": True},
            'binding_group.pool.selection: must be one of "round-robin", "hash", got true',
        ),
        (
            {"bindings": ["b1"], "domain": {"-bad.example": {}}},
            'binding_group.pool.domain."-bad.example": "-bad.example" is not a valid domain name',
        ),
    ],
)
def test_binding_group_errors(group: dict[str, Any], message: str) -> None:
    assert error_of(minimal(binding_group={"pool": group})) == message


@pytest.mark.parametrize("selection", ["round-robin", "hash"])
def test_binding_group_selection(selection: str) -> None:
    config = parse_config(
        minimal(binding_group={"pool": {"bindings": ["b1"], "selection": selection}})
    )
    assert config.binding_groups["pool"].selection == selection
    assert roundtrip(config) == config


def test_binding_group_selection_defaults_to_round_robin() -> None:
    config = parse_config(minimal(binding_group={"pool": {"bindings": ["b1"]}}))
    assert config.binding_groups["pool"].selection == "round-robin"
    assert BindingGroup("pool", ("b1",)).selection == "round-robin"
    groups = config_to_dict(config)["binding_group"]
    assert groups == {"pool": {"bindings": ["b1"], "selection": "round-robin"}}


# -- ha_proxy_client.health_check_probe --------------------------------------------------------


@pytest.mark.parametrize(
    ("probe", "expected"),
    [
        ("192.0.2.25:25", HostPort("192.0.2.25", 25)),
        ("[2001:DB8::25]:2525", HostPort("2001:db8::25", 2525)),
    ],
)
def test_health_check_probe(probe: str, expected: HostPort) -> None:
    config = parse_config(minimal(ha_proxy_client={"health_check_probe": probe}))
    assert config.ha_proxy_client.health_check_probe == expected
    assert roundtrip(config) == config
    health = config_to_dict(config)["ha_proxy_client"]
    assert isinstance(health, dict) and health["health_check_probe"] == str(expected)


@pytest.mark.parametrize(
    ("probe", "message"),
    [
        ("mx.example:25", 'host must be an IP address, got "mx.example"'),
        ("192.0.2.25", '"192.0.2.25" has no port (write host:port)'),
        (
            "2001:db8::25",
            '"2001:db8::25" has no port (write an IPv6 address as [2001:db8::25]:port)',
        ),
        ("192.0.2.25:0", '"0" in "192.0.2.25:0" is not a port (1-65535)'),
        (25, "must be a string, got 25"),
        ("0.0.0.0:25", '"0.0.0.0" cannot be a probe destination'),
        ("[::]:25", '"::" cannot be a probe destination'),
    ],
)
def test_health_check_probe_errors(probe: object, message: str) -> None:
    error = error_of(minimal(ha_proxy_client={"health_check_probe": probe}))
    assert error == f"ha_proxy_client.health_check_probe: {message}"


def test_health_check_probe_is_left_out_of_the_dict_when_unset() -> None:
    health = config_to_dict(parse_config(MINIMAL))["ha_proxy_client"]
    assert isinstance(health, dict) and "health_check_probe" not in health


def test_binding_group_name_must_not_shadow_a_binding() -> None:
    assert error_of(minimal(binding_group={"b1": {"bindings": ["b1"]}})) == (
        'binding_group.b1: the name "b1" is already used by a binding'
    )


# -- domains and dns ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "message"),
    [
        ({"a..example": {}}, 'domain."a..example": "a..example" is not a valid domain name'),
        (
            {"under_score.example": {}},
            'domain."under_score.example": "under_score.example" is not a valid domain name',
        ),
        ({"192.0.2.1": {}}, 'domain."192.0.2.1": "192.0.2.1" is not a valid domain name'),
        ({"": {}}, 'domain."": "" is not a valid domain name'),
        (
            {"bücher.example": {}},
            'domain."bücher.example": "bücher.example" is not a valid domain name '
            "(write it in A-label form, xn--...)",
        ),
        (
            {"a" * 64 + ".example": {}},
            f'domain."{"a" * 64}.example": "{"a" * 64}.example" is not a valid domain name',
        ),
        (
            {"x.example": {"ha_proxy_bypass": "true"}},
            'domain."x.example".ha_proxy_bypass: must be true or false, got "true"',
        ),
        ({"x.example": True}, 'domain."x.example": must be a table, got true'),
        (
            {"X.example": {}, "x.example": {"ha_proxy_bypass": True}},
            'domain."x.example": "x.example" is configured twice',
        ),
    ],
)
def test_domain_errors(domain: dict[str, Any], message: str) -> None:
    assert error_of(minimal(domain=domain)) == message


def test_domain_names_are_lower_cased_everywhere() -> None:
    config = parse_config(
        minimal(
            binding={
                "b1": {
                    **MINIMAL["binding"]["b1"],
                    "domain": {"Internal.EXAMPLE": {"ha_proxy_bypass": True}},
                }
            },
            binding_group={"g": {"bindings": ["b1"], "domain": {"G.Example": {}}}},
            domain={"Top.Example.": {"ha_proxy_bypass": False}},
            dns={"static": {"Static.Example": ["MX.Static.Example"]}},
        )
    )
    assert list(config.bindings["b1"].domains) == ["internal.example"]
    assert list(config.binding_groups["g"].domains) == ["g.example"]
    assert config.domains == {"top.example": DomainPolicy(ha_proxy_bypass=False)}
    assert config.dns.static == {"static.example": ("mx.static.example",)}


@pytest.mark.parametrize(
    ("dns", "message"),
    [
        (
            {"nameservers": ["dns.example"]},
            'dns.nameservers[0]: host must be an IP address, got "dns.example"',
        ),
        (
            {"nameservers": ["127.0.0.1:0"]},
            'dns.nameservers[0]: "0" in "127.0.0.1:0" is not a port (1-65535)',
        ),
        ({"nameservers": [53]}, "dns.nameservers[0]: must be a string, got 53"),
        (
            {"static": {"a.example": []}},
            'dns.static."a.example": must list at least one MX host name or IP address',
        ),
        (
            {"static": {"a.example": "mx.a.example"}},
            'dns.static."a.example": must be an array of MX host names or IP addresses, '
            'got "mx.a.example"',
        ),
        (
            {"static": {"a.example": ["mx.a.example", "bad host"]}},
            'dns.static."a.example"[1]: "bad host" is not a host name or IP address',
        ),
        (
            {"static": {"a_b.example": ["mx.a.example"]}},
            'dns.static."a_b.example": "a_b.example" is not a valid domain name',
        ),
        (
            {"static": {"A.example": ["192.0.2.1"], "a.example": ["192.0.2.2"]}},
            'dns.static."a.example": "a.example" is configured twice',
        ),
        ({"static": []}, "dns.static: must be a table, got an array"),
    ],
)
def test_dns_errors(dns: dict[str, Any], message: str) -> None:
    assert error_of(minimal(dns=dns)) == message


# -- round trip --------------------------------------------------------------------------------


def roundtrip(config: Config) -> Config:
    return parse_config(tomllib.loads(tomli_w.dumps(config_to_dict(config))))


def test_full_config_round_trips() -> None:
    config = parse_config(tomllib.loads(FULL_TOML))
    assert roundtrip(config) == config


def test_minimal_config_round_trips_with_defaults_filled_in() -> None:
    config = parse_config(MINIMAL)
    assert roundtrip(config) == config
    out = config_to_dict(config)
    assert out["delivery"] == {
        "port": 25,
        "allow_private_destinations": False,
        "tls": "opportunistic",
        "dane": False,
        "mta_sts": True,
        "state_dir": "/var/lib/sidecar",
        # RFC 5321 section 4.5.3.2 values, cut to fit the MTA's own waits (issue 10, item 8)
        "setup_timeout": 240.0,
        "connect_timeout": 10.0,
        "banner_timeout": 300.0,
        "mx_command_timeout": 300.0,
        "data_init_timeout": 100.0,
        "data_send_timeout": 150.0,
        "data_done_timeout": 480.0,
        "max_mx_addresses": 5,
        "connection_cache": True,
        "connection_cache_idle": 5.0,
        "connection_cache_size": 100,
        "connection_reuse_limit": 100,
    }
    assert "binding_group" not in out
    assert "domain" not in out


def test_config_to_dict_shape() -> None:
    out = config_to_dict(parse_config(tomllib.loads(FULL_TOML)))
    assert out["listener"] == [
        {"address": "127.0.0.1:2525", "binding": "b1", "protocol": "smtp", "max_routes": 20},
        {"address": "[::1]:2526", "binding_group": "pool", "protocol": "smtp", "max_routes": 20},
    ]
    assert out["binding"] == {
        "b1": {
            "ha_proxy_server": "10.0.0.5:5000",
            "ha_proxy_src_addr": "192.0.2.10",
            "ha_proxy_ipv6_src_addr": "2001:db8::10",
            "ehlo_hostname": "out1.example.com",
            "domain": {"internal.example": {"ha_proxy_bypass": True}},
        },
        "b2": {
            "ha_proxy_server": ["haproxy1.example.com:5000", "[2001:db8::5]:5000"],
            "ha_proxy_ipv6_src_addr": "2001:db8::11",
        },
    }
    assert out["binding_group"] == {
        "pool": {
            "bindings": ["b1", "b2"],
            "selection": "hash",
            "domain": {"x.example": {"ha_proxy_bypass": False}},
        }
    }
    assert out["domain"] == {"y.example": {"ha_proxy_bypass": True}, "z.example": {}}
    server = out["server"]
    assert isinstance(server, dict)
    assert server["allowed_clients"] == ["127.0.0.0/8", "::1/128", "192.0.2.7/32"]
    dns = out["dns"]
    assert isinstance(dns, dict)
    assert dns["nameservers"] == [
        "127.0.0.1:5353",
        "192.0.2.53:53",
        "[2001:db8::53]:5300",
        "[2001:db8::54]:53",
    ]


def test_config_error_carries_path_and_problem() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(minimal(server={"max_connections": -1}))
    assert info.value.path == "server.max_connections"
    assert info.value.problem == "must be a positive integer, got -1"
    assert str(info.value) == "server.max_connections: must be a positive integer, got -1"


def test_status_section() -> None:
    base = {
        "listener": [{"address": "127.0.0.1:2525", "binding": "b1"}],
        "binding": {"b1": {"ha_proxy_server": "127.0.0.1:5000", "ha_proxy_src_addr": "192.0.2.1"}},
    }
    assert parse_config(base).status.address is None
    config = parse_config({**base, "status": {"address": "127.0.0.1:9925"}})
    assert config.status.address == HostPort("127.0.0.1", 9925)
    assert parse_config(tomllib.loads(tomli_w.dumps(config_to_dict(config)))) == config
    with pytest.raises(ConfigError, match=r"^status\.address: "):
        parse_config({**base, "status": {"address": "nowhere"}})
    with pytest.raises(ConfigError, match=r"^status\.port: unknown key"):
        parse_config({**base, "status": {"port": 1}})


def test_status_port_leaves_room_for_every_worker() -> None:
    """Worker i serves its status on port + i: past 65535 getaddrinfo would wrap the port to
    0 (a random one) or 1, silently."""
    status = {"address": "127.0.0.1:65534"}
    assert parse_config(minimal(server={"workers": 2}, status=status)).server.workers == 2
    with pytest.raises(ConfigError) as info:
        parse_config(minimal(server={"workers": 3}, status=status))
    assert info.value.path == "status.address"
    assert "no room for the status ports of 3 workers" in info.value.problem
    assert parse_config(minimal(server={"workers": "auto"}, status=status)).status.address


def test_tls_verify_ca_file_and_per_domain_tls(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    base: dict[str, Any] = {
        "listener": [{"address": "127.0.0.1:2525", "binding": "b1"}],
        "delivery": {"tls": "verify", "tls_ca_file": str(ca)},
        "domain": {"bank.example": {"tls": "verify"}},
        "binding": {
            "b1": {
                "ha_proxy_server": "127.0.0.1:5000",
                "ha_proxy_src_addr": "192.0.2.1",
                "domain": {"old.example": {"tls": "disabled"}},
            }
        },
    }
    config = parse_config(base)
    assert config.delivery.tls == "verify" and config.delivery.tls_ca_file == str(ca)
    assert config.domains["bank.example"] == DomainPolicy(tls="verify")
    assert config.bindings["b1"].domains["old.example"] == DomainPolicy(tls="disabled")
    assert parse_config(tomllib.loads(tomli_w.dumps(config_to_dict(config)))) == config
    # The bundle was loaded as it will be used: one context, built once, with its CA.
    context = config.delivery.tls_verify_context
    assert context is not None and len(context.get_ca_certs()) == 1
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert "tls_verify_context" not in config_to_dict(config)["delivery"]  # type: ignore[operator]
    bad = copy.deepcopy(base)
    bad["domain"]["bank.example"]["tls"] = "maybe"
    with pytest.raises(ConfigError, match=r'^domain\."bank\.example"\.tls: must be one of'):
        parse_config(bad)


def _with_ca_file(name: str) -> dict[str, Any]:
    return {
        "listener": [{"address": "127.0.0.1:2525", "binding": "b1"}],
        "delivery": {"tls": "verify", "tls_ca_file": name},
        "binding": {"b1": {"ha_proxy_server": "127.0.0.1:5000", "ha_proxy_src_addr": "192.0.2.1"}},
    }


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, 'cannot read "{}": No such file or directory'),
        ("directory", 'cannot read "{}": Is a directory'),
        ("", '"{}" is not a PEM CA bundle: no certificate or crl found'),
        ("not a certificate\n", '"{}" is not a PEM CA bundle: no certificate or crl found'),
        (
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
            '"{}" is not a PEM CA bundle: ',
        ),
    ],
    ids=["missing", "directory", "empty", "text", "garbage-pem"],
)
def test_a_ca_file_that_cannot_be_used_is_a_config_error(
    tmp_path: Path, content: str | None, problem: str
) -> None:
    """Issue 10 item 13: the bundle is read as delivery will use it, at check, start and
    SIGHUP; before, a garbage file passed and each verified delivery ended in a traceback."""
    path = tmp_path / "ca.pem"
    if content == "directory":
        path.mkdir()
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        parse_config(_with_ca_file(str(path)))
    assert str(info.value).startswith("delivery.tls_ca_file: " + problem.format(path)), info.value
    assert info.value.path == "delivery.tls_ca_file"


def test_tls_verify_context_is_no_configuration_key(tmp_path: Path) -> None:
    data = _with_ca_file(str(tmp_path / "x.pem"))
    del data["delivery"]["tls_ca_file"]
    data["delivery"]["tls_verify_context"] = "x"
    with pytest.raises(ConfigError, match=r"^delivery\.tls_verify_context: unknown key$"):
        parse_config(data)


# -- LMTP listeners (issue 16) -------------------------------------------------------------------


def test_listener_protocol_defaults_to_smtp_and_takes_lmtp() -> None:
    config = parse_config(
        listeners(
            {"address": "127.0.0.1:2525", "binding_group": "pool"},
            {"address": "127.0.0.1:2424", "binding_group": "pool", "protocol": "lmtp"},
        )
    )
    assert [listener.protocol for listener in config.listeners] == ["smtp", "lmtp"]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (
            {"address": "127.0.0.1:25", "binding_group": "pool", "protocol": "lmtp"},
            'listener[0].protocol: "lmtp" on port 25 (RFC 2033 section 5: never on the SMTP port)',
        ),
        (
            {"address": "127.0.0.1:2424", "binding_group": "pool", "protocol": "LMTP"},
            'listener[0].protocol: must be one of "smtp", "lmtp", got "LMTP"',
        ),
    ],
)
def test_listener_protocol_errors(item: dict[str, Any], message: str) -> None:
    assert error_of(listeners(item)) == message


@pytest.mark.parametrize("value", ["state", "./state", "var/lib/sidecar", ""])
def test_state_dir_must_be_an_absolute_path(value: str) -> None:
    """sidecar run (a service, its working directory /), sidecar check (the operator's shell)
    and sidecar tls-report (cron, the user's home) run in different directories: a relative
    state_dir would give each its own store, and tls-report would read an empty one."""
    assert error_of(minimal(delivery={"state_dir": value})) == (
        f'delivery.state_dir: must be an absolute path, got "{value}"'
    )
