"""Proves the e2e harness itself: HAProxy carries the PROXY header's source address to the MX,
dnsmasq answers as described, TestMX records exactly what it receives."""

from __future__ import annotations

import ipaddress
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest
import trio
import trio.testing
import trustme

from .harness import (
    Addresses,
    DnsmasqFactory,
    DnsStubFactory,
    Endpoint,
    ForwardZone,
    HAProxy,
    HAProxyFactory,
    HostRecord,
    Lab,
    MXRecord,
    NullMXRecord,
    RawSMTPClient,
    RefusedZone,
    TestMX,
    free_port,
    make_resolver,
    reset_connection,
    server_tls_context,
    smtp_reply,
)

pytestmark = pytest.mark.e2e

EXAMPLE_CFG = Path(__file__).resolve().parents[2] / "examples" / "haproxy.cfg"


def query(server: Endpoint, name: str, rdtype: str, timeout: float = 2.0) -> dns.message.Message:
    return dns.query.udp(
        dns.message.make_query(name, rdtype), server.host, port=server.port, timeout=timeout
    )


# -- addresses --------------------------------------------------------------------------------


def test_addresses_are_fresh_loopback_with_free_ports(addresses: Addresses) -> None:
    first, second = addresses.endpoint(), addresses.endpoint()
    assert first.host != second.host
    for endpoint in (first, second):
        assert ipaddress.ip_address(endpoint.host).is_loopback
        with socket.socket() as sock:
            sock.bind(endpoint.as_tuple())
    port = free_port("::1", udp=True)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind(("::1", port))
    assert str(Endpoint("::1", 25)) == "[::1]:25"


# -- HAProxy ----------------------------------------------------------------------------------


async def test_haproxy_connects_from_the_header_source_ipv4(lab: Lab, mx: TestMX) -> None:
    haproxy = lab.haproxy()
    source = lab.addresses.ipv4()
    stream = await haproxy.open_stream(source, mx.endpoint)
    async with RawSMTPClient(stream) as client:
        assert (await client.read_reply()).startswith(b"220 ")
        assert (await client.command("EHLO client.test")).startswith(b"250-")
        assert await client.command("QUIT") == b"221 2.0.0 Bye\r\n"
    (connection,) = mx.connections
    assert connection.peer_host == source
    assert connection.peer[1] != 0  # PROXY source port 0: the kernel picked one
    assert connection.ehlo == "client.test"


@pytest.mark.parametrize("ipv6_listener", [True, False], ids=["ipv6-bind", "ipv4-bind"])
async def test_haproxy_connects_from_the_header_source_ipv6(lab: Lab, ipv6_listener: bool) -> None:
    haproxy = lab.haproxy(ipv6=True)
    mx = await lab.mx(ipv6=True)
    stream = await haproxy.open_stream("::1", mx.endpoint, ipv6_listener=ipv6_listener)
    async with RawSMTPClient(stream) as client:
        assert (await client.read_reply()).startswith(b"220 ")
    await mx.wait_for_connections(1)
    assert mx.connections[0].peer_host == "::1"
    assert mx.connections[0].local[0] == "::1"


async def test_haproxy_refused_mx_is_eof_before_banner(lab: Lab) -> None:
    haproxy = lab.haproxy()  # retries 1, timeout connect 1s
    closed_port = lab.addresses.endpoint()  # nothing listens there
    started = trio.current_time()
    stream = await haproxy.open_stream(lab.addresses.ipv4(), closed_port)
    async with RawSMTPClient(stream) as client:
        with trio.fail_after(5):
            assert await client.read_reply() == b""
    # One retry after min(timeout connect, 1s): about a second, far from the 3 s of defaults.
    assert trio.current_time() - started < 2.5


async def test_haproxy_kill_and_restart(lab: Lab, mx: TestMX) -> None:
    haproxy = lab.haproxy()
    haproxy.kill()
    assert not haproxy.running
    with pytest.raises(OSError):
        await trio.open_tcp_stream(*haproxy.address)
    haproxy.restart()
    source = lab.addresses.ipv4()
    async with RawSMTPClient(await haproxy.open_stream(source, mx.endpoint)) as client:
        assert (await client.read_reply()).startswith(b"220 ")
    assert mx.connections[0].peer_host == source


async def test_haproxy_protection_rules(lab: Lab, mx: TestMX) -> None:
    sidecar, egress, stranger = lab.addresses.ipv4(), lab.addresses.ipv4(), lab.addresses.ipv4()
    open_proxy = lab.haproxy(
        allowed_clients=[sidecar],
        allowed_sources=[egress],
        allowed_destination_ports=[mx.endpoint.port],
    )
    local_guard = lab.haproxy(reject_local_destinations=True)

    async def outcome(
        haproxy: HAProxy, source: str, destination: Endpoint, local_address: str | None = None
    ) -> bytes | str:
        """The first reply, b"" for a close, "reset" for a TCP reset (at connect or later)."""
        try:
            stream = await haproxy.open_stream(source, destination, local_address=local_address)
        except (OSError, trio.BrokenResourceError):  # the reset may hit the header's send
            return "reset"
        async with RawSMTPClient(stream) as client:
            try:
                with trio.fail_after(5):
                    return await client.read_reply()
            except trio.BrokenResourceError:
                return "reset"

    # Allowed: right client, right egress source, right port.
    reply = await outcome(open_proxy, egress, mx.endpoint, sidecar)
    assert isinstance(reply, bytes) and reply.startswith(b"220 ")
    # tcp-request connection: the real peer is checked before the header; a reject is a reset.
    assert await outcome(open_proxy, egress, mx.endpoint) == "reset"
    # tcp-request session: the header's source and destination port; a reject is a close.
    other_port = Endpoint(mx.endpoint.host, free_port(mx.endpoint.host))
    assert await outcome(open_proxy, egress, other_port, sidecar) == b""
    assert await outcome(open_proxy, stranger, mx.endpoint, sidecar) == b""
    # dst_is_local: the test MX is on loopback, hence local, hence refused.
    assert await outcome(local_guard, egress, mx.endpoint) == b""
    assert len(mx.connections) == 1


def test_haproxy_startup_failure_reports_logs(haproxy_factory: HAProxyFactory) -> None:
    haproxy = haproxy_factory(start=False)
    haproxy.config_text += "\nthis-is-not-a-keyword\n"
    with pytest.raises(RuntimeError, match="this-is-not-a-keyword"):
        haproxy.start(timeout=5)
    assert not haproxy.running


def test_example_haproxy_cfg_is_valid(tmp_path: Path) -> None:
    egress_ips = tmp_path / "egress_ips.lst"
    egress_ips.write_text("203.0.113.10\n2001:db8::10\n")
    config = tmp_path / "haproxy.cfg"
    text = EXAMPLE_CFG.read_text()
    assert "/etc/haproxy/egress_ips.lst" in text
    config.write_text(text.replace("/etc/haproxy/egress_ips.lst", str(egress_ips)))
    result = subprocess.run(
        ["haproxy", "-c", "-f", str(config)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout + result.stderr
    for rule in (
        "accept-proxy",
        "tcp-request connection reject unless { src ",
        "tcp-request session reject unless { dst_port 25 }",
        "tcp-request session reject if { dst_is_local }",
        "tcp-request session reject unless { src -f /etc/haproxy/egress_ips.lst }",
        "source 0.0.0.0 usesrc clientip",
        "server mx 0.0.0.0:0",
        "retries 1",
    ):
        assert rule in text, rule
    assert " check" not in text.split("server mx 0.0.0.0:0", 1)[1].split("\n", 1)[0]


# -- dnsmasq ----------------------------------------------------------------------------------


@pytest.fixture
def zone(dnsmasq_factory: DnsmasqFactory, dns_stubs: DnsStubFactory) -> Endpoint:
    servfail = dns_stubs.rcode(dns.rcode.SERVFAIL)
    silent = dns_stubs.silent()
    dnsmasq = dnsmasq_factory(
        [
            MXRecord("example.test", "mx1.example.test", 10),
            MXRecord("example.test", "mx2.example.test", 20),
            HostRecord("mx1.example.test", ["127.0.0.21"]),
            HostRecord("mx2.example.test", ["127.0.0.22", "127.0.0.23", "::1"]),
            NullMXRecord("nullmx.test"),
            HostRecord("nomx.test", ["127.0.0.24"]),
            ForwardZone("servfail.test", servfail.endpoint),
            ForwardZone("timeout.test", silent.endpoint),
            RefusedZone("refused.test"),
        ],
        ttl=1,
    )
    return dnsmasq.endpoint


def test_dnsmasq_mx_a_aaaa(zone: Endpoint) -> None:
    resolver = make_resolver(zone)
    mx = resolver.resolve("example.test", "MX")
    assert sorted((r.preference, r.exchange.to_text()) for r in mx) == [
        (10, "mx1.example.test."),
        (20, "mx2.example.test."),
    ]
    assert mx.rrset is not None and mx.rrset.ttl == 1
    a = resolver.resolve("mx2.example.test", "A")
    assert sorted(r.address for r in a) == ["127.0.0.22", "127.0.0.23"]
    assert a.rrset is not None and a.rrset.ttl == 1
    aaaa = resolver.resolve("mx2.example.test", "AAAA")
    assert [r.address for r in aaaa] == ["::1"]
    assert aaaa.rrset is not None and aaaa.rrset.ttl == 1


def test_dnsmasq_null_mx(zone: Endpoint) -> None:
    response = query(zone, "nullmx.test", "MX")
    assert response.rcode() == dns.rcode.NOERROR
    (rrset,) = response.answer
    (record,) = rrset
    assert (record.preference, record.exchange.to_text()) == (0, ".")
    assert record.to_wire() == b"\x00\x00\x00"
    assert rrset.ttl == 1


def test_dnsmasq_no_answer_and_nxdomain(zone: Endpoint) -> None:
    resolver = make_resolver(zone)
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("nomx.test", "MX")
    assert [r.address for r in resolver.resolve("nomx.test", "A")] == ["127.0.0.24"]
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("mx1.example.test", "AAAA")
    for name in ("nothere.test", "deeper.nothere.example.test"):
        with pytest.raises(dns.resolver.NXDOMAIN):
            resolver.resolve(name, "MX")
        response = query(zone, name, "A")
        assert response.rcode() == dns.rcode.NXDOMAIN
        assert response.authority == []  # no SOA: no negative-caching TTL


def test_dnsmasq_servfail_refused_timeout(zone: Endpoint) -> None:
    assert query(zone, "x.servfail.test", "MX").rcode() == dns.rcode.SERVFAIL
    assert query(zone, "x.refused.test", "MX").rcode() == dns.rcode.REFUSED
    with pytest.raises(dns.exception.Timeout):
        query(zone, "x.timeout.test", "MX", timeout=0.3)
    resolver = make_resolver(zone, lifetime=0.5)
    for name in ("x.servfail.test", "x.refused.test"):
        with pytest.raises(dns.resolver.NoNameservers):
            resolver.resolve(name, "MX")
    with pytest.raises(dns.resolver.LifetimeTimeout):
        resolver.resolve("x.timeout.test", "MX")


def test_dns_stubs_directly(dns_stubs: DnsStubFactory) -> None:
    servfail, silent = dns_stubs.rcode(dns.rcode.SERVFAIL), dns_stubs.silent()
    assert query(servfail.endpoint, "a.test", "MX").rcode() == dns.rcode.SERVFAIL
    assert servfail.queries == [("udp", "a.test", "MX")]
    with pytest.raises(dns.exception.Timeout):
        query(silent.endpoint, "a.test", "MX", timeout=0.2)


async def test_dnsmasq_with_the_trio_async_resolver(zone: Endpoint) -> None:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [zone.host]
    resolver.port = zone.port
    answer = await resolver.resolve("example.test", "MX")
    assert {r.preference for r in answer} == {10, 20}
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("nothere.test", "MX")


def test_dnsmasq_restart(dnsmasq_factory: DnsmasqFactory) -> None:
    dnsmasq = dnsmasq_factory([HostRecord("a.test", ["127.0.0.30"])])
    dnsmasq.stop()
    assert not dnsmasq.running
    dnsmasq.restart()
    assert [r.address for r in dnsmasq.resolver().resolve("a.test", "A")] == ["127.0.0.30"]


# -- TestMX -----------------------------------------------------------------------------------


def _smtplib_send(
    endpoint: Endpoint, message: bytes, tls: ssl.SSLContext | None = None
) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP(endpoint.host, endpoint.port, local_hostname="client.test", timeout=10) as s:
        if tls is not None:
            s.starttls(context=tls)
        return s.sendmail("alice@client.test", ["bob@example.test", "carol@example.test"], message)


async def test_mx_records_a_message_from_smtplib(mx: TestMX) -> None:
    body = b"Subject: hi\r\n\r\nline one\r\n.leading dot\r\nlast line without newline"
    refused = await trio.to_thread.run_sync(_smtplib_send, mx.endpoint, body)
    assert refused == {}
    (message,) = mx.messages
    assert message.peer_host == "127.0.0.1"
    assert message.ehlo == "client.test"
    assert message.mail_from == b"mail FROM:<alice@client.test> size=64"  # smtplib's spelling
    assert message.rcpt_to == [b"rcpt TO:<bob@example.test>", b"rcpt TO:<carol@example.test>"]
    # smtplib dot-stuffs and adds the final CRLF; TestMX keeps the stuffing.
    assert message.data == (
        b"Subject: hi\r\n\r\nline one\r\n..leading dot\r\nlast line without newline\r\n"
    )
    assert message.reply == f"250 2.0.0 Ok: queued as {message.queue_id}\r\n".encode()
    assert not message.tls
    assert mx.connections[0].commands[-1] == b"QUIT"


async def test_mx_starttls_with_trustme(
    lab: Lab, tls_ca: trustme.CA, client_tls: ssl.SSLContext
) -> None:
    host = lab.addresses.ipv4()  # smtplib checks the certificate against the address it dialled
    context = server_tls_context(tls_ca, "mx.test", host)
    mx = await lab.mx(Endpoint(host, 0), tls_context=context)

    def send() -> None:
        with smtplib.SMTP(mx.endpoint.host, mx.endpoint.port, "client.test", timeout=10) as s:
            s.ehlo()
            assert s.has_extn("starttls")
            s.starttls(context=client_tls)
            s.ehlo()
            assert not s.has_extn("starttls")
            s.sendmail("a@client.test", ["b@example.test"], b"Subject: tls\r\n\r\nsecret\r\n")

    await trio.to_thread.run_sync(send)
    (message,) = mx.messages
    assert message.tls and message.data == b"Subject: tls\r\n\r\nsecret\r\n"
    assert mx.connections[0].tls
    assert mx.connections[0].commands.count(b"ehlo client.test") == 2


async def test_mx_starttls_raw_client_discards_pipelined_bytes(
    lab: Lab, mx_tls_context: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    mx = await lab.mx(tls_context=mx_tls_context)
    async with await RawSMTPClient.connect(mx.endpoint) as client:
        await client.read_reply()
        await client.command("EHLO c.test")
        await client.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        assert await client.read_reply() == b"220 2.0.0 Ready to start TLS\r\n"
        await _raw_tls_upgrade(client, client_tls, "mx.test")
        assert (await client.command("MAIL FROM:<a@b.test>")).startswith(b"503 5.5.1")
        assert (await client.command("EHLO c.test")).startswith(b"250-mx.test")
        assert await client.command("MAIL FROM:<a@b.test>") == b"250 2.1.0 Ok\r\n"
    await mx.wait_closed()
    assert mx.connections[0].discarded_before_tls == b"MAIL FROM:<injected@evil.test>\r\n"


async def _raw_tls_upgrade(client: RawSMTPClient, context: ssl.SSLContext, name: str) -> None:
    client.buffer.clear()
    stream = trio.SSLStream(client.stream, context, server_hostname=name)
    client.stream = stream
    await stream.do_handshake()


async def test_mx_multiline_final_reply_and_overrides(lab: Lab) -> None:
    mx = await lab.mx(
        multiline_final_reply=True,
        replies={
            "RCPT": lambda line: (
                smtp_reply(550, "5.1.1 no such user")
                if b"nobody" in line
                else smtp_reply(250, "2.1.5 Ok")
            )
        },
    )
    async with await RawSMTPClient.connect(mx.endpoint) as client:
        await client.read_reply()
        assert (await client.command("EHLO c.test")).endswith(b"250 SMTPUTF8\r\n")
        # Pipelined envelope in one write.
        await client.send(
            b"MAIL FROM:<a@c.test>\r\nRCPT TO:<nobody@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n"
        )
        replies = [await client.read_reply() for _ in range(4)]
        assert replies == [
            b"250 2.1.0 Ok\r\n",
            b"550 5.1.1 no such user\r\n",
            b"250 2.1.5 Ok\r\n",
            b"354 End data with <CR><LF>.<CR><LF>\r\n",
        ]
        await client.send(b"hello\r\n.\r\nQUIT\r\n")
        final = await client.read_reply()
        assert await client.read_reply() == b"221 2.0.0 Bye\r\n"
    (message,) = mx.messages
    assert final == message.reply
    qid = message.queue_id
    expected = f"250-2.0.0 Ok: queued as {qid}\r\n250 2.0.0 {qid} accepted by TestMX mx.test\r\n"
    assert final == expected.encode()
    assert message.rcpt_to == [b"RCPT TO:<b@x.test>"]
    assert message.data == b"hello\r\n"


@pytest.mark.parametrize(
    ("banner", "expected_after_ehlo"),
    [
        (smtp_reply(421, "4.3.2 try later"), b""),
        (smtp_reply(554, "5.7.1 go away"), b"503 5.5.0 Error: no service\r\n"),
    ],
)
async def test_mx_refusing_banners(lab: Lab, banner: bytes, expected_after_ehlo: bytes) -> None:
    mx = await lab.mx(banner=banner)
    async with await RawSMTPClient.connect(mx.endpoint) as client:
        assert await client.read_reply() == banner
        await client.send(b"EHLO c.test\r\n")
        try:
            reply = await client.read_reply()
        except trio.BrokenResourceError:  # 421 closed; the EHLO may meet a reset
            reply = b""
        assert reply == expected_after_ehlo


# Before: what a peer that resets does before and after the banner, and mid-command.
RESETS = [None, b"", b"EHLO c.test\r\n", b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\n"]


async def test_mx_survives_peers_that_reset(lab: Lab) -> None:
    """A peer that resets (a port probe that never reads the banner, a crashed client) costs
    that connection only: the TestMX goes on serving (issue 10 item 16)."""
    mx = await lab.mx()
    for _ in range(3):
        for before in RESETS:
            await trio.to_thread.run_sync(reset_connection, mx.endpoint, before)
    await trio.sleep(0.2)  # let the MX meet every reset
    async with await RawSMTPClient.connect(mx.endpoint) as client:
        assert (await client.read_reply()).startswith(b"220 ")
        assert (await client.command(b"EHLO c.test")).startswith(b"250")
        assert (await client.command(b"MAIL FROM:<a@c.test>")).startswith(b"250")
        assert (await client.command(b"RCPT TO:<r@mx.test>")).startswith(b"250")
        assert (await client.command(b"DATA")).startswith(b"354")
        assert (await client.command(b"Subject: x\r\n\r\nhi\r\n.")).startswith(b"250")
        assert (await client.command(b"QUIT")).startswith(b"221")
    (message,) = await mx.wait_for_messages(1)
    assert message.rcpt_to == [b"RCPT TO:<r@mx.test>"]


async def test_mx_close_and_hang_at_connect(lab: Lab) -> None:
    closing = await lab.mx(close_at="CONNECT")
    hanging = await lab.mx(hang_at="CONNECT")
    async with await RawSMTPClient.connect(closing.endpoint) as client:
        assert await client.read_reply() == b""
    async with await RawSMTPClient.connect(hanging.endpoint) as client:
        with trio.move_on_after(0.3) as scope:
            await client.read_reply()
        assert scope.cancelled_caught
    assert len(closing.connections) == 1 and len(hanging.connections) == 1


@pytest.mark.parametrize("phase", ["close", "hang"])
async def test_mx_stops_at_end_of_data(lab: Lab, phase: str) -> None:
    if phase == "close":
        mx = await lab.mx(close_at="END")
    else:
        mx = await lab.mx(hang_at="END")
    async with await RawSMTPClient.connect(mx.endpoint) as client:
        await client.read_reply()
        for line in ("EHLO c.test", "MAIL FROM:<a@c.test>", "RCPT TO:<b@x.test>", "DATA"):
            await client.command(line)
        await client.send(b"x\r\n.\r\n")
        with trio.move_on_after(0.3):
            assert await client.read_reply() == b""
    (message,) = await mx.wait_for_messages(1)
    assert message.reply == b"" and not message.accepted


@pytest.mark.parametrize("accept_bare_lf", [False, True])
async def test_mx_end_of_data_bare_lf(lab: Lab, accept_bare_lf: bool) -> None:
    mx = await lab.mx(accept_bare_lf=accept_bare_lf)
    smuggled = b"one\n.\nMAIL FROM:<evil@x.test>\r\ntwo\r\n.\r\n"
    async with await RawSMTPClient.connect(mx.endpoint) as client:
        await client.read_reply()
        for line in ("EHLO c.test", "MAIL FROM:<a@c.test>", "RCPT TO:<b@x.test>", "DATA"):
            await client.command(line)
        await client.send(smuggled)
        assert (await client.read_reply()).startswith(b"250 2.0.0")
        if accept_bare_lf:
            assert await client.read_reply() == b"250 2.1.0 Ok\r\n"  # the smuggled MAIL
            assert await client.read_reply() == b"500 5.5.2 Error: command not recognized\r\n"
    if accept_bare_lf:
        assert mx.messages[0].data == b"one\n"
    else:
        assert [m.data for m in mx.messages] == [b"one\n.\nMAIL FROM:<evil@x.test>\r\ntwo\r\n"]


async def test_mx_end_marker_split_across_chunks_and_empty_message(mx: TestMX) -> None:
    async with await RawSMTPClient.connect(mx.endpoint) as client:
        await client.read_reply()
        for line in ("HELO c.test", "MAIL FROM:<a@c.test>", "RCPT TO:<b@x.test>", "DATA"):
            await client.command(line)
        for piece in (b"ab\r", b"\n", b".", b"\r", b"\n"):
            await client.send(piece)
            await trio.testing.wait_all_tasks_blocked()
        assert (await client.read_reply()).startswith(b"250 ")
        for line in ("MAIL FROM:<a@c.test>", "RCPT TO:<b@x.test>", "DATA"):
            await client.command(line)
        assert (await client.command(".")).startswith(b"250 ")
    assert [m.data for m in mx.messages] == [b"ab\r\n", b""]


async def test_mx_state_errors(mx: TestMX) -> None:
    async with await RawSMTPClient.connect(mx.endpoint) as client:
        await client.read_reply()
        assert (await client.command("MAIL FROM:<a@c.test>")).startswith(b"503 5.5.1")
        await client.command("EHLO c.test")
        assert (await client.command("RCPT TO:<b@x.test>")).startswith(b"503 5.5.1")
        assert (await client.command("DATA")).startswith(b"503 5.5.1")
        await client.command("MAIL FROM:<a@c.test>")
        assert (await client.command("DATA")).startswith(b"554 5.5.1")
        assert (await client.command("STARTTLS")).startswith(b"502 5.5.1")
        assert await client.command("RSET") == b"250 2.0.0 Ok\r\n"
        assert (await client.command("VRFY x")).startswith(b"500 5.5.2")


async def test_mx_ten_megabytes_through_haproxy(lab: Lab, mx: TestMX) -> None:
    haproxy = lab.haproxy()
    line = b"0123456789" * 7 + b"\r\n"
    body = line * (10 * 1024 * 1024 // len(line)) + b"..dot-stuffed\r\n"
    source = lab.addresses.ipv4()
    started = trio.current_time()
    async with RawSMTPClient(await haproxy.open_stream(source, mx.endpoint)) as client:
        await client.read_reply()
        for command in ("EHLO c.test", "MAIL FROM:<a@c.test>", "RCPT TO:<b@x.test>", "DATA"):
            await client.command(command)
        await client.send(body + b".\r\n")
        assert (await client.read_reply()).startswith(b"250 2.0.0 Ok")
    (message,) = mx.messages
    assert message.data == body
    assert message.peer_host == source
    assert trio.current_time() - started < 10
