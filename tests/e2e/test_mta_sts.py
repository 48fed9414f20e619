"""MTA-STS (RFC 8461) end to end: dnsmasq answers ``_mta-sts.sts.test`` TXT and
``mta-sts.sts.test``; a real HTTPS server (testkit PolicyServer, certificate from the test CA)
serves the policy on port 443 of its own loopback address; the sidecar trusts that CA through
``delivery.tls_ca_file`` (the same trust store as ``tls = "verify"``) and keeps its policies
under a per-test ``delivery.state_dir``.

The domain sts.test has two MX hosts unless a test says otherwise: ``mx.other.test``
(preference 10, not in the policies below) and ``mx.sts.test`` (preference 20), each with a
certificate for its own name. Without a policy the mail goes to mx.other.test; under an
"enforce" policy naming mx.sts.test it goes there, with verified TLS.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from .harness import (
    FAST_DELIVERY,
    MESSAGE,
    Dnsmasq,
    DnsRecord,
    Endpoint,
    HostRecord,
    Lab,
    MXRecord,
    PolicyResponse,
    PolicyServer,
    SendResult,
    Stack,
    TxtRecord,
    final_status,
    policy_body,
    refusal,
    run_cli,
    send,
    server_tls_context,
)

DOMAIN = "sts.test"
POLICY_HOST = f"mta-sts.{DOMAIN}"
OTHER, LISTED = "mx.other.test", "mx.sts.test"
RCPT = f"rcpt@{DOMAIN}"
ENFORCE = policy_body("enforce", [LISTED])


@dataclass
class StsWorld:
    """The stack, the policy server and what is needed to change the DNS."""

    lab: Lab
    stack: Stack
    server: PolicyServer
    records: list[DnsRecord]

    @property
    def dns(self) -> Dnsmasq:
        assert self.stack.dns is not None
        return self.stack.dns

    def mx(self, name: str) -> Any:
        return self.stack.mxes[self.stack.mx_hosts.index(name)]

    def serve(self, response: PolicyResponse | bytes) -> None:
        if isinstance(response, bytes):
            response = PolicyResponse(response)
        self.server.responses[POLICY_HOST] = response

    async def set_txt(self, text: str | None) -> None:
        """Restart dnsmasq (same address) with ``_mta-sts`` TXT ``text`` (None: no record),
        and wait out the 1 s TTL of what the sidecar has cached."""
        records = [r for r in self.records if not isinstance(r, TxtRecord)]
        if text is not None:
            records.append(TxtRecord(f"_mta-sts.{DOMAIN}", text))
        endpoint = self.dns.endpoint
        self.dns.stop()
        self.stack.dns = self.lab.dnsmasq(records, listen=endpoint)
        self.records = records
        await trio.sleep(1.2)

    async def send(self, endpoint: Endpoint | None = None) -> SendResult:
        return await send(endpoint or self.stack.endpoint, "a@client.test", [RCPT], MESSAGE)

    def delivered(self) -> dict[str, int]:
        return {name: len(self.mx(name).messages) for name in self.stack.mx_hosts}


async def sts_world(
    lab: Lab,
    nursery: trio.Nursery,
    ca: trustme.CA,
    tmp_path: Path,
    *,
    policy: PolicyResponse | bytes | None = ENFORCE,
    txt: str | None = "v=STSv1; id=1;",
    mx_hosts: Sequence[str] = (OTHER, LISTED),
    delivery: dict[str, Any] | None = None,
    server_ca: trustme.CA | None = None,
) -> StsWorld:
    """``server_ca``: the CA of the policy server's certificate (default ``ca``, which the
    sidecar trusts)."""
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = PolicyServer(Endpoint(lab.addresses.ipv4(), 443), server_ca or ca, [POLICY_HOST])
    await nursery.start(server.serve)
    records: list[DnsRecord] = [HostRecord(POLICY_HOST, [server.endpoint.host])]
    if txt is not None:
        records.append(TxtRecord(f"_mta-sts.{DOMAIN}", txt))
    stack = await lab.build(
        mxes=[{"tls_context": server_tls_context(ca, name)} for name in mx_hosts],
        hosts=list(mx_hosts),
        domains={DOMAIN: list(range(len(mx_hosts)))},
        records=records,
        server={"client_command_timeout": 10, "data_timeout": 10, "shutdown_grace": 1},
        delivery={
            **FAST_DELIVERY,
            "tls": "opportunistic",
            "tls_ca_file": str(ca_file),
            **(delivery or {}),
        },
    )
    assert stack.dns is not None
    world = StsWorld(lab, stack, server, [*stack_zone(stack), *records])
    if policy is not None:
        world.serve(policy)
    return world


def stack_zone(stack: Stack) -> list[DnsRecord]:
    """The MX and host records Lab.build gave dnsmasq (to start it again with other TXT)."""
    zone: list[DnsRecord] = [
        HostRecord(name, [address])
        for name, address in zip(stack.mx_hosts, stack.mx_addresses, strict=True)
    ]
    zone += [MXRecord(DOMAIN, name, 10 * (i + 1)) for i, name in enumerate(stack.mx_hosts)]
    return zone


def reply_text(result: SendResult) -> str:
    return result.refused[RCPT][1].decode()


async def test_enforce_delivers_only_to_a_listed_mx_with_verified_tls(
    lab: Lab, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    world = await sts_world(lab, nursery, tls_ca, tmp_path)
    result = await world.send()
    assert final_status(result) == (250, "2.0.0")
    assert world.delivered() == {OTHER: 0, LISTED: 1}
    (message,) = world.mx(LISTED).messages
    assert message.tls
    assert world.mx(OTHER).connections == []  # not even tried
    assert world.server.requests == [(POLICY_HOST, "/.well-known/mta-sts.txt")]
    # The policy is cached: the next message fetches nothing.
    assert final_status(await world.send()) == (250, "2.0.0")
    assert len(world.server.requests) == 1
    assert (tmp_path / "state" / "mta-sts.sqlite3").exists()


async def test_enforce_without_a_listed_mx_is_a_4xx_naming_the_policy(
    lab: Lab, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    world = await sts_world(lab, nursery, tls_ca, tmp_path, mx_hosts=[OTHER])
    result = await world.send()
    code, enhanced = refusal(result, RCPT)
    assert (code, enhanced) == (451, "4.7.5")
    text = reply_text(result)
    assert f"MTA-STS policy of {DOMAIN} (enforce, id 1)" in text, text
    assert OTHER in text, text
    assert world.mx(OTHER).connections == []
    # sidecar route says so, with the policy that excludes the MX.
    result = await run_cli("route", "-c", str(world.stack.config_path), RCPT)
    out = result.stdout.decode()
    assert result.returncode == 1, out + result.stderr.decode()
    assert "result:    451 4.7.5 MTA-STS policy of sts.test (enforce, id 1)" in out, out
    assert f"  MX hosts not in the policy, skipped: {OTHER}" in out, out


async def test_enforce_refuses_a_listed_mx_whose_certificate_is_not_for_it(
    lab: Lab, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    world = await sts_world(lab, nursery, tls_ca, tmp_path, mx_hosts=[LISTED])
    world.mx(LISTED).tls_context = server_tls_context(tls_ca, "elsewhere.test")
    result = await world.send()
    assert refusal(result, RCPT) == (451, "4.7.5")
    text = reply_text(result)
    assert "no MX delivered with verified TLS" in text and "Hostname mismatch" in text, text
    assert world.delivered() == {LISTED: 0}
    # Never in plaintext under an enforced policy.
    assert all(
        conn.tls or b"MAIL" not in b" ".join(conn.commands) for conn in world.mx(LISTED).connections
    )


async def test_testing_mode_delivers_as_before_and_logs_the_failure(
    lab: Lab,
    nursery: trio.Nursery,
    tls_ca: trustme.CA,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = await sts_world(lab, nursery, tls_ca, tmp_path, policy=policy_body("testing", [LISTED]))
    # The MX used has a certificate for another name: "enforce" would refuse it twice over.
    world.mx(OTHER).tls_context = server_tls_context(tls_ca, "elsewhere.test")
    with caplog.at_level(logging.INFO):
        result = await world.send()
    assert final_status(result) == (250, "2.0.0")
    assert world.delivered() == {OTHER: 1, LISTED: 0}
    (message,) = world.mx(OTHER).messages
    assert message.tls  # opportunistic, as without the policy
    assert f"MX {OTHER} does not match {LISTED}" in caplog.text
    assert "would fail under enforce (certificate-host-mismatch)" in caplog.text
    assert "certificate does not name mx.other.test" in caplog.text


FAILED_FETCHES = {
    "http-500": (PolicyResponse(b"oops\n", status=500), f"{POLICY_HOST}: HTTP 500"),
    "text-html": (
        PolicyResponse(ENFORCE, content_type="text/html"),
        f"{POLICY_HOST}: Content-Type 'text/html' is not text/plain",
    ),
    "invalid": (PolicyResponse(b"<html>policy</html>\n"), f"{POLICY_HOST}: invalid policy: "),
    "untrusted-certificate": (
        PolicyResponse(ENFORCE),
        f"{POLICY_HOST}: certificate not valid: unable to get local issuer certificate",
    ),
    "nobody-listening": (None, f"{POLICY_HOST}: "),
}


@pytest.mark.parametrize("case", list(FAILED_FETCHES))
async def test_a_failed_fetch_without_cached_policy_delivers_as_before(
    lab: Lab,
    nursery: trio.Nursery,
    tls_ca: trustme.CA,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    response, problem = FAILED_FETCHES[case]
    world = await sts_world(
        lab,
        nursery,
        tls_ca,
        tmp_path,
        policy=response,
        server_ca=trustme.CA() if case == "untrusted-certificate" else None,
    )
    if response is None:
        world.server.close()
    with caplog.at_level(logging.INFO):
        result = await world.send()
    assert final_status(result) == (250, "2.0.0")
    assert world.delivered() == {OTHER: 1, LISTED: 0}
    assert f"MTA-STS policy of {DOMAIN} (id 1) not fetched: {problem}" in caplog.text


async def test_a_redirect_is_not_followed(
    lab: Lab,
    nursery: trio.Nursery,
    tls_ca: trustme.CA,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    redirect = PolicyResponse(
        b"", status=301, headers={"Location": f"https://{POLICY_HOST}/policy.txt"}
    )
    world = await sts_world(lab, nursery, tls_ca, tmp_path, policy=redirect)
    world.server.responses["other"] = PolicyResponse(ENFORCE)
    with caplog.at_level(logging.INFO):
        result = await world.send()
    assert final_status(result) == (250, "2.0.0")
    assert world.delivered() == {OTHER: 1, LISTED: 0}  # no policy: as before
    assert world.server.requests == [(POLICY_HOST, "/.well-known/mta-sts.txt")]
    assert "HTTP 301 (redirects are not followed, RFC 8461 section 3.3)" in caplog.text


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "streamed"])
async def test_an_oversized_policy_is_refused(
    lab: Lab,
    nursery: trio.Nursery,
    tls_ca: trustme.CA,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    length: bool,
) -> None:
    # A valid enforce policy, made larger than 64 KiB by unknown keys.
    padding = b"".join(b"x%05d: %s\r\n" % (i, b"y" * 60) for i in range(1100))
    world = await sts_world(
        lab, nursery, tls_ca, tmp_path, policy=PolicyResponse(ENFORCE + padding, length=length)
    )
    with caplog.at_level(logging.INFO):
        result = await world.send()
    assert final_status(result) == (250, "2.0.0")
    assert world.delivered() == {OTHER: 1, LISTED: 0}
    assert "than 65536" in caplog.text


async def test_a_new_id_is_fetched_and_a_failed_fetch_keeps_the_cached_policy(
    lab: Lab,
    nursery: trio.Nursery,
    tls_ca: trustme.CA,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = await sts_world(lab, nursery, tls_ca, tmp_path, policy=policy_body("testing", [LISTED]))
    # id 1, testing: delivered as before; the same id again: nothing fetched.
    assert final_status(await world.send()) == (250, "2.0.0")
    assert final_status(await world.send()) == (250, "2.0.0")
    assert world.delivered() == {OTHER: 2, LISTED: 0}
    assert len(world.server.requests) == 1
    # id 2: fetched again, and its enforce policy applies at once.
    world.serve(ENFORCE)
    await world.set_txt("v=STSv1; id=2;")
    assert final_status(await world.send()) == (250, "2.0.0")
    assert len(world.server.requests) == 2
    assert world.delivered() == {OTHER: 2, LISTED: 1}
    # id 3 but the fetch fails: the cached policy (id 2, enforce) stays in force.
    world.serve(PolicyResponse(b"", status=500))
    await world.set_txt("v=STSv1; id=3;")
    with caplog.at_level(logging.INFO):
        assert final_status(await world.send()) == (250, "2.0.0")
    assert len(world.server.requests) == 3
    assert world.delivered() == {OTHER: 2, LISTED: 2}
    assert "not fetched, the cached one (id 2) stays" in caplog.text


async def test_a_restart_keeps_the_cached_policy(
    lab: Lab, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    world = await sts_world(lab, nursery, tls_ca, tmp_path)
    assert final_status(await world.send()) == (250, "2.0.0")
    assert world.delivered() == {OTHER: 0, LISTED: 1}
    world.stack.sidecar.shutdown.set()
    # An attacker strips the TXT record and blocks HTTPS; the sidecar restarts on the same
    # state_dir: the known policy still applies (RFC 8461 section 5.1, 10.2).
    world.server.close()
    await world.set_txt(None)
    config = {**world.stack.config}
    config["listener"] = [{"address": lab.listener(), "binding": "b1"}]
    second = await lab.sidecar(config)
    assert final_status(await world.send(second.endpoint)) == (250, "2.0.0")
    assert world.delivered() == {OTHER: 0, LISTED: 2}
    assert world.mx(OTHER).connections == []


async def test_route_shows_the_policy_and_the_mx_hosts_it_excludes(
    lab: Lab, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    world = await sts_world(lab, nursery, tls_ca, tmp_path)
    config = str(world.stack.config_path)
    result = await run_cli("route", "-c", config, RCPT)
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    lines = out.splitlines()
    assert "tls:       verify" in lines
    (sts,) = [line for line in lines if line.startswith("mta-sts:")]
    assert sts.startswith("mta-sts:   mode enforce, id 1, max_age 86400 (fetched now, valid until ")
    assert f"  mx patterns: {LISTED}" in lines
    assert f"  MX hosts not in the policy, skipped: {OTHER}" in lines
    assert f"  skipped {OTHER}: not an MX host of the MTA-STS policy" in lines
    assert not any(line.startswith(f"  {OTHER} [") for line in lines)  # not a candidate
    # Once the sidecar has the policy, route shows its cached copy (read only).
    assert final_status(await world.send()) == (250, "2.0.0")
    world.server.close()
    result = await run_cli("route", "-c", config, RCPT)
    assert "(cached, valid until " in result.stdout.decode(), result.stdout.decode()


async def test_check_names_a_state_dir_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    config = tmp_path / "bad-state.toml"
    config.write_text(
        '[[listener]]\naddress = "127.0.0.1:2525"\nbinding = "b"\n'
        '[binding.b]\nha_proxy_server = "127.0.0.1:5000"\nha_proxy_src_addr = "192.0.2.1"\n'
        f'[delivery]\nstate_dir = "{blocker}/state"\n'
    )
    for command in ("check", "run"):
        result = await run_cli(command, "-c", str(config))
        stderr = result.stderr.decode()
        assert result.returncode == 2, stderr
        assert stderr.startswith("error: delivery.state_dir: cannot "), stderr
        assert f"{blocker}" in stderr, stderr
        assert "Traceback" not in stderr


async def test_a_connection_kept_for_one_domains_policy_never_carries_anothers(
    lab: Lab, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    """Two domains on one MX set, both under "enforce": wide.test allows mx.other.test,
    sts.test only mx.sts.test. The connection the sidecar keeps after a message to wide.test
    (to mx.other.test, verified) must not carry the next message to sts.test, whose policy
    does not allow that MX (RFC 8461 section 4.1): the connection cache is keyed on the MX
    hosts each policy allows, not only on the MX set and "verify"."""
    ca_file = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    wide, wide_host = "wide.test", "mta-sts.wide.test"
    server = PolicyServer(Endpoint(lab.addresses.ipv4(), 443), tls_ca, [POLICY_HOST, wide_host])
    await nursery.start(server.serve)
    server.responses[POLICY_HOST] = PolicyResponse(ENFORCE)
    server.responses[wide_host] = PolicyResponse(policy_body("enforce", [OTHER, LISTED]))
    stack = await lab.build(
        mxes=[{"tls_context": server_tls_context(tls_ca, name)} for name in (OTHER, LISTED)],
        hosts=[OTHER, LISTED],
        domains={DOMAIN: [0, 1], wide: [0, 1]},
        records=[
            HostRecord(POLICY_HOST, [server.endpoint.host]),
            HostRecord(wide_host, [server.endpoint.host]),
            TxtRecord(f"_mta-sts.{DOMAIN}", "v=STSv1; id=1;"),
            TxtRecord(f"_mta-sts.{wide}", "v=STSv1; id=1;"),
        ],
        server={"client_command_timeout": 10, "data_timeout": 10, "shutdown_grace": 1},
        delivery={**FAST_DELIVERY, "tls": "opportunistic", "tls_ca_file": str(ca_file)},
    )
    other, listed = stack.mxes
    result = await send(stack.endpoint, "a@client.test", [f"rcpt@{wide}"], MESSAGE)
    assert final_status(result) == (250, "2.0.0")
    assert (len(other.messages), len(listed.messages)) == (1, 0)
    result = await send(stack.endpoint, "a@client.test", [RCPT], MESSAGE)
    assert final_status(result) == (250, "2.0.0")
    assert (len(other.messages), len(listed.messages)) == (1, 1)
    assert listed.messages[0].tls
    # One message with both recipients: two routes, never one transaction via mx.other.test.
    result = await send(stack.endpoint, "a@client.test", [f"rcpt@{wide}", RCPT], MESSAGE)
    assert result.refused.get(RCPT, (0,))[0] == 452, result
    assert len(listed.messages) == 1 and len(other.messages) == 2
