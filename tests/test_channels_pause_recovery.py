"""Crash recovery respects a provider's pause: while a channel is paused (``channel_pause``: a
429 or 503 with ``Retry-After``), no worker's ``recover()`` asks its provider about the
channel's stale ``sending`` items (no Twilio status lookup by SID or by content); they stay
``sending``, unwritten and unaudited, reported as deferred, and the first pass after the
pause recovers them as usual. Recovery's own lookups are answers too: one answered 429 or
503 with ``Retry-After`` pauses the channel as a send's answer does (the ``channel_pause``
row, one ``channel.pause`` record, the same caps), and no further lookup goes to Twilio in
that pass or any worker's before the pause ends. Two deliver workers over one database
against the local Twilio wire-format server, on both engines."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlmodel import Session, select

from careloop.clock import VirtualClock, utc
from careloop.store import Store
from careloop.tables import DeliveryReceipt, OutboxItem
from channels._http import MAX_RETRY_AFTER
from channels.outbox import DeliverStage, Recovery
from channels.twilio_loopback import _error as _twilio_error
from channels.twilio_loopback import _Handler as _TwilioHandler
from tests.test_channels_outbox import add_items, audits, rows
from tests.test_channels_outbox import person as person  # the fixture
from tests.test_channels_pause_shared import audit_count, closing, outbox_versions, pauses
from tests.test_channels_retry_after import RetryAfterTwilio, drain, stage_for, vclock
from tests.test_channels_twilio_sms import channel

SECOND = timedelta(seconds=1)
LEASE = timedelta(seconds=60)


class LookupCountingTwilio(RetryAfterTwilio):
    """The Retry-After Twilio that also counts the status lookups it answers (``GET``: a
    message by its SID, or the message list searched by phone and text), and answers the
    next ones with the statuses in ``fail_lookups_with`` (429: Twilio's 20429 "Too Many
    Requests"; 5xx: 20500), with ``Retry-After: retry_after()`` as its failures are."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0
        self.fail_lookups_with: list[int] = []

    def handler(self) -> type[_TwilioHandler]:
        fake = self

        class Handler(super().handler()):  # type: ignore[misc]
            def do_GET(self) -> None:
                with fake.lock:
                    fake.gets += 1
                    status = fake.fail_lookups_with.pop(0) if fake.fail_lookups_with else None
                if status is not None:
                    self._send(status, _twilio_error(20429 if status == 429 else 20500, "failure", status))
                    return
                super().do_GET()

        return Handler


@pytest.fixture
def twilio(store: Store) -> Iterator[LookupCountingTwilio]:
    f = LookupCountingTwilio()
    f.now = store.clock.now  # Twilio's clock is the store's: the lookup window is in its time
    f.start()
    yield f
    f.stop()


def worker(store: Store, twilio: LookupCountingTwilio, seed: int) -> DeliverStage:
    """A deliver worker that recovers on every pass, with a short lease."""
    return stage_for(store, channel(twilio), rng=random.Random(seed), sending_lease=LEASE, recover_every=0.0)


def sent_by_a_dead_process(
    store: Store, twilio: LookupCountingTwilio, person: int, text: str | None = None
) -> tuple[int, str]:
    """An item a process claimed and sent to Twilio, then died before settling: ``sending``,
    its attempt started now; its id and the SID Twilio gave its message. ``text``: its own
    text (else the items' usual one, which a second such item would share: twins)."""
    [oid] = add_items(store, person, status="sending", attempts=1, next_attempt_at=store.clock.now())
    if text is not None:
        with store.session() as s:
            row = s.get(OutboxItem, oid)
            assert row is not None
            row.content = {"text": text}
    [item] = [r for r in rows(store) if r.id == oid]

    async def go() -> None:
        ch = channel(twilio)
        try:
            await ch.send(item)
        finally:
            await ch.aclose()

    asyncio.run(go())
    return oid, str(twilio.messages[-1]["sid"])


@pytest.mark.parametrize("by_sid", [False, True], ids=["by-content", "by-sid"])
def test_recovery_asks_a_paused_provider_nothing_until_the_pause_ends(
    store: Store, person: int, twilio: LookupCountingTwilio, by_sid: bool
) -> None:
    """Worker A's 429 (Retry-After: 120) pauses Twilio; an item a dead process left
    ``sending`` goes stale during the pause. Neither worker's recovery looks it up (by
    content, or by its SID when the dead process had recorded it) before the 120 s are
    over, nor writes or audits anything for it; the first pass after adopts the dead
    process's message, as recovery without a pause does, and nothing is sent twice."""
    clock = vclock(store)
    t0 = clock.now()
    stale, sid = sent_by_a_dead_process(store, twilio, person)
    if by_sid:
        with store.session() as s:  # the dead process had recorded the SID
            row = s.get(OutboxItem, stale)
            assert row is not None
            row.provider_id = sid
    [queued] = add_items(store, person)
    twilio.fail_with, twilio.retry_after = [429], lambda: "120"
    a, b = worker(store, twilio, 1), worker(store, twilio, 2)
    reports: list[Recovery] = []

    async def go() -> None:
        await drain(a)  # not stale yet: no lookup; A's send of ``queued`` gets the 429
        assert (twilio.posts, twilio.gets) == (2, 0)  # the dead process's send, A's 429
        before, records = outbox_versions(store), audit_count(store)
        for after in (61, 90, 119):  # stale (lease 60 s) and the channel paused
            clock.set(t0 + after * SECOND)
            reports.append(await b.recover())
            await drain(b)
            await drain(a)
            assert twilio.gets == 0, f"a status lookup {after} s into the pause"
        assert outbox_versions(store) == before  # the stale item untouched, not even in place
        assert audit_count(store) == records
        clock.set(t0 + 121 * SECOND)
        reports.append(await b.recover())
        await asyncio.gather(drain(a), drain(b))

    asyncio.run(closing(go(), a, b))
    stale_key = {r.id: r.key for r in rows(store)}[stale]
    assert [(r.deferred, r.keys.get("deferred"), r.adopted + r.resend + r.unknown) for r in reports[:-1]] == [
        (1, [stale_key], 0)
    ] * 3
    after_pause = reports[-1]
    assert (after_pause.adopted, after_pause.resend, after_pause.unknown, after_pause.deferred) == (
        1,
        0,
        0,
        0,
    )
    assert twilio.gets == 1  # the one lookup, after the pause
    by_id = {r.id: r for r in rows(store)}
    assert (by_id[stale].status, by_id[stale].provider_id, by_id[stale].attempts) == ("sent", sid, 1)
    assert (by_id[queued].status, by_id[queued].attempts) == ("sent", 2)
    assert twilio.keys() == {by_id[stale].key: 1, by_id[queued].key: 1}  # nothing sent twice
    with Session(store.engine) as s:
        [receipt] = s.exec(select(DeliveryReceipt).where(DeliveryReceipt.outbox_id == stale)).all()
    assert (receipt.provider_id, receipt.detail["recovered"]) == (sid, True)
    assert [d.entity for d in audits(store, "disclosure")].count(f"outbox/{stale}") == 1
    assert audits(store, "outbox.recover") == []  # adopted: no resend, no staff review


def _untouched(store: Store, before: dict[int, Any], ids: list[int]) -> None:
    """The rows ``ids`` as they were (on PostgreSQL not even rewritten in place): ``sending``,
    one attempt, no provider id of a recovery."""
    now = outbox_versions(store)
    assert {i: now[i] for i in ids} == {i: before[i] for i in ids}
    assert {now[i]["status"] for i in ids} == {"sending"}


@pytest.mark.parametrize(
    ("answer", "by_sid"), [(429, False), (503, False), (429, True)], ids=["429", "503", "429-by-sid"]
)
def test_a_lookup_answered_with_retry_after_pauses_the_channel_for_every_worker(
    store: Store, person: int, twilio: LookupCountingTwilio, answer: int, by_sid: bool
) -> None:
    """Two items a dead process sent (their own texts) go stale. Worker A's recovery asks
    Twilio about the first (by content, or by its SID when the dead process had recorded
    it), answered 429 (or 503) with Retry-After: 120: the channel is
    paused in ``channel_pause`` for every worker (one ``channel.pause`` record), A asks
    nothing about the second in that pass, and both stay ``sending``, unwritten, neither
    failed nor sent. Neither worker asks Twilio anything until the 120 s are over; the first
    pass after adopts both dead process's messages, and nothing is sent twice."""
    clock = vclock(store)
    t0 = clock.now()
    first, sid1 = sent_by_a_dead_process(store, twilio, person, "Reminder one: reply C to confirm.")
    second, sid2 = sent_by_a_dead_process(store, twilio, person, "Reminder two: reply C to confirm.")
    if by_sid:
        with store.session() as s:  # the dead process had recorded the SIDs
            for oid, sid in ((first, sid1), (second, sid2)):
                row = s.get(OutboxItem, oid)
                assert row is not None
                row.provider_id = sid
    twilio.fail_lookups_with, twilio.retry_after = [answer], lambda: "120"
    a, b = worker(store, twilio, 1), worker(store, twilio, 2)
    asked = t0 + 61 * SECOND  # stale: the lease is 60 s
    keys = {r.id: r.key for r in rows(store)}
    before = outbox_versions(store)
    reports: list[Recovery] = []

    async def go() -> None:
        clock.set(asked)
        reports.append(await a.recover())
        assert twilio.gets == 1, "a lookup after the provider asked to wait"
        for after in (1, 60, 119):
            clock.set(asked + after * SECOND)
            reports.append(await b.recover())
            await drain(b)
            await drain(a)
            assert twilio.gets == 1, f"a status lookup {after} s into the pause"
        _untouched(store, before, [first, second])
        clock.set(asked + 121 * SECOND)
        reports.append(await b.recover())
        await asyncio.gather(drain(a), drain(b))

    asyncio.run(closing(go(), a, b))
    both = [keys[first], keys[second]]
    assert [(r.deferred, r.keys.get("deferred"), r.adopted + r.resend + r.unknown) for r in reports[:-1]] == [
        (2, both, 0)
    ] * 4
    last = reports[-1]
    assert (last.adopted, last.resend, last.unknown, last.deferred) == (2, 0, 0, 0)
    assert twilio.gets == 3  # the 429, then one lookup per item after the pause
    assert {k: utc(v) for k, v in pauses(store).items()} == {"sms": asked + 120 * SECOND}
    [pause] = audits(store, "channel.pause")
    assert (pause.entity, pause.person_id) == ("channel/sms", None)
    assert pause.detail == {
        "channel": "sms",
        "reason": "provider-retry-after",
        "until": (asked + 120 * SECOND).isoformat(),
    }
    by_id = {r.id: r for r in rows(store)}
    assert [(by_id[i].status, by_id[i].provider_id, by_id[i].attempts) for i in (first, second)] == [
        ("sent", sid1, 1),
        ("sent", sid2, 1),
    ]
    assert twilio.posts == 2 and twilio.keys() == {keys[first]: 1, keys[second]: 1}  # nothing twice
    assert audits(store, "outbox.recover") == []  # adopted: no resend, no staff review


def test_a_lookups_absurd_retry_after_holds_the_channel_no_longer_than_the_cap(
    store: Store, person: int, twilio: LookupCountingTwilio
) -> None:
    """A lookup answered 429 with Retry-After of a week pauses the channel for
    ``MAX_RETRY_AFTER`` (an hour), as a send's answer would: not a week; the first pass
    after the hour asks again and adopts the message."""
    clock = vclock(store)
    t0 = clock.now()
    stale, sid = sent_by_a_dead_process(store, twilio, person)
    twilio.fail_lookups_with, twilio.retry_after = [429], lambda: "604800"
    stage = worker(store, twilio, 1)
    asked = t0 + 61 * SECOND
    reports: list[Recovery] = []

    async def go() -> None:
        for at in (asked, asked + MAX_RETRY_AFTER - SECOND, asked + MAX_RETRY_AFTER + SECOND):
            clock.set(at)
            reports.append(await stage.recover())

    asyncio.run(closing(go(), stage))
    assert {k: utc(v) for k, v in pauses(store).items()} == {"sms": asked + MAX_RETRY_AFTER}
    assert len(audits(store, "channel.pause")) == 1
    assert [(r.deferred, r.adopted) for r in reports] == [(1, 0), (1, 0), (0, 1)]
    assert twilio.gets == 2  # the 429, and the lookup after the hour
    [row] = rows(store)
    assert (row.id, row.status, row.provider_id) == (stale, "sent", sid)


def test_a_lookup_pause_from_a_clock_far_ahead_is_not_obeyed(
    store: Store, person: int, twilio: LookupCountingTwilio
) -> None:
    """Worker A's clock runs 6 h ahead: its lookup's 429 (Retry-After: 120) is recorded as
    A's now + 120 s, beyond any wait a provider may ask for from worker B's now
    (``MAX_RETRY_AFTER`` + ``PAUSE_SKEW``): B's recovery does not obey it, asks, and adopts."""
    clock = vclock(store)
    t0 = clock.now()
    ahead = Store(store.engine, VirtualClock(t0 + timedelta(hours=6)))  # worker A's host
    stale, sid = sent_by_a_dead_process(store, twilio, person)
    twilio.fail_lookups_with, twilio.retry_after = [429], lambda: "120"
    a = stage_for(ahead, channel(twilio), rng=random.Random(1), sending_lease=LEASE, recover_every=0.0)
    b = worker(store, twilio, 2)
    reports: list[Recovery] = []

    async def go() -> None:
        reports.append(await a.recover())
        clock.set(t0 + 61 * SECOND)
        reports.append(await b.recover())

    asyncio.run(closing(go(), a, b))
    assert [(r.deferred, r.adopted) for r in reports] == [(1, 0), (0, 1)]
    assert {k: utc(v) for k, v in pauses(store).items()} == {"sms": t0 + timedelta(hours=6, seconds=120)}
    assert twilio.gets == 2
    [row] = rows(store)
    assert (row.id, row.status, row.provider_id) == (stale, "sent", sid)
