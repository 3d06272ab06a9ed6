"""A channel's ``rate_per_second`` holds for every deliver worker on one database together,
not per process: two ``DeliverStage`` instances (two workers) against the local server that
speaks Twilio's wire format, which records when each message arrived. The schedule is one
row per channel in the store (``channel_rate``); a worker that dies holding a reserved slot
only delays the next send; a channel without a rate, and the capture channel that stands in
for every channel in replay, never touch it."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from careloop.config import AppConfig
from careloop.db import alembic_config, upgrade
from careloop.errors import ConfigError
from careloop.store import Store
from careloop.tables import ChannelRate, OutboxItem
from careloop.wiring import check
from channels.base import ChannelConfig
from channels.capture import CaptureChannel
from channels.outbox import DeliverStage
from channels.twilio_loopback import FakeTwilio
from channels.twilio_sms import TwilioSmsChannel, TwilioSmsConfig
from tests.test_channels_outbox import add_items, rows
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
    assert [stage._reserve("fast", 5) <= 0 for _ in range(5)] == [True] * 5
    assert 0.1 < stage._reserve("fast", 5) <= 0.2  # the 6th waits for one interval
    assert stage._reserve("slow", 0.5) <= 0  # a rate under 1/s: a burst of one
    assert 1.9 < stage._reserve("slow", 0.5) <= 2.0


def test_a_schedule_far_ahead_of_the_clock_restarts_from_now(store: Store) -> None:
    """A schedule more than a lease ahead (the database clock stepped back a day) holds
    nothing: the next send goes at once, and the schedule continues from now."""
    stage = DeliverStage(store, {})
    stage._reserve("sms", 1)
    with store.engine.begin() as c:
        c.execute(sa.update(ChannelRate).values(next_at=ChannelRate.next_at + 86400))
    assert stage._reserve("sms", 1) <= 0
    assert 0.9 < stage._reserve("sms", 1) <= 1.0


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
