"""The gate's reads are loaded once per batch (orchestrator/facts.py) and dropped for a
person as soon as anything could change them: a batch deciding several events of one
person decides each as if it had read the database just then. Synthetic people only."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from careloop.clock import VirtualClock
from careloop.config import AppConfig
from careloop.hub import Hub
from careloop.store import Store
from careloop.tables import Consent, Decision, OutboxItem, Person
from orchestrator import facts

NOW = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)

CONFIG: dict[str, Any] = {
    "site": {"timezone": "UTC", "quiet_hours": "00:00-24:00", "channels": ["out"]},
    "compliance": {"frequency_caps": {"out": {"per_day": 1, "per_week": 3}}},
    "connectors": {"adt": {"plugin": "hl7v2_mllp", "port": 2599}},
    "channels": {"out": {"plugin": "capture"}},
    "templates": {
        "appointment-reminder": {"phi_class": "none", "text": {"en": "Visit {{ appointment.start }}"}}
    },
    "playbooks": {
        "appointment-reminders": {"on": ["appointment.booked"], "steps": [{"send": "appointment-reminder"}]}
    },
}


def siu(msg: str, appt: str, mrn: str, start: datetime) -> bytes:
    ts = start.strftime("%Y%m%d%H%M%S+0000")
    return (
        f"MSH|^~\\&|T|HOSP|CARELOOP|CARELOOP|20260302150000+0000||SIU^S12^SIU_S12|{msg}|P|2.5.1\r"
        f"SCH|{appt}^T|{appt}F^T|||||FOLLOWUP^Follow-up^HL70276||30|min|^^30^{ts}||||||||||||||Booked\r"
        f"TQ1|1||||||{ts}\r"
        f"PID|1||{mrn}^^^HOSP^MR||Testperson^Synthetic||19800101|F|||1 Main St^^Boston^MA^02101^USA"
        f"||^PRN^PH^^1^617^5550100\r"
    ).encode()


def _hub(engine: Engine, hubs: list[Hub], batch: int) -> Hub:
    hub = Hub(AppConfig.model_validate(CONFIG), store=Store(engine, VirtualClock(NOW)), capture=True)
    hubs.append(hub)
    hub.orchestrator.batch = batch
    return hub


@pytest.mark.parametrize("batch", [200, 1], ids=["one-batch", "one-event-a-batch"])
def test_a_second_booking_in_the_same_batch_sees_the_first_send_against_the_cap(
    engine: Engine, hubs: list[Hub], batch: int
) -> None:
    hub = _hub(engine, hubs, batch)
    conn = hub.connectors["adt"]
    start = NOW + timedelta(days=3)
    hub.sink.put_sync(
        [*conn.accept(siu("M1", "A1", "BF-1", start), {}), *conn.accept(siu("M2", "A2", "BF-1", start), {})]
    )
    asyncio.run(hub.drain())
    with Session(engine) as s:
        sends = s.exec(select(OutboxItem)).all()
        decisions = [(d.action, d.reason) for d in s.exec(select(Decision).order_by(col(Decision.id))).all()]
    assert len(sends) == 1, decisions
    assert decisions == [("send", "allowed"), ("suppress", "frequency-cap")]


def a28(msg: str, mrn: str) -> bytes:
    """A patient added (ADT^A28): a person and a journey state, and nothing sent."""
    return (
        f"MSH|^~\\&|T|HOSP|CARELOOP|CARELOOP|20260302150000+0000||ADT^A28^ADT_A05|{msg}|P|2.5.1\r"
        "EVN|A28|20260302150000+0000\r"
        f"PID|1||{mrn}^^^HOSP^MR||Testperson^Synthetic||19800101|F|||1 Main St^^Boston^MA^02101^USA"
        "||^PRN^PH^^1^617^5550100\r"
    ).encode()


def test_a_known_person_booked_twice_in_one_batch_gets_one_message_a_day(
    engine: Engine, hubs: list[Hub]
) -> None:
    """The person and their journey state are in memory for the batch, so nothing is read
    between the two decisions: the first send, still queued with the batch's writes, must
    count against the cap all the same."""
    hub = _hub(engine, hubs, 200)
    conn = hub.connectors["adt"]
    hub.sink.put_sync(conn.accept(a28("M0", "BF-2"), {}))
    asyncio.run(hub.drain())
    start = NOW + timedelta(days=3)
    hub.sink.put_sync(
        [*conn.accept(siu("M1", "A1", "BF-2", start), {}), *conn.accept(siu("M2", "A2", "BF-2", start), {})]
    )
    asyncio.run(hub.drain())
    with Session(engine) as s:
        sends = s.exec(select(OutboxItem)).all()
        decisions = [(d.action, d.reason) for d in s.exec(select(Decision).order_by(col(Decision.id))).all()]
    assert len(sends) == 1, decisions
    assert decisions == [("send", "allowed"), ("suppress", "frequency-cap")]


def _people(s: Session, n: int) -> list[int]:
    people = [Person(created_at=NOW, patient={}) for _ in range(n)]
    for p in people:
        s.add(p)
    s.flush()
    return [p.id for p in people if p.id is not None]


def _outbox(pid: int, key: str) -> OutboxItem:
    return OutboxItem(
        key=key,
        person_id=pid,
        channel="out",
        template="t",
        purpose="appointment-reminder",
        phi_class="none",
        recipient="+16175550100",
        content={},
        created_at=NOW,
    )


def test_a_write_makes_stale_the_facts_of_the_person_it_names_or_of_everyone(store: Store) -> None:
    with store.session() as s:
        p1, p2, p3 = _people(s, 3)
        s.add(_outbox(p1, "k1"))
        s.flush()
        batch = facts.begin(s, [p1, p2, p3], NOW)
        assert batch is not None
        since = NOW - facts.WEEK
        got = batch.get(s, p1, since)
        assert got is not None and [c for _, c, _ in got.recent] == ["out"]

        s.add(_outbox(p1, "k2"))  # a new send to p1: p1's caps changed, nobody else's
        assert batch.get(s, p1, since) is None
        assert batch.get(s, p2, since) is not None
        # and read again, p1's facts include it
        assert len(facts.read(s, [p1], since)[p1].recent) == 2

        s.add(Consent(person_id=p2, channel="sms", purpose="*", status="opt_out", at=NOW, source="test"))
        assert batch.get(s, p2, since) is None  # written by the flush inside ``get``
        assert batch.get(s, p3, since) is not None

        s.execute(update(Person).where(col(Person.id) == p3).values(timezone="America/Chicago"))
        assert batch.get(s, p3, since) is not None  # a time zone is not a fact kept here

        s.execute(update(Person).where(col(Person.id) == p1).values(merged_into=p3))
        assert batch.get(s, p3, since) is None  # a merge changes who shares what
        facts.end(s)
        assert facts.current(s) is None


def test_facts_do_not_answer_for_a_longer_look_back_than_they_were_read_for(store: Store) -> None:
    with store.session() as s:
        (p1,) = _people(s, 1)
        batch = facts.begin(s, [p1], NOW)
        assert batch is not None
        assert batch.get(s, p1, NOW - facts.WEEK) is not None
        assert batch.get(s, p1, NOW - facts.WEEK - timedelta(seconds=1)) is None
        facts.end(s)


def test_any_other_write_to_the_outbox_makes_every_persons_facts_stale(store: Store) -> None:
    with store.session() as s:
        p1, p2 = _people(s, 2)
        batch = facts.begin(s, [p1, p2], NOW)
        assert batch is not None
        s.execute(update(OutboxItem).where(col(OutboxItem.person_id) == p1).values(status="cancelled"))
        assert batch.get(s, p1, NOW - facts.WEEK) is None
        assert batch.get(s, p2, NOW - facts.WEEK) is None
        facts.end(s)
