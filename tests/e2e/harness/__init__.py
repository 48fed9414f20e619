"""End-to-end test harness: real HAProxy and dnsmasq subprocesses, a trio SMTP server that
records what reaches it, and helpers for loopback addresses and raw SMTP.

Import from here (``from .harness import HAProxy, TestMX, ...``); fixtures that start and stop
these live in ``tests/e2e/conftest.py``. :class:`~.stack.Lab` (the ``lab`` fixture) is the one
stack builder; :mod:`.dns_stub` the one scripted DNS server.
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
    make_resolver,
)
from .dns_stub import StubDns
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
    "NullMXRecord",
    "Processes",
    "RawRecord",
    "RawSMTPClient",
    "RefusedZone",
    "RelayStack",
    "RelayStackFactory",
    "ReplySpec",
    "RunningSidecar",
    "SendResult",
    "SidecarFactory",
    "SidecarProcess",
    "Stack",
    "StubDns",
    "TestMX",
    "allocate_ipv4",
    "client_tls_context",
    "final_status",
    "fixed_ipv4",
    "free_port",
    "haproxy_config",
    "make_config",
    "make_resolver",
    "open_proxied_stream",
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
