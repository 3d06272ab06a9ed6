"""A channel's ``rate_per_second`` holds for every deliver worker on one database together,
not per process: two ``DeliverStage`` instances (two workers) against the local server that
speaks Twilio's wire format, which records when each message arrived. The schedule is one
row per channel in the store (``channel_rate``); a worker that dies holding a reserved slot
only delays the next send; a claim never waits for a slot longer than half its lease (a
slot further off is not reserved, and the item goes back to pending for it); a channel
without a rate, and the capture channel that stands in for every channel in replay, never
touch it."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from careloop.clock import Clock, SystemClock, utc
from careloop.config import AppConfig
from careloop.db import alembic_config, upgrade
from careloop.errors import ConfigError
from careloop.store import Store
from careloop.tables import ChannelRate, OutboxItem, Person
from careloop.wiring import check
from channels.base import ChannelConfig
from channels.capture import CaptureChannel
from channels.outbox import DeliverStage
from channels.twilio_loopback import FakeTwilio
from channels.twilio_sms import TwilioSmsChannel, TwilioSmsConfig
from tests.test_channels_outbox import ScriptChannel, add_items, audits, cfg, rows
from tests.test_channels_outbox import person as person  # the fixture
from tests.test_channels_twilio_sms import config

WINDOW = 1.0  # seconds


class TimedTwilio(FakeTwilio):
    """The loopback Twilio, noting when (``time.monotonic()``) it accepted each message."""

    def __init__(self) -> None:
        super().__init__()
        self.accepted_at: list[float] = []

    def create(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        status, doc = super().create(form)
        if status == 201:
            with self.lock:
                self.accepted_at.append(time.monotonic())
        return status, doc


@pytest.fixture
def twilio() -> Iterator[TimedTwilio]:
    f = TimedTwilio()
    f.start()
    yield f
    f.stop()


class CountedTwilio(TwilioSmsChannel):
    """Twilio SMS, counting the messages this worker sent (to see that both workers did)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.count = 0

    async def send(self, item: OutboxItem) -> Any:
        receipt = await super().send(item)
        self.count += 1
        return receipt


def sms(twilio: FakeTwilio, rate: float | None) -> CountedTwilio:
    return CountedTwilio("sms", TwilioSmsConfig.model_validate(config(twilio.base_url, rate_per_second=rate)))


def worker(store: Store, ch: Any) -> DeliverStage:
    return DeliverStage(store, {"sms": ch}, recover_every=1e9)


async def drain(stage: DeliverStage) -> None:
    while await stage.run_once():
        pass


def most_in_a_window(times: list[float], window: float = WINDOW) -> int:
    """The most sends in any half-open window ``[t, t + window)`` (one starting at each
    send: a window holding the most sends can always be moved to start at one)."""
    ts = sorted(times)
    return max((sum(1 for u in ts if t <= u < t + window) for t in ts), default=0)


def schedule(store: Store) -> dict[str, float]:
    with Session(store.engine) as s:
        return {r.channel: r.next_at for r in s.exec(select(ChannelRate)).all()}


def test_two_workers_together_send_no_faster_than_the_channels_rate(
    store: Store, person: int, twilio: TimedTwilio
) -> None:
    """20 SMS at 5/s through two workers at once: in no second do more than 5 go, plus the
    burst of up to max(1, rate) = 5 the token bucket allowed after a quiet spell. (Each
    worker with its own bucket sent 18 in the first second.) Each item is sent once, and
    both workers took part."""
    add_items(store, person, n=20)
    a, b = sms(twilio, 5), sms(twilio, 5)

    async def go() -> None:
        try:
            await asyncio.gather(drain(worker(store, a)), drain(worker(store, b)))
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(go())
    assert [r.status for r in rows(store)] == ["sent"] * 20
    assert set(twilio.keys().values()) == {1} and len(twilio.keys()) == 20
    assert a.count > 0 and b.count > 0, (a.count, b.count)
    assert most_in_a_window(twilio.accepted_at) <= 5 + 5, sorted(twilio.accepted_at)
    assert list(schedule(store)) == ["sms"]


def test_a_slot_a_dead_worker_reserved_only_delays_the_next_send(
    store: Store, person: int, twilio: TimedTwilio
) -> None:
    """At Twilio's 1/s for a long code: worker A sends one message, reserves the next slot
    and dies waiting for it (its task cancelled). Worker B, started at once, keeps the rate
    (its first send a full second after A's at least) and is held up by the dead slot by one
    interval at most: it is never blocked."""
    add_items(store, person, n=4)
    a, b = sms(twilio, 1), sms(twilio, 1)

    async def go() -> None:
        try:
            dying = asyncio.create_task(drain(worker(store, a)))
            # A sent one, settled it and claimed the next: it reserves that one's slot now
            while Counter(r.status for r in rows(store)) != {"sent": 1, "sending": 1, "pending": 2}:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.3)  # A waits for its slot, a second after its first send
            dying.cancel()
            with pytest.raises(asyncio.CancelledError):
                await dying
            await drain(worker(store, b))
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(go())
    assert a.count == 1 and b.count == 2  # the item A held stays ``sending``, for recovery
    sent = twilio.accepted_at
    spacing = [later - earlier for earlier, later in itertools.pairwise(sent)]
    assert min(spacing) >= 1.0 - 0.02, spacing  # the rate held across A's death
    assert spacing[0] <= 2.0 + 0.5, spacing  # A's dead slot, one interval, then B's
    assert [r.status for r in rows(store)].count("sending") == 1


def test_bursts_are_the_token_buckets_up_to_max_1_rate(store: Store) -> None:
    """After a quiet spell, up to max(1, rate) sends go at once, then one every 1/rate s."""
    stage = DeliverStage(store, {})
    t0 = time.monotonic()
    assert [stage._reserve("fast", 5).wait <= 0 for _ in range(5)] == [True] * 5
    sixth = stage._reserve("fast", 5).wait  # one interval, less the time the burst took
    assert 0.2 - (time.monotonic() - t0) - 0.02 < sixth <= 0.2
    t1 = time.monotonic()
    assert stage._reserve("slow", 0.5).wait <= 0  # a rate under 1/s: a burst of one
    second = stage._reserve("slow", 0.5).wait
    assert 2.0 - (time.monotonic() - t1) - 0.02 < second <= 2.0


def test_a_schedule_far_ahead_of_the_clock_restarts_from_now(store: Store) -> None:
    """A schedule more than a lease ahead (the database clock stepped back a day) holds
    nothing: the next send goes at once, and the schedule continues from now."""
    stage = DeliverStage(store, {})
    stage._reserve("sms", 1)
    with store.engine.begin() as c:
        c.execute(sa.update(ChannelRate).values(next_at=ChannelRate.next_at + 86400))
    assert stage._reserve("sms", 1).wait <= 0
    assert 0.9 < stage._reserve("sms", 1).wait <= 1.0


def test_unlimited_and_capture_channels_never_touch_the_schedule(store: Store, person: int) -> None:
    """The channels without a rate, and a capture channel standing in with a real channel's
    rate (replay), send at full speed: not one statement reads or writes ``channel_rate``."""
    statements: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    add_items(store, person, n=6)
    unlimited = CaptureChannel("sms", ChannelConfig(plugin="capture"))
    stand_in = CaptureChannel("sms", ChannelConfig(plugin="twilio_sms", rate_per_second=0.01))
    event.listen(store.engine, "before_cursor_execute", note)
    try:
        asyncio.run(drain(worker(store, unlimited)))
        add_items(store, person, n=6)
        asyncio.run(drain(worker(store, stand_in)))
    finally:
        event.remove(store.engine, "before_cursor_execute", note)
    assert len(unlimited.captured) == 6 and len(stand_in.captured) == 6
    assert statements and not [q for q in statements if "channel_rate" in q]
    assert schedule(store) == {}


def test_the_migration_adds_the_schedule_and_its_downgrade_drops_it(engine: Engine) -> None:
    cfg = alembic_config(engine)
    command.downgrade(cfg, "0006")
    names = set(sa.inspect(engine).get_table_names())
    assert "channel_rate" not in names and "channel_pause" in names
    upgrade(engine)
    assert "channel_rate" in set(sa.inspect(engine).get_table_names())
    with engine.begin() as c:
        assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one() == "0007"
    assert Counter(c["name"] for c in sa.inspect(engine).get_columns("channel_rate")) == Counter(
        ["channel", "next_at"]
    )


@pytest.mark.parametrize("rate", [0, -1])
def test_a_rate_that_is_not_positive_is_refused_naming_the_field(rate: float) -> None:
    raw = {
        "site": {"channels": ["sms"]},
        "channels": {
            "sms": {
                "plugin": "twilio_sms",
                "account_sid": "AC" + "0" * 32,
                "auth_token": "x",
                "from_number": "+15550000000",
                "rate_per_second": rate,
            }
        },
    }
    with pytest.raises(ConfigError) as got:
        check(AppConfig.model_validate(raw))
    assert got.value.problems == ["channels.sms.rate_per_second: Input should be greater than 0"]


class ClaimAgeTwilio(CountedTwilio):
    """Twilio SMS noting, for each message it sends, how long its item had been claimed
    (the claim's time is the item's ``next_attempt_at``, on the store's clock)."""

    def __init__(self, clock: Clock, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.clock = clock
        self.ages: list[float] = []

    async def send(self, item: OutboxItem) -> Any:
        assert item.next_attempt_at is not None
        self.ages.append((self.clock.now() - utc(item.next_attempt_at)).total_seconds())
        return await super().send(item)


class AheadClock(SystemClock):
    """The wall clock of another machine, ``ahead`` seconds ahead of this one's."""

    def __init__(self, ahead: float) -> None:
        self.ahead = timedelta(seconds=ahead)

    def now(self) -> datetime:
        return super().now() + self.ahead


@pytest.mark.parametrize(("rate", "n", "ahead"), [(0.2, 3, 0.0), (0.5, 4, 0.5)])
def test_a_worker_never_sends_after_waiting_longer_than_its_claim_covers(
    engine: Engine, twilio: TimedTwilio, rate: float, n: int, ahead: float
) -> None:
    """Two workers share a slow channel's schedule with a 4 s lease, and a third stage runs
    crash recovery (its machine's clock ``ahead``), which takes a claim older than the lease
    for a dead worker's, asks Twilio (which never saw it) and puts it back to be sent again.
    The second in line would wait for its slot for longer than half the lease (up to the
    whole lease: then a send in flight, or a recovery clock a little ahead, resends it while
    it still waits). Each message goes once, none after half its lease; those whose slot was
    too far off went back to pending (``outbox.defer``, reason ``rate-limit``), not counted
    as attempts; and the rate held, also at 0.2/s, one send in 5 s, longer than the lease."""
    clock = SystemClock()
    store = Store(engine, clock)
    lease = timedelta(seconds=4)
    with store.session() as s:
        p = Person(created_at=clock.now())
        s.add(p)
        s.flush()
        assert p.id is not None
        person_id = p.id
    ids = add_items(store, person_id, n=n)
    with store.session() as s:  # distinct texts: recovery finds a message by its text
        for i, oid in enumerate(ids):
            row = s.get(OutboxItem, oid)
            assert row is not None
            row.content = {"text": f"Visit {i}."}

    def channel(clock: Clock) -> ClaimAgeTwilio:
        conf = config(twilio.base_url, rate_per_second=rate, resend_if_absent=True)
        return ClaimAgeTwilio(clock, "sms", TwilioSmsConfig.model_validate(conf))

    a, b, r = channel(clock), channel(clock), channel(clock)
    workers = [DeliverStage(store, {"sms": ch}, sending_lease=lease, recover_every=1e9) for ch in (a, b)]
    elsewhere = Store(engine, AheadClock(ahead))
    recovery = DeliverStage(elsewhere, {"sms": r}, sending_lease=lease, recover_every=1e9)

    def settled() -> bool:
        return all(x.status not in ("pending", "sending") for x in rows(store))

    async def work(stage: DeliverStage, deadline: float) -> None:
        while not settled() and time.monotonic() < deadline:
            await stage.run_once()
            await asyncio.sleep(0.05)

    async def recover(deadline: float) -> None:
        while not settled() and time.monotonic() < deadline:
            await recovery.recover()
            await asyncio.sleep(0.1)

    async def go() -> None:
        deadline = time.monotonic() + 40
        try:
            await asyncio.gather(work(workers[0], deadline), work(workers[1], deadline), recover(deadline))
        finally:
            for ch in (a, b, r):
                await ch.aclose()

    asyncio.run(go())
    assert twilio.posts == n and dict(twilio.keys()) == {x.key: 1 for x in rows(store)}, twilio.keys()
    # ... and each item was handed to a channel once: a channel that remembers what it sent
    # (Twilio's, per process) hides a second send from the same worker, not from another
    assert len(a.ages) + len(b.ages) == n, (a.ages, b.ages)
    assert [(x.status, x.attempts) for x in rows(store)] == [("sent", 1)] * n
    assert r.count == 0
    ages = a.ages + b.ages
    assert max(ages) <= lease.total_seconds() / 2 + 0.2, ages  # the sleep's own lateness
    spacing = [later - earlier for earlier, later in itertools.pairwise(sorted(twilio.accepted_at))]
    assert min(spacing) >= 1 / rate - 0.1, spacing  # the sends' own latency apart
    deferred = audits(store, "outbox.defer")
    assert deferred and {d.detail["reason"] for d in deferred} == {"rate-limit"}
    assert {d.entity for d in deferred} <= {f"outbox/{i}" for i in ids}


def test_a_slot_further_off_than_the_claim_covers_is_not_reserved(store: Store) -> None:
    """At 0.5/s with a 5 s lease a claim may wait up to 2.5 s: the slot 4 s off is neither
    waited for nor taken (the schedule is left as it was, so no later send is delayed by
    it), and its wait is told, for the item's return to pending."""
    stage = DeliverStage(store, {}, sending_lease=timedelta(seconds=5))
    assert stage._reserve("sms", 0.5).reserved  # now
    second = stage._reserve("sms", 0.5)
    assert second.reserved and 1.9 < second.wait <= 2.01  # within half the lease
    before = schedule(store)
    far = stage._reserve("sms", 0.5)
    assert not far.reserved and 3.9 < far.wait <= 4.01
    assert schedule(store) == before
    assert stage._reserve("sms", 0.5, within=4.5).reserved  # a claim that covers it


def test_a_backlogged_schedule_makes_the_groups_smaller(store: Store, person: int) -> None:
    """A receiver that de-duplicates on the key takes items in groups, as many as one worker
    sends in half the lease at the channel's rate (0.1/s, 5 min: 15). With the shared
    schedule already 95 s ahead (other workers' reservations), a group is what still fits
    in the rest: 5. The schedule is read once per batch, and only for such a channel: an
    unlimited one never touches it."""
    statements: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    add_items(store, person, n=20)
    slow = ScriptChannel("sms", cfg(rate=0.1), idempotent=True)
    stage = DeliverStage(store, {"sms": slow}, sending_lease=timedelta(minutes=5))
    stage._reserve("sms", 0.1)  # one send now: the schedule is 10 s ahead
    with store.engine.begin() as c:
        c.execute(sa.update(ChannelRate).values(next_at=ChannelRate.next_at + 85))
    groups, claimed = stage._first_step()
    assert [len(g) for g in groups] == [5, 5, 5, 5] and len(claimed) == 5
    unlimited = DeliverStage(store, {"sms": ScriptChannel("sms", cfg(), idempotent=True)})
    event.listen(store.engine, "before_cursor_execute", note)
    try:
        groups, _ = unlimited._first_step()
    finally:
        event.remove(store.engine, "before_cursor_execute", note)
    assert [len(g) for g in groups] == [15] and not [q for q in statements if "channel_rate" in q]
