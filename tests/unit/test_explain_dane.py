"""DANE in ``sidecar check`` (a warning when the resolver cannot be told to be a local
validating one) and ``sidecar route`` (the TLS policy per MX and why), without sockets."""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path

import pytest
from click.testing import CliRunner

from sidecar.cli import main
from sidecar.config import parse_config
from sidecar.explain import dane_resolver_warning, explain_tls
from sidecar.health import HealthRegistry
from sidecar.mxtls.dane import DanePolicy, TlsaRecord
from sidecar.resolver import MXHost, MXResult, Resolver
from sidecar.routing import Router

BASE = """
[[listener]]
address = "127.0.0.1:2525"
binding = "b1"

[binding.b1]
ha_proxy_server = "127.0.0.1:5000"
ha_proxy_src_addr = "192.0.2.10"
"""


@pytest.mark.parametrize(
    ("extra", "warned"),
    [
        ("", None),  # DANE off: nothing to say
        ("[delivery]\ndane = true\n", "dns.nameservers is empty"),
        ('[delivery]\ndane = true\n[dns]\nnameservers = ["192.0.2.53"]\n', "not on loopback"),
        ('[delivery]\ndane = true\n[dns]\nnameservers = ["127.0.0.1:5353", "::1"]\n', None),
        ('[domain."d.test"]\ndane = true\n', "dns.nameservers is empty"),
        ('[binding.b1.domain."d.test"]\ndane = true\n', "dns.nameservers is empty"),
    ],
)
def test_check_warns_when_dane_cannot_trust_the_resolver(
    tmp_path: Path, extra: str, warned: str | None
) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text(BASE + extra, encoding="utf-8")
    result = CliRunner().invoke(main, ["check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    if warned is None:
        assert "dane" not in result.stderr
    else:
        assert result.stderr.startswith("warning: dane is on and "), result.stderr
        assert warned in result.stderr and "validating resolver" in result.stderr


def test_the_warning_names_every_remote_nameserver() -> None:
    config = parse_config(
        {
            "listener": [{"address": "127.0.0.1:2525", "binding": "b1"}],
            "binding": {
                "b1": {"ha_proxy_server": "127.0.0.1:5000", "ha_proxy_src_addr": "192.0.2.1"}
            },
            "delivery": {"dane": True},
            "dns": {"nameservers": ["127.0.0.53", "198.51.100.1", "[2001:db8::1]:53"]},
        }
    )
    warning = dane_resolver_warning(config)
    assert warning is not None
    assert "198.51.100.1:53" in warning and "[2001:db8::1]:53" in warning
    assert "127.0.0.53" not in warning


def test_route_explains_the_policy_of_each_mx() -> None:
    config = parse_config(
        {
            "listener": [{"address": "127.0.0.1:2525", "binding": "b1"}],
            "binding": {
                "b1": {"ha_proxy_server": "127.0.0.1:5000", "ha_proxy_src_addr": "192.0.2.1"}
            },
            "dns": {"nameservers": ["127.0.0.1"]},
            "delivery": {"dane": True, "allow_private_destinations": True},
        }
    )
    servers = [s for b in config.bindings.values() for s in b.ha_proxy_server]
    router = Router(config, Resolver(config.dns), HealthRegistry(servers, config.ha_proxy_client))
    ee = TlsaRecord(3, 1, 1, bytes(range(32)))
    hosts = (
        MXHost(
            "a.d.test",
            10,
            (ip_address("127.0.0.5"),),
            secure=True,
            dane=DanePolicy.from_records("a.d.test", [ee], tlsa_name="_25._tcp.a.d.test"),
        ),
        MXHost(
            "b.d.test",
            20,
            (ip_address("127.0.0.6"),),
            insecure="its address records are not DNSSEC-signed",
        ),
        MXHost(
            "c.d.test",
            30,
            (ip_address("127.0.0.7"),),
            dane_failure="DANE: TLSA lookup for _25._tcp.c.d.test failed, MX c.d.test not used",
        ),
    )
    route = router.candidates(
        "d.test",
        config.bindings["b1"],
        False,
        MXResult("d.test", hosts, secure=True),
        "opportunistic",
    )
    lines = explain_tls(router, route, None)
    assert lines[0] == "tls policy per MX (DANE is on for d.test; its MX RRset is DNSSEC-secure):"
    assert lines[1] == "  a.d.test: dane (TLSA _25._tcp.a.d.test: DANE-EE 1 1 0001020304050607)"
    assert lines[2] == "    DANE-TA names: a.d.test"
    assert (
        lines[3] == "  b.d.test: opportunistic (no DANE: its address records are not DNSSEC-signed)"
    )
    assert lines[4].startswith("  c.d.test: not used (DANE: TLSA lookup for _25._tcp.c.d.test")
    insecure = router.candidates(
        "d.test",
        config.bindings["b1"],
        False,
        MXResult("d.test", hosts[:2], secure=False),
        "verify",
    )
    assert "NOT DNSSEC-secure: DANE does not apply" in explain_tls(router, insecure, None)[0]
    off = parse_config({**config_dict(), "delivery": {"allow_private_destinations": True}})
    router_off = Router(off, Resolver(off.dns), HealthRegistry(servers, off.ha_proxy_client))
    assert explain_tls(router_off, insecure, None) == []  # the "tls:" line says it all


def config_dict() -> dict[str, object]:
    return {
        "listener": [{"address": "127.0.0.1:2525", "binding": "b1"}],
        "binding": {"b1": {"ha_proxy_server": "127.0.0.1:5000", "ha_proxy_src_addr": "192.0.2.1"}},
    }
