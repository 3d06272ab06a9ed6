"""Two map workers at once: messages of the same new patient (an ADT^A04 and an SIU^S12
with the same MRN) mapped by two workers together end with one person, not two. Each
worker claims its own raw messages (FOR UPDATE SKIP LOCKED) and reads who holds the
batch's identifiers once; before, on PostgreSQL, both read "nobody" and each created a
person (a duplicate patient, splitting journey, consents and caps). Worker A pauses after
its batch has read the holders and before it resolves anyone; worker B runs meanwhile, and
A goes on once B is done or is seen waiting for a lock. On SQLite the writer lock (BEGIN
IMMEDIATE) keeps B out until A commits. Synthetic people only."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from careloop.clock import VirtualClock
from careloop.config import AppConfig
from careloop.hub import Hub
from careloop.identity import deciding
from careloop.model import Identifier, MappedEvent
from careloop.pipeline import MapBatch, MapStage
from careloop.store import Store
from careloop.tables import DeadLetter, JourneyEvent, PersonIdentifier, RawMessage
from tests.hl7_support import adt, msh, seg, siu
from tests.test_hl7_siu_status import CONFIG, NOW


def pid(mrn: str) -> str:
    return seg("PID", {1: "1", 3: f"{mrn}^^^NWH^MR", 5: "Testperson^Alex", 7: "19900101", 8: "U"})


def no_pid() -> bytes:
    """An ADT^A04 without its PID segment: its mapper raises, so the batch it is in fails
    and the map stage maps that batch's messages one by one."""
    return ("\r".join([msh("ADT^A04^ADT_A04", "BAD1"), seg("EVN", {1: "A04"})]) + "\r").encode()


def _waiting_for_identity_lock(engine: Engine) -> bool:
    """Whether some backend waits for an advisory lock inside the map stage's lock statement."""
    with engine.connect() as c:
        n = c.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND wait_event = 'advisory' AND query LIKE '%pg_advisory_xact_lock%'"
            )
        ).scalar_one()
    return bool(n)


def _two_workers(engine: Engine, hubs: list[Hub], a_batch: int, *bodies: bytes, pause_at: int = 1) -> str:
    """Store ``bodies`` (in order); worker A maps the first ``a_batch`` of them, worker B the
    rest, B starting while A has read its holders and not yet resolved anyone (at A's
    ``pause_at``-th message stored, counting the tries of a batch mapped one by one).
    Returns what A saw before going on: "done" (B committed) or "waiting" (B waits for a
    lock; on SQLite: B was still not done after a second, held by the writer lock)."""
    a = Hub(AppConfig.model_validate(CONFIG), store=Store(engine, VirtualClock(NOW)), capture=True)
    b = Hub(AppConfig.model_validate(CONFIG), store=Store(engine, VirtualClock(NOW)), capture=True)
    hubs.extend([a, b])
    for body in bodies:
        a.sink.put_sync(a.connectors["siu"].accept(body, {}))
    stage_a, stage_b = a.stages[0], b.stages[0]
    assert isinstance(stage_a, MapStage) and isinstance(stage_b, MapStage)
    stage_a.batch = a_batch
    real: Callable[..., tuple[str, str | None]] = stage_a._store
    seen: list[str] = []
    calls: list[int] = []
    worker_b = threading.Thread(target=stage_b.run_once_sync)

    def hooked(
        s: Session, raw: RawMessage, actor: str, out: Any, now: datetime, batch: MapBatch
    ) -> tuple[str, str | None]:
        calls.append(raw.id or 0)
        if len(calls) == pause_at:  # A has read the holders: B maps the other message now
            worker_b.start()
            deadline = time.monotonic() + (30.0 if engine.dialect.name == "postgresql" else 1.0)
            while worker_b.is_alive() and time.monotonic() < deadline:
                if engine.dialect.name == "postgresql" and _waiting_for_identity_lock(engine):
                    break
                time.sleep(0.01)
            seen.append("waiting" if worker_b.is_alive() else "done")
        return real(s, raw, actor, out, now, batch)

    stage_a._store = hooked  # type: ignore[method-assign]
    assert stage_a.run_once_sync() == a_batch
    worker_b.join(timeout=60)
    assert not worker_b.is_alive()
    return seen[0]


def _holders(engine: Engine, mrn: str) -> set[int]:
    with Session(engine) as s:
        rows = s.exec(select(PersonIdentifier).where(PersonIdentifier.value == mrn)).all()
    return {r.person_id for r in rows}


def _events(engine: Engine) -> list[tuple[str, int | None]]:
    with Session(engine) as s:
        evs = s.exec(select(JourneyEvent).order_by(col(JourneyEvent.id))).all()
    return sorted((e.type, e.person_id) for e in evs)


def test_two_workers_mapping_one_new_patient_make_one_person(engine: Engine, hubs: list[Hub]) -> None:
    seen = _two_workers(
        engine, hubs, 1, adt("A04", "C1", pid=pid("TWMRN001")), siu("S12", "S1", pid=pid("TWMRN001"))
    )
    assert len(_holders(engine, "TWMRN001")) == 1  # before: two people held the MRN
    [person] = _holders(engine, "TWMRN001")
    assert _events(engine) == [("appointment.booked", person), ("encounter.registered", person)]
    assert seen == "waiting"  # B could not decide about the MRN while A had read it


def test_two_workers_mapping_different_new_patients_do_not_wait_for_each_other(
    engine: Engine, hubs: list[Hub]
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("two map workers at once need PostgreSQL (SQLite has one writer)")
    seen = _two_workers(
        engine, hubs, 1, adt("A04", "C1", pid=pid("TWMRN001")), siu("S12", "S1", pid=pid("TWMRN002"))
    )
    assert seen == "done"  # B created its patient and committed while A held its batch
    [first] = _holders(engine, "TWMRN001")
    [second] = _holders(engine, "TWMRN002")
    assert first != second
    assert _events(engine) == [("appointment.booked", second), ("encounter.registered", first)]


def test_a_batch_mapped_one_by_one_after_a_failure_still_makes_one_person(
    engine: Engine, hubs: list[Hub]
) -> None:
    """A's batch holds a message its mapper cannot map, so A maps its messages one by one
    (``handle_isolated``); the patient's SIU in B still finds A's person."""
    if engine.dialect.name != "postgresql":
        pytest.skip("two map workers at once need PostgreSQL (SQLite has one writer)")
    seen = _two_workers(
        engine,
        hubs,
        2,
        adt("A04", "C1", pid=pid("TWMRN001")),
        no_pid(),
        siu("S12", "S1", pid=pid("TWMRN001")),
        pause_at=2,  # the ADT alone, after the batch of both (ADT stored, bad one failed) was undone
    )
    assert len(_holders(engine, "TWMRN001")) == 1
    [person] = _holders(engine, "TWMRN001")
    assert _events(engine) == [("appointment.booked", person), ("encounter.registered", person)]
    with Session(engine) as s:
        assert len(s.exec(select(DeadLetter)).all()) == 1
    assert seen == "waiting"


def test_map_batch_events_are_what_these_tests_assume() -> None:
    """The messages above map to one event each, naming the MRN (and no contact point)."""
    from mapping.hl7v2 import HL7v2Mapper

    for body in (adt("A04", "C1", pid=pid("TWMRN001")), siu("S12", "S1", pid=pid("TWMRN001"))):
        raw = RawMessage(connector="siu", kind="hl7v2:x", content_type="x", body=body, headers={})
        evs: list[MappedEvent] = list(HL7v2Mapper().map(raw))
        assert [[i.value for i in ev.identifiers] for ev in evs] == [["TWMRN001"]]


def test_the_identifiers_locked_are_those_that_decide_whether_a_person_is_created() -> None:
    """Strong ids; phones and emails (which may be shared) only when they decide alone."""
    mrn = Identifier("urn:test:mrn", "TWMRN001")
    crm = Identifier("urn:test:crm", "TWC1", kind="crm")
    phone = Identifier("phone", "+12125550100", kind="phone")
    email = Identifier("email", "tw1@example.org", kind="email", verified=True)
    outbox = Identifier("urn:careloop:outbox", "k1", kind="outbox")
    assert deciding([mrn, phone, email]) == [mrn]
    assert deciding([phone, email]) == [phone, email]
    assert deciding([crm, phone, email]) == [crm, email]
    assert deciding([crm, mrn, email]) == [crm, mrn]
    assert deciding([outbox]) == []
