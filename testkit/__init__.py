"""Test equipment shared by the e2e tests (``tests/e2e``) and the benchmarks (``bench/``): real
HAProxy, dnsmasq and redis-server subprocesses, the scripted stub DNS server, a trio SMTP
server that records what reaches it (TestMX), a raw SMTP client, and loopback address helpers.

Nothing here knows pytest: the fixtures, the factories that stop everything at a test's end
and the one stack builder live in ``tests/e2e/harness`` (which re-exports these names). Not
part of the ``sidecar`` distribution; tests find it through pytest's ``pythonpath``, bench
scripts through their own ``sys.path`` entry for the repository root.
"""

from .client import RawSMTPClient, reset_connection
from .dns import (
    Dnsmasq,
    DnsRecord,
    ForwardZone,
    HostRecord,
    MXRecord,
    NullMXRecord,
    RawRecord,
    RefusedZone,
    TxtRecord,
    make_resolver,
)
from .dns_stub import StubDns
from .haproxy import HAProxy, haproxy_config, open_proxied_stream
from .mx import (
    DEFAULT_CAPABILITIES,
    DEFAULT_TLS_IDENTITIES,
    PHASES,
    MXConnection,
    MXMessage,
    ReplySpec,
    TestMX,
    client_tls_context,
    server_tls_context,
    smtp_reply,
)
from .net import IPV6_LOOPBACK, Addresses, Endpoint, allocate_ipv4, fixed_ipv4, free_port
from .process import HarnessError, ManagedProcess, wait_until
from .redis import RedisSentinel, RedisServer
from .sts_server import PolicyResponse, PolicyServer, policy_body

__all__ = [
    "DEFAULT_CAPABILITIES",
    "DEFAULT_TLS_IDENTITIES",
    "IPV6_LOOPBACK",
    "PHASES",
    "Addresses",
    "DnsRecord",
    "Dnsmasq",
    "Endpoint",
    "ForwardZone",
    "HAProxy",
    "HarnessError",
    "HostRecord",
    "MXConnection",
    "MXMessage",
    "MXRecord",
    "ManagedProcess",
    "NullMXRecord",
    "PolicyResponse",
    "PolicyServer",
    "RawRecord",
    "RawSMTPClient",
    "RedisSentinel",
    "RedisServer",
    "RefusedZone",
    "ReplySpec",
    "StubDns",
    "TestMX",
    "TxtRecord",
    "allocate_ipv4",
    "client_tls_context",
    "fixed_ipv4",
    "free_port",
    "haproxy_config",
    "make_resolver",
    "open_proxied_stream",
    "policy_body",
    "reset_connection",
    "server_tls_context",
    "smtp_reply",
    "wait_until",
]
