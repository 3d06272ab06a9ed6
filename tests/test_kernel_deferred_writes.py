"""Deferred writes (careloop/writes.py): what a batch queues is written before anything
else runs, a bad row fails inside its own savepoint, and handed-out ids never collide."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlmodel import Session, col

from careloop import writes
from careloop.pipeline import handle_isolated
from careloop.store import Store, write_through
from careloop.tables import DeadLetter, Decision, Person, Timer

NOW = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
_DECISION = Decision.__table__  # type: ignore[attr-defined]
_PERSON = Person.__table__  # type: ignore[attr-defined]


def _decision(pid: int, **kw: Any) -> dict[str, Any]:
    return {
        "person_id": pid,
        "decided_at": NOW,
        "event_id": None,
        "timer_id": None,
        "playbook": "p",
        "playbook_version": 1,
        "action": "send",
        "template": None,
        "channel": None,
        "reason": "allowed",
        "detail": {},
        "propensity": None,
        **kw,
    }


def _person(s: Session) -> Person:
    p = Person(created_at=NOW, patient={})
    s.add(p)
    s.flush()
    return p


def _count(s: Session, table: Any) -> int:
    return int(s.connection().execute(select(func.count()).select_from(table)).scalar_one())


def test_queued_rows_are_written_before_the_next_statement_reads(store: Store) -> None:
    with store.session() as s:
        pid = _person(s).id or 0
        with writes.deferred(s) as d:
            writes.insert(s, _DECISION, _decision(pid, id=writes.next_id(s, _DECISION)))
            assert d.inserts  # queued, not written
            assert _count(s, _DECISION) == 1  # the read wrote it first
            assert not d.inserts


def test_a_queued_update_is_written_and_a_missing_row_is_an_error(store: Store) -> None:
    with store.session() as s:
        p = _person(s)
        with writes.deferred(s) as d:
            write_through(s, p, timezone="America/Denver")
            assert p.timezone == "America/Denver" and d.updates
        row = s.connection().execute(select(_PERSON.c.timezone).where(_PERSON.c.id == p.id)).scalar_one()
        assert row == "America/Denver"
        ghost = Person(id=10**9, created_at=NOW, patient={})
        with pytest.raises(RuntimeError, match="row not found"), writes.deferred(s):
            writes.update(s, _PERSON, {"id": ghost.id}, {"timezone": "UTC"})


def test_a_bad_row_fails_in_its_own_item_and_the_others_are_kept(store: Store) -> None:
    """handle_isolated flushes at the end of each savepoint: the duplicate id fails the
    batch, then only its own item when the items are redone one by one."""
    with store.session() as s:
        pid = _person(s).id or 0
        s.connection().execute(_DECISION.insert(), _decision(pid, id=7))
        items = [Timer(person_id=pid, due_at=NOW, playbook="p", payload={}) for _ in range(3)]
        s.add_all(items)
        s.flush()

        def handle(sess: Session, t: Timer) -> None:
            new_id = 7 if t is items[1] else writes.next_id(sess, _DECISION)
            writes.insert(sess, _DECISION, _decision(pid, id=new_id, timer_id=t.id))
            write_through(sess, t, status="fired")

        with writes.deferred(s):
            handle_isolated(s, items, handle, "test", lambda: NOW)
        assert _count(s, _DECISION) == 3  # the first row and the two good items'
        dead = s.connection().execute(select(col(DeadLetter.item_id))).scalars().all()
        assert dead == [items[1].id]
        assert [t.status for t in items] == ["fired", "dead", "fired"]


def test_a_rolled_back_savepoint_drops_what_it_queued(store: Store) -> None:
    with store.session() as s:
        pid = _person(s).id or 0
        with writes.deferred(s):
            try:
                with s.begin_nested():
                    writes.insert(s, _DECISION, _decision(pid, id=writes.next_id(s, _DECISION)))
                    raise ValueError("item failed")
            except ValueError:
                pass
            writes.insert(s, _DECISION, _decision(pid, id=writes.next_id(s, _DECISION), reason="kept"))
        reasons = s.connection().execute(select(_DECISION.c.reason)).scalars().all()
        assert reasons == ["kept"]


def test_ids_handed_out_never_collide_with_rows_inserted_otherwise(store: Store) -> None:
    with store.session() as s:
        pid = _person(s).id or 0
        with writes.deferred(s):
            a = writes.next_id(s, _DECISION)
            writes.insert(s, _DECISION, _decision(pid, id=a))
            # someone else's insert in the same transaction takes the next free id
            other = (
                s.connection()
                .execute(_DECISION.insert().returning(_DECISION.c.id), _decision(pid))
                .scalar_one()
            )
            b = writes.next_id(s, _DECISION)
            writes.insert(s, _DECISION, _decision(pid, id=b))
        assert len({a, other, b}) == 3
        assert _count(s, _DECISION) == 3
    with store.session() as s:  # a later transaction starts from what is there
        with writes.deferred(s):
            c = writes.next_id(s, _DECISION)
            writes.insert(s, _DECISION, _decision(pid, id=c))
        assert c not in {a, other, b}


def test_updates_of_one_row_in_different_shapes_keep_their_order(store: Store) -> None:
    with store.session() as s:
        p, q = _person(s), _person(s)
        with writes.deferred(s):
            write_through(s, p, timezone="America/Denver")
            write_through(s, q, timezone="America/Chicago")
            write_through(s, p, timezone="America/Phoenix", language="es")
            write_through(s, p, timezone="America/New_York")  # the last word
        rows: dict[int, str] = dict(s.connection().execute(select(_PERSON.c.id, _PERSON.c.timezone)).all())
        assert rows[p.id or 0] == "America/New_York" and rows[q.id or 0] == "America/Chicago"


def test_updates_of_different_rows_are_grouped_one_statement_a_shape(store: Store) -> None:
    with store.session() as s:
        people = [_person(s) for _ in range(4)]
        seen: list[str] = []

        def count(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            seen.append(statement.split()[0])

        event.listen(s.get_bind(), "before_cursor_execute", count)
        try:
            with writes.deferred(s):
                for p in people:
                    write_through(s, p, timezone="America/Denver")
                    write_through(s, p, language="es")
        finally:
            event.remove(s.get_bind(), "before_cursor_execute", count)
        assert seen.count("UPDATE") == 2
        langs = s.connection().execute(select(_PERSON.c.language)).scalars().all()
        assert langs == ["es"] * 4


def _reasons(store: Store) -> list[str]:
    with store.session() as s:
        return sorted(s.connection().execute(select(_DECISION.c.reason)).scalars())


def test_a_savepoint_rolled_back_before_its_first_statement_keeps_the_rows_queued_before_it(
    store: Store,
) -> None:
    """SQLAlchemy emits SAVEPOINT at the first statement inside it; a failure before any
    (a triage step whose lexicon cannot load) dropped the enclosing batch's queued rows:
    the previous event's status, journey state and timers were lost (a review's repro)."""
    with store.session() as s:
        pid = _person(s).id or 0
        with writes.deferred(s):
            writes.insert(s, _DECISION, _decision(pid, id=writes.next_id(s, _DECISION), reason="outer"))
            try:
                with s.begin_nested():
                    raise ValueError("fails before its first statement")
            except ValueError:
                pass
    assert _reasons(store) == ["outer"]


def test_rows_queued_inside_a_savepoint_before_its_first_statement_go_with_its_rollback(
    store: Store,
) -> None:
    with store.session() as s:
        pid = _person(s).id or 0
        with writes.deferred(s):
            try:
                with s.begin_nested():
                    writes.insert(
                        s, _DECISION, _decision(pid, id=writes.next_id(s, _DECISION), reason="inner")
                    )
                    s.connection().execute(select(func.count()).select_from(_DECISION))
                    raise ValueError("the item fails")
            except ValueError:
                pass
    assert _reasons(store) == []
