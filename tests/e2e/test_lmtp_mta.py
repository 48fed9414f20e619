"""Real MTAs on the LMTP listener (issue 16): Postfix's ``lmtp`` client
(``default_transport = lmtp:inet:HOST:PORT``) and Exim's smtp transport with
``protocol = lmtp``, each sending messages with recipients in three domains (two in one)
through a recording tap to a sidecar LMTP listener, which delivers through a real HAProxy to
one TestMX per domain.

What they prove: one LMTP transaction per message, one SMTP transaction per route per
message at the MXes, every recipient at its own MX exactly once from the binding's source,
the queue empty within seconds with no deferral; a route whose MX is down defers only its
own recipients, an MX that refuses at the end of data bounces only its own recipient.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from .harness import Lab, smtp_reply
from .mta import (
    ALICE,
    DOMAINS,
    POSTFIX_SENDMAIL,
    Arrival,
    Egress,
    EximFactory,
    MailStack,
    Postfix,
    PostfixFactory,
    exim_route,
    make_mail_stack,
    message_text,
    poll,
    run,
)

# Four recipients in three domains, two in the first.
RECIPIENTS = ["ann@one.test", "bea@one.test", "cid@two.test", "dan@three.test"]
MESSAGES = 10
LMTP_SERVICE = "lmtp      unix  -       -       n       -       -       lmtp"
# Bounces go to the sender's domain, which has no MX here: Postfix discards them.
DISCARD_OWN_DOMAIN = {"transport_maps": "inline:{ client.test=discard: }"}


@pytest.fixture
async def postfix_factory() -> AsyncIterator[PostfixFactory]:
    factory = PostfixFactory()
    try:
        yield factory
    finally:
        await factory.stop_all()


@pytest.fixture
def exim_factory() -> Iterator[EximFactory]:
    factory = EximFactory()
    try:
        yield factory
    finally:
        factory.remove_all()


def lmtp_main(egress: Egress) -> dict[str, str]:
    """The README's Postfix recipe: every remote recipient to the sidecar's LMTP listener."""
    return {
        "default_transport": f"lmtp:inet:{egress.endpoint.host}:{egress.endpoint.port}",
        **DISCARD_OWN_DOMAIN,
    }


def expected(count: int, source: str, recipients: list[str] = RECIPIENTS) -> list[Arrival]:
    return sorted(
        Arrival(r.split("@")[1], r, ALICE, source) for r in recipients for _ in range(count)
    )


async def wait_arrivals(stack: MailStack, count: int, timeout: float = 15) -> None:
    async def arrived() -> bool:
        return len(stack.arrivals()) >= count

    async def describe() -> str:
        return f"arrivals: {stack.arrivals()}\n{stack.dialogue()}"

    await poll(arrived, timeout=timeout, what=f"{count} arrivals", describe=describe)


async def send_batch(postfix: Postfix, count: int = MESSAGES, padding: int = 0) -> None:
    """``count`` messages to RECIPIENTS, each with ``padding`` more octets of body."""
    lines = b"".join(b"%075d\n" % i for i in range(padding // 76))
    for number in range(count):
        text = message_text(ALICE, RECIPIENTS, f"m{number}") + lines
        await postfix.sendmail(ALICE, RECIPIENTS, text)


@pytest.mark.parametrize("transport", ["lmtp", "sidecar"])
async def test_postfix_lmtp_delivers_a_multi_domain_batch_at_once(
    nursery: trio.Nursery, lab: Lab, postfix_factory: PostfixFactory, transport: str
) -> None:
    """Both README recipes: ``default_transport = lmtp:inet:...`` and a dedicated ``sidecar``
    transport of type lmtp."""
    stack = await make_mail_stack(nursery, lab, protocol="lmtp")
    egress = stack.egress["b1"]
    service = LMTP_SERVICE.replace("lmtp      unix", f"{transport:<9} unix")
    main = lmtp_main(egress)
    main["default_transport"] = main["default_transport"].replace("lmtp:", f"{transport}:", 1)
    postfix = await postfix_factory(main=main, services=[service])
    began = trio.current_time()
    await send_batch(postfix)
    await wait_arrivals(stack, MESSAGES * len(RECIPIENTS))
    await postfix.wait_queue_empty(timeout=10)
    elapsed = trio.current_time() - began
    assert elapsed < 15, elapsed

    # Every recipient reached its own MX once per message, from the binding's source.
    assert stack.arrivals() == expected(MESSAGES, egress.source), stack.dialogue()
    # One SMTP transaction per route per message: one.test's two recipients went together.
    for domain, mx in stack.mx.items():
        assert len(mx.messages) == MESSAGES, domain
        wanted = 2 if domain == "one.test" else 1
        assert all(len(m.rcpt_to) == wanted for m in mx.messages), domain
    # One LMTP transaction per message, every RCPT and every per-recipient reply a 250.
    transactions = stack.transactions()
    assert len(transactions) == MESSAGES, stack.dialogue()
    for transaction in transactions:
        assert sorted(transaction.accepted) == sorted(RECIPIENTS)
        assert transaction.finals == (250,) * len(RECIPIENTS), stack.dialogue()
    statuses = [(d.recipient, d.status) for d in postfix.deliveries()]
    assert sorted(statuses) == sorted((r, "sent") for r in RECIPIENTS for _ in range(MESSAGES))
    assert "status=deferred" not in postfix.log()


async def test_postfix_lmtp_notify_success_says_relayed_not_delivered(
    nursery: trio.Nursery, lab: Lab, postfix_factory: PostfixFactory
) -> None:
    """The listener offers no DSN, so Postfix (``lmtp_assume_final = no``, its default)
    reports a NOTIFY=SUCCESS recipient as "relayed": no sender is told "delivered" when the
    message only left for the MX. The success DSN comes back through the sidecar to the
    sender's domain's MX, where the test reads it."""
    stack = await make_mail_stack(nursery, lab, protocol="lmtp", domains=(*DOMAINS, "client.test"))
    egress = stack.egress["b1"]
    main = {"default_transport": lmtp_main(egress)["default_transport"]}
    postfix = await postfix_factory(main=main, services=[LMTP_SERVICE])
    sendmail = [POSTFIX_SENDMAIL, "-C", str(postfix.config_directory), "-i", "-N", "success"]
    await run(
        [*sendmail, "-f", ALICE, "--", RECIPIENTS[0]],
        stdin=message_text(ALICE, RECIPIENTS[:1], "dsn"),
        what="sendmail -N success",
    )
    own = stack.mx["client.test"]
    (notice,) = await own.wait_for_messages(1)
    assert notice.mail_from == b"MAIL FROM:<>" or notice.mail_from.startswith(b"MAIL FROM:<>")
    assert b"Action: relayed" in notice.data, notice.data.decode(errors="replace")
    assert b"Action: delivered" not in notice.data


async def test_postfix_lmtp_one_mx_down_defers_only_its_recipients(
    nursery: trio.Nursery, lab: Lab, postfix_factory: PostfixFactory
) -> None:
    stack = await make_mail_stack(
        nursery, lab, protocol="lmtp", mx_options={"two.test": {"close_at": "CONNECT"}}
    )
    egress = stack.egress["b1"]
    postfix = await postfix_factory(main=lmtp_main(egress), services=[LMTP_SERVICE])
    await send_batch(postfix, 2)
    delivered = [r for r in RECIPIENTS if not r.endswith("@two.test")]
    await wait_arrivals(stack, 2 * len(delivered))

    async def settled() -> bool:
        done = [d for d in postfix.deliveries()]
        return len(done) >= 2 * len(RECIPIENTS)

    await poll(settled, timeout=10, what="every recipient tried", describe=postfix.report)
    assert stack.arrivals() == expected(2, egress.source, delivered)
    for delivery in postfix.deliveries():
        want = "deferred" if delivery.recipient.endswith("@two.test") else "sent"
        assert delivery.status == want, (delivery, postfix.log())
    deferred = [d for d in postfix.deliveries() if d.status == "deferred"]
    assert all("4.4.1" in d.text or "451" in d.text for d in deferred), deferred
    queue = await postfix.queue()
    waiting = sorted(r["address"] for entry in queue for r in entry["recipients"])
    assert waiting == ["cid@two.test", "cid@two.test"]


async def test_postfix_lmtp_a_refusal_at_end_of_data_bounces_only_its_recipient(
    nursery: trio.Nursery, lab: Lab, postfix_factory: PostfixFactory
) -> None:
    refusal = smtp_reply(554, "5.7.1 dan does not take this")
    stack = await make_mail_stack(
        nursery, lab, protocol="lmtp", mx_options={"three.test": {"replies": {"END": refusal}}}
    )
    egress = stack.egress["b1"]
    postfix = await postfix_factory(main=lmtp_main(egress), services=[LMTP_SERVICE])
    await send_batch(postfix, 1)
    await postfix.wait_queue_empty(timeout=10)
    statuses = sorted((d.recipient, d.status) for d in postfix.deliveries() if d.recipient != ALICE)
    assert statuses == [
        ("ann@one.test", "sent"),
        ("bea@one.test", "sent"),
        ("cid@two.test", "sent"),
        ("dan@three.test", "bounced"),
    ], postfix.log()
    (bounced,) = [d for d in postfix.deliveries() if d.status == "bounced"]
    assert "554 5.7.1 dan does not take this" in bounced.text


async def test_exim_lmtp_delivers_the_same_batch(
    nursery: trio.Nursery, lab: Lab, exim_factory: EximFactory
) -> None:
    stack = await make_mail_stack(nursery, lab, protocol="lmtp")
    egress = stack.egress["b1"]
    # The README's Exim recipe: the smtp transport speaks LMTP to the listener (its port set
    # on the transport too: Exim looks up the default "lmtp" service port otherwise).
    exim = exim_factory(
        routers=exim_route("sidecar", egress.endpoint),
        transport=f"  protocol = lmtp\n  port = {egress.endpoint.port}\n",
    )
    for number in range(3):
        await exim.send(ALICE, RECIPIENTS, message_text(ALICE, RECIPIENTS, f"e{number}"))
    await wait_arrivals(stack, 3 * len(RECIPIENTS))
    assert stack.arrivals() == expected(3, egress.source), stack.dialogue()
    for domain, mx in stack.mx.items():
        assert len(mx.messages) == 3, domain
    transactions = stack.transactions()
    assert len(transactions) == 3, stack.dialogue()
    assert all(t.finals == (250,) * len(RECIPIENTS) for t in transactions)
    assert sorted(d.status for d in exim.deliveries()) == ["sent"] * 3 * len(RECIPIENTS)
    assert (await exim.queue()).strip() == "", exim.log()
    assert DOMAINS == ("one.test", "two.test", "three.test")


async def test_exim_lmtp_notify_success_is_reported_by_exim_itself(
    nursery: trio.Nursery, lab: Lab, exim_factory: EximFactory
) -> None:
    """What Exim (4.96) reports to a sender who asked NOTIFY=SUCCESS when its LMTP next hop
    (the sidecar) offers no DSN: a success DSN of its own, "Action: delivered" with the
    next hop's "250 Ok", as for any SMTP next hop without DSN (README, "LMTP listener").
    The message comes in over SMTP on stdin (``-bs``) so that it carries the DSN
    parameters; the DSN goes back through the sidecar to the sender's domain's MX."""
    stack = await make_mail_stack(nursery, lab, protocol="lmtp", domains=(*DOMAINS, "client.test"))
    egress = stack.egress["b1"]
    exim = exim_factory(
        routers=exim_route("sidecar", egress.endpoint),
        transport=f"  protocol = lmtp\n  port = {egress.endpoint.port}\n",
    )
    exim.config_text = "dsn_advertise_hosts = *\nacl_smtp_rcpt = accept\n" + exim.config_text
    exim.write_config()
    dialogue = (
        (
            "EHLO client.test\r\n"
            f"MAIL FROM:<{ALICE}> RET=HDRS\r\n"
            f"RCPT TO:<{RECIPIENTS[0]}> NOTIFY=SUCCESS\r\n"
            "DATA\r\n"
        ).encode()
        + message_text(ALICE, RECIPIENTS[:1], "dsn").replace(b"\n", b"\r\n")
        + (b".\r\nQUIT\r\n")
    )
    out = await run([*exim.args, "-odf", "-bs"], stdin=dialogue, what="exim -bs")
    assert "250" in out, out
    own = stack.mx["client.test"]
    (notice,) = await own.wait_for_messages(1)
    text = notice.data.decode(errors="replace")
    assert "Action: delivered" in text and "Diagnostic-Code: smtp; 250 Ok" in text, text
    # Nothing of the DSN request went on: the sidecar offers no DSN.
    assert all(b"NOTIFY=" not in rcpt for rcpt in stack.mx["one.test"].messages[0].rcpt_to)


# -- bench: the LMTP recipe against the recipient_limit = 1 recipe -------------------------------

SIDECAR_SMTP_TRANSPORT = "sidecar   unix  -       -       n       -       -       smtp"


async def measure(
    stack: MailStack, postfix: Postfix, messages: int, padding: int
) -> dict[str, float | int]:
    """Send ``messages`` x RECIPIENTS, wait for every arrival and an empty queue."""
    began = trio.current_time()
    await send_batch(postfix, messages, padding)
    await wait_arrivals(stack, messages * len(RECIPIENTS), timeout=60)
    await postfix.wait_queue_empty(timeout=30)
    elapsed = trio.current_time() - began
    mx_messages = [m for mx in stack.mx.values() for m in mx.messages]
    return {
        "seconds to empty the queue": round(elapsed, 2),
        "client transactions": len(stack.transactions()),
        "MX transactions": len(mx_messages),
        "MX connections": sum(len(mx.connections) for mx in stack.mx.values()),
        "message bytes at the MXes": sum(len(m.data) for m in mx_messages),
        "deferrals": postfix.log().count("status=deferred"),
    }


async def test_bench_lmtp_against_recipient_limit_1(
    nursery: trio.Nursery, lab: Lab, postfix_factory: PostfixFactory
) -> None:
    """The same batch (``LMTP_BENCH_MESSAGES`` messages, default 10, each to RECIPIENTS: 4
    in 3 domains) through the LMTP recipe and through the SMTP recipe with
    ``sidecar_destination_recipient_limit = 1``. LMTP: one copy per route (3 per message),
    the recipe one per recipient (4). ``bench/lmtp.py`` runs this and writes the figures."""
    messages = int(os.environ.get("LMTP_BENCH_MESSAGES", "10"))
    padding = int(os.environ.get("LMTP_BENCH_SIZE", "0"))
    lmtp_stack = await make_mail_stack(nursery, lab, protocol="lmtp")
    lmtp_postfix = await postfix_factory(
        main=lmtp_main(lmtp_stack.egress["b1"]), services=[LMTP_SERVICE]
    )
    lmtp = await measure(lmtp_stack, lmtp_postfix, messages, padding)

    smtp_stack = await make_mail_stack(nursery, lab)
    egress = smtp_stack.egress["b1"]
    recipe_postfix = await postfix_factory(
        main={
            "relayhost": f"[{egress.endpoint.host}]:{egress.endpoint.port}",
            "default_transport": "sidecar",
            "sidecar_destination_recipient_limit": "1",
            **DISCARD_OWN_DOMAIN,
        },
        services=[SIDECAR_SMTP_TRANSPORT],
    )
    recipe = await measure(smtp_stack, recipe_postfix, messages, padding)

    assert lmtp["MX transactions"] == 3 * messages and lmtp["deferrals"] == 0
    assert recipe["MX transactions"] == 4 * messages and recipe["deferrals"] == 0
    assert lmtp["client transactions"] == messages
    assert recipe["client transactions"] == 4 * messages
    assert lmtp["message bytes at the MXes"] * 4 < recipe["message bytes at the MXes"] * 3 + 1
    output = os.environ.get("LMTP_BENCH_OUTPUT")
    if output:
        lines = [
            f"{messages} messages of ~{padding} octets, each to {len(RECIPIENTS)} recipients in"
            " 3 domains (2 in one), real Postfix 3.7 -> sidecar -> HAProxy -> TestMXes;"
            " time: from the first sendmail (queued one after another) to an empty queue",
            f"{'figure':<32}{'LMTP recipe':>14}{'recipient_limit=1':>20}",
            *(f"{key:<32}{lmtp[key]!s:>14}{recipe[key]!s:>20}" for key in lmtp),
        ]
        Path(output).write_text("\n".join(lines) + "\n")
