"""End-to-end test harness: real HAProxy and dnsmasq subprocesses, a trio SMTP server that
records what reaches it, and helpers for loopback addresses and raw SMTP.

Import from here (``from .harness import HAProxy, TestMX, ...``); fixtures that start and stop
these live in ``tests/e2e/conftest.py``.
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
    RcodeDns,
    RefusedZone,
    SilentDns,
    make_resolver,
)
from .factories import DnsmasqFactory, DnsStubFactory, HAProxyFactory, MXFactory
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

__all__ = [
    "DEFAULT_CAPABILITIES",
    "DEFAULT_TLS_IDENTITIES",
    "IPV6_LOOPBACK",
    "PHASES",
    "Addresses",
    "DnsRecord",
    "DnsStubFactory",
    "Dnsmasq",
    "DnsmasqFactory",
    "Endpoint",
    "ForwardZone",
    "HAProxy",
    "HAProxyFactory",
    "HarnessError",
    "HostRecord",
    "MXConnection",
    "MXFactory",
    "MXMessage",
    "MXRecord",
    "ManagedProcess",
    "NullMXRecord",
    "RawRecord",
    "RawSMTPClient",
    "RcodeDns",
    "RefusedZone",
    "ReplySpec",
    "SilentDns",
    "TestMX",
    "allocate_ipv4",
    "client_tls_context",
    "fixed_ipv4",
    "free_port",
    "haproxy_config",
    "make_resolver",
    "open_proxied_stream",
    "reset_connection",
    "server_tls_context",
    "smtp_reply",
    "wait_until",
]
