"""The commented starter configuration that ``sidecar init`` writes.

Kept identical to ``examples/sidecar.toml`` (a unit test checks it); edit both together.
"""

STARTER_CONFIG = """\
# sidecar.toml: configuration of the SMTP-to-PROXY sidecar.
#
# The sidecar accepts mail from your MTA on a local listener and delivers each message to the
# recipient domain's MX through an HAProxy egress (PROXY protocol v2), so that the MX sees the
# binding's source address. It never queues: your MTA gets the MX's own reply, or a 4xx and
# keeps the message.
#
# Lines starting with "#" show an option's default; uncomment one to change it.
# Check this file with:   sidecar check -c sidecar.toml
# (it prints the effective configuration, defaults included).

[server]
# Name the sidecar gives itself in its 220 banner and EHLO reply. Default: this host's FQDN.
# hostname = "mta1.example.com"
# Clients allowed to connect (networks; a bare address means /32 or /128). Others are refused.
# allowed_clients = ["127.0.0.0/8", "::1/128"]
# Most client connections open at once; more are refused until one closes.
# max_connections = 1000
# Longest SMTP line accepted from the client, in bytes (command and data lines).
# max_line_length = 4096
# Largest message accepted, in bytes (advertised as SIZE).
# max_message_size = 52428800
# Most recipients per transaction.
# max_recipients = 1000
# Protocol errors tolerated in one session before the sidecar closes it.
# max_errors = 100
# Seconds to wait for the client's next command.
# command_timeout = 300
# Seconds to wait for the next chunk of message data from the client.
# data_timeout = 180
# Seconds the whole message data may take, however steadily it trickles in.
# data_total_timeout = 3600
# On shutdown, seconds open sessions get to finish their current transaction.
# shutdown_grace = 30

# One [[listener]] per local address; each sends its mail through one binding or binding_group.
[[listener]]
# Local ip:port to listen on ("[::1]:2525" for IPv6). Keep it on loopback unless you must not.
address = "127.0.0.1:2525"
# The binding (or, instead, binding_group = "NAME") whose egress this listener's mail uses.
binding = "b1"

# HTTP status endpoint: /healthz (liveness), /status (JSON), /metrics (Prometheus).
# Off unless an address is given; keep it on loopback or a management network.
[status]
# address = "127.0.0.1:9925"

[dns]
# Resolvers to ask for MX/A/AAAA: "ip", "ip:port" or "[v6]:port". Default: the system's.
# nameservers = ["127.0.0.1:53"]
# Seconds to wait for one DNS answer.
# timeout = 5
# Most DNS answers kept in the cache.
# cache_size = 10000
# Fixed MX hosts (names or IP addresses) for some domains, used instead of DNS.
[dns.static]
# "partner.example" = ["mx.partner.example", "192.0.2.25"]

[delivery]
# TCP port of the MXes.
# port = 25
# Allow MX addresses in loopback/private/link-local/reserved ranges (for tests only).
# allow_private_destinations = false
# STARTTLS towards the MX: "disabled"; "opportunistic" (when offered; a failed handshake is
# retried in plaintext); "required" (encrypted or not delivered, certificate not checked);
# "verify" (the certificate must chain to tls_ca_file and name the MX host).
# tls = "opportunistic"
# CA bundle (PEM) for tls = "verify". Default: the system's trust store.
# tls_ca_file = "/etc/ssl/certs/ca-certificates.crt"
# Seconds for the whole upstream set-up (DNS, connect, banner, EHLO, STARTTLS, MAIL, RCPT);
# keep it well under your MTA's RCPT timeout (Postfix: 300).
# setup_timeout = 120
# Seconds to connect to HAProxy (or to the MX directly, for bypass domains).
# connect_timeout = 10
# Seconds to wait for the MX's 220 banner.
# banner_timeout = 60
# Seconds to wait for the MX's reply to each command.
# command_timeout = 60
# Seconds to wait for the MX's reply to the end of data; keep it under your MTA's (600).
# data_done_timeout = 480
# Most MX addresses tried for one transaction before giving up with a 4xx.
# max_mx_addresses = 5
# Keep finished MX connections for the next message on the same route (binding, MX hosts,
# TLS policy), from any client session, as Postfix's connection cache does.
# connection_cache = true
# Seconds an idle cached connection is kept before it is closed with QUIT.
# connection_cache_idle = 5
# Most idle connections kept at once.
# connection_cache_size = 100
# Most messages sent over one connection.
# connection_reuse_limit = 100

# Health checks of the HAProxy servers. A server becomes unplumbed (unused) after the failure
# threshold of consecutive failed checks, and plumbed again after the success threshold.
[ha_proxy_client]
# Seconds between two checks of one HAProxy server.
# health_check_interval = 5
# Seconds one check may take before it counts as failed.
# health_check_timeout = 1
# Consecutive failed checks that unplumb a server.
# health_check_failure_threshold = 3
# Consecutive successful checks that plumb it again.
# health_check_success_threshold = 3
# Deeper check, "ip:port" of an SMTP server: each check sends a PROXY header through the HAProxy
# server from a binding's source address to it and needs its 220 banner. Default: TCP connect.
# health_check_probe = "192.0.2.25:25"

# A binding is an egress identity: the HAProxy to go through and the source addresses the MX
# sees. Mail for an IPv4 MX needs ha_proxy_src_addr, for an IPv6 MX ha_proxy_ipv6_src_addr;
# without the right one the MX address is not used (never a silent fallback).
[binding.b1]
# HAProxy "host:port" (accept-proxy), or a list of them tried in order.
ha_proxy_server = "127.0.0.1:5000"
# IPv4 source address for IPv4 MXes (must be routed to this HAProxy's host).
ha_proxy_src_addr = "192.0.2.10"
# IPv6 source address for IPv6 MXes.
ha_proxy_ipv6_src_addr = "2001:db8::10"
# Name sent in EHLO to the MX (should match the source address's PTR). Default: server.hostname.
# ehlo_hostname = "out1.example.com"

# Per-domain settings for this binding. ha_proxy_bypass = true delivers that domain directly
# from this host's own address instead of through HAProxy.
# [binding.b1.domain."internal.example"]
# ha_proxy_bypass = true

# A binding_group spreads mail over its plumbed member bindings.
# [binding.b2]
# ha_proxy_server = "127.0.0.1:5000"
# ha_proxy_src_addr = "192.0.2.11"
#
# [binding_group.pool]
# bindings = ["b1", "b2"]
# How a member is picked: "round-robin" (in turn) or "hash" (each recipient domain keeps one
# member, so one source address, e.g. while warming up IP reputation).
# selection = "round-robin"
# A listener then uses it with: binding_group = "pool"

# Per-domain settings for every binding (a binding's or group's own setting wins):
# ha_proxy_bypass, and tls (overrides delivery.tls for that domain).
# [domain."internal.example"]
# ha_proxy_bypass = true
# [domain."bank.example"]
# tls = "verify"
"""
