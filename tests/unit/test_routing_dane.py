"""DANE in routing and the upstream's per-MX policy (no sockets): which domains are under
DANE, candidates carry their host's DANE policy, a route's key tells DANE routes apart, a
domain whose secure MX hosts all failed their TLSA look-up gets 451 4.7.5, and
:func:`sidecar.upstream.effective_policy`."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

import pytest

from sidecar.config import Config, parse_config
from sidecar.errors import RouteError
from sidecar.health import HealthRegistry
from sidecar.mxtls.dane import DanePolicy, TlsaRecord
from sidecar.resolver import MXHost, MXResult, Resolver
from sidecar.routing import Router
from sidecar.upstream import effective_policy

EE = TlsaRecord(3, 1, 1, b"\x01" * 32)
PKIX = TlsaRecord(1, 1, 1, b"\x01" * 32)


def make(**delivery: Any) -> tuple[Router, Config]:
    config = parse_config(
        {
            "listener": [{"address": "127.0.0.1:2525", "binding": "b1"}],
            "dns": {"nameservers": ["127.0.0.1:53"]},
            "binding": {
                "b1": {"ha_proxy_server": "127.0.0.1:5001", "ha_proxy_src_addr": "192.0.2.1"}
            },
            "delivery": {"allow_private_destinations": True, "port": 2525, **delivery},
            "domain": {"on.test": {"dane": True}, "off.test": {"dane": False}},
        }
    )
    servers = [s for b in config.bindings.values() for s in b.ha_proxy_server]
    router = Router(config, Resolver(config.dns), HealthRegistry(servers, config.ha_proxy_client))
    return router, config


def mx(*hosts: MXHost, secure: bool | None = True) -> MXResult:
    return MXResult("d.test", hosts, secure=secure)


def host(name: str, address: str, **fields: Any) -> MXHost:
    return MXHost(name, 10, (ip_address(address),), **fields)


def test_dane_follows_the_domain_then_delivery_dane() -> None:
    router, config = make()
    binding = config.bindings["b1"]
    assert router.dane_enabled(binding, None, "on.test")
    assert not router.dane_enabled(binding, None, "other.test")
    router, config = make(dane=True)
    assert router.dane_enabled(binding, None, "other.test")
    assert not router.dane_enabled(binding, None, "off.test")
    assert router.resolver.tlsa_port == 2525  # TLSA records of the delivery port


def test_candidates_carry_their_hosts_dane_policy_and_the_key_tells_routes_apart() -> None:
    router, config = make()
    binding = config.bindings["b1"]
    dane = DanePolicy.from_records("a.d.test", [EE])
    with_dane = router.candidates(
        "d.test",
        binding,
        False,
        mx(host("a.d.test", "127.0.0.5", secure=True, dane=dane), host("b.d.test", "127.0.0.6")),
        "opportunistic",
    )
    assert [c.dane for c in with_dane.candidates] == [dane, None]
    without = router.candidates(
        "d.test",
        binding,
        False,
        mx(host("a.d.test", "127.0.0.5"), host("b.d.test", "127.0.0.6"), secure=None),
        "opportunistic",
    )
    assert with_dane.key.site == without.key.site
    assert with_dane.key != without.key  # no connection reused across the two policies
    assert with_dane.key.dane == ("a.d.test",) and without.key.dane == ()


def test_a_host_whose_tlsa_lookup_failed_is_skipped_and_none_left_is_451_4_7_5() -> None:
    router, config = make()
    binding = config.bindings["b1"]
    failed = "DANE: TLSA lookup for _25._tcp.a.d.test failed, MX a.d.test not used"
    route = router.candidates(
        "d.test",
        binding,
        False,
        mx(host("a.d.test", "127.0.0.5", dane_failure=failed), host("b.d.test", "127.0.0.6")),
        "opportunistic",
    )
    assert [c.mx for c in route.candidates] == ["b.d.test"]
    assert any("TLSA lookup" in reason for reason in route.skipped)
    with pytest.raises(RouteError) as caught:
        router.candidates(
            "d.test",
            binding,
            False,
            mx(host("a.d.test", "127.0.0.5", dane_failure=failed)),
            "verify",
        )
    reply = caught.value.reply
    assert reply.code == 451 and reply.text.startswith("4.7.5 ")
    assert "DANE" in reply.text and "_25._tcp.a.d.test" in reply.text


@pytest.mark.parametrize(
    ("records", "tls", "expected"),
    [
        ((EE,), "opportunistic", ("required", "dane")),
        ((EE,), "disabled", ("required", "dane")),  # DANE takes precedence
        ((EE, PKIX), "verify", ("required", "dane")),
        ((PKIX,), "opportunistic", ("required", "required")),  # RFC 7672 3.1.3
        ((PKIX,), "disabled", ("required", "required")),
        ((PKIX,), "verify", ("verify", "verify")),  # the stronger configured check stays
        ((), "opportunistic", ("opportunistic", "opportunistic")),
        ((), "disabled", ("disabled", "none")),
        ((), "required", ("required", "required")),
    ],
)
def test_effective_policy(
    records: tuple[TlsaRecord, ...], tls: str, expected: tuple[str, str]
) -> None:
    router, config = make()
    dane = DanePolicy.from_records("a.d.test", records) if records else None
    route = router.candidates(
        "d.test",
        config.bindings["b1"],
        False,
        mx(host("a.d.test", "127.0.0.5", dane=dane)),
        tls,  # type: ignore[arg-type]
    )
    assert effective_policy(route, route.candidates[0]) == expected


def test_a_failed_tlsa_lookup_is_reported_for_tls_rpt_as_dnssec_invalid() -> None:
    """RFC 8460 section 4.3.2: a secure MX host whose TLSA look-up failed (the validating
    resolver's SERVFAIL: a bogus signature, an unreachable zone) is skipped, and the skip is
    a failed session of the domain's DANE policy ("dnssec-invalid"), not silence: the
    domain's operator learns of it from the report."""
    from sidecar.mxtls.outcome import TlsOutcome

    router, config = make()
    outcomes: list[TlsOutcome] = []
    router.report = outcomes.append
    why = "DANE: TLSA lookup for _25._tcp.a.d.test failed, MX a.d.test not used"
    route = router.candidates(
        "d.test",
        config.bindings["b1"],
        False,
        mx(
            host("a.d.test", "127.0.0.5", secure=True, dane_failure=why),
            host("b.d.test", "127.0.0.6"),
        ),
        "opportunistic",
    )
    assert [c.mx for c in route.candidates] == ["b.d.test"]
    (outcome,) = outcomes
    assert (outcome.policy_domain, outcome.policy_type) == ("d.test", "tlsa")
    assert (outcome.mx_host, outcome.result, outcome.detail) == ("a.d.test", "dnssec-invalid", why)
    assert outcome.sending_ip == "192.0.2.1"
