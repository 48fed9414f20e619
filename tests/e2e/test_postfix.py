"""Postfix (Debian 12: 3.7) as the sidecar's client: a private instance (``postfix -c DIR``)
relays to a sidecar listener through a recording tap; the sidecar delivers through a real
HAProxy to TestMXes for three domains, each its own route (DESIGN.md invariant 3).

What these tests prove about Postfix (README, "The MTA side"):

* Postfix groups every recipient for the relayhost into one transaction. It ignores the
  sidecar's ``LIMITS RCPTDOMAINMAX=1`` and pipelines RCPTs for all three domains; the sidecar
  answers ``452 4.5.3`` for the two on other routes, and Postfix *defers* them (deferred queue,
  retried at the next queue run: minutes by default); it never bounces them.
* ``<transport>_destination_recipient_limit = 1`` on the transport that relays to the sidecar
  (the README's dedicated ``sidecar`` transport, or ``smtp_destination_recipient_limit = 1``
  for the default one) makes each delivery one recipient: every recipient goes out in one
  pass, with no 452 at all.
* ``sender_dependent_relayhost_maps`` sends each sender through its own sidecar listener, so
  each sender's mail leaves from its own binding's source address.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import pytest
import trio

from .harness import (
    Lab,
)
from .mta import (
    ALICE,
    BOB,
    DOMAINS,
    RECIPIENTS,
    Egress,
    MailStack,
    Postfix,
    PostfixFactory,
    expected,
    make_mail_stack,
    message_text,
    poll,
)

# Retry deferred mail within a second (defaults: queue_run_delay and minimal_backoff_time 300s).
FAST_RETRY = {"queue_run_delay": "1s", "minimal_backoff_time": "1s", "maximal_backoff_time": "1s"}
SIDECAR_TRANSPORT = "sidecar   unix  -       -       n       -       -       smtp"


@pytest.fixture
async def postfix_factory() -> AsyncIterator[PostfixFactory]:
    factory = PostfixFactory()
    try:
        yield factory
    finally:
        await factory.stop_all()


def relayhost(egress: Egress) -> str:
    return f"[{egress.endpoint.host}]:{egress.endpoint.port}"


async def send(postfix: Postfix, sender: str = ALICE) -> None:
    await postfix.sendmail(sender, RECIPIENTS, message_text(sender, RECIPIENTS, postfix.name))


async def wait_arrivals(stack: MailStack, count: int, timeout: float = 15) -> None:
    async def arrived() -> bool:
        return len(stack.arrivals()) >= count

    async def describe() -> str:
        return f"arrivals: {stack.arrivals()}\n{stack.dialogue()}"

    await poll(arrived, timeout=timeout, what=f"{count} arrivals", describe=describe)


async def wait_deferred(postfix: Postfix, timeout: float = 10) -> list[dict[str, object]]:
    """Until the queue holds only messages back in the deferred queue (or nothing)."""

    async def settled() -> list[dict[str, object]] | bool:
        queue = await postfix.queue()
        if all(entry["queue_name"] == "deferred" for entry in queue):
            return queue or True
        return False

    result = await poll(settled, timeout=timeout, what="queue settled", describe=postfix.report)
    return [] if result is True else list(result)


def rcpt_replies(stack: MailStack, client: str) -> list[tuple[str, int]]:
    """Every RCPT the MTA called ``client`` sent through the sidecar, with its reply code."""
    return [r for t in stack.transactions() if t.client == client for r in t.recipients]


async def test_postfix_retries_452_recipients_until_every_domain_is_delivered(
    mail_stack: MailStack, postfix_factory: PostfixFactory
) -> None:
    """One message to three domains with a plain ``relayhost``: the first transaction carries
    all three RCPTs (Postfix ignores LIMITS RCPTDOMAINMAX=1), the sidecar takes the first and
    452s the others, Postfix defers them and sends them at its next queue runs (1 s here).
    Each MX gets its recipient exactly once, from the binding's source address."""
    egress = mail_stack.egress["b1"]
    postfix = await postfix_factory(main={"relayhost": relayhost(egress), **FAST_RETRY})
    await send(postfix)

    await wait_arrivals(mail_stack, 3)
    await postfix.wait_queue_empty()
    assert mail_stack.arrivals() == expected(ALICE, egress.source), mail_stack.dialogue()

    first, *later = mail_stack.transactions()
    assert sorted(address for address, _ in first.recipients) == sorted(RECIPIENTS)
    assert sorted(code for _, code in first.recipients) == [250, 452, 452]
    assert first.final == 250
    # Each retry sends what is still deferred; the sidecar takes one route per transaction.
    assert [len(t.accepted) for t in later] == [1, 1]
    assert all(t.final == 250 for t in later)
    statuses = [(d.recipient, d.status) for d in postfix.deliveries()]
    assert sorted(s for _, s in statuses) == ["deferred"] * 3 + ["sent"] * 3, postfix.log()
    deferrals = [d for d in postfix.deliveries() if d.status == "deferred"]
    assert all("452 4.5.3" in d.text for d in deferrals), deferrals


@pytest.mark.parametrize(
    ("main", "services"),
    [
        pytest.param(
            {"default_transport": "sidecar", "sidecar_destination_recipient_limit": "1"},
            [SIDECAR_TRANSPORT],
            id="dedicated-transport",
        ),
        pytest.param({"smtp_destination_recipient_limit": "1"}, [], id="smtp-transport"),
    ],
)
async def test_postfix_recipient_limit_1_delivers_every_route_in_one_pass(
    mail_stack: MailStack,
    postfix_factory: PostfixFactory,
    main: dict[str, str],
    services: list[str],
) -> None:
    """The README recipe next to a plain relayhost, same message, same sidecar: with the
    recipe every recipient is its own transaction and all three arrive in one pass (no 452,
    nothing deferred); the plain instance gets 452 for two of them and keeps those in its
    deferred queue (default retry times: minutes)."""
    egress = mail_stack.egress["b1"]
    recipe = await postfix_factory(main={"relayhost": relayhost(egress), **main}, services=services)
    plain = await postfix_factory(main={"relayhost": relayhost(egress)})
    await send(recipe, ALICE)
    await send(plain, BOB)

    await recipe.wait_queue_empty(timeout=10)
    deferred = await wait_deferred(plain)
    await wait_arrivals(mail_stack, 4)

    arrivals = mail_stack.arrivals()
    assert [a for a in arrivals if a.sender == ALICE] == expected(ALICE, egress.source)
    (first,) = [a.recipient for a in arrivals if a.sender == BOB]

    recipe_rcpts = rcpt_replies(mail_stack, recipe.main["myhostname"])
    assert sorted(recipe_rcpts) == sorted((r, 250) for r in RECIPIENTS), mail_stack.dialogue()
    recipe_transactions = [
        t for t in mail_stack.transactions() if t.client == recipe.main["myhostname"]
    ]
    assert all(len(t.recipients) == 1 and t.final == 250 for t in recipe_transactions)
    # One attempt per recipient, each one sent: a single pass.
    assert sorted((d.recipient, d.status) for d in recipe.deliveries()) == sorted(
        (r, "sent") for r in RECIPIENTS
    ), recipe.log()

    assert sorted(code for _, code in rcpt_replies(mail_stack, plain.main["myhostname"])) == [
        250,
        452,
        452,
    ]
    (entry,) = deferred
    waiting = entry["recipients"]
    assert isinstance(waiting, list)
    assert sorted(r["address"] for r in waiting) == sorted(set(RECIPIENTS) - {first})
    assert all("452 4.5.3" in r["delay_reason"] for r in waiting), waiting


async def test_postfix_sender_dependent_relayhost_chooses_the_binding(
    nursery: trio.Nursery, lab: Lab, postfix_factory: PostfixFactory
) -> None:
    """Two bindings, two listeners; ``sender_dependent_relayhost_maps`` sends alice's mail to
    b1's listener and bob's to b2's (with the recipe): every MX sees alice's message from b1's
    source address and bob's from b2's."""
    stack = await make_mail_stack(
        nursery,
        lab,
        bindings=("b1", "b2"),
    )
    b1, b2 = stack.egress["b1"], stack.egress["b2"]
    assert b1.source != b2.source
    postfix = await postfix_factory(
        main={
            "relayhost": relayhost(b1),
            "sender_dependent_relayhost_maps": (
                f"inline:{{ {ALICE}={relayhost(b1)}, {BOB}={relayhost(b2)} }}"
            ),
            "default_transport": "sidecar",
            "sidecar_destination_recipient_limit": "1",
        },
        services=[SIDECAR_TRANSPORT],
    )
    await send(postfix, ALICE)
    await send(postfix, BOB)

    await postfix.wait_queue_empty(timeout=10)
    assert stack.arrivals() == sorted(expected(ALICE, b1.source) + expected(BOB, b2.source))
    assert {t.sender for t in b1.tap.transactions()} == {ALICE}
    assert {t.sender for t in b2.tap.transactions()} == {BOB}
    assert all(t.final == 250 for t in stack.transactions())


async def test_postfix_defers_a_452_recipient_and_never_bounces_it(
    mail_stack: MailStack, postfix_factory: PostfixFactory
) -> None:
    """Default retry times: after the first pass two recipients sit in the deferred queue with
    the sidecar's 452 4.5.3 as the reason; each flush (``postqueue -f``) delivers one more
    route, until the queue is empty. Nothing bounces: no ``status=bounced``, no message from
    ``<>`` at any MX, every recipient delivered exactly once."""
    egress = mail_stack.egress["b1"]
    postfix = await postfix_factory(main={"relayhost": relayhost(egress)})
    await send(postfix)

    deferred = await wait_deferred(postfix)
    assert len(mail_stack.arrivals()) == 1
    (entry,) = deferred
    assert entry["queue_name"] == "deferred"
    waiting = entry["recipients"]
    assert isinstance(waiting, list) and len(waiting) == 2
    assert all("452 4.5.3" in r["delay_reason"] for r in waiting), waiting

    # A flush can come while qmgr is still putting the message back in the deferred queue
    # (showq may list it there already): such a flush starts no pass, so it is sent again
    # rather than waited for. What counts is how many routes each delivery pass took.
    # A pass that takes longer than the wait below (a loaded machine) would be counted with
    # the next one: the wait is generous, and costs nothing when the pass is quick.
    passes: list[int] = []
    with trio.fail_after(90):
        while deferred:
            await postfix.flush()
            arrived = len(mail_stack.arrivals())
            with trio.move_on_after(20):
                await wait_arrivals(mail_stack, arrived + 1)
                await trio.sleep(0.2)  # a pass that delivered two routes would show it now
                passes.append(len(mail_stack.arrivals()) - arrived)
            deferred = await wait_deferred(postfix)
    assert passes == [1, 1]  # one more route per pass
    assert mail_stack.arrivals() == expected(ALICE, egress.source)
    assert all(d.status in ("sent", "deferred") for d in postfix.deliveries()), postfix.log()
    assert "status=bounced" not in postfix.log()
    for recipient in RECIPIENTS:
        statuses = [d.status for d in postfix.deliveries() if d.recipient == recipient]
        assert statuses[-1] == "sent" and statuses.count("sent") == 1, (recipient, statuses)


async def test_postfix_recipe_delivers_over_tls_where_offered(
    nursery: trio.Nursery, lab: Lab, postfix_factory: PostfixFactory, mx_tls_context: ssl.SSLContext
) -> None:
    """Issue 4's "done": a Postfix configured as the README says delivers a mixed batch, every
    recipient at the right MX from the right address, over TLS where the MX offers it."""
    offering = DOMAINS[:2]
    stack = await make_mail_stack(
        nursery,
        lab,
        tls_contexts={domain: mx_tls_context for domain in offering},
        tls="opportunistic",
    )
    egress = stack.egress["b1"]
    postfix = await postfix_factory(
        main={
            "relayhost": relayhost(egress),
            "default_transport": "sidecar",
            "sidecar_destination_recipient_limit": "1",
        },
        services=[SIDECAR_TRANSPORT],
    )
    await send(postfix, ALICE)
    await postfix.wait_queue_empty(timeout=10)
    await wait_arrivals(stack, len(RECIPIENTS))
    assert stack.arrivals() == expected(ALICE, egress.source)
    for domain, mx in stack.mx.items():
        (message,) = mx.messages
        assert message.tls == (domain in offering), domain
