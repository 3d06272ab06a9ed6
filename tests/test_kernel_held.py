"""Events held for staff (identity): listed without PHI, assigned to a person, released."""

from __future__ import annotations

import json

from rich.console import Console
from sqlmodel import Session, col, select

from careloop.held import assign, list_held
from careloop.pipeline import IngestSink, MapStage
from careloop.store import Store
from careloop.tables import AuditRecord, JourneyEvent
from careloop.wiring import MapperRegistry
from tests.kernel_plugins import JsonConnector, register

register()
AT = "2026-03-02T10:00:00+00:00"


def _feed(store: Store, *docs: dict[str, object]) -> None:
    conn = JsonConnector("feed", JsonConnector.Config(plugin="test_json"))
    IngestSink(store).put_sync([i for d in docs for i in conn.accept(json.dumps(d).encode(), {})])
    MapStage(store, MapperRegistry({})).run_once_sync()


def test_a_shared_phone_is_held_listed_and_released_to_the_person_staff_choose(store: Store) -> None:
    phone = "+15555550142"
    _feed(
        store,
        {"id": "a", "type": "patient.updated", "at": AT, "mrn": "H-1", "phone": phone},
        {"id": "b", "type": "patient.updated", "at": AT, "mrn": "H-2", "phone": phone},
        {"id": "c", "type": "message.inbound", "at": AT, "phone": phone, "attributes": {"body": "C"}},
    )
    with Session(store.engine) as s:
        held = s.exec(select(JourneyEvent).where(JourneyEvent.status == "held")).one()
        held_id, reason = held.id, held.status_reason
        people = sorted({e.person_id for e in s.exec(select(JourneyEvent)).all() if e.person_id})
    assert reason == "ambiguous-identity" and len(people) == 2 and held_id is not None

    console = Console(record=True, width=200)
    assert list_held(store.engine, console) == 1
    text = console.export_text()
    assert "ambiguous-identity" in text and "message.inbound" in text and phone not in text

    assert assign(store.engine, held_id, 999_999) == "person 999999: not found"
    assert assign(store.engine, held_id, people[1]) is None
    assert assign(store.engine, held_id, people[1]) == f"event {held_id}: not a held event"
    with Session(store.engine) as s:
        ev = s.get(JourneyEvent, held_id)
        assert ev is not None and (ev.status, ev.person_id) == ("pending", people[1])
        actions = [r.action for r in s.exec(select(AuditRecord).order_by(col(AuditRecord.seq))).all()]
    assert actions[-2:] == ["held.list", "identity.assign"]
