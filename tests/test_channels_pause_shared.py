"""A provider's pause (a 429 or 503 with ``Retry-After``) holds every deliver worker, not only
the one that got it: two ``DeliverStage`` instances over one database (two workers) against
local servers speaking Twilio's and Standard Webhooks' wire format. The pause is kept in the
store (``channel_pause``); a paused channel's items stay pending, untouched (no claim, no
write, no audit record of their own), then go once each when it ends, or expire."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, text
from sqlmodel import Session, select

from careloop.clock import utc
from careloop.store import Store
from careloop.tables import AuditRecord, ChannelPause, OutboxItem
from channels.outbox import DeliverStage
from channels.twilio_sms import TwilioSmsChannel, TwilioSmsConfig
from tests.test_channels_outbox import add_items, audits, rows
from tests.test_channels_outbox import person as person  # the fixture
from tests.test_channels_retry_after import (
    RetryAfterTwilio,
    WebhookReceiver,
    drain,
    stage_for,
    vclock,
    webhook_channel,
)
from tests.test_channels_retry_after import receiver as receiver  # the fixture
from tests.test_channels_retry_after import twilio as twilio  # the fixture
from tests.test_channels_twilio_sms import channel, config

SECOND = timedelta(seconds=1)


def two_workers(store: Store, twilio: RetryAfterTwilio) -> tuple[DeliverStage, DeliverStage]:
    """Workers A and B, each with its own Twilio channel (own HTTP client) to ``twilio``."""
    return (
        stage_for(store, channel(twilio), rng=random.Random(1)),
        stage_for(store, channel(twilio), rng=random.Random(2)),
    )


async def closing(work: Awaitable[None], *stages: DeliverStage) -> None:
    """Run ``work``, then close the stages' channels (in the loop their clients ran in),
    even if it failed: an unclosed client would fail a later test with its warning."""
    try:
        await work
    finally:
        for stage in stages:
            for ch in stage.channels.values():
                await ch.aclose()


def audit_count(store: Store) -> int:
    with Session(store.engine) as s:
        return int(s.exec(select(func.count()).select_from(AuditRecord)).one())


def outbox_versions(store: Store) -> dict[int, Any]:
    """Each outbox row as stored, and on PostgreSQL its row version (``xmin``: a new one
    for every UPDATE, even one that writes the same values back)."""
    got: dict[int, Any] = {r.id: r.model_dump() for r in rows(store) if r.id is not None}
    if store.engine.dialect.name == "postgresql":
        with store.engine.connect() as c:
            for oid, xmin in c.execute(text("SELECT id, xmin::text FROM outbox")):
                got[oid]["xmin"] = xmin
    return got


def pauses(store: Store) -> dict[str, datetime]:
    with Session(store.engine) as s:
        return {p.channel: p.until for p in s.exec(select(ChannelPause)).all()}


def test_a_pause_one_worker_got_holds_the_other_worker(
    store: Store, person: int, twilio: RetryAfterTwilio
) -> None:
    """After worker A's 429 (Retry-After: 120), worker B makes no request to Twilio before
    the 120 s are over, for the items queued before the 429 or during the pause; then the
    two together send every item exactly once."""
    ids = add_items(store, person, n=4)
    twilio.fail_with, twilio.retry_after = [429], lambda: "120"
    a, b = two_workers(store, twilio)
    clock = vclock(store)
    t0 = clock.now()

    async def go() -> None:
        await drain(a)
        assert twilio.posts == 1  # A's request, answered 429
        for after in (0, 1, 30, 119):
            clock.set(t0 + after * SECOND)
            ids.extend(add_items(store, person))  # the orchestrator queues on meanwhile
            await drain(b)
            await drain(a)
            assert twilio.posts == 1, f"a request {after} s into the pause"
        clock.set(t0 + 121 * SECOND)
        await asyncio.gather(drain(a), drain(b))

    asyncio.run(closing(go(), a, b))
    keys = {r.id: r.key for r in rows(store)}
    assert twilio.posts == 9  # the 429, then one accepted request per item
    assert twilio.keys() == Counter({keys[i]: 1 for i in ids})
    assert {r.id: (r.status, r.attempts) for r in rows(store)} == {
        ids[0]: ("sent", 2),
        **{i: ("sent", 1) for i in ids[1:]},
    }


def test_paused_items_are_not_written_while_the_pause_lasts(
    store: Store, person: int, twilio: RetryAfterTwilio
) -> None:
    """A busy channel's queue during a throttle: neither worker updates its items or writes
    an audit record for them; the pause itself is recorded once."""
    first, *rest = add_items(store, person, n=20)
    twilio.fail_with, twilio.retry_after = [429], lambda: "120"
    a, b = two_workers(store, twilio)
    clock = vclock(store)
    t0 = clock.now()

    async def go() -> None:
        await drain(a)
        rest.extend(add_items(store, person, n=20))  # queued during the pause
        before, records = outbox_versions(store), audit_count(store)
        for after in (0, 10, 60, 119):
            clock.set(t0 + after * SECOND)
            await drain(b)
            await drain(a)
        assert outbox_versions(store) == before  # no row of the 40 updated, not even in place
        assert audit_count(store) == records

    asyncio.run(closing(go(), a, b))
    assert twilio.posts == 1
    assert audits(store, "outbox.defer") == []
    [pause] = audits(store, "channel.pause")
    assert pause.detail["channel"] == "sms" and pause.detail["reason"] == "provider-retry-after"
    assert pause.person_id is None and pause.entity == "channel/sms"
    by_id = {r.id: r for r in rows(store)}
    assert all(by_id[i].status == "pending" and by_id[i].attempts == 0 for i in rest)
    assert (by_id[first].status, by_id[first].attempts) == ("pending", 1)


def test_an_item_whose_not_after_passes_during_the_pause_expires(
    store: Store, person: int, twilio: RetryAfterTwilio
) -> None:
    """Left pending through the pause, it is cancelled as expired when the channel comes
    back (as any item past ``not_after`` is when it comes up), never sent."""
    clock = vclock(store)
    t0 = clock.now()
    [first, other] = add_items(store, person, n=2)
    twilio.fail_with, twilio.retry_after = [429], lambda: "120"
    a, b = two_workers(store, twilio)
    late = -1

    async def go() -> None:
        nonlocal late
        await drain(a)
        [late] = add_items(store, person, not_after=t0 + 60 * SECOND)  # queued during the pause
        clock.set(t0 + 30 * SECOND)  # before its not_after: B must not send it either
        await drain(b)
        clock.set(t0 + 61 * SECOND)
        await drain(b)
        assert {r.id: r.status for r in rows(store)}[late] == "pending"
        clock.set(t0 + 121 * SECOND)
        await asyncio.gather(drain(a), drain(b))

    asyncio.run(closing(go(), a, b))
    by_id = {r.id: r for r in rows(store)}
    assert by_id[late].status == "cancelled" and by_id[late].last_error == "expired: not_after has passed"
    assert by_id[late].attempts == 0
    assert [x.entity for x in audits(store, "outbox.expire")] == [f"outbox/{late}"]
    assert by_id[first].status == by_id[other].status == "sent"
    sent_keys = twilio.keys()
    assert by_id[late].key not in sent_keys
    assert twilio.posts == 3


class HookedTwilio(TwilioSmsChannel):
    """A Twilio channel that runs ``hook`` (once) just before its next request."""

    hook: Callable[[], Awaitable[None]] | None = None

    async def send(self, item: OutboxItem) -> Any:
        hook, self.hook = self.hook, None
        if hook is not None:
            await hook()
        return await super().send(item)


def test_a_claim_after_the_pause_skips_items_read_as_due_before_it(
    store: Store, person: int, twilio: RetryAfterTwilio
) -> None:
    """B read its batch as due before A's 429 was recorded: its next claims leave the
    paused channel's items alone. (B's send already claimed still goes: it was in flight.)"""
    b_first, a_first, third = add_items(store, person, n=3)
    twilio.fail_with, twilio.retry_after = [429], lambda: "120"
    a = stage_for(store, channel(twilio), rng=random.Random(1))
    hooked = HookedTwilio("sms", TwilioSmsConfig.model_validate(config(twilio.base_url)))
    b = stage_for(store, hooked, rng=random.Random(2))
    hooked.hook = lambda: drain(a)  # A sends the next item, gets the 429, records the pause

    asyncio.run(closing(drain(b), a, b))
    assert twilio.posts == 2  # A's 429, and B's send that was in flight
    by_id = {r.id: r for r in rows(store)}
    assert (by_id[b_first].status, by_id[a_first].status) == ("sent", "pending")
    assert by_id[a_first].attempts == 1
    assert (by_id[third].status, by_id[third].attempts, by_id[third].next_attempt_at) == ("pending", 0, None)


def test_the_later_end_of_two_pauses_holds(store: Store, person: int, twilio: RetryAfterTwilio) -> None:
    """Two workers' answers, 120 s then 30 s (B's request was in flight when A's 429 came):
    the channel stays paused for the 120 s, not shortened to 30; each answer audited once."""
    waits = iter(["120", "30"])
    add_items(store, person, n=3)
    twilio.fail_with, twilio.retry_after = [429, 429], lambda: next(waits)
    a = stage_for(store, channel(twilio), rng=random.Random(1))
    hooked = HookedTwilio("sms", TwilioSmsConfig.model_validate(config(twilio.base_url)))
    b = stage_for(store, hooked, rng=random.Random(2))
    hooked.hook = lambda: drain(a)
    clock = vclock(store)
    t0 = clock.now()

    async def go() -> None:
        await drain(b)
        assert twilio.posts == 2
        clock.set(t0 + 31 * SECOND)
        await drain(a)
        await drain(b)
        assert twilio.posts == 2
        clock.set(t0 + 121 * SECOND)
        await asyncio.gather(drain(a), drain(b))

    asyncio.run(closing(go(), a, b))
    [until] = pauses(store).values()
    assert utc(until) == t0 + 120 * SECOND
    ends = sorted(x.detail["until"] for x in audits(store, "channel.pause"))
    assert ends == [(t0 + 30 * SECOND).isoformat(), (t0 + 120 * SECOND).isoformat()]
    assert {r.status for r in rows(store)} == {"sent"} and twilio.posts == 5


def test_a_deduplicating_channels_pause_holds_the_other_worker(
    store: Store, person: int, receiver: WebhookReceiver
) -> None:
    """Webhook items go in groups: A's group stops at the 503 (Retry-After: 30), and B,
    with items A never read, posts nothing before the 30 s are over."""
    ids = add_items(store, person, n=5)
    receiver.script = [(503, "30")]
    a = stage_for(store, webhook_channel(receiver), rng=random.Random(1), batch=2, group=2)
    b = stage_for(store, webhook_channel(receiver), rng=random.Random(2))
    clock = vclock(store)
    t0 = clock.now()

    async def go() -> None:
        assert await a.run_once() == 2  # its batch: the first two items, one group
        assert len(receiver.ids) == 1
        await drain(b)
        clock.set(t0 + 29 * SECOND)
        await drain(b)
        assert len(receiver.ids) == 1
        clock.set(t0 + 31 * SECOND)
        await asyncio.gather(drain(a), drain(b))

    asyncio.run(closing(go(), a, b))
    assert {r.status for r in rows(store)} == {"delivered"}
    assert len(receiver.ids) == 6 and len(set(receiver.ids)) == len(ids)
