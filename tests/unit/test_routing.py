"""sidecar.routing: picking a binding_group member, round-robin or by a hash of the recipient
domain (no sockets: the health registry is driven by hand, the resolver is never asked)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import dns.name
import dns.resolver
import pytest

from sidecar.config import Config, ConfigError, HostPort, Listener, parse_config
from sidecar.health import HealthRegistry
from sidecar.resolver import Resolver
from sidecar.routing import RouteError, Router, hash_ranking

MEMBERS = ("b1", "b2", "b3")
DOMAINS = [f"domain{i}.example" for i in range(1000)]


def server_of(name: str) -> HostPort:
    return HostPort("127.0.0.1", 5000 + int(name[1:]))


def make_config(
    members: tuple[str, ...] = MEMBERS, selection: str | None = "hash", **group: Any
) -> Config:
    """One group ``pool`` of ``members``, each binding with its own HAProxy server."""
    table: dict[str, Any] = {"bindings": list(members), **group}
    if selection is not None:
        table["selection"] = selection
    bindings = {
        name: {
            "ha_proxy_server": str(server_of(name)),
            "ha_proxy_src_addr": f"192.0.2.{int(name[1:])}",
        }
        for name in members
    }
    return parse_config(
        {
            "listener": [
                {"address": "127.0.0.1:2525", "binding_group": "pool"},
                {"address": "127.0.0.1:2526", "binding": members[0]},
            ],
            "dns": {"nameservers": ["127.0.0.1:53"]},
            "binding": bindings,
            "binding_group": {"pool": table},
        }
    )


def make_router(config: Config) -> tuple[Router, HealthRegistry, Listener]:
    servers = [s for binding in config.bindings.values() for s in binding.ha_proxy_server]
    health = HealthRegistry(servers, config.ha_proxy_client)
    return Router(config, Resolver(config.dns), health), health, config.listeners[0]


def unplumb(health: HealthRegistry, member: str) -> None:
    health.servers[server_of(member)].plumbed = False


def assignment(router: Router, listener: Listener, domains: list[str]) -> dict[str, str]:
    return {domain: router.pick_binding(listener, domain).name for domain in domains}


# -- hash_ranking ------------------------------------------------------------------------------


def test_hash_ranking_is_a_stable_permutation() -> None:
    for domain in DOMAINS[:50]:
        ranking = hash_ranking(domain, MEMBERS)
        assert sorted(ranking) == sorted(MEMBERS)
        assert hash_ranking(domain, MEMBERS) == ranking
        # Case and a trailing dot do not matter; neither does the configured order (only ties).
        assert hash_ranking(domain.upper() + ".", MEMBERS) == ranking
        assert hash_ranking(domain, tuple(reversed(MEMBERS))) == ranking


def test_hash_ranking_is_pinned() -> None:
    """A change of hash function would move every domain to another source address after an
    upgrade: these values must not change."""
    assert hash_ranking("example.com", MEMBERS) == ["b2", "b1", "b3"]
    assert hash_ranking("gmail.com", MEMBERS) == ["b2", "b3", "b1"]
    assert hash_ranking("outlook.com", MEMBERS) == ["b1", "b2", "b3"]


def test_removing_a_member_keeps_the_others_order() -> None:
    """Rendezvous hashing: dropping a member leaves the relative order of the rest."""
    for domain in DOMAINS[:200]:
        ranking = hash_ranking(domain, MEMBERS)
        assert hash_ranking(domain, ("b1", "b3")) == [m for m in ranking if m != "b2"]


# -- selection = "hash" ------------------------------------------------------------------------


def test_hash_keeps_each_domain_on_one_member() -> None:
    router, _, listener = make_router(make_config())
    first = assignment(router, listener, DOMAINS[:100])
    for _ in range(5):
        assert assignment(router, listener, DOMAINS[:100]) == first
    for domain, member in first.items():
        assert member == hash_ranking(domain, MEMBERS)[0]


def test_hash_spreads_domains_over_the_members() -> None:
    router, _, listener = make_router(make_config())
    counts = Counter(assignment(router, listener, DOMAINS).values())
    assert set(counts) == set(MEMBERS)
    for member, count in counts.items():
        assert 200 <= count <= 450, (member, counts)


def test_hash_unplumbed_member_moves_only_its_own_domains() -> None:
    router, health, listener = make_router(make_config())
    before = assignment(router, listener, DOMAINS)
    unplumb(health, "b2")
    after = assignment(router, listener, DOMAINS)
    moved = {domain for domain in DOMAINS if before[domain] != after[domain]}
    assert moved == {domain for domain in DOMAINS if before[domain] == "b2"}
    assert "b2" not in after.values()
    # Each moved domain goes to its next member in its own ranking, so they spread out.
    for domain in moved:
        assert after[domain] == hash_ranking(domain, MEMBERS)[1]
    spread = Counter(after[domain] for domain in moved)
    assert set(spread) == {"b1", "b3"}
    # Plumbed again: every domain is back where it was.
    health.servers[server_of("b2")].plumbed = True
    assert assignment(router, listener, DOMAINS) == before


def test_hash_removed_member_moves_only_its_own_domains() -> None:
    router, _, listener = make_router(make_config())
    before = assignment(router, listener, DOMAINS)
    smaller, _, smaller_listener = make_router(make_config(("b1", "b3")))
    after = assignment(smaller, smaller_listener, DOMAINS)
    for domain in DOMAINS:
        if before[domain] != "b2":
            assert after[domain] == before[domain], domain


def test_hash_excluded_member_falls_to_the_next_in_the_domain_ranking() -> None:
    router, _, listener = make_router(make_config())
    for domain in DOMAINS[:50]:
        ranking = hash_ranking(domain, MEMBERS)
        assert router.pick_binding(listener, domain, excluded={ranking[0]}).name == ranking[1]
        assert router.pick_binding(listener, domain, excluded=ranking[:2]).name == ranking[2]
        with pytest.raises(RouteError) as info:
            router.pick_binding(listener, domain, excluded=ranking)
        assert info.value.reply.code == 451


def test_hash_does_not_follow_prefer() -> None:
    """``prefer`` (the open connection's binding) must not take a domain off its member."""
    router, _, listener = make_router(make_config())
    for domain in DOMAINS[:50]:
        ranking = hash_ranking(domain, MEMBERS)
        for other in ranking[1:]:
            assert router.pick_binding(listener, domain, prefer=other).name == ranking[0]


def test_hash_all_members_unplumbed() -> None:
    router, health, listener = make_router(make_config())
    for member in MEMBERS:
        unplumb(health, member)
    with pytest.raises(RouteError) as info:
        router.pick_binding(listener, "example.com")
    assert info.value.reply.to_bytes() == (
        b"451 4.4.1 No binding of group pool has an HAProxy server up\r\n"
    )


def test_hash_bypass_member_counts_as_usable() -> None:
    config = make_config(domain={"internal.example": {"ha_proxy_bypass": True}})
    router, health, listener = make_router(config)
    for member in MEMBERS:
        unplumb(health, member)
    ranking = hash_ranking("internal.example", MEMBERS)
    assert router.pick_binding(listener, "internal.example").name == ranking[0]


def test_a_binding_listener_ignores_the_group() -> None:
    router, health, _ = make_router(make_config())
    unplumb(health, "b1")
    listener = router.config.listeners[1]
    assert {router.pick_binding(listener, d).name for d in DOMAINS[:20]} == {"b1"}


# -- selection = "round-robin" (the default) ---------------------------------------------------


@pytest.mark.parametrize("selection", [None, "round-robin"])
def test_round_robin_takes_members_in_turn(selection: str | None) -> None:
    router, _, listener = make_router(make_config(selection=selection))
    assert router.config.binding_groups["pool"].selection == "round-robin"
    picks = [router.pick_binding(listener, "example.com").name for _ in range(6)]
    assert picks == ["b1", "b2", "b3", "b1", "b2", "b3"]


def test_round_robin_prefer_and_excluded() -> None:
    router, health, listener = make_router(make_config(selection="round-robin"))
    assert [router.pick_binding(listener, "a.example", prefer="b3").name for _ in range(3)] == [
        "b3"
    ] * 3
    assert router.pick_binding(listener, "a.example", prefer="b3", excluded={"b3"}).name != "b3"
    unplumb(health, "b3")
    picks = {router.pick_binding(listener, "a.example", prefer="b3").name for _ in range(4)}
    assert picks == {"b1", "b2"}


def test_unknown_selection_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        make_config(selection="least-used")
    assert info.value.path == "binding_group.pool.selection"


def test_tls_policy_most_specific_scope_wins() -> None:
    config = parse_config(
        {
            "listener": [{"address": "127.0.0.1:2525", "binding_group": "pool"}],
            "delivery": {"tls": "disabled"},
            "domain": {"top.example": {"tls": "opportunistic"}, "all.example": {"tls": "required"}},
            "binding": {
                "b1": {
                    "ha_proxy_server": "127.0.0.1:5001",
                    "ha_proxy_src_addr": "192.0.2.1",
                    "domain": {"all.example": {"tls": "verify"}},
                }
            },
            "binding_group": {
                "pool": {"bindings": ["b1"], "domain": {"g.example": {"tls": "required"}}}
            },
        }
    )
    router, _, _ = make_router(config)
    b1 = config.bindings["b1"]
    assert router.tls_policy(b1, "pool", "all.example") == "verify"  # binding beats top level
    assert router.tls_policy(b1, "pool", "g.example") == "required"  # group scope
    assert router.tls_policy(b1, "pool", "top.example") == "opportunistic"
    assert router.tls_policy(b1, "pool", "other.example") == "disabled"  # delivery.tls
    assert router.tls_policy(b1, None, "g.example") == "disabled"  # not via the group


# -- route identity (issue 10, item 2) --------------------------------------------------------


class _Rdata:
    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


def _twelve_equal_mx_hosts(resolver: Resolver) -> None:
    """Make ``resolver`` answer as a domain with 12 MX hosts of equal preference and TTL 0
    would: no answer is cached, so every look-up shuffles and cuts anew."""

    async def query(name: str, rdtype: str, ttls: list[int], dnssec: bool = False) -> list[_Rdata]:
        if rdtype == "MX":
            return [
                _Rdata(preference=10, exchange=dns.name.from_text(f"mx{i}.bigmail.example"))
                for i in range(12)
            ]
        if rdtype == "A":
            return [_Rdata(address=f"1.2.3.{int(name[2:].split('.')[0]) + 1}")]
        raise dns.resolver.NoAnswer

    resolver._query = query  # type: ignore[assignment,method-assign]


async def test_recipients_of_one_domain_always_share_a_route() -> None:
    config = make_config()
    router, _, _ = make_router(config)
    _twelve_equal_mx_hosts(router.resolver)
    listener = config.listeners[1]  # binding b1
    first = await router.route(listener, "example.com", None)
    assert len(first.mx.hosts) == 10  # cut to MAX_MX_HOSTS: which 10 is random
    hosts_seen = {tuple(host.name for host in first.mx.hosts)}
    for _ in range(30):
        again = await router.route(listener, "example.com", None)
        hosts_seen.add(tuple(host.name for host in again.mx.hosts))
        assert again.key == first.key
    assert len(hosts_seen) > 1  # the draws did differ, and the key did not


async def test_domains_with_the_same_mx_set_share_a_route() -> None:
    config = make_config()
    router, _, _ = make_router(config)
    _twelve_equal_mx_hosts(router.resolver)
    listener = config.listeners[1]
    one = await router.route(listener, "example.com", None)
    other = await router.route(listener, "example.org", None)
    assert one.key == other.key
    assert one.mx.site == frozenset(f"mx{i}.bigmail.example" for i in range(12))
