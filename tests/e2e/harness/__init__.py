"""End-to-end test harness: the pytest side of the test equipment in ``testkit/`` (real HAProxy
and dnsmasq subprocesses, the stub DNS server, TestMX, raw SMTP; shared with ``bench/``), the
factories that stop what a test started, and :class:`~.stack.Lab`, the one stack builder.

Import from here (``from .harness import HAProxy, TestMX, Lab, ...``); the fixtures live in
``tests/e2e/conftest.py``.
"""

from testkit.client import RawSMTPClient, reset_connection
from testkit.dns import (
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
from testkit.dns_stub import StubDns
from testkit.dnssec import Nsd, Record, SignedZone, Unbound
from testkit.haproxy import HAProxy, haproxy_config, open_proxied_stream
from testkit.mx import (
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
from testkit.net import IPV6_LOOPBACK, Addresses, Endpoint, allocate_ipv4, fixed_ipv4, free_port
from testkit.process import HarnessError, ManagedProcess, wait_until
from testkit.redis import RedisSentinel, RedisServer
from testkit.sts_server import PolicyResponse, PolicyServer, policy_body

from .factories import (
    DnsmasqFactory,
    DnssecFactory,
    DnsStubFactory,
    HAProxyFactory,
    MXFactory,
    RedisFactory,
)
from .processes import (
    SIDECAR,
    Processes,
    SidecarProcess,
    refuses_connections,
    run_cli,
    wait_exit,
    wait_listening,
)
from .sidecar import (
    FAST_DELIVERY,
    FAST_SERVER,
    MESSAGE,
    RunningSidecar,
    SendResult,
    SidecarFactory,
    final_status,
    make_config,
    proxied_binding,
    rcpt_reply,
    refusal,
    send,
    send_message,
)
from .stack import CliStack, Lab, RelayStack, RelayStackFactory, Stack

__all__ = [
    "DEFAULT_CAPABILITIES",
    "DEFAULT_TLS_IDENTITIES",
    "FAST_DELIVERY",
    "FAST_SERVER",
    "IPV6_LOOPBACK",
    "MESSAGE",
    "PHASES",
    "SIDECAR",
    "Addresses",
    "CliStack",
    "DnsRecord",
    "DnsStubFactory",
    "Dnsmasq",
    "DnsmasqFactory",
    "DnssecFactory",
    "Endpoint",
    "ForwardZone",
    "HAProxy",
    "HAProxyFactory",
    "HarnessError",
    "HostRecord",
    "Lab",
    "MXConnection",
    "MXFactory",
    "MXMessage",
    "MXRecord",
    "ManagedProcess",
    "Nsd",
    "NullMXRecord",
    "PolicyResponse",
    "PolicyServer",
    "Processes",
    "RawRecord",
    "RawSMTPClient",
    "Record",
    "RedisFactory",
    "RedisSentinel",
    "RedisServer",
    "RefusedZone",
    "RelayStack",
    "RelayStackFactory",
    "ReplySpec",
    "RunningSidecar",
    "SendResult",
    "SidecarFactory",
    "SidecarProcess",
    "SignedZone",
    "Stack",
    "StubDns",
    "TestMX",
    "TxtRecord",
    "Unbound",
    "allocate_ipv4",
    "client_tls_context",
    "final_status",
    "fixed_ipv4",
    "free_port",
    "haproxy_config",
    "make_config",
    "make_resolver",
    "open_proxied_stream",
    "policy_body",
    "proxied_binding",
    "rcpt_reply",
    "refusal",
    "refuses_connections",
    "reset_connection",
    "run_cli",
    "send",
    "send_message",
    "server_tls_context",
    "smtp_reply",
    "wait_exit",
    "wait_listening",
    "wait_until",
]
