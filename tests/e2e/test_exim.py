"""Exim (Debian 12: 4.96, unpacked by scripts/lib.sh) as the sidecar's client: a private
configuration (``exim -C FILE``) whose manualroute router sends every remote domain to a
sidecar listener through a recording tap; each message is delivered in the foreground
(``exim -odf``), so when the command returns Exim has done all it will do with it.

What these tests prove about Exim (README, "The MTA side"):

* Debian's Exim 4.96 is built without LIMITS support (``exim -bV`` does not list
  ``ESMTP_Limits``), so it ignores the sidecar's ``LIMITS RCPTDOMAINMAX=1``: its first
  transaction carries every domain. On ``452 4.5.3`` it does not defer: it sends a new MAIL
  with the 452'd recipients at once, on the same connection, until all are taken. With a
  build that lists ``ESMTP_Limits`` the test expects one domain per transaction instead.
* ``multi_domain = false`` on the smtp transport gives one domain per transaction with any
  Exim version: no 452 at all.
* Routers chosen by sender (``senders = ...``) send each sender through its own listener, so
  each sender's mail leaves from its own binding's source address.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio

from .harness import (
    Lab,
)
from .mta import (
    ALICE,
    BOB,
    RECIPIENTS,
    Exim,
    EximFactory,
    MailStack,
    exim_route,
    expected,
    make_mail_stack,
    message_text,
)


@pytest.fixture
def exim_factory() -> Iterator[EximFactory]:
    factory = EximFactory()
    try:
        yield factory
    finally:
        factory.remove_all()


async def send(exim: Exim, sender: str = ALICE) -> None:
    await exim.send(sender, RECIPIENTS, message_text(sender, RECIPIENTS, "exim"))


async def assert_all_delivered(exim: Exim, messages: int = 1) -> None:
    """Exim logged every recipient of each message as delivered, none deferred or failed, and
    its spool is empty."""
    statuses = sorted((d.recipient, d.status) for d in exim.deliveries())
    assert statuses == sorted([(r, "sent") for r in RECIPIENTS] * messages), exim.log()
    assert (await exim.queue()).strip() == ""


async def test_exim_retries_452_recipients_at_once_on_the_same_connection(
    mail_stack: MailStack, exim_factory: EximFactory
) -> None:
    """One message to three domains, one delivery run: Exim's first transaction carries all
    three domains (no LIMITS support in Debian's 4.96); the sidecar takes one route and 452s
    the rest; Exim sends the 452'd recipients again at once in a new transaction on the same
    connection, until all three are delivered. Nothing is deferred."""
    egress = mail_stack.egress["b1"]
    exim = exim_factory(routers=exim_route("sidecar", egress.endpoint))
    _, limits = await exim.version()
    await send(exim)

    assert mail_stack.arrivals() == expected(ALICE, egress.source), mail_stack.dialogue()
    await assert_all_delivered(exim)
    transactions = mail_stack.transactions()
    assert len(egress.tap.sessions) == 1  # one connection for all of it
    assert all(t.final == 250 and len(t.accepted) == 1 for t in transactions)
    if limits:
        # A build with ESMTP_Limits should honour RCPTDOMAINMAX=1: one domain per transaction.
        assert all(len(t.recipients) == 1 for t in transactions), mail_stack.dialogue()
        return
    first, second, third = transactions
    assert sorted(address for address, _ in first.recipients) == sorted(RECIPIENTS)
    assert len(first.deferred) == 2
    # Each new transaction retries exactly what the previous one got 452 for.
    assert [address for address, _ in second.recipients] == first.deferred
    assert len(second.deferred) == 1
    assert [address for address, _ in third.recipients] == second.deferred
    assert third.deferred == []


async def test_exim_multi_domain_false_sends_one_domain_per_transaction(
    mail_stack: MailStack, exim_factory: EximFactory
) -> None:
    """``multi_domain = false`` on the transport: one transaction per domain, so the sidecar
    never needs a 452, whatever the Exim version."""
    egress = mail_stack.egress["b1"]
    exim = exim_factory(
        routers=exim_route("sidecar", egress.endpoint), transport="  multi_domain = false\n"
    )
    await send(exim)

    assert mail_stack.arrivals() == expected(ALICE, egress.source), mail_stack.dialogue()
    await assert_all_delivered(exim)
    transactions = mail_stack.transactions()
    assert len(transactions) == 3
    assert all(len(t.recipients) == 1 and t.final == 250 for t in transactions)
    assert all(t.deferred == [] for t in transactions)


async def test_exim_routes_each_sender_through_its_binding(
    nursery: trio.Nursery, lab: Lab, exim_factory: EximFactory
) -> None:
    """Two bindings, two listeners, one router per sender (``senders = ...``): every MX sees
    alice's message from b1's source address and bob's from b2's."""
    stack = await make_mail_stack(
        nursery,
        lab,
        bindings=("b1", "b2"),
    )
    b1, b2 = stack.egress["b1"], stack.egress["b2"]
    assert b1.source != b2.source
    exim = exim_factory(
        routers=exim_route("sidecar_b1", b1.endpoint, condition=f"  senders = {ALICE}\n")
        + exim_route("sidecar_b2", b2.endpoint, condition=f"  senders = {BOB}\n")
    )
    await send(exim, ALICE)
    await send(exim, BOB)

    assert stack.arrivals() == sorted(expected(ALICE, b1.source) + expected(BOB, b2.source))
    await assert_all_delivered(exim, messages=2)
    assert {t.sender for t in b1.tap.transactions()} == {ALICE}
    assert {t.sender for t in b2.tap.transactions()} == {BOB}
