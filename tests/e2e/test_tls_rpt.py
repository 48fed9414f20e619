"""TLS-RPT (RFC 8460) end to end: a real ``sidecar run`` delivers through HAProxy to MXes with
and without STARTTLS (certificates from trustme; one domain under ``tls = "verify"`` with a
CA the sidecar does not trust), records each TLS session attempt in its state_dir, writes
it on SIGTERM; then ``sidecar tls-report`` looks up ``_smtp._tls`` TXT records in dnsmasq
and writes the gzip JSON reports (and the e-mails) of the domains that publish one."""

from __future__ import annotations

import gzip
import json
import signal
from datetime import UTC, datetime
from email import message_from_bytes, policy
from pathlib import Path

import trustme

from .harness import (
    MESSAGE,
    Lab,
    Processes,
    TxtRecord,
    final_status,
    refusal,
    run_cli,
    send,
    server_tls_context,
    wait_exit,
    wait_listening,
)


async def test_reports_of_a_day_of_mixed_tls_results(
    lab: Lab, processes: Processes, tmp_path: Path, tls_ca: trustme.CA
) -> None:
    wrong_ca = tmp_path / "wrong-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(wrong_ca))
    domains = ["good.test", "plain.test", "strict.test"]
    stack = await lab.build(
        mxes=[
            {"tls_context": server_tls_context(tls_ca, "mx.good.test")},
            {},  # no STARTTLS
            {"tls_context": server_tls_context(tls_ca, "mx.strict.test")},
        ],
        hosts=[f"mx.{domain}" for domain in domains],
        domains={domain: index for index, domain in enumerate(domains)},
        records=[
            TxtRecord(
                "_smtp._tls.good.test",
                ("v=TLSRPTv1; rua=mailto:tlsrpt@good.test,", "https://reports.good.test/v1"),
            ),
            TxtRecord("_smtp._tls.strict.test", ("v=TLSRPTv1; rua=mailto:rpt@strict.test",)),
            TxtRecord("_smtp._tls.plain.test", ("v=spf1 -all",)),  # not TLS-RPT's
        ],
        server={"hostname": "sidecar.test", "shutdown_grace": 2},
        delivery={
            "tls": "opportunistic",
            "tls_ca_file": str(wrong_ca),
            "mx_command_timeout": 5,
            "banner_timeout": 5,
            "connection_reuse_limit": 1,  # a TLS session per message (a reused one counts once)
        },
        sections={"domain": {"strict.test": {"tls": "verify"}}},
        start=False,
    )
    state = Path(stack.config["delivery"]["state_dir"])
    started = await processes.start(["run", "-c", str(stack.config_path)])
    await wait_listening(stack.listener, started)
    for _ in range(2):
        result = await send(stack.listener, "a@client.test", ["rcpt@good.test"], MESSAGE)
        assert final_status(result) == (250, "2.0.0")
    result = await send(stack.listener, "a@client.test", ["rcpt@plain.test"], MESSAGE)
    assert final_status(result) == (250, "2.0.0")
    result = await send(stack.listener, "a@client.test", ["rcpt@strict.test"], MESSAGE)
    assert refusal(result, "rcpt@strict.test")[0] == 451
    # Before the first periodic write (every 5 s): the last one at shutdown has them all.
    started.process.send_signal(signal.SIGTERM)
    assert await wait_exit(started, timeout=15) == 0
    assert (state / "tls-rpt.sqlite3").exists()

    out = tmp_path / "reports"
    today = datetime.now(UTC).date()
    done = await run_cli(
        "tls-report",
        "-c",
        str(stack.config_path),
        "--date",
        today.isoformat(),
        "--output-dir",
        str(out),
        "--organization",
        "Example Sender",
        "--submitter",
        "sender.test",
    )
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert "no TLS-RPT record: plain.test" in stderr
    start = int(datetime(today.year, today.month, today.day, tzinfo=UTC).timestamp())
    good_name = f"sender.test!good.test!{start}!{start + 86399}"
    strict_name = f"sender.test!strict.test!{start}!{start + 86399}"
    assert done.stdout.decode().splitlines() == [
        f"mailto:tlsrpt@good.test {out / good_name}.eml",
        f"https://reports.good.test/v1 {out / good_name}.json.gz",
        f"mailto:rpt@strict.test {out / strict_name}.eml",
    ]
    assert sorted(path.name for path in out.iterdir()) == sorted(
        [f"{good_name}.eml", f"{good_name}.json.gz", f"{strict_name}.eml", f"{strict_name}.json.gz"]
    )

    good = json.loads(gzip.decompress((out / f"{good_name}.json.gz").read_bytes()))
    assert good["organization-name"] == "Example Sender"
    assert good["contact-info"] == "postmaster@sender.test"
    assert good["date-range"]["start-datetime"] == f"{today.isoformat()}T00:00:00Z"
    assert good["policies"] == [
        {
            "policy": {"policy-type": "no-policy-found", "policy-domain": "good.test"},
            "summary": {"total-successful-session-count": 2, "total-failure-session-count": 0},
        }
    ]
    strict = json.loads(gzip.decompress((out / f"{strict_name}.json.gz").read_bytes()))
    ((entry),) = strict["policies"]
    assert entry["summary"] == {
        "total-successful-session-count": 0,
        "total-failure-session-count": 1,
    }
    assert entry["failure-details"] == [
        {
            "result-type": "certificate-not-trusted",
            "sending-mta-ip": stack.source,
            "receiving-mx-hostname": "mx.strict.test",
            "receiving-ip": stack.mx_addresses[2],
            "failed-session-count": 1,
            "failure-reason-code": "unable to get local issuer certificate",
        }
    ]
    mail = message_from_bytes((out / f"{strict_name}.eml").read_bytes(), policy=policy.default)
    assert mail["TLS-Report-Domain"] == "strict.test"
    assert mail["TLS-Report-Submitter"] == "sender.test"
    assert mail.get_content_type() == "multipart/report"
    assert mail.get_param("report-type") == "tlsrpt"
    attachment = list(mail.iter_parts())[1]
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert attachment.get_payload(decode=True) == (out / f"{strict_name}.json.gz").read_bytes()

    # plain.test's sessions (STARTTLS not offered) are recorded all the same.
    done = await run_cli("tls-report", "-c", str(stack.config_path), "--date", "2000-01-01")
    assert done.returncode == 0 and done.stdout == b""


async def test_a_state_dir_that_cannot_be_written_stops_the_start(
    lab: Lab, processes: Processes, tmp_path: Path
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    stack = await lab.build(delivery={"state_dir": str(blocker / "state")}, start=False)
    started = await processes.start(["run", "-c", str(stack.config_path)])
    assert await wait_exit(started, timeout=10) == 2
    # The first user of state_dir to find it unusable says so (the MTA-STS cache, or the
    # TLS-RPT store when MTA-STS is off).
    assert started.stderr.startswith("error: delivery.state_dir: cannot "), started.stderr
    assert f"{blocker}/state" in started.stderr, started.stderr


async def test_worker_processes_share_the_store(
    lab: Lab, processes: Processes, tmp_path: Path, tls_ca: trustme.CA
) -> None:
    """``server.workers = 2``: each worker counts the sessions it made and writes them at its
    shutdown into the one file; the report has them all."""
    stack = await lab.build(
        mxes=[{"tls_context": server_tls_context(tls_ca, "mx.good.test")}],
        hosts=["mx.good.test"],
        domains={"good.test": 0},
        records=[TxtRecord("_smtp._tls.good.test", ("v=TLSRPTv1; rua=mailto:r@good.test",))],
        server={"hostname": "sidecar.test", "shutdown_grace": 2, "workers": 2},
        delivery={"tls": "opportunistic", "connection_reuse_limit": 1},
        start=False,
    )
    started = await processes.start(["run", "-c", str(stack.config_path)])
    await wait_listening(stack.listener, started)
    sent = 12
    for _ in range(sent):
        result = await send(stack.listener, "a@client.test", ["rcpt@good.test"], MESSAGE)
        assert final_status(result) == (250, "2.0.0")
    started.process.send_signal(signal.SIGTERM)
    assert await wait_exit(started, timeout=15) == 0
    out = tmp_path / "reports"
    today = datetime.now(UTC).date().isoformat()
    config = str(stack.config_path)
    done = await run_cli("tls-report", "-c", config, "--date", today, "--output-dir", str(out))
    assert done.returncode == 0, done.stderr.decode()
    (path,) = out.glob("*.json.gz")
    report = json.loads(gzip.decompress(path.read_bytes()))
    (entry,) = report["policies"]
    assert entry["summary"]["total-successful-session-count"] == sent
