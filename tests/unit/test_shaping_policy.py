"""sidecar.shaping.policy: sites, the merge of scopes, rule matching; config errors name keys."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from sidecar.config import ConfigError, parse_config
from sidecar.shaping.model import PathLimits, Rate
from sidecar.shaping.policy import ShapingPolicy
from sidecar.smtp.replies import Reply

BASE: dict[str, Any] = {
    "listener": [{"address": "127.0.0.1:2525", "binding": "b1"}],
    "delivery": {"connection_reuse_limit": 77},
    "binding": {
        "b1": {
            "ha_proxy_server": "127.0.0.1:5000",
            "ha_proxy_src_addr": "192.0.2.10",
            "shaping": {"connection_limit": 5, "site": {"google": {"max_message_rate": "500/h"}}},
        },
        "b2": {"ha_proxy_server": "127.0.0.1:5000", "ha_proxy_src_addr": "192.0.2.11"},
    },
    "shaping": {
        "connection_limit": 10,
        "max_connection_rate": "60/min",
        "site": {
            "google": {"mx": ["*.google.com", "*.googlemail.com"], "connection_limit": 20},
            "ms": {"mx": ["*.mail.protection.outlook.com"]},
        },
        "rule": [
            {"site": "google", "match": r"^421[ -]4\.7\.28 ", "action": "suspend",
             "duration": "2h"},
            {"code": 451, "enhanced": "4.7.500", "action": "set", "connection_limit": 1,
             "duration": "30min"},
        ],
    },
}  # fmt: skip


def policy(data: dict[str, Any] = BASE) -> ShapingPolicy:
    return ShapingPolicy(parse_config(copy.deepcopy(data)))


def test_named_site_by_pattern_else_the_normalised_mx_set() -> None:
    p = policy()
    assert p.site_of(["ASPMX.L.Google.com."]) == "google"
    assert p.site_of(["x.example", "alt1.aspmx.l.google.com"]) == "google"
    assert p.site_of(["tenant.mail.protection.outlook.com"]) == "ms"
    assert p.site_of(["MX2.Example.org.", "mx1.example.org", "mx1.example.org"]) == (
        "mx1.example.org,mx2.example.org"
    )


def test_the_most_specific_scope_wins_key_by_key() -> None:
    p = policy()
    assert p.limits("b1", "google") == PathLimits(5, Rate(60, 60.0), Rate(500, 3600.0), 77)
    assert p.limits("b2", "google") == PathLimits(20, Rate(60, 60.0), None, 77)
    assert p.limits("b1", "mx.example.org") == PathLimits(5, Rate(60, 60.0), None, 77)
    assert p.limits("b2", "mx.example.org") == PathLimits(10, Rate(60, 60.0), None, 77)


def test_no_limit_unless_configured() -> None:
    data = copy.deepcopy(BASE)
    del data["shaping"], data["binding"]["b1"]["shaping"], data["delivery"]
    assert policy(data).limits("b1", "x") == PathLimits(max_deliveries_per_connection=100)


def test_rules_for_a_site_and_their_match() -> None:
    p = policy()
    google, ms = p.rules_for("google"), p.rules_for("ms")
    assert [r.name for r in google] == ["shaping.rule[0]", "shaping.rule[1]"]
    assert [r.name for r in ms] == ["shaping.rule[1]"]
    throttled = Reply(421, ("4.7.28 unusual rate", "4.7.28 of unsolicited mail"))
    assert google[0].match(throttled)
    assert google[0].match(Reply(421, ("4.7.28 x",)))
    assert not google[0].match(Reply(421, ("4.7.0 try later",)))
    assert ms[0].match(Reply(451, ("4.7.500 Server busy. Please try again later",)))
    assert not ms[0].match(Reply(451, ("4.7.5001 nope",)))
    assert not ms[0].match(Reply(421, ("4.7.500 Server busy",)))
    assert ms[0].limits == PathLimits(connection_limit=1) and ms[0].duration == 1800.0


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda d: d["shaping"].update(max_connection_rate="10/fortnight"),
         "shaping.max_connection_rate: '10/fortnight' is not a rate like \"100/min\""),
        (lambda d: d["shaping"]["rule"][0].update(match="(("),
         'shaping.rule[0].match: "((" is not a regular expression'),
        (lambda d: d["shaping"]["rule"][0].update(duration="soon"),
         "shaping.rule[0].duration: 'soon' is not a duration"),
        (lambda d: d["shaping"]["rule"][0].update(site="yahoo"),
         'shaping.rule[0].site: no [shaping.site."yahoo"] is configured'),
        (lambda d: d["shaping"]["rule"][0].update(connection_limit=2),
         'shaping.rule[0].connection_limit: only a rule with action = "set" takes limits'),
        (lambda d: d["shaping"]["rule"][1].pop("connection_limit"),
         'shaping.rule[1]: action = "set" needs the limits'),
        (lambda d: d["shaping"]["rule"][0].update(action="pause"),
         'shaping.rule[0].action: must be one of "suspend", "set"'),
        (lambda d: d["binding"]["b1"]["shaping"]["site"].update(yahoo={}),
         'binding.b1.shaping.site.yahoo: no [shaping.site."yahoo"] is configured'),
        (lambda d: d["binding"]["b1"]["shaping"].update(max_message_rate="0/h"),
         "binding.b1.shaping.max_message_rate: '0/h': a rate needs a positive count"),
        (lambda d: d["shaping"]["site"]["google"].pop("mx"),
         "shaping.site.google.mx: missing"),
        (lambda d: d["shaping"].update(backend="redis"),
         'shaping.redis_url: missing (backend = "redis" needs it)'),
        (lambda d: d["shaping"].update(max_wait=-1),
         "shaping.max_wait: must be a number of seconds, 0 or more"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(change: Any, error: str) -> None:
    data = copy.deepcopy(BASE)
    change(data)
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert str(info.value).startswith(error)


def test_the_starter_examples_parse_when_uncommented() -> None:
    import re
    import tomllib

    from sidecar.starter import STARTER_CONFIG

    head, _, tail = STARTER_CONFIG.partition("[shaping]\n")
    lines = [
        m[1]
        for line in tail.splitlines()
        if (m := re.match(r"# (\[[a-z\[].*\]|[a-z_]+ = .*)$", line))
        and not line.startswith(("# backend", "# redis_url"))
    ]
    config = parse_config(tomllib.loads(head + "[shaping]\n" + "\n".join(lines)))
    assert len(config.shaping.rules) == 4 and config.shaping.max_wait == 2.0
    p = ShapingPolicy(config)
    yahoo = p.rules_for("yahoo")[0]
    assert yahoo.match(Reply(421, ("4.7.0 [TSS04] Messages from 192.0.2.10 temporarily deferred",)))
