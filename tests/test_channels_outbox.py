"""The deliver stage: claim before send, recovery, retries with jittered backoff, dead
letters, rate limits, disclosure audit records."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any, ClassVar

import pytest
from sqlmodel import Session, col, select

from careloop.clock import VirtualClock, utc
from careloop.errors import PermanentError, TransientError
from careloop.store import Store
from careloop.tables import AuditRecord, DeadLetter, DeliveryReceipt, OutboxItem, Person
from channels.base import ABSENT, ChannelCaps, ChannelConfig, DeliveryUncertain, Receipt
from channels.outbox import DeliverStage, backoff
from channels.twilio_loopback import ACCOUNT_SID, AUTH_TOKEN, FakeTwilio
from channels.twilio_sms import TwilioSmsChannel, TwilioSmsConfig

PHONE = "+15550100042"
TEXT = "Reminder: visit on Mar 5. Reply C to confirm."


class ScriptChannel:
    """A test double speaking the Channel protocol: answers from a script, logs calls."""

    name: ClassVar[str] = "script"
    Config: ClassVar[type[ChannelConfig]] = ChannelConfig
    capabilities: ClassVar[ChannelCaps] = ChannelCaps(
        template_kind="sms", address_kind="phone", max_phi="none"
    )

    def __init__(
        self,
        id: str,
        config: ChannelConfig,
        script: Sequence[Receipt | BaseException] | None = None,
        status_answer: Receipt | None = None,
        queryable: bool = False,
        idempotent: bool = False,
    ) -> None:
        self.id, self.config = id, config
        self.script = list(script or [])
        self.sent: list[str] = []
        self.status_calls: list[str] = []
        self.status_answer = status_answer
        self.on_send: Any = None
        self.send_times: list[float] = []
        if queryable or idempotent:
            # This double's capabilities vary per instance: an instance attribute shadows the
            # class-level one (which the Channel protocol declares a ClassVar).
            vars(self)["capabilities"] = ChannelCaps(
                template_kind="sms",
                address_kind="phone",
                max_phi="none",
                can_query_status=queryable,
                idempotent_key=idempotent,
            )

    async def send(self, item: OutboxItem) -> Receipt:
        self.send_times.append(time.monotonic())
        if self.on_send is not None:
            self.on_send(item)
        outcome = self.script.pop(0) if self.script else Receipt("queued", provider_id=f"P-{item.key}")
        if isinstance(outcome, BaseException):
            raise outcome
        self.sent.append(item.key)
        return outcome

    async def status(self, item: OutboxItem) -> Receipt | None:
        self.status_calls.append(item.key)
        return self.status_answer

    async def aclose(self) -> None:
        return None


def cfg(rate: float | None = None) -> ChannelConfig:
    return ChannelConfig(plugin="script", rate_per_second=rate)


@pytest.fixture
def person(store: Store) -> int:
    with store.session() as s:
        p = Person(created_at=store.clock.now())
        s.add(p)
        s.flush()
        assert p.id is not None
        return p.id


def add_items(store: Store, person: int, n: int = 1, status: str = "pending", **kw: Any) -> list[int]:
    ids = []
    with store.session() as s:
        for i in range(n):
            row = OutboxItem(
                key=f"key-{status}-{i}-{random.random()}",
                person_id=person,
                channel="sms",
                template="appointment-reminder",
                playbook="appointment-reminders",
                purpose="treatment",
                phi_class="none",
                recipient=PHONE,
                content={"text": TEXT},
                created_at=store.clock.now(),
                status=status,
                **kw,
            )
            s.add(row)
            s.flush()
            assert row.id is not None
            ids.append(row.id)
    return ids


def rows(store: Store) -> list[OutboxItem]:
    with Session(store.engine) as s:
        return list(s.exec(select(OutboxItem).order_by(col(OutboxItem.id))).all())


def audits(store: Store, action: str) -> list[AuditRecord]:
    with Session(store.engine) as s:
        return list(s.exec(select(AuditRecord).where(AuditRecord.action == action)).all())


def drain(stage: DeliverStage) -> None:
    async def go() -> None:
        while await stage.run_once():
            pass

    asyncio.run(go())


def test_sending_is_committed_before_the_provider_call(store: Store, person: int) -> None:
    add_items(store, person)
    ch = ScriptChannel("sms", cfg())
    seen: list[str] = []
    ch.on_send = lambda item: seen.append(rows(store)[0].status)  # read through another connection
    drain(DeliverStage(store, {"sms": ch}))
    assert seen == ["sending"]
    [row] = rows(store)
    assert (row.status, row.provider_id, row.attempts) == ("sent", f"P-{row.key}", 1)


def test_success_records_a_receipt_and_a_phi_free_disclosure(store: Store, person: int) -> None:
    add_items(store, person)
    drain(DeliverStage(store, {"sms": ScriptChannel("sms", cfg())}))
    with Session(store.engine) as s:
        [receipt] = s.exec(select(DeliveryReceipt)).all()
    assert receipt.status == "queued"
    [audit] = audits(store, "disclosure")
    assert audit.detail == {
        "channel": "sms",
        "template": "appointment-reminder",
        "phi_class": "none",
        "recipient_kind": "phone",
        "recipient_role": "patient",
        "purpose": "treatment",
        "outcome": "queued",
        "attempt": 1,
    }
    assert audit.person_id == person and audit.outcome == "success"
    dumped = json.dumps(audit.detail)
    assert PHONE not in dumped and TEXT not in dumped


def test_transient_error_retries_with_jittered_exponential_backoff(store: Store, person: int) -> None:
    add_items(store, person)
    ch = ScriptChannel("sms", cfg(), script=[TransientError("HTTP 503")])
    stage = DeliverStage(store, {"sms": ch}, rng=random.Random(7))
    drain(stage)
    [row] = rows(store)
    assert row.status == "pending" and row.attempts == 1 and row.last_error == "TransientError: HTTP 503"
    assert row.next_attempt_at is not None
    delay = (utc(row.next_attempt_at) - store.clock.now()).total_seconds()
    assert 1.0 <= delay <= 2.0  # base 2 s: between half and all of it
    assert ch.sent == []
    assert isinstance(store.clock, VirtualClock)
    store.clock.set(store.clock.now() + timedelta(seconds=3))
    drain(stage)
    assert rows(store)[0].status == "sent" and rows(store)[0].attempts == 2
    assert [a.detail["outcome"] for a in audits(store, "disclosure")] == ["transient-error", "queued"]


def test_backoff_grows_exponentially_is_jittered_and_capped() -> None:
    rng = random.Random(1)
    for attempt in range(1, 12):
        ceiling = min(60.0, 2.0 * 2 ** (attempt - 1))
        draws = {backoff(attempt, 2.0, 60.0, rng).total_seconds() for _ in range(20)}
        assert all(ceiling / 2 <= d <= ceiling for d in draws)
        assert len(draws) > 1  # jitter: not all the same


def test_transient_errors_dead_letter_after_max_attempts(store: Store, person: int) -> None:
    add_items(store, person)
    ch = ScriptChannel("sms", cfg(), script=[TransientError("HTTP 429")] * 3)
    stage = DeliverStage(store, {"sms": ch}, max_attempts=3)
    assert isinstance(store.clock, VirtualClock)
    for _ in range(4):
        drain(stage)
        store.clock.set(store.clock.now() + timedelta(hours=2))
    [row] = rows(store)
    assert (row.status, row.attempts) == ("dead", 3)
    with Session(store.engine) as s:
        [dead] = s.exec(select(DeadLetter)).all()
    assert dead.stage == "deliver" and dead.item_id == row.id and "HTTP 429" in dead.error


def test_permanent_error_dead_letters_at_once(store: Store, person: int) -> None:
    add_items(store, person)
    ch = ScriptChannel("sms", cfg(), script=[PermanentError("HTTP 400 (provider code 21211)")])
    drain(DeliverStage(store, {"sms": ch}))
    [row] = rows(store)
    assert (row.status, row.attempts) == ("dead", 1)
    assert [a.detail["outcome"] for a in audits(store, "disclosure")] == ["permanent-error"]
    assert len(audits(store, "item.dead_letter")) == 1


def test_unconfigured_channel_dead_letters(store: Store, person: int) -> None:
    add_items(store, person)
    drain(DeliverStage(store, {}))
    assert rows(store)[0].status == "dead"


def test_interrupted_send_is_adopted_from_the_provider_not_resent(store: Store, person: int) -> None:
    old = store.clock.now() - timedelta(minutes=10)
    add_items(store, person, status="sending", attempts=1, next_attempt_at=old)
    ch = ScriptChannel("sms", cfg(), status_answer=Receipt("delivered", provider_id="SM1"), queryable=True)
    report = asyncio.run(DeliverStage(store, {"sms": ch}).recover())
    assert report.adopted == 1 and ch.sent == []
    [row] = rows(store)
    assert (row.status, row.provider_id) == ("delivered", "SM1")
    [audit] = audits(store, "disclosure")
    assert audit.detail["outcome"] == "delivered"


def test_interrupted_send_the_provider_never_got_is_sent_again(store: Store, person: int) -> None:
    add_items(
        store, person, status="sending", attempts=1, next_attempt_at=store.clock.now() - timedelta(hours=1)
    )
    ch = ScriptChannel("sms", cfg(), status_answer=Receipt(ABSENT), queryable=True)
    stage = DeliverStage(store, {"sms": ch})
    drain(stage)  # run_once recovers first, then sends
    [row] = rows(store)
    assert (row.status, row.attempts) == ("sent", 2) and ch.sent == [row.key]


def test_interrupted_send_without_a_status_api_becomes_unknown_for_staff(store: Store, person: int) -> None:
    add_items(
        store, person, status="sending", attempts=1, next_attempt_at=store.clock.now() - timedelta(hours=1)
    )
    ch = ScriptChannel("sms", cfg())
    drain(DeliverStage(store, {"sms": ch}))
    [row] = rows(store)
    assert row.status == "unknown" and ch.sent == [] and ch.status_calls == []
    assert row.last_error is not None and "staff review" in row.last_error
    [rec] = audits(store, "outbox.recover")
    assert rec.detail == {"channel": "sms", "outcome": "unknown"}


def _statuses_seen_at_each_send(store: Store, ch: ScriptChannel) -> list[list[str]]:
    seen: list[list[str]] = []
    ch.on_send = lambda item: seen.append([r.status for r in rows(store)])  # another connection
    return seen


def test_one_item_per_claim_unless_the_receiver_dedupes_on_the_key(store: Store, person: int) -> None:
    add_items(store, person, n=3)
    ch = ScriptChannel("sms", cfg())
    seen = _statuses_seen_at_each_send(store, ch)
    drain(DeliverStage(store, {"sms": ch}))
    # Each send sees only its own item claimed: the next is claimed after it settles.
    assert [x.count("sending") for x in seen] == [1, 1, 1]
    assert [r.status for r in rows(store)] == ["sent"] * 3


def test_idempotent_channel_items_are_claimed_in_groups(store: Store, person: int) -> None:
    add_items(store, person, n=5)
    ch = ScriptChannel("sms", cfg(), idempotent=True)
    seen = _statuses_seen_at_each_send(store, ch)
    drain(DeliverStage(store, {"sms": ch}, group=3))
    # Groups of 3 then 2, each claimed in one commit before its first send.
    assert [x.count("sending") for x in seen] == [3, 3, 3, 2, 2]
    assert sorted(ch.sent) == sorted(r.key for r in rows(store))
    assert [r.status for r in rows(store)] == ["sent"] * 5
    assert len(audits(store, "disclosure")) == 5


def test_a_rate_limited_channel_claims_no_more_than_it_can_send_within_the_lease(store: Store) -> None:
    stage = DeliverStage(store, {}, group=50, sending_lease=timedelta(minutes=5))
    assert stage._group_size(ScriptChannel("a", cfg(), idempotent=True)) == 50
    assert stage._group_size(ScriptChannel("b", cfg(rate=0.1), idempotent=True)) == 15  # 150 s of sends
    assert stage._group_size(ScriptChannel("c", cfg(rate=0.001), idempotent=True)) == 1


def test_interrupted_send_to_a_deduplicating_receiver_is_sent_again(store: Store, person: int) -> None:
    add_items(
        store,
        person,
        n=2,
        status="sending",
        attempts=1,
        next_attempt_at=store.clock.now() - timedelta(hours=1),
    )
    ch = ScriptChannel("sms", cfg(), idempotent=True)
    drain(DeliverStage(store, {"sms": ch}))
    assert [(r.status, r.attempts) for r in rows(store)] == [("sent", 2), ("sent", 2)]
    assert sorted(ch.sent) == sorted(r.key for r in rows(store))
    assert [a.detail["outcome"] for a in audits(store, "outbox.recover")] == ["resend", "resend"]


def test_a_deduplicated_item_always_in_doubt_goes_to_staff_not_round_and_round(
    store: Store, person: int
) -> None:
    old = store.clock.now() - timedelta(hours=1)
    add_items(store, person, status="sending", attempts=6, next_attempt_at=old)
    ch = ScriptChannel("sms", cfg(), idempotent=True)
    drain(DeliverStage(store, {"sms": ch}, max_attempts=6))
    [row] = rows(store)
    assert (row.status, row.attempts) == ("unknown", 6) and ch.sent == []


def test_inconclusive_provider_lookup_becomes_unknown(store: Store, person: int) -> None:
    add_items(
        store, person, status="sending", attempts=1, next_attempt_at=store.clock.now() - timedelta(hours=1)
    )
    ch = ScriptChannel("sms", cfg(), status_answer=None, queryable=True)
    asyncio.run(DeliverStage(store, {"sms": ch}).recover())
    assert rows(store)[0].status == "unknown" and ch.status_calls == [rows(store)[0].key]


def test_recovery_leaves_a_live_workers_item_alone(store: Store, person: int) -> None:
    add_items(
        store, person, status="sending", attempts=1, next_attempt_at=store.clock.now() - timedelta(seconds=5)
    )
    ch = ScriptChannel("sms", cfg(), status_answer=Receipt(ABSENT), queryable=True)
    report = asyncio.run(DeliverStage(store, {"sms": ch}).recover())
    assert report.resend == report.unknown == report.adopted == 0
    assert rows(store)[0].status == "sending"


def test_uncertain_send_stays_sending_until_recovery_settles_it(store: Store, person: int) -> None:
    add_items(store, person)
    ch = ScriptChannel(
        "sms",
        cfg(),
        script=[DeliveryUncertain("read timeout")],
        status_answer=Receipt("sent", provider_id="SM9"),
        queryable=True,
    )
    stage = DeliverStage(store, {"sms": ch})
    drain(stage)
    assert rows(store)[0].status == "sending" and ch.sent == []
    assert isinstance(store.clock, VirtualClock)
    store.clock.set(store.clock.now() + timedelta(minutes=6))
    asyncio.run(stage.recover())
    assert (rows(store)[0].status, rows(store)[0].provider_id) == ("sent", "SM9")
    assert [a.detail["outcome"] for a in audits(store, "disclosure")] == ["uncertain", "sent"]


def test_expired_item_is_cancelled_not_sent(store: Store, person: int) -> None:
    add_items(store, person, not_after=store.clock.now() - timedelta(minutes=1))
    ch = ScriptChannel("sms", cfg())
    drain(DeliverStage(store, {"sms": ch}))
    [row] = rows(store)
    assert (row.status, row.attempts) == ("cancelled", 0) and ch.sent == []
    assert len(audits(store, "outbox.expire")) == 1


def test_only_pending_items_are_claimed(store: Store, person: int) -> None:
    add_items(store, person, status="cancelled")
    add_items(store, person, status="unknown")
    ch = ScriptChannel("sms", cfg())
    drain(DeliverStage(store, {"sms": ch}))
    assert ch.sent == []


def test_items_not_yet_due_wait(store: Store, person: int) -> None:
    add_items(store, person, next_attempt_at=store.clock.now() + timedelta(minutes=1))
    ch = ScriptChannel("sms", cfg())
    drain(DeliverStage(store, {"sms": ch}))
    assert ch.sent == []


def test_rate_limit_spaces_sends_per_channel(store: Store, person: int) -> None:
    add_items(store, person, n=14)
    ch = ScriptChannel("sms", cfg(rate=10))
    drain(DeliverStage(store, {"sms": ch}))
    assert len(ch.sent) == 14
    # the token bucket's promise: a burst of 10, then no more than 10 per second
    t0 = ch.send_times[0]
    for i, t in enumerate(ch.send_times):
        assert t - t0 >= (i + 1 - 10) / 10 - 0.01


@pytest.fixture
def fake() -> Iterator[FakeTwilio]:
    f = FakeTwilio()
    f.start()
    yield f
    f.stop()


def test_outbox_delivers_through_twilio_once_per_key(store: Store, person: int, fake: FakeTwilio) -> None:
    ids = add_items(store, person, n=25)
    ch = TwilioSmsChannel(
        "sms",
        TwilioSmsConfig(
            plugin="twilio_sms",
            base_url=fake.base_url,
            account_sid=ACCOUNT_SID,
            auth_token=AUTH_TOKEN,
            from_number="+15550109999",
            status_callback_url="http://127.0.0.1:8080/channels/sms",
        ),
    )
    fake.fail_with = [429, 500]
    stage = DeliverStage(store, {"sms": ch})
    clock = store.clock
    assert isinstance(clock, VirtualClock)

    async def go() -> None:  # one event loop: the channel's connections belong to it
        while await stage.run_once():
            pass
        clock.set(clock.now() + timedelta(minutes=5))
        while await stage.run_once():
            pass
        await ch.aclose()

    asyncio.run(go())
    assert all(r.status == "sent" for r in rows(store))
    counts = fake.keys()
    assert sorted(counts) == sorted(r.key for r in rows(store)) and set(counts.values()) == {1}
    assert {r.provider_id for r in rows(store)} == {m["sid"] for m in fake.messages}
    assert len(ids) == 25


def test_rate_limit_does_not_slow_a_capture_stand_in(store: Store, person: int) -> None:
    from channels.capture import CaptureChannel

    add_items(store, person, n=30)
    ch = CaptureChannel("sms", ChannelConfig(plugin="twilio_sms", rate_per_second=1))
    t0 = time.monotonic()
    drain(DeliverStage(store, {"sms": ch}))
    assert len(ch.captured) == 30
    assert time.monotonic() - t0 < 25  # at 1/s it would take 29 s at least
