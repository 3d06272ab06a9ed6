"""The store handle shared by every stage: an engine and the clock."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import make_transient_to_detached
from sqlmodel import Session

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


@event.listens_for(Session, "after_soft_rollback")
def _drop_attached(session: Any, *_: Any) -> None:
    for obj in session.info.pop(_ATTACHED_KEY, []):
        if obj in session:
            session.expunge(obj)


@event.listens_for(Session, "after_transaction_end")
def _forget_attached(session: Any, transaction: Any) -> None:
    if transaction.parent is None:
        session.info.pop(_ATTACHED_KEY, None)
