"""The store handle shared by every stage: an engine and the clock."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session

from careloop import writes
from careloop.clock import Clock


@dataclass
class Store:
    engine: Engine
    clock: Clock

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits on success and rolls back on error."""
        with Session(self.engine, expire_on_commit=False) as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise


_ATTACHED_KEY = "careloop.attached"


def attach_inserted(session: Session, obj: Any) -> None:
    """Attach ``obj``, whose row was just inserted with a Core statement (its primary key
    set), as a persistent object: later reads find it in the identity map and changes to
    it are flushed as usual. The session holds it until its transaction ends.

    A rollback (a savepoint's too) expunges every object attached so far: a row inserted
    inside the rolled-back savepoint is gone (and SQLite may hand its id out again), and
    one inserted earlier is simply read again when next asked for (a savepoint starts
    with a flush, so nothing of it is pending)."""
    make_transient_to_detached(obj)
    session.add(obj)
    session.info.setdefault(_ATTACHED_KEY, []).append(obj)


def insert_object(session: Session, obj: Any) -> Any:
    """Insert the new ``obj`` at once with one Core INSERT (RETURNING its generated id)
    and attach it as a persistent, clean object (``attach_inserted``): the same row an
    ``add`` and a flush would write, without the unit-of-work flush. Returns ``obj``."""
    table = type(obj).__table__
    pk = list(table.primary_key.columns)
    values = {c.name: getattr(obj, c.name) for c in table.columns}
    auto = [c for c in pk if values.get(c.name) is None]
    for c in auto:
        del values[c.name]
    conn = session.connection()
    if auto:
        (col_,) = auto
        setattr(obj, col_.name, conn.execute(_insert_returning(table, col_.name), values).scalar_one())
    else:
        conn.execute(table.insert(), values)
    attach_inserted(session, obj)
    return obj


_WRITTEN_KEY = "careloop.written"


@functools.lru_cache(maxsize=64)
def _insert_returning(table: Any, name: str) -> Any:
    return table.insert().returning(table.c[name])


def write_through(session: Session, obj: Any, **values: Any) -> None:
    """Set ``values`` on the persistent ``obj`` and write them at once with one Core UPDATE
    by primary key, leaving the object clean: no unit-of-work flush follows for it (on the
    hot paths a flush costs more than the work). The object is expired if a rollback (a
    savepoint's too) undoes the UPDATE, so it is read again rather than trusted. Inside
    ``careloop.writes.deferred`` the UPDATE is queued with the batch's other writes."""
    table = type(obj).__table__
    pk = {c.name: getattr(obj, c.name) for c in table.primary_key.columns}
    if not writes.update(session, table, pk, values):
        params = {f"pk_{k}": v for k, v in pk.items()}
        params.update({f"v_{k}": v for k, v in values.items()})
        result = session.connection().execute(writes.update_statement(table, tuple(values)), params)
        if result.rowcount != 1:  # a row that is not there (deleted, or never inserted): a bug
            raise RuntimeError(f"write_through: {table.name} row not found for update")
    for name, value in values.items():
        set_committed_value(obj, name, value)
    session.info.setdefault(_WRITTEN_KEY, []).append(obj)


@event.listens_for(Session, "after_soft_rollback")
def _drop_attached(session: Any, *_: Any) -> None:
    for obj in session.info.pop(_ATTACHED_KEY, []):
        if obj in session:
            session.expunge(obj)
    for obj in session.info.pop(_WRITTEN_KEY, []):
        if obj in session:
            session.expire(obj)


@event.listens_for(Session, "after_transaction_end")
def _forget_attached(session: Any, transaction: Any) -> None:
    if transaction.parent is None:
        session.info.pop(_ATTACHED_KEY, None)
        session.info.pop(_WRITTEN_KEY, None)
