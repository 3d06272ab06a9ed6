"""Regressions from the review of the send-time gate, shared addresses and caps by kind:
each failed before its fix. Synthetic people only."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from careloop import config as cfgmod
from careloop.clock import VirtualClock
from careloop.hub import Hub
from careloop.pipeline import MapStage
from careloop.store import Store
from careloop.tables import Consent, Decision, Escalation, JourneyEvent, OutboxItem, Person, PersonIdentifier
from orchestrator.gate import Cap, ChannelFacts, GateInput, PersonFacts, evaluate
from tests.conftest import FIXTURES
from tests.test_channels_outbox import ScriptChannel, cfg
from tests.test_orchestrator_qa_gate import APPT, NY, PHONE, _line
from tests.test_orchestrator_send_time import arrive_with, clock, hub, prep_queued, row, stage  # noqa: F401

NOW = datetime(2026, 3, 3, 15, 0, tzinfo=UTC)  # 10:00 in New York


def _arrive(hub_: Hub, vclock: VirtualClock, prefix: str) -> Any:
    n = iter(range(1000))

    def arrive(**body: Any) -> None:
        line = _line(vclock.now(), **body)
        doc = {**json.loads(line.body), "id": f"{prefix}{next(n)}"}
        hub_.sink.put_sync(hub_.connectors["feed"].accept(json.dumps(doc).encode(), {}))
        map_stage = hub_.stages[0]
        assert isinstance(map_stage, MapStage)
        map_stage.run_once_sync()
        hub_.orchestrator.run_once_sync()

    return arrive


def test_an_escalation_opened_after_the_decision_cancels_the_queued_message(
    hub: Hub,  # noqa: F811
    clock: VirtualClock,  # noqa: F811
) -> None:
    item = prep_queued(hub, clock)
    clock.set(clock.now() + timedelta(minutes=1))
    arrive_with(hub, clock)(
        type="message.inbound",
        attributes={"channel": "sms", "body": "I have crushing chest pain and cannot breathe"},
    )
    with Session(hub.store.engine) as s:
        assert [e.status for e in s.exec(select(Escalation)).all()] == ["open"]
    sms = ScriptChannel("sms", cfg())
    asyncio.run(stage(hub, sms).run_once())
    assert row(hub, item.id).status == "cancelled"
    assert row(hub, item.id).last_error == "escalation-open"


def test_a_staff_page_about_the_patient_does_not_use_up_the_patients_sms_cap(
    engine: Engine, hubs: list[Hub], tmp_path: Path
) -> None:
    raw = cfgmod.load_raw(FIXTURES / "config" / "kernel-test.yaml")
    sms = raw["channels"]["sms"]
    raw["channels"] = {"texts": sms, "email": raw["channels"]["email"], "oncall": dict(sms)}
    raw["site"]["channels"] = ["texts"]
    raw.setdefault("compliance", {})["frequency_caps"] = {"sms": {"per_day": 1, "per_week": 3}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    vclock = VirtualClock(datetime(2026, 3, 2, 10, tzinfo=NY))
    hub_ = Hub(cfgmod.load(path), store=Store(engine, vclock), capture=True)
    hubs.append(hub_)
    arrive = _arrive(hub_, vclock, "c")
    arrive(type="appointment.booked", appointment=APPT)
    with Session(engine) as s:
        [p] = s.exec(select(Person)).all()
        assert p.id is not None
        s.add(  # a page to the on-call phone about this patient: staff, not the patient
            OutboxItem(
                key="page1",
                person_id=p.id,
                channel="oncall",
                template="escalation-sms",
                playbook="escalation",
                purpose="escalation",
                phi_class="none",
                recipient="+12125550999",
                content={"text": "escalation"},
                created_at=vclock.now(),
                status="sent",
                attempts=1,
            )
        )
        s.commit()
    vclock.set(vclock.now() + timedelta(minutes=5))
    arrive(type="appointment.confirmed", appointment={**APPT, "status": "confirmed"})
    with Session(engine) as s:
        prep = s.exec(select(Decision).where(Decision.template == "appointment-prep")).all()
    assert [d.reason for d in prep] == ["allowed"]


def test_a_cap_keyed_by_kind_counts_every_channel_of_it_even_one_named_like_the_kind() -> None:
    sms, sms2 = ChannelFacts("sms", "phone", "sms", "none"), ChannelFacts("sms2", "phone", "sms", "none")
    person = PersonFacts(False, "America/New_York", {"phone": ["+12125550101"]}, frozenset())
    base: dict[str, Any] = {
        "now": NOW,
        "person": person,
        "template_kinds": frozenset({"sms"}),
        "phi_class": "none",
        "purpose": "appointment-reminder",
        "caps": {"sms": Cap(1, 3)},
        "kind_of": {"sms": "sms", "sms2": "sms"},
    }
    on_sms = evaluate(GateInput(channels=[sms], sent_day={"sms2": 1}, sent_week={"sms2": 1}, **base))
    on_sms2 = evaluate(GateInput(channels=[sms2], sent_day={"sms": 1}, sent_week={"sms": 1}, **base))
    assert on_sms.reason == on_sms2.reason == "frequency-cap"


def test_the_learner_sends_to_the_persons_own_phone_not_the_shared_one(
    engine: Engine, hubs: list[Hub]
) -> None:
    own = "+12125550177"
    vclock = VirtualClock(datetime(2026, 3, 2, 10, tzinfo=NY))
    hub_ = Hub(
        cfgmod.load(FIXTURES / "config" / "learning-test.yaml"), store=Store(engine, vclock), capture=True
    )
    hubs.append(hub_)
    arrive = _arrive(hub_, vclock, "l")
    arrive(type="appointment.booked", appointment=APPT)
    with Session(engine) as s:
        [first] = s.exec(select(PersonIdentifier).where(PersonIdentifier.value == PHONE)).all()
        s.add(PersonIdentifier(person_id=first.person_id, kind="phone", system=first.system, value=own))
        s.commit()
    arrive(mrn="QA-2", type="patient.updated", patient={"resourceType": "Patient"})  # a family member
    arrive(type="appointment.confirmed", appointment={**APPT, "status": "confirmed"})
    for _ in range(6):
        vclock.set(vclock.now() + timedelta(hours=4))
        hub_.orchestrator.run_once_sync()
    with Session(engine) as s:
        recipients = [o.recipient for o in s.exec(select(OutboxItem)).all()]
    assert recipients and PHONE not in recipients and set(recipients) <= {own}


def _example_hub(engine: Engine, hubs: list[Hub]) -> Hub:
    made = Hub(
        cfgmod.load(FIXTURES / "config" / "example.yaml"),
        store=Store(engine, VirtualClock(NOW)),
        capture=True,
    )
    hubs.append(made)
    return made


def _someone(s: Session) -> Person:
    p = Person(created_at=NOW, timezone="America/New_York", patient={})
    s.add(p)
    s.flush()
    return p


def _queued(person_id: int, **kw: Any) -> OutboxItem:
    """An outbox row that failed once and waits for its retry (``kw`` sets the rest)."""
    base: dict[str, Any] = {
        "person_id": person_id,
        "phi_class": "none",
        "created_at": NOW - timedelta(minutes=30),
        "attempts": 2,
        "last_error": "transient",
    }
    return OutboxItem(**{**base, **kw})


def test_a_write_back_task_for_staff_is_not_held_by_the_patients_opt_out(
    engine: Engine, hubs: list[Hub]
) -> None:
    hub_ = _example_hub(engine, hubs)
    with Session(engine) as s:
        p = _someone(s)
        assert p.id is not None
        s.add(Consent(person_id=p.id, channel="*", purpose="*", status="opt_out", at=NOW, source="test"))
        item = _queued(
            p.id,
            key="k1",
            channel="ehr-writeback",
            template="writeback-task",
            playbook="triage",
            subject_ref="Appointment/x",
            purpose="care-coordination",
            phi_class="limited",
            recipient="Patient/x",
            content={"kind": "task"},
        )
        s.add(item)
        s.flush()
        assert hub_.orchestrator.send_check(s, item, NOW) is None


def test_a_patients_unsubscribe_does_not_cancel_a_notice_to_staff_about_them(
    engine: Engine, hubs: list[Hub]
) -> None:
    hub_ = _example_hub(engine, hubs)
    with Session(engine) as s:
        p = _someone(s)
        assert p.id is not None
        item = _queued(
            p.id,
            key="k2",
            channel="email",
            template="escalation-email",
            playbook="escalation",
            purpose="escalation",
            recipient="nurse-line@northwind.example.org",
            content={"subject": "x", "text": "y"},
            next_attempt_at=NOW + timedelta(minutes=2),
        )
        s.add(item)
        ev = JourneyEvent(
            event_key="e1",
            person_id=p.id,
            type="consent.revoked",
            occurred_at=NOW,
            recorded_at=NOW,
            attributes={"channel": "email", "purpose": "*", "source": "email-reply"},
        )
        s.add(ev)
        s.flush()
        hub_.orchestrator._consent(s, p, ev, NOW)
        s.flush()
        assert item.status == "pending"


def test_a_retry_to_a_number_that_has_become_shared_is_held(engine: Engine, hubs: list[Hub]) -> None:
    hub_ = _example_hub(engine, hubs)
    with Session(engine) as s:
        p, other = _someone(s), _someone(s)
        assert p.id is not None and other.id is not None
        s.add(
            PersonIdentifier(
                person_id=p.id, kind="phone", system="phone", value="+12125550101", verified=True
            )
        )
        s.add(PersonIdentifier(person_id=p.id, kind="phone", system="phone", value="+12125550102"))
        s.add(PersonIdentifier(person_id=other.id, kind="phone", system="phone", value="+12125550101"))
        item = _queued(
            p.id,
            key="k3",
            channel="sms",
            template="appointment-reminder",
            playbook="appointment-reminders",
            purpose="appointment-reminder",
            recipient="+12125550101",
            content={"text": "x"},
        )
        s.add(item)
        s.flush()
        hold = hub_.orchestrator.send_check(s, item, NOW)
        assert hold is not None and (hold.reason, hold.until, hold.staff) == (
            "identity-unresolved",
            None,
            True,
        )
