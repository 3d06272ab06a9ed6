"""Crash recovery through Twilio never adopts a message another outbox item owns: Twilio
has no idempotency key, so recovery finds an interrupted item's message by its text and
phone, and a twin (the same text to the same phone: a second reminder worded alike, one
message each to two people sharing a phone) matches too. Against the local Twilio
wire-format server, on both engines."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from careloop.clock import VirtualClock
from careloop.errors import TransientError
from careloop.store import Store
from careloop.tables import OutboxItem
from channels.outbox import DeliverStage, Recovery
from channels.twilio_loopback import FakeTwilio
from channels.twilio_sms import TwilioSmsChannel
from tests.test_channels_outbox import add_items, audits, person, rows
from tests.test_channels_twilio_sms import channel

__all__ = ["person"]  # the fixture, used by the tests below


@pytest.fixture
def fake(store: Store) -> Iterator[FakeTwilio]:
    f = FakeTwilio()
    f.now = store.clock.now  # Twilio's clock is the store's: the lookup window is in its time
    f.start()
    yield f
    f.stop()


def stage_for(store: Store, ch: Any) -> DeliverStage:
    """The deliver stage with ``ch`` as its ``sms`` channel (``Any``: a concrete channel's
    ``Config`` is narrower than the protocol's, which mypy reads as a mismatch)."""
    return DeliverStage(store, {"sms": ch})


def advance(store: Store, by: timedelta) -> None:
    clock = store.clock
    assert isinstance(clock, VirtualClock)
    clock.set(clock.now() + by)


def crashed(store: Store, person: int, n: int = 1) -> list[int]:
    """Items a dead process had claimed: ``sending``, their attempt started now."""
    return add_items(store, person, n=n, status="sending", attempts=1, next_attempt_at=store.clock.now())


def sent_by_the_dead_process(fake: FakeTwilio, store: Store, item_id: int) -> str:
    """Send ``item_id`` to Twilio as the process that then died did (its outcome never
    committed); the message's SID."""
    [item] = [r for r in rows(store) if r.id == item_id]

    async def go() -> None:
        ch = channel(fake)
        try:
            await ch.send(item)
        finally:
            await ch.aclose()

    asyncio.run(go())
    return str(fake.messages[-1]["sid"])


def recover(store: Store, fake: FakeTwilio, **kw: Any) -> Recovery:
    async def go() -> Recovery:
        ch = channel(fake, **kw)
        try:
            return await stage_for(store, ch).recover()
        finally:
            await ch.aclose()

    return asyncio.run(go())


def by_id(store: Store) -> dict[int, Any]:
    return {r.id: r for r in rows(store) if r.id is not None}


@pytest.mark.parametrize("resend_if_absent", [False, True])
def test_a_twin_s_settled_message_is_not_adopted(
    store: Store, person: int, fake: FakeTwilio, resend_if_absent: bool
) -> None:
    [a] = add_items(store, person)

    async def deliver() -> None:
        ch = channel(fake)
        try:
            stage = stage_for(store, ch)
            while await stage.run_once():
                pass
        finally:
            await ch.aclose()

    asyncio.run(deliver())
    s1 = by_id(store)[a].provider_id
    assert s1 == fake.messages[0]["sid"] and by_id(store)[a].status == "sent"
    # B, the same text to the same phone, claimed a moment later; its process died
    # before the request reached Twilio.
    [b] = crashed(store, person)
    advance(store, timedelta(minutes=10))

    report = recover(store, fake, resend_if_absent=resend_if_absent)

    got = by_id(store)
    assert (report.adopted, report.unknown, report.resend) == (0, 1, 0)
    # Unknown even with resend_if_absent: the lookup did not find nothing, it found this
    # very text already on that phone; a resend would duplicate it (module doc).
    assert (got[b].status, got[b].provider_id) == ("unknown", None)
    assert (got[a].status, got[a].provider_id) == ("sent", s1)
    assert len(fake.messages) == 1
    [rec] = audits(store, "outbox.recover")
    assert rec.entity == f"outbox/{b}"
    assert rec.detail == {"channel": "sms", "outcome": "unknown", "reason": "provider-id-owned"}


def test_two_crashed_twins_do_not_both_claim_one_message(store: Store, person: int, fake: FakeTwilio) -> None:
    a, b = crashed(store, person, n=2)
    sent_by_the_dead_process(fake, store, a)  # one of them reached Twilio: which, nobody knows
    advance(store, timedelta(minutes=10))

    report = recover(store, fake)

    got = by_id(store)
    # Neither is guessed to own it: both go to staff review.
    assert (report.adopted, report.unknown) == (0, 2)
    assert [(got[i].status, got[i].provider_id) for i in (a, b)] == [("unknown", None)] * 2
    reasons = [r.detail.get("reason") for r in audits(store, "outbox.recover")]
    assert reasons == ["provider-id-contested"] * 2
    assert len(fake.messages) == 1


def test_a_twin_recovered_later_does_not_take_the_message_adopted_before(
    store: Store, person: int, fake: FakeTwilio
) -> None:
    [a] = crashed(store, person)
    s1 = sent_by_the_dead_process(fake, store, a)
    advance(store, timedelta(minutes=3))  # more than the clock skew allowed: s1 is not B's
    [b] = crashed(store, person)  # its process died too, before reaching Twilio
    advance(store, timedelta(minutes=2, seconds=30))

    first = recover(store, fake)  # A's lease is over, B's is not
    assert (first.adopted, first.unknown) == (1, 0)
    assert by_id(store)[a].provider_id == s1

    advance(store, timedelta(minutes=5))
    second = recover(store, fake)

    got = by_id(store)
    assert (second.adopted, second.unknown) == (0, 1)
    assert (got[a].status, got[a].provider_id) == ("sent", s1)
    assert (got[b].status, got[b].provider_id) == ("unknown", None)
    assert sum(1 for r in got.values() if r.provider_id == s1) == 1


def test_an_unowned_single_match_is_still_adopted(store: Store, person: int, fake: FakeTwilio) -> None:
    [a] = crashed(store, person)
    s1 = sent_by_the_dead_process(fake, store, a)
    [other] = add_items(store, person, status="sent", provider_id="SM" + "0" * 32)  # someone else's sid
    advance(store, timedelta(minutes=10))

    report = recover(store, fake)

    got = by_id(store)
    assert (report.adopted, report.unknown, report.resend) == (1, 0, 0)
    assert (got[a].status, got[a].provider_id) == ("sent", s1)
    assert got[other].provider_id == "SM" + "0" * 32
    assert audits(store, "outbox.recover") == []
    assert len(fake.messages) == 1


class _FlakyLookup:
    """The Twilio channel, but the lookup of one item fails transiently (a 503 on the GET)."""

    def __init__(self, inner: TwilioSmsChannel, flaky_id: int) -> None:
        self.inner, self.flaky_id = inner, flaky_id
        self.id, self.capabilities, self.config = inner.id, inner.capabilities, inner.config

    async def send(self, item: OutboxItem) -> Any:
        return await self.inner.send(item)

    async def status(self, item: OutboxItem) -> Any:
        if item.id == self.flaky_id:
            raise TransientError("channel sms: lookup: HTTP 503")
        return await self.inner.status(item)


def test_a_twin_whose_lookup_failed_still_keeps_the_other_from_guessing(
    store: Store, person: int, fake: FakeTwilio
) -> None:
    """Both crashed; A reached Twilio, B never did; A's lookup blips. B's lookup finds A's
    message alone, but A, still in doubt, could own it: B goes to staff, not marked sent
    (review repro: B was adopted, its reminder silently lost)."""
    a, b = crashed(store, person, n=2)
    s1 = sent_by_the_dead_process(fake, store, a)
    advance(store, timedelta(minutes=10))

    async def go() -> Recovery:
        ch = channel(fake)
        try:
            return await DeliverStage(store, {"sms": _FlakyLookup(ch, a)}).recover()  # type: ignore[dict-item]
        finally:
            await ch.aclose()

    report = asyncio.run(go())
    got = by_id(store)
    assert (report.deferred, report.adopted, report.unknown) == (1, 0, 1)
    assert (got[b].status, got[b].provider_id) == ("unknown", None)
    assert got[a].status == "sending"  # asked again next pass
    assert [r.detail.get("reason") for r in audits(store, "outbox.recover")] == ["provider-id-contested"]
    # Next pass A's lookup works; B, in doubt from the same moment, could still be s1's
    # sender: both twins are left to staff, none guessed.
    advance(store, timedelta(minutes=10))
    again = recover(store, fake)
    got = by_id(store)
    assert (again.adopted, again.unknown) == (0, 1)
    assert [got[i].status for i in (a, b)] == ["unknown", "unknown"]
    assert not any(r.provider_id == s1 for r in got.values())
