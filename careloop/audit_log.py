"""Appending to the hash-chained audit log, inside the caller's transaction.

Each record's ``hash`` is SHA-256 over the previous record's hash and the record's
canonical JSON (``canonical``), so an offline verifier can re-hash the chain. The chain
tip lives in ``audit_head``, read once per transaction with a row lock, which keeps the
chain linear when several workers or processes append at once.

Records are written in one multi-row INSERT per transaction (at commit, or when someone
reads the tip with ``head``), not one statement each: a batch of a few hundred events
appends a few thousand records. They live only in the transaction, as the rows would: a
rollback, of a savepoint too, drops those appended inside it and puts the tip back.
"""

from __future__ import annotations

import getpass
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, event
from sqlmodel import Session

from careloop.clock import utc
from careloop.tables import AuditHead, AuditRecord

GENESIS = "0" * 64
_HEAD_KEY = "careloop.audit_head"
_TOUCHED_KEY = "careloop.audit_touched"
_PENDING_KEY = "careloop.audit_pending"  # rows appended, not yet written
_MARKS_KEY = "careloop.audit_marks"  # savepoint -> (pending rows, tip) when it began
_ROLLED_KEY = "careloop.audit_rolled_back"  # the transaction ending now was rolled back
_TABLE = AuditRecord.__table__  # type: ignore[attr-defined]


def canonical(
    seq: int,
    at: datetime,
    actor: str,
    action: str,
    outcome: str,
    person_id: int | None,
    entity: str | None,
    purpose: str | None,
    detail: dict[str, Any],
) -> bytes:
    """The bytes a record's hash covers (besides the previous hash)."""
    doc = {
        "seq": seq,
        "at": utc(at).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "actor": actor,
        "action": action,
        "outcome": outcome,
        "person": person_id,
        "entity": entity,
        "purpose": purpose,
        "detail": detail,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def chain_hash(prev_hash: str, body: bytes) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + b"\n" + body).hexdigest()


def record_hash(r: AuditRecord) -> str:
    body = canonical(r.seq, r.at, r.actor, r.action, r.outcome, r.person_id, r.entity, r.purpose, r.detail)
    return chain_hash(r.prev_hash, body)


@dataclass(slots=True)
class Head:
    """The chain tip as this transaction sees it (``audit_head`` is written at commit)."""

    seq: int
    hash: str
    stored: bool  # whether the ``audit_head`` row exists
    written: int  # the seq the ``audit_head`` row holds


_HEAD_T = AuditHead.__table__  # type: ignore[attr-defined]
_READ_HEAD = _HEAD_T.select().with_only_columns(_HEAD_T.c.seq, _HEAD_T.c.hash).where(_HEAD_T.c.id == 1)
_READ_HEAD_LOCKED = _READ_HEAD.with_for_update()
_LATEST_AFTER = (
    _TABLE.select()
    .with_only_columns(_TABLE.c.seq, _TABLE.c.hash)
    .where(_TABLE.c.seq > bindparam("after"))
    .order_by(_TABLE.c.seq.desc())
    .limit(1)
)


def _head(session: Session) -> Head:
    head: Head | None = session.info.get(_HEAD_KEY)
    if head is None:
        conn = session.connection()
        row = conn.execute(_READ_HEAD_LOCKED).one_or_none()
        head = Head(row[0], row[1], True, row[0]) if row is not None else Head(0, GENESIS, False, 0)
        # Records appended earlier in this transaction (before a savepoint that was rolled
        # back) are already in the table; the head row catches up with them at commit.
        later = conn.execute(_LATEST_AFTER, {"after": head.seq}).one_or_none()
        if later is not None:
            head.seq, head.hash = later[0], later[1]
        session.info[_HEAD_KEY] = head
    return head


def head(session: Session) -> Head:
    """The chain tip, row-locked for the rest of ``session``'s transaction (the same row
    ``append`` uses, so a checkpoint taken in this transaction sees a stable tree). The
    records appended so far are written first, so the table holds everything up to it."""
    h = _head(session)
    flush(session)
    return h


def flush(session: Session) -> None:
    """Write the records appended in this transaction and not written yet (one statement)."""
    pending: list[dict[str, Any]] | None = session.info.get(_PENDING_KEY)
    if pending:
        session.connection().execute(_TABLE.insert(), pending)
        pending.clear()


@event.listens_for(Session, "after_transaction_create")
def _mark(session: Any, transaction: Any) -> None:
    # A savepoint remembers where the records and the tip stood, for its rollback.
    if transaction.nested:
        head: Head | None = session.info.get(_HEAD_KEY)
        tip = (head.seq, head.hash) if head is not None else None
        pending = session.info.get(_PENDING_KEY)
        marks = session.info.setdefault(_MARKS_KEY, {})
        marks[id(transaction)] = (list(pending) if pending else [], tip)


@event.listens_for(Session, "after_rollback")
def _note_rollback(session: Any) -> None:
    # Fires for the transaction or savepoint actually rolled back, before it ends.
    session.info[_ROLLED_KEY] = True


@event.listens_for(Session, "after_transaction_end")
def _forget_at_end(session: Any, transaction: Any) -> None:
    # A savepoint's rollback drops the records appended inside it, and the table takes
    # back those written meanwhile (which may include records pending when it began: they
    # are pending again). The tip goes back to where it stood when the savepoint began (or
    # is read again, if it had not been read yet). A released savepoint keeps both.
    marks = session.info.get(_MARKS_KEY)
    mark = marks.pop(id(transaction), None) if marks else None
    if transaction.nested and session.info.pop(_ROLLED_KEY, False):
        head: Head | None = session.info.get(_HEAD_KEY)
        if mark is None or mark[1] is None or head is None:
            session.info.pop(_HEAD_KEY, None)
            session.info.pop(_PENDING_KEY, None)
        else:
            rows, (head.seq, head.hash) = mark
            session.info[_PENDING_KEY] = list(rows)
    # The end of the session's transaction releases the row lock, so the next one reads
    # the head again.
    if transaction.parent is None:
        for key in (_HEAD_KEY, _TOUCHED_KEY, _PENDING_KEY, _MARKS_KEY, _ROLLED_KEY):
            session.info.pop(key, None)


@event.listens_for(Session, "before_commit")
def _write_head(session: Any) -> None:
    # The records, then the head row, once per transaction, not once per record (this
    # event fires for a savepoint's release too: the enclosing transaction's commit
    # writes them).
    if not session.info.get(_TOUCHED_KEY) or session.in_nested_transaction():
        return
    head = _head(session)
    flush(session)
    if head.seq == head.written:
        return
    conn = session.connection()
    if head.stored:
        conn.execute(_HEAD_T.update().where(_HEAD_T.c.id == 1).values(seq=head.seq, hash=head.hash))
    else:
        conn.execute(_HEAD_T.insert(), {"id": 1, "seq": head.seq, "hash": head.hash})
        head.stored = True
    head.written = head.seq


@dataclass(frozen=True, slots=True)
class Appended:
    seq: int
    hash: str


def append(
    session: Session,
    *,
    at: datetime,
    actor: str,
    action: str,
    outcome: str = "success",
    person_id: int | None = None,
    entity: str | None = None,
    purpose: str | None = None,
    detail: dict[str, Any] | None = None,
) -> Appended:
    """Add one audit record to ``session``'s transaction. ``detail`` must hold no PHI
    beyond identifiers (ids, codes, channel names, reason codes).

    The record is hashed onto the chain at once and written with the transaction's other
    records when it commits (see the module's docstring); the chain tip stays in the
    session and the ``audit_head`` row is written after them."""
    head = _head(session)
    detail = detail or {}
    at = utc(at)
    seq = head.seq + 1
    h = chain_hash(head.hash, canonical(seq, at, actor, action, outcome, person_id, entity, purpose, detail))
    session.info.setdefault(_PENDING_KEY, []).append(
        {
            "seq": seq,
            "at": at,
            "actor": actor,
            "action": action,
            "outcome": outcome,
            "person_id": person_id,
            "entity": entity,
            "purpose": purpose,
            "detail": detail,
            "prev_hash": head.hash,
            "hash": h,
        }
    )
    head.seq, head.hash = seq, h
    session.info[_TOUCHED_KEY] = True
    return Appended(seq, h)


def cli_actor() -> str:
    """The actor of a command run at a terminal: ``cli:<login name>``, or ``cli:unknown``
    where there is none (a container without a passwd entry or USER)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"
