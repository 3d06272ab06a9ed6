"""Crash recovery respects a provider's pause: while a channel is paused (``channel_pause``: a
429 or 503 with ``Retry-After``), no worker's ``recover()`` asks its provider about the
channel's stale ``sending`` items (no Twilio status lookup by SID or by content); they stay
``sending``, unwritten and unaudited, reported as deferred, and the first pass after the
pause recovers them as usual. Two deliver workers over one database against the local
Twilio wire-format server, on both engines."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlmodel import Session, select

from careloop.store import Store
from careloop.tables import DeliveryReceipt, OutboxItem
from channels.outbox import DeliverStage, Recovery
from channels.twilio_loopback import _Handler as _TwilioHandler
from tests.test_channels_outbox import add_items, audits, rows
from tests.test_channels_outbox import person as person  # the fixture
from tests.test_channels_pause_shared import audit_count, closing, outbox_versions
from tests.test_channels_retry_after import RetryAfterTwilio, drain, stage_for, vclock
from tests.test_channels_twilio_sms import channel

SECOND = timedelta(seconds=1)
LEASE = timedelta(seconds=60)


class LookupCountingTwilio(RetryAfterTwilio):
    """The Retry-After Twilio that also counts the status lookups it answers (``GET``: a
    message by its SID, or the message list searched by phone and text)."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0

    def handler(self) -> type[_TwilioHandler]:
        fake = self

        class Handler(super().handler()):  # type: ignore[misc]
            def do_GET(self) -> None:
                with fake.lock:
                    fake.gets += 1
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


def sent_by_a_dead_process(store: Store, twilio: LookupCountingTwilio, person: int) -> tuple[int, str]:
    """An item a process claimed and sent to Twilio, then died before settling: ``sending``,
    its attempt started now; its id and the SID Twilio gave its message."""
    [oid] = add_items(store, person, status="sending", attempts=1, next_attempt_at=store.clock.now())
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
