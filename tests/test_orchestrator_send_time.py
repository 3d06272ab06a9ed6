"""The compliance gate again at send time (``EngineCore.send_check``, wired into the
deliver stage by the Hub): a retry that falls into quiet hours waits for the morning, a
death or a STOP since the decision cancels a retry or a dead letter put back, and notices
to staff are not held by the patient's rules. Synthetic people only."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, NoReturn

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from careloop import config as cfgmod
from careloop.clock import VirtualClock, utc
from careloop.deadletters import retry
from careloop.errors import PermanentError, TransientError
from careloop.hub import Hub
from careloop.pipeline import MapStage
from careloop.store import Store
from careloop.tables import AuditRecord, DeadLetter, Decision, DeliveryReceipt, OutboxItem, Person
from channels.base import Receipt
from channels.outbox import DeliverStage
from tests.conftest import FIXTURES
from tests.test_channels_outbox import ScriptChannel, cfg
from tests.test_orchestrator_qa_gate import APPT, NY, _line

Arrive = Callable[..., None]


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(datetime(2026, 3, 2, 20, 50, tzinfo=NY))


@pytest.fixture
def hub(engine: Engine, clock: VirtualClock, hubs: list[Hub]) -> Hub:
    made = Hub(
        cfgmod.load(FIXTURES / "config" / "kernel-test.yaml"), store=Store(engine, clock), capture=True
    )
    hubs.append(made)
    return made


_ids = itertools.count(1)  # message ids unique across arrive functions (else: duplicates)


def arrive_with(hub: Hub, clock: VirtualClock) -> Arrive:
    def arrive(**body: Any) -> None:
        line = _line(clock.now(), **body)
        doc = {**json.loads(line.body), "id": f"s{next(_ids)}"}
        hub.sink.put_sync(hub.connectors["feed"].accept(json.dumps(doc).encode(), {}))
        map_stage = hub.stages[0]
        assert isinstance(map_stage, MapStage)
        map_stage.run_once_sync()
        hub.orchestrator.run_once_sync()

    return arrive


def prep_queued(hub: Hub, clock: VirtualClock) -> OutboxItem:
    """A confirmed visit: its preparation text is queued on ``sms`` (not yet delivered)."""
    arrive = arrive_with(hub, clock)
    arrive(type="appointment.booked", appointment=APPT)
    arrive(type="appointment.confirmed", appointment={**APPT, "status": "confirmed"})
    with Session(hub.store.engine) as s:
        [item] = s.exec(select(OutboxItem)).all()
    assert (item.channel, item.template, item.status) == ("sms", "appointment-prep", "pending")
    return item


def stage(hub: Hub, channel: ScriptChannel, **kw: Any) -> DeliverStage:
    return DeliverStage(
        hub.store,
        {"sms": channel},
        recover_every=1e9,
        rng=random.Random(3),
        check=hub.orchestrator.send_check,
        **kw,
    )


def row(hub: Hub, item_id: int | None) -> OutboxItem:
    with Session(hub.store.engine) as s:
        got = s.get(OutboxItem, item_id)
        assert got is not None
        return got


def test_a_retry_that_falls_into_quiet_hours_waits_for_the_morning(hub: Hub, clock: VirtualClock) -> None:
    item = prep_queued(hub, clock)
    sms = ScriptChannel("sms", cfg(), script=[TransientError("provider unavailable")])
    deliver = stage(hub, sms, backoff_base=1800, backoff_cap=1800)
    asyncio.run(deliver.run_once())  # 20:50 local: sent, and it fails
    first = row(hub, item.id)
    assert first.status == "pending" and first.attempts == 1 and len(sms.send_times) == 1
    assert first.next_attempt_at is not None and utc(first.next_attempt_at).astimezone(NY).hour == 21

    clock.set(datetime(2026, 3, 2, 21, 25, tzinfo=NY))
    asyncio.run(deliver.run_once())
    held = row(hub, item.id)
    assert len(sms.send_times) == 1  # not sent at 21:25 local
    assert held.status == "pending" and held.attempts == 1
    assert held.next_attempt_at is not None
    assert utc(held.next_attempt_at) == datetime(2026, 3, 3, 8, 0, tzinfo=NY)
    with Session(hub.store.engine) as s:
        [audit] = s.exec(select(AuditRecord).where(AuditRecord.action == "outbox.defer")).all()
    assert audit.detail["reason"] == "quiet-hours" and audit.person_id == item.person_id

    clock.set(datetime(2026, 3, 3, 8, 0, 30, tzinfo=NY))
    asyncio.run(deliver.run_once())
    assert len(sms.send_times) == 2 and row(hub, item.id).status not in ("pending", "cancelled")


def test_a_death_recorded_before_a_retry_cancels_it(hub: Hub, clock: VirtualClock) -> None:
    item = prep_queued(hub, clock)
    clock.set(datetime(2026, 3, 3, 10, 0, tzinfo=NY))  # next morning, inside the window
    sms = ScriptChannel("sms", cfg(), script=[TransientError("provider unavailable")])
    deliver = stage(hub, sms, backoff_base=60, backoff_cap=60)
    asyncio.run(deliver.run_once())
    assert row(hub, item.id).status == "pending" and len(sms.send_times) == 1
    with Session(hub.store.engine) as s:
        person = s.get(Person, item.person_id)
        assert person is not None
        person.deceased = True
        s.commit()
    clock.set(clock.now() + timedelta(minutes=2))
    asyncio.run(deliver.run_once())
    gone = row(hub, item.id)
    assert len(sms.send_times) == 1 and (gone.status, gone.last_error) == ("cancelled", "deceased")
    with Session(hub.store.engine) as s:
        cancels = s.exec(select(Decision).where(Decision.action == "cancel")).all()
    assert [(d.reason, d.template) for d in cancels if d.detail.get("when") == "send-time"] == [
        ("deceased", "appointment-prep")
    ]


def test_a_dead_letter_put_back_after_a_stop_is_not_sent(hub: Hub, clock: VirtualClock) -> None:
    item = prep_queued(hub, clock)
    sms = ScriptChannel("sms", cfg(), script=[PermanentError("recipient unreachable")])
    deliver = stage(hub, sms)
    asyncio.run(deliver.run_once())
    assert row(hub, item.id).status == "dead"
    clock.set(clock.now() + timedelta(minutes=1))
    arrive_with(hub, clock)(
        type="consent.revoked", attributes={"channel": "sms", "purpose": "*", "keyword": "stop"}
    )
    with Session(hub.store.engine) as s:
        [dl] = s.exec(select(DeadLetter).where(DeadLetter.stage == "deliver")).all()
    assert dl.id is not None and retry(hub.store.engine, dl.id) is None  # staff put it back
    asyncio.run(deliver.run_once())
    gone = row(hub, item.id)
    assert len(sms.send_times) == 1 and (gone.status, gone.last_error) == ("cancelled", "opted-out")


def test_a_fresh_first_attempt_in_the_window_goes_without_a_full_recheck(
    hub: Hub, clock: VirtualClock
) -> None:
    item = prep_queued(hub, clock)
    sms = ScriptChannel("sms", cfg())
    asyncio.run(stage(hub, sms).run_once())
    assert len(sms.send_times) == 1 and row(hub, item.id).status == "sent"


def test_a_delivery_report_that_beats_the_settle_leaves_the_disclosure_to_the_settle(
    hub: Hub, clock: VirtualClock
) -> None:
    item = prep_queued(hub, clock)
    with Session(hub.store.engine) as s:  # claimed: the send is under way
        claimed = s.get(OutboxItem, item.id)
        assert claimed is not None
        claimed.status, claimed.attempts = "sending", 1
        s.commit()
    arrive_with(hub, clock)(type="message.delivered", attributes={"outbox_key": item.key})
    assert row(hub, item.id).status == "sending"  # the report is kept, the row left to the stage
    deliver = stage(hub, ScriptChannel("sms", cfg()))
    with hub.store.session() as s:
        deliver._done_in(s, clock.now(), row(hub, item.id), Receipt("queued", provider_id="SM1"), False)
    settled = row(hub, item.id)  # the report went further than the send's own answer
    assert (settled.status, settled.provider_id) == ("delivered", "SM1")
    with Session(hub.store.engine) as s:
        disclosures = s.exec(select(AuditRecord).where(AuditRecord.action == "disclosure")).all()
        receipts = s.exec(select(DeliveryReceipt).where(DeliveryReceipt.outbox_id == item.id)).all()
    assert [(d.entity, d.outcome) for d in disclosures] == [(f"outbox/{item.id}", "success")]
    assert sorted(r.status for r in receipts) == ["delivered", "queued"]


def test_a_person_who_moved_gets_the_time_zone_of_the_new_address(hub: Hub, clock: VirtualClock) -> None:
    arrive = arrive_with(hub, clock)

    def patient(state: str, zip_code: str) -> dict[str, Any]:
        return {
            "resourceType": "Patient",
            "address": [{"use": "home", "state": state, "postalCode": zip_code}],
        }

    arrive(type="appointment.booked", appointment=APPT, patient=patient("CA", "94103"))
    with Session(hub.store.engine) as s:
        [person] = s.exec(select(Person)).all()
    assert person.timezone == "America/Los_Angeles"
    later = {**APPT, "id": "qa-a9"}
    arrive(type="appointment.booked", appointment=later, patient=patient("NY", "10001"))
    with Session(hub.store.engine) as s:
        [person] = s.exec(select(Person)).all()
    assert person.timezone == "America/New_York"


def test_a_provider_opt_out_refusal_is_recorded_so_later_messages_are_suppressed(
    hub: Hub, clock: VirtualClock
) -> None:
    from careloop.tables import Consent
    from channels.twilio_loopback import FakeTwilio
    from tests.test_channels_twilio_sms import channel as twilio_channel

    item = prep_queued(hub, clock)
    fake = FakeTwilio()
    fake.start()
    try:
        fake.fail_with = [400]  # Twilio 21610: the recipient opted out with Twilio or the carrier
        sms = twilio_channel(fake)
        deliver = DeliverStage(hub.store, {"sms": sms}, check=hub.orchestrator.send_check)

        async def once() -> None:
            try:
                await deliver.run_once()
            finally:
                await sms.aclose()

        asyncio.run(once())
    finally:
        fake.stop()
    assert row(hub, item.id).status == "dead"
    hub.orchestrator.run_once_sync()  # the recorded refusal, as a STOP would be
    with Session(hub.store.engine) as s:
        consents = s.exec(select(Consent)).all()
    assert [(c.person_id, c.channel, c.purpose, c.status) for c in consents] == [
        (item.person_id, "sms", "*", "opt_out")
    ]
    clock.set(clock.now() + timedelta(minutes=5))
    arrive_with(hub, clock)(type="appointment.booked", appointment={**APPT, "id": "qa-a7"})
    clock.set(datetime(2026, 3, 6, 16, tzinfo=NY))  # the 72 h reminder is due
    hub.orchestrator.run_once_sync()
    with Session(hub.store.engine) as s:
        reasons = [
            d.reason for d in s.exec(select(Decision).where(Decision.template == "appointment-reminder"))
        ]
    assert "opted-out" in reasons and "allowed" not in reasons


def test_a_send_time_check_that_keeps_failing_ends_in_a_dead_letter_not_a_silent_stall(
    hub: Hub, clock: VirtualClock
) -> None:
    item = prep_queued(hub, clock)

    def broken(s: Session, item: OutboxItem, now: datetime) -> NoReturn:
        raise RuntimeError("a bug in the check")

    sms = ScriptChannel("sms", cfg())
    deliver = DeliverStage(hub.store, {"sms": sms}, max_attempts=3, recover_every=1e9, check=broken)
    for _ in range(3):
        asyncio.run(deliver.run_once())
        got = row(hub, item.id)
        clock.set(clock.now() + timedelta(minutes=6))
    assert not sms.send_times  # never sent unchecked
    assert got.status == "dead" and got.attempts == 3
    with Session(hub.store.engine) as s:
        [dl] = s.exec(select(DeadLetter).where(DeadLetter.item_id == item.id)).all()
    assert "check kept failing" in dl.error
