"""OpenSMTPD (Debian 12: 6.8.0p2, unpacked by scripts/lib.sh: it conflicts with postfix) as the
sidecar's client: ``smtpd -d -f FILE`` with a ``relay host`` action to a sidecar listener
through a recording tap; a message to three domains is submitted over SMTP.

OpenSMTPD keeps its spool (/var/spool/smtpd) and control socket (/var/run/smtpd.sock) at
compiled-in paths: one instance per machine, so the tests here take a lock file for it.

What these tests prove about OpenSMTPD (README, "The MTA side"): with ``relay host``, every
recipient of a message goes in one transaction (it ignores ``LIMITS``); the sidecar takes one
route and 452s the others; OpenSMTPD keeps those queued (temporary failure, never a bounce) and
delivers them in later transactions, so every recipient arrives once, from the binding's
source address.
"""

from __future__ import annotations

import fcntl
import smtplib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from .harness import Endpoint, Lab
from .mta import ALICE, RECIPIENTS, MailStack, expected, message_text, poll, run

ROOT = Path("/opt/sidecar-test/opensmtpd")
SMTPD = ROOT / "usr/sbin/smtpd"
SMTPCTL = ROOT / "usr/sbin/smtpctl"
LOCK = Path("/run/sidecar-test-opensmtpd.lock")


def recipe(relay: Endpoint) -> str:
    """The README's OpenSMTPD recipe, with the test's tap as the sidecar's address (the
    README's is 127.0.0.1:2525)."""
    return (
        f'action "sidecar" relay host smtp+notls://{relay.host}:{relay.port}\n'
        f'match from any for any action "sidecar"\n'
    )


@pytest.fixture
async def opensmtpd_lock() -> AsyncIterator[None]:
    if not SMTPD.exists():
        pytest.fail(f"{SMTPD} is missing: run ./scripts/test.sh (scripts/lib.sh unpacks it)")
    with LOCK.open("w") as lock:
        await trio.to_thread.run_sync(fcntl.flock, lock, fcntl.LOCK_EX)
        yield


async def test_opensmtpd_delivers_every_recipient_of_a_mixed_domain_message(
    mail_stack: MailStack, lab: Lab, tmp_path: Path, opensmtpd_lock: None
) -> None:
    egress = mail_stack.egress["b1"]
    submit = lab.addresses.endpoint()
    config = tmp_path / "smtpd.conf"
    config.write_text(
        f"listen on {submit.host} port {submit.port} hostname opensmtpd.client.test\n"
        + recipe(egress.endpoint)
    )
    await run([str(SMTPD), "-n", "-f", str(config)], what="smtpd -n")
    log = tmp_path / "smtpd.log"
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [str(SMTPD), "-d", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    try:

        async def listening() -> bool:
            try:
                stream = await trio.open_tcp_stream(submit.host, submit.port)
            except OSError:
                return False
            await stream.aclose()
            return True

        await poll(listening, timeout=10, what="OpenSMTPD listening")

        def submit_message() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP(submit.host, submit.port, timeout=10) as client:
                return client.sendmail(ALICE, RECIPIENTS, message_text(ALICE, RECIPIENTS, "smtpd"))

        assert await trio.to_thread.run_sync(submit_message) == {}  # queued for every recipient

        async def first_arrived() -> bool:
            return len(mail_stack.arrivals()) >= 1

        await poll(first_arrived, timeout=20, what="the first route delivered")

        async def all_arrived() -> bool:
            if len(set(mail_stack.arrivals())) >= len(RECIPIENTS):
                return True
            # The 452'd recipients wait in the queue for OpenSMTPD's next retry (its backoff:
            # minutes); `smtpctl schedule all` (as root) retries them now.
            # Only when nothing is in flight: a forced retry of an envelope whose delivery
            # OpenSMTPD has not yet recorded sends it again (a duplicate of OpenSMTPD's own).
            queue = await run([str(SMTPCTL), "show", "queue"], what="smtpctl show queue")
            if "inflight" not in queue:
                await run([str(SMTPCTL), "schedule", "all"], what="smtpctl schedule all")
            await trio.sleep(1)
            return False

        async def describe() -> str:
            return f"{mail_stack.dialogue()}\n{log.read_text(errors='replace')}"

        await poll(all_arrived, timeout=30, what="every recipient delivered", describe=describe)
        # Every recipient arrived, from the binding's source; none was lost or bounced. A
        # recipient may arrive twice: OpenSMTPD 6.8 can attribute the replies to a pipelined
        # retry's RCPTs to the wrong envelopes (the tap records 250 then 452 on the wire, its
        # log says TempFail then Ok) and send the delivered one again (README, "OpenSMTPD").
        arrivals = mail_stack.arrivals()
        assert sorted(set(arrivals)) == expected(ALICE, egress.source), mail_stack.dialogue()
        transactions = mail_stack.transactions()
        assert all(t.final == 250 for t in transactions if t.accepted), mail_stack.dialogue()
        # The first transaction had all three, the sidecar took one route: 452 for the others,
        # which OpenSMTPD kept (TempFail), then sent in transactions of their own.
        assert transactions[0].accepted and len(transactions) >= len(RECIPIENTS)
        text = log.read_text(errors="replace")
        assert text.count('result="TempFail" stat="452 4.5.3') >= 2, text
        assert 'result="PermFail"' not in text, text
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
