"""Where the shared provider pause (``channel_pause``) stops, from a review of the change
that made it shared: one item's refusal never pauses the fleet, paused items still expire
at their ``not_after``, and a worker whose clock runs ahead cannot park a channel past the
longest wait a provider may ask for. Local Twilio and webhook servers, both engines;
synthetic people only."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlmodel import select

from careloop.clock import VirtualClock
from careloop.store import Store
from careloop.tables import AuditRecord, ChannelPause
from channels._http import MAX_RETRY_AFTER
from channels.outbox import DeliverStage
from channels.twilio_loopback import FakeTwilio
from tests.test_channels_credentials import OneTenantRefused, webhook_channel
from tests.test_channels_outbox import add_items, rows
from tests.test_channels_outbox import person as person
from tests.test_channels_retry_after import RetryAfterTwilio
from tests.test_channels_retry_after import twilio as twilio
from tests.test_channels_twilio_sms import channel


@pytest.fixture
def suspended() -> Iterator[FakeTwilio]:
    """The local Twilio server with the account suspended (20403 on every request)."""
    f = FakeTwilio()
    f.start()
    f.account_refusal = 20403
    yield f
    f.stop()


async def _close(*stages: DeliverStage) -> None:
    for st in stages:
        for ch in st.channels.values():
            await ch.aclose()


def test_one_items_401_taken_by_an_idle_worker_does_not_stop_the_others(
    store: Store,
    person: int,
) -> None:
    good1, bad, good2, good3 = add_items(store, person, n=4)
    key = {r.id: r.key for r in rows(store)}[bad]
    rx = OneTenantRefused(key)  # a receiver that answers 401 for this one item only
    a = DeliverStage(store, {"sms": webhook_channel(rx)}, batch=1, group=1, rng=random.Random(1))
    b = DeliverStage(store, {"sms": webhook_channel(rx)}, batch=1, group=1, rng=random.Random(2))

    async def go() -> None:
        try:
            await b.run_once()  # B delivers: the channel works
            await a.run_once()  # A, which has sent nothing yet, takes the refused item
            for _ in range(4):  # B goes on, the clock not moved
                await b.run_once()
        finally:
            await _close(a, b)

    try:
        asyncio.run(go())
    finally:
        rx.stop()
    status = {r.id: r.status for r in rows(store)}
    assert (status[good1], status[good2], status[good3]) == ("delivered",) * 3
    assert status[bad] == "pending"  # A holds it (and the channel) in its own process only
    with store.session() as s:
        assert not s.exec(select(ChannelPause)).all()


def test_items_expire_at_their_end_through_an_account_outage(
    store: Store,
    person: int,
    suspended: FakeTwilio,
) -> None:
    clock = store.clock
    assert isinstance(clock, VirtualClock)
    t0 = clock.now()
    ahead = add_items(store, person, n=10)
    [late] = add_items(store, person, not_after=t0 + timedelta(minutes=1))
    ch = channel(suspended)
    stage = DeliverStage(store, {"sms": ch}, rng=random.Random(1))

    async def go() -> None:
        try:
            for hold in range(4):  # 20 minutes of outage, one 5-minute hold after another
                clock.set(t0 + hold * timedelta(minutes=5, seconds=1))
                while await stage.run_once():
                    pass
        finally:
            await _close(stage)

    asyncio.run(go())
    status = {r.id: r.status for r in rows(store)}
    assert all(status[i] == "pending" for i in ahead)  # waiting for the account, uncounted
    assert status[late] == "cancelled"


def test_paused_items_past_their_end_are_cancelled_during_the_pause(
    store: Store,
    person: int,
    twilio: RetryAfterTwilio,
) -> None:
    clock = store.clock
    assert isinstance(clock, VirtualClock)
    t0 = clock.now()
    first, keep = add_items(store, person, n=2)
    [late] = add_items(store, person, not_after=t0 + timedelta(minutes=10))
    twilio.fail_with, twilio.retry_after = [429], lambda: "3600"
    # recover_every=0: the recovery pass, which expires what no claim will reach, runs each time
    stage = DeliverStage(store, {"sms": channel(twilio)}, batch=1, recover_every=0, rng=random.Random(1))

    async def go() -> None:
        try:
            await stage.run_once()  # 429, Retry-After 1 h: the channel is paused for everyone
            clock.set(t0 + timedelta(minutes=11))  # the late item's end passes during the pause
            await stage.run_once()
        finally:
            await _close(stage)

    asyncio.run(go())
    status = {r.id: r.status for r in rows(store)}
    assert status[late] == "cancelled"
    assert status[keep] == "pending" and status[first] == "pending"  # still paused, untouched
    assert twilio.messages == [] and twilio.posts == 1  # the one 429, nothing since
    with store.session() as s:
        expiries = s.exec(select(AuditRecord).where(AuditRecord.action == "outbox.expire")).all()
    assert [(e.entity, e.detail["reason"]) for e in expiries] == [(f"outbox/{late}", "expired")]


def test_a_worker_whose_clock_runs_ahead_cannot_park_the_channel_past_the_longest_wait(
    store: Store,
    person: int,
    twilio: RetryAfterTwilio,
) -> None:
    clock = store.clock
    assert isinstance(clock, VirtualClock)
    t0 = clock.now()
    ahead = Store(store.engine, VirtualClock(t0 + timedelta(hours=6)))  # worker A's host
    _, *rest = add_items(store, person, n=3)
    twilio.fail_with, twilio.retry_after = [429], lambda: "120"
    a = DeliverStage(ahead, {"sms": channel(twilio)}, batch=1, rng=random.Random(1))
    b = DeliverStage(store, {"sms": channel(twilio)}, rng=random.Random(2))

    async def go() -> None:
        try:
            await a.run_once()  # A: 429, wait 120 s, recorded as A's clock + 120 s
            # B, on time, 3 min later: A's pause ends 6 h from B's now, beyond any wait a
            # provider may ask for (MAX_RETRY_AFTER): a skewed clock's, not obeyed
            clock.set(t0 + timedelta(minutes=3))
            while await b.run_once():
                pass
        finally:
            await _close(a, b)

    asyncio.run(go())
    assert [r.status for r in rows(store) if r.id in rest] == ["sent", "sent"]
    with store.session() as s:  # the pause A recorded is there, just not believed
        [pause] = s.exec(select(ChannelPause)).all()
    assert pause.until.replace(tzinfo=None) > (t0 + MAX_RETRY_AFTER).replace(tzinfo=None)
