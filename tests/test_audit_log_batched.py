"""Audit records are written once per transaction (careloop.audit_log): what the chain
holds after savepoints that are released or rolled back, with or without the records
written inside them, is what appending each record at once would have left."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col

from audit import query
from audit.verify import verify_database
from careloop import audit_log
from careloop.store import Store
from careloop.tables import AuditRecord

AT = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def _append(s: Session, action: str) -> int:
    return audit_log.append(s, at=AT, actor="test", action=action).seq


def _actions(engine: Engine) -> list[str]:
    with engine.connect() as c:
        return list(c.execute(select(col(AuditRecord.action)).order_by(col(AuditRecord.seq))).scalars())


def test_records_appended_in_a_transaction_are_all_written_at_commit(store: Store, engine: Engine) -> None:
    with store.session() as s:
        for i in range(5):
            _append(s, f"a{i}")
        s.commit()
    assert _actions(engine) == [f"a{i}" for i in range(5)]
    assert verify_database(engine).ok


def test_a_rolled_back_savepoint_drops_its_records_and_the_chain_goes_on_from_before_it(
    store: Store, engine: Engine
) -> None:
    with store.session() as s:
        _append(s, "kept-1")
        try:
            with s.begin_nested():
                _append(s, "dropped")
                raise RuntimeError("item failed")
        except RuntimeError:
            pass
        assert _append(s, "kept-2") == 2  # the dropped record's seq is used again
        s.commit()
    assert _actions(engine) == ["kept-1", "kept-2"]
    assert verify_database(engine).ok


def test_records_pending_before_a_savepoint_and_written_inside_it_survive_its_rollback(
    store: Store, engine: Engine
) -> None:
    """A read inside the savepoint writes what is pending (the earlier records too); the
    savepoint's rollback takes those rows out of the table, so they must be written again."""
    with store.session() as s:
        _append(s, "before")
        try:
            with s.begin_nested():
                _append(s, "inside")
                found = query.search(s, query.AuditQuery(actor="test")).records
                assert [r.action for r in found] == ["before", "inside"]
                raise RuntimeError("item failed")
        except RuntimeError:
            pass
        _append(s, "after")
        s.commit()
    assert _actions(engine) == ["before", "after"]
    assert verify_database(engine).ok


def test_released_savepoints_keep_their_records_and_a_rollback_loses_them_all(
    store: Store, engine: Engine
) -> None:
    with store.session() as s:
        with s.begin_nested():
            _append(s, "one")
        with s.begin_nested(), s.begin_nested():
            _append(s, "two")
        s.commit()
    with store.session() as s:
        _append(s, "never")
        s.rollback()
        _append(s, "three")
        s.commit()
    assert _actions(engine) == ["one", "two", "three"]
    assert verify_database(engine).ok
