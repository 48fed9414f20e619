"""MTA-STS look-up, cache and routing (sidecar/mxtls/sts_cache.py, Router.sts_candidates): RFC
8461 section 5.1 (a cached policy survives DNS and HTTPS failures and restarts; a new TXT id
is fetched), without sockets: the resolver and the fetcher are stand-ins."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from sidecar.config import ConfigError, parse_config
from sidecar.errors import ResolutionError, RouteError
from sidecar.health import HealthRegistry
from sidecar.mxtls.outcome import TlsOutcome
from sidecar.mxtls.sts import StsLookup, parse_policy
from sidecar.mxtls.sts_cache import FAILURE_HOLD, CachedPolicy, MtaSts, StsStore
from sidecar.mxtls.sts_cache import open_store as real_open_store
from sidecar.mxtls.sts_fetch import FetchedPolicy, StsFetchError
from sidecar.replies import dns_temporary
from sidecar.resolver import MXHost, MXResult
from sidecar.routing import Router

ENFORCE = "version: STSv1\nmode: enforce\nmx: *.example.test\nmax_age: 3600\n"
TESTING = ENFORCE.replace("enforce", "testing")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class FakeResolver:
    def __init__(self) -> None:
        self.txt_records: dict[str, list[str] | Exception] = {}

    async def resolve_txt(self, name: str) -> list[str]:
        answer = self.txt_records.get(name, [])
        if isinstance(answer, Exception):
            raise answer
        return answer


class FakeFetcher:
    def __init__(self) -> None:
        self.bodies: dict[str, str | StsFetchError] = {}
        self.fetches: list[str] = []

    async def fetch(self, domain: str, *, by: float = 0) -> FetchedPolicy:
        self.fetches.append(domain)
        await trio.sleep(0)
        body = self.bodies[domain]
        if isinstance(body, StsFetchError):
            raise body
        return FetchedPolicy(parse_policy(body.encode()), body)


def make_sts(store: StsStore) -> tuple[MtaSts, FakeResolver, FakeFetcher]:
    resolver, fetcher = FakeResolver(), FakeFetcher()
    return MtaSts(resolver, fetcher, store), resolver, fetcher  # type: ignore[arg-type]


def publish(resolver: FakeResolver, domain: str, policy_id: str) -> None:
    resolver.txt_records[f"_mta-sts.{domain}"] = [f"v=STSv1; id={policy_id};", "v=spf1 -all"]


async def test_no_txt_record_no_policy_no_fetch() -> None:
    sts, _, fetcher = make_sts(StsStore())
    assert await sts.lookup("example.test") == StsLookup("example.test")
    assert fetcher.fetches == []


async def test_fetched_once_then_cached_until_the_id_changes() -> None:
    clock = Clock()
    sts, resolver, fetcher = make_sts(StsStore(clock=clock))
    publish(resolver, "example.test", "1")
    fetcher.bodies["example.test"] = ENFORCE
    first = await sts.lookup("example.test")
    assert (first.source, first.id, first.mode) == ("fetched", "1", "enforce")
    assert first.expires == clock.now + 3600
    second = await sts.lookup("example.test")
    assert (second.source, second.id) == ("cache", "1")
    assert fetcher.fetches == ["example.test"]
    # A new id: fetched again (RFC 8461 section 5.1).
    publish(resolver, "example.test", "2")
    fetcher.bodies["example.test"] = TESTING
    third = await sts.lookup("example.test")
    assert (third.source, third.id, third.mode) == ("fetched", "2", "testing")
    assert len(fetcher.fetches) == 2
    # Expired: fetched again, even with the same id.
    clock.now += 3601
    assert (await sts.lookup("example.test")).source == "fetched"
    assert len(fetcher.fetches) == 3


async def test_a_policy_in_use_is_refreshed_daily_and_a_failed_refresh_keeps_it() -> None:
    clock = Clock()
    sts, resolver, fetcher = make_sts(StsStore(clock=clock))
    publish(resolver, "example.test", "1")
    week = ENFORCE.replace("3600", "604800")
    fetcher.bodies["example.test"] = week
    first = await sts.lookup("example.test")
    clock.now += 86_000
    assert (await sts.lookup("example.test")).source == "cache"
    clock.now += 1_000  # a day old: fetched again with the same id, max_age runs anew
    refreshed = await sts.lookup("example.test")
    assert refreshed.source == "fetched" and len(fetcher.fetches) == 2
    assert first.expires is not None and refreshed.expires == first.expires + 87_000
    clock.now += 86_401
    fetcher.bodies["example.test"] = StsFetchError("HTTP 503")
    kept = await sts.lookup("example.test")
    assert (kept.source, kept.mode, kept.problem) == ("cache", "enforce", "HTTP 503")
    await sts.lookup("example.test")
    assert len(fetcher.fetches) == 3  # the failure is held, not retried on every RCPT


async def test_a_cached_policy_stays_when_dns_or_https_fail() -> None:
    sts, resolver, fetcher = make_sts(StsStore())
    publish(resolver, "example.test", "1")
    fetcher.bodies["example.test"] = ENFORCE
    await sts.lookup("example.test")
    # DNS failing: the known policy stays.
    resolver.txt_records["_mta-sts.example.test"] = ResolutionError(dns_temporary("x", "timeout"))
    assert (await sts.lookup("example.test")).mode == "enforce"
    # A new id whose fetch fails: the cached policy stays, with the problem said.
    publish(resolver, "example.test", "2")
    fetcher.bodies["example.test"] = StsFetchError("HTTP 500")
    found = await sts.lookup("example.test")
    assert (found.source, found.id, found.mode) == ("cache", "1", "enforce")
    assert found.problem == "HTTP 500" and found.result == "sts-policy-fetch-error"
    # The TXT record stripped: the known policy stays.
    resolver.txt_records["_mta-sts.example.test"] = []
    assert (await sts.lookup("example.test")).mode == "enforce"


async def test_a_domain_without_a_record_is_asked_again_after_a_minute(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sts, resolver, _ = make_sts(StsStore())
    asked: list[str] = []
    real_txt = resolver.resolve_txt

    async def resolve_txt(name: str) -> list[str]:
        asked.append(name)
        return await real_txt(name)

    resolver.resolve_txt = resolve_txt  # type: ignore[method-assign]
    for _ in range(3):
        assert (await sts.lookup("example.test")).policy is None
    assert len(asked) == 1  # no record: not asked again on every RCPT
    await trio.sleep(61)
    await sts.lookup("example.test")
    assert len(asked) == 2


async def test_a_failed_fetch_without_cache_is_no_policy_and_is_held(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A failed fetch is held for FAILURE_HOLD per domain, whatever the TXT id: TXT records
    with a new id each time (forged, or a flapping zone) must not make every delivery wait
    for another fetch (the break review of issue 13)."""
    sts, resolver, fetcher = make_sts(StsStore())
    publish(resolver, "example.test", "1")
    fetcher.bodies["example.test"] = StsFetchError("bad", "sts-webpki-invalid")
    found = await sts.lookup("example.test")
    assert found.policy is None and found.problem == "bad" and found.result == "sts-webpki-invalid"
    await sts.lookup("example.test")
    assert fetcher.fetches == ["example.test"]  # held: not tried on every delivery
    publish(resolver, "example.test", "2")  # a new id: still held
    fetcher.bodies["example.test"] = ENFORCE
    assert (await sts.lookup("example.test")).policy is None
    assert fetcher.fetches == ["example.test"]
    await trio.sleep(FAILURE_HOLD + 1)
    assert (await sts.lookup("example.test")).source == "fetched"


async def test_concurrent_lookups_fetch_once() -> None:
    sts, resolver, fetcher = make_sts(StsStore())
    publish(resolver, "example.test", "1")
    fetcher.bodies["example.test"] = ENFORCE
    found: list[StsLookup] = []

    async def one() -> None:
        found.append(await sts.lookup("example.test"))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
    assert fetcher.fetches == ["example.test"]
    assert {lookup.mode for lookup in found} == {"enforce"}


async def test_the_store_survives_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    store = StsStore.in_state_dir(str(tmp_path / "state"), clock)
    sts, resolver, fetcher = make_sts(store)
    publish(resolver, "example.test", "1")
    fetcher.bodies["example.test"] = ENFORCE
    await sts.lookup("example.test")
    store.close()
    # "Restart": a new store on the same directory, DNS stripped by an attacker.
    again, _, refetcher = make_sts(StsStore.in_state_dir(str(tmp_path / "state"), clock))
    found = await again.lookup("example.test")
    assert (found.source, found.id, found.mode) == ("cache", "1", "enforce")
    assert refetcher.fetches == []
    # Expired entries are not loaded.
    clock.now += 3601
    assert len(StsStore.in_state_dir(str(tmp_path / "state"), clock)) == 0


def test_the_store_on_disk_is_bounded_like_the_one_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every fetched policy (up to 64 KiB each) is written to disk: policies of ever more
    recipient domains (an attacker's subdomains) must not grow the file without bound. The
    file keeps the MAX_ENTRIES that last longest, as memory does."""
    import sqlite3

    from sidecar.mxtls import sts_cache

    monkeypatch.setattr(sts_cache, "MAX_ENTRIES", 3)
    clock = Clock()
    store = StsStore.in_state_dir(str(tmp_path / "state"), clock)
    policy = parse_policy(ENFORCE.encode())
    for n in range(6):
        entry = CachedPolicy(f"d{n}.test", "1", policy, ENFORCE, clock.now, clock.now + 100 + n)
        store.put_memory(entry)
        store.write(entry)
    store.close()
    with sqlite3.connect(tmp_path / "state" / "mta-sts.sqlite3") as db:
        kept = sorted(row[0] for row in db.execute("SELECT domain FROM policy"))
    assert kept == ["d3.test", "d4.test", "d5.test"]
    assert sorted(StsStore.in_state_dir(str(tmp_path / "state"), clock)._entries) == kept


def test_a_state_dir_that_cannot_be_created_names_the_key(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = make_router(None).config
    config = replace(config, delivery=replace(config.delivery, state_dir=str(blocker / "sub")))
    # open_store as imported before the unit conftest replaced it with a memory store.
    with pytest.raises(ConfigError, match=r"^delivery\.state_dir: cannot create .*file/sub"):
        real_open_store(config)


# ---- routing --------------------------------------------------------------------------------


def make_router(sts: MtaSts | None, **domain: Any) -> Router:
    config = parse_config(
        {
            "listener": [{"address": "127.0.0.1:2525", "binding": "b"}],
            "binding": {
                "b": {"ha_proxy_server": "127.0.0.1:5000", "ha_proxy_src_addr": "192.0.2.1"}
            },
            "domain": {"example.test": domain} if domain else {},
            "delivery": {"allow_private_destinations": True},
        }
    )
    health = HealthRegistry(config.bindings["b"].ha_proxy_server, config.ha_proxy_client)
    return Router(config, FakeResolver(), health, sts)  # type: ignore[arg-type]


MX = MXResult(
    "example.test",
    (
        MXHost("mx1.example.test", 10, (ip_address("192.0.2.10"),)),
        MXHost("backup.elsewhere.test", 20, (ip_address("192.0.2.20"),)),
    ),
)


def lookup_of(body: str) -> StsLookup:
    policy = parse_policy(body.encode())
    return StsLookup("example.test", policy, "7", "fetched", None, text=policy.lines())


def route_with(router: Router, lookup: StsLookup) -> Any:
    binding = router.config.bindings["b"]
    return router.sts_candidates("example.test", binding, False, MX, "opportunistic", lookup)


def test_enforce_keeps_only_matching_mx_hosts_and_verifies() -> None:
    route = route_with(make_router(None), lookup_of(ENFORCE))
    assert [c.mx for c in route.candidates] == ["mx1.example.test"]
    assert route.tls == "verify" and route.sts_label == "mta-sts"
    assert route.sts_excluded == ("backup.elsewhere.test",)
    assert any("not an MX host of the MTA-STS policy" in s for s in route.skipped)
    # The destination (site) is the whole MX set still: one route for the domain.
    assert route.key.site == frozenset({"mx1.example.test", "backup.elsewhere.test"})


def test_enforce_with_no_matching_mx_is_a_4xx_naming_the_policy() -> None:
    router = make_router(None)
    outcomes: list[TlsOutcome] = []
    router.report = outcomes.append
    body = ENFORCE.replace("*.example.test", "mx.other.test")
    with pytest.raises(RouteError) as caught:
        route_with(router, lookup_of(body))
    answer = caught.value.reply
    assert answer.code == 451 and answer.text.startswith("4.7.5 ")
    assert "MTA-STS policy of example.test (enforce, id 7)" in answer.text
    assert {o.mx_host for o in outcomes} == {"mx1.example.test", "backup.elsewhere.test"}
    assert {o.result for o in outcomes} == {"validation-failure"}


def test_testing_delivers_as_before_and_reports(caplog: pytest.LogCaptureFixture) -> None:
    router = make_router(None)
    outcomes: list[TlsOutcome] = []
    router.report = outcomes.append
    route = route_with(router, lookup_of(TESTING))
    assert [c.mx for c in route.candidates] == ["mx1.example.test", "backup.elsewhere.test"]
    assert route.tls == "opportunistic" and route.sts_label is None
    assert route.sts_excluded == ("backup.elsewhere.test",)
    assert "does not match" in caplog.text
    (outcome,) = outcomes
    assert (outcome.policy_type, outcome.mx_host) == ("sts", "backup.elsewhere.test")
    assert outcome.policy_strings[1] == "mode: testing"


def test_none_and_no_policy_deliver_as_before() -> None:
    router = make_router(None)
    for lookup in (lookup_of("version: STSv1\nmode: none\nmax_age: 1\n"), StsLookup("x")):
        route = route_with(router, lookup)
        assert len(route.candidates) == 2 and route.tls == "opportunistic"
        assert route.sts_label is None


def test_dane_takes_precedence_over_mta_sts_per_mx_host() -> None:
    """RFC 8461 section 2: an MX host with usable TLSA records is DANE's, whatever the
    domain's MTA-STS policy; the others keep the policy. DANE on for a domain whose MX hosts
    have no TLSA records (no DNSSEC) must not switch MTA-STS off."""
    from sidecar.mxtls.dane import DanePolicy, TlsaRecord
    from sidecar.upstream import effective_policy

    router = make_router(None)
    binding = router.config.bindings["b"]
    assert router.mta_sts_on(binding, None, "example.test")
    assert make_router(None, dane=True).mta_sts_on(binding, None, "example.test")
    assert not make_router(None, mta_sts=False).mta_sts_on(binding, None, "example.test")
    dane = DanePolicy.from_records("mx1.example.test", [TlsaRecord(3, 1, 1, b"\x01" * 32)])
    hosts = (
        MXHost("mx1.example.test", 10, (ip_address("127.0.0.5"),), dane=dane),
        MXHost("mx2.example.test", 20, (ip_address("127.0.0.6"),)),
    )
    lookup = StsLookup("example.test", parse_policy(ENFORCE.encode()), "7", "fetched")
    route = router.sts_candidates(
        "example.test", binding, False, MXResult("example.test", hosts), "opportunistic", lookup
    )
    first, second = route.candidates
    assert effective_policy(route, first) == ("required", "dane")
    assert effective_policy(route, second) == ("verify", "mta-sts")


async def test_route_applies_the_looked_up_policy() -> None:
    store = StsStore()
    sts, resolver, fetcher = make_sts(store)
    publish(resolver, "example.test", "7")
    fetcher.bodies["example.test"] = ENFORCE
    router = make_router(sts)

    async def resolve_mx(domain: str) -> MXResult:
        return MX

    router.resolver.resolve_mx = resolve_mx  # type: ignore[attr-defined]
    router.health.servers[router.config.bindings["b"].ha_proxy_server[0]].plumbed = True
    route = await router.route(router.config.listeners[0], "example.test", None)
    assert route.sts_enforced and [c.mx for c in route.candidates] == ["mx1.example.test"]
    cached = store.get("example.test")
    assert isinstance(cached, CachedPolicy)
    assert (cached.id, cached.body, cached.policy.mode) == ("7", ENFORCE, "enforce")


def test_a_reload_keeps_the_policy_store_and_mta_sts_off_builds_none(tmp_path: Path) -> None:
    from sidecar.server import build_context

    table = {
        "listener": [{"address": "127.0.0.1:2525", "binding": "b"}],
        "binding": {"b": {"ha_proxy_server": "127.0.0.1:5000", "ha_proxy_src_addr": "192.0.2.1"}},
        "delivery": {"state_dir": str(tmp_path / "state")},
    }
    first = build_context(parse_config(table))
    assert first.router.sts is not None
    again = build_context(parse_config(table), first)
    assert again.router.sts is not None and again.router.sts.store is first.router.sts.store
    # The router reports to the context's reporter of the moment.
    outcomes: list[TlsOutcome] = []

    class Recorder:
        def record(self, outcome: TlsOutcome) -> None:
            outcomes.append(outcome)

    again.tls_reporter = Recorder()
    again.router.report(TlsOutcome("example.test", "sts", "", "", None, "sts-policy-invalid"))
    assert len(outcomes) == 1
    off = {**table, "delivery": {**table["delivery"], "mta_sts": False}}
    assert build_context(parse_config(off), again).router.sts is None
    # On for one domain only: built.
    one = {**off, "domain": {"bank.example": {"mta_sts": True}}}
    assert build_context(parse_config(one)).router.sts is not None


def test_routes_under_different_enforced_policies_never_share_a_connection() -> None:
    """A connection (or a transaction) is shared only between routes with equal keys. Two
    domains on one MX set whose enforced MTA-STS policies allow different MX hosts must not
    share one: a connection to ``backup.elsewhere.test`` opened for a policy that allows it
    would otherwise carry mail of a domain whose policy does not (RFC 8461 section 4.1). Nor
    may a route under ``verify`` without a policy share with one under a policy."""
    router = make_router(None)
    narrow = route_with(router, lookup_of(ENFORCE))  # allows mx1.example.test only
    wide = route_with(
        router,
        lookup_of(
            ENFORCE.replace("mx: *.example.test", "mx: *.example.test\nmx: *.elsewhere.test")
        ),
    )
    binding = router.config.bindings["b"]
    plain_verify = router.candidates("example.test", binding, False, MX, "verify")
    assert narrow.tls == wide.tls == plain_verify.tls == "verify"
    assert narrow.key != wide.key
    assert wide.key != plain_verify.key and narrow.key != plain_verify.key
    # The same policy (or one allowing the same hosts) still shares.
    assert route_with(router, lookup_of(ENFORCE)).key == narrow.key
