"""The Redis shaping backend's sans-IO parts: URL forms, the password hidden in logs, and the
JSON form of limit overrides (the backend itself is tested against a real redis-server in
tests/e2e/test_shaping_redis.py)."""

from __future__ import annotations

import coredis
import pytest

from sidecar.shaping.model import PathLimits, Rate
from sidecar.shaping.redis import RedisBackend, limits_from_json, limits_to_json, make_client


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("redis://127.0.0.1:6379", coredis.Redis),
        ("rediss://user:secret@redis.example:6380/2", coredis.Redis),
        ("unix:///run/redis/redis.sock", coredis.Redis),
        ("redis+cluster://127.0.0.1:7000", coredis.RedisCluster),
        ("rediss+cluster://127.0.0.1:7000", coredis.RedisCluster),
        ("redis+sentinel://10.0.0.1:26379,10.0.0.2,[2001:db8::1]:26380/mymaster", coredis.Redis),
    ],
)
def test_url_forms(url: str, kind: type) -> None:
    client, contexts = make_client(url, 1.0)
    assert isinstance(client, kind)
    assert contexts[-1] is client


def test_sentinel_addresses() -> None:
    _, contexts = make_client("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2,[::1]:1/svc", 1.0)
    sentinel = contexts[0]
    assert isinstance(sentinel, coredis.Sentinel)
    assert [
        (s.connection_pool.location.host, s.connection_pool.location.port)
        for s in sentinel.sentinels
    ] == [
        ("10.0.0.1", 26379),
        ("10.0.0.2", 26379),
        ("::1", 1),
    ]


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("http://127.0.0.1:6379", "not a Redis URL"),
        ("redis+sentinel://10.0.0.1:26379", "names the service"),
    ],
)
def test_bad_urls(url: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        make_client(url, 1.0)


def test_password_is_hidden_in_logs() -> None:
    backend = RedisBackend("redis://user:s3cret@redis.example:6379/0")
    assert backend.url_for_logs == "redis://user:***@redis.example:6379/0"
    assert "s3cret" not in backend.url_for_logs
    assert RedisBackend("redis://redis.example").url_for_logs == "redis://redis.example"


@pytest.mark.parametrize(
    "limits",
    [
        PathLimits(),
        PathLimits(1, Rate(60, 60.0), Rate(20000, 3600.0), 100),
        PathLimits(max_message_rate=Rate(7, 0.3)),
    ],
)
def test_limits_json_round_trip(limits: PathLimits) -> None:
    assert limits_from_json(limits_to_json(limits)) == limits


def test_rate_is_written_count_slash_seconds() -> None:
    assert (
        limits_to_json(PathLimits(max_connection_rate=Rate(100, 60.0)))["max_connection_rate"]
        == "100/60.0"
    )
