"""Store, migrations, identity linking, ingest and dead letters on both engines."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, col, select

import careloop.tables  # noqa: F401
from careloop import identity
from careloop.model import Identifier, RawIn
from careloop.pipeline import IngestSink, MapStage
from careloop.store import Store
from careloop.tables import DeadLetter, JourneyEvent, Person, RawMessage
from careloop.wiring import MapperRegistry
from tests.kernel_plugins import JsonConnector, register

register()
NOW = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)


def test_migrations_create_the_schema_the_models_describe(engine: Engine) -> None:
    names = set(inspect(engine).get_table_names())
    assert {"raw_message", "person", "journey_event", "decision", "timer", "outbox", "audit_record"} <= names
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == []


def test_same_identifier_is_same_person(store: Store) -> None:
    with store.session() as s:
        a = identity.resolve(s, [Identifier("urn:h", "1")], NOW)
        b = identity.resolve(s, [Identifier("urn:h", "1"), Identifier("phone", "+15555550101", "phone")], NOW)
        assert a.person_id == b.person_id and a.created and not b.created


def test_shared_phone_is_held_not_guessed(store: Store) -> None:
    phone = Identifier("phone", "+15555550177", "phone")
    with store.session() as s:
        identity.resolve(s, [Identifier("urn:h", "1"), phone], NOW)
        identity.resolve(s, [Identifier("urn:h", "2"), phone], NOW)
        r = identity.resolve(s, [phone], NOW)
    assert r.person_id is None and r.held_reason == "ambiguous-identity"


def test_conflicting_strong_identifiers_are_held(store: Store) -> None:
    with store.session() as s:
        identity.resolve(s, [Identifier("urn:h", "1")], NOW)
        identity.resolve(s, [Identifier("urn:h", "2")], NOW)
        r = identity.resolve(s, [Identifier("urn:h", "1"), Identifier("urn:h", "2")], NOW)
    assert r.held_reason == "identity-conflict"


def test_merge_links_old_person_into_survivor(store: Store) -> None:
    with store.session() as s:
        old = identity.resolve(s, [Identifier("urn:h", "OLD")], NOW).person_id
        new = identity.resolve(s, [Identifier("urn:h", "NEW")], NOW).person_id
        assert old is not None and new is not None
        assert identity.merge(s, new, [Identifier("urn:h", "OLD")]) == [old]
        assert identity.resolve(s, [Identifier("urn:h", "OLD")], NOW).person_id == new
        person = s.get(Person, old)
        assert person is not None and person.merged_into == new


def test_duplicate_dedup_key_is_stored_once_and_gets_first_reply(store: Store) -> None:
    sink = IngestSink(store)
    first = sink.put_sync([RawIn("adt", "hl7v2:ADT^A01", b"x", "x/hl7", "A|F|1", reply=b"ACK-1")])
    again = asyncio.run(sink.put([RawIn("adt", "hl7v2:ADT^A01", b"x", "x/hl7", "A|F|1", reply=b"ACK-2")]))
    assert again[0].duplicate and again[0].reply == b"ACK-1" and again[0].raw_id == first[0].raw_id
    with Session(store.engine) as s:
        assert len(s.exec(select(RawMessage)).all()) == 1


def test_one_failing_message_is_dead_lettered_while_next_flows(store: Store) -> None:
    conn = JsonConnector("feed", JsonConnector.Config(plugin="test_json"))
    sink = IngestSink(store)
    bad = b'{"type": "boom", "at": "2026-03-02T10:00:00+00:00", "mrn": "1", "id": "b"}'
    good = b'{"type": "appointment.booked", "at": "2026-03-02T10:00:00+00:00", "mrn": "1", "id": "g"}'
    skip = b'{"type": "ignored", "at": "2026-03-02T10:00:00+00:00", "mrn": "1", "id": "s"}'
    sink.put_sync([*conn.accept(bad, {}), *conn.accept(good, {}), *conn.accept(skip, {})])
    stage = MapStage(store, MapperRegistry({}))
    assert stage.run_once_sync() == 3
    with Session(store.engine) as s:
        statuses = [r.status for r in s.exec(select(RawMessage).order_by(col(RawMessage.id))).all()]
        assert statuses == ["dead", "mapped", "skipped"]
        dl = s.exec(select(DeadLetter)).one()
        assert dl.stage == "map" and "cannot be mapped" in dl.error
        assert [e.type for e in s.exec(select(JourneyEvent)).all()] == ["appointment.booked"]
