"""Appending to the hash-chained audit log, inside the caller's transaction.

Each record's ``hash`` is SHA-256 over the previous record's hash and the record's
canonical JSON (``canonical``), so an offline verifier can re-hash the chain. The chain
tip lives in ``audit_head``, read once per transaction with a row lock, which keeps the
chain linear when several workers or processes append at once.
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
    ``append`` uses, so a checkpoint taken in this transaction sees a stable tree)."""
    return _head(session)


@event.listens_for(Session, "after_soft_rollback")
def _forget_head(session: Any, *_: Any) -> None:
    # A rollback (of a savepoint too) removes the records appended inside it from the
    # table; the next append reads the tip again (head row, then any later record).
    session.info.pop(_HEAD_KEY, None)


@event.listens_for(Session, "after_transaction_end")
def _forget_head_at_end(session: Any, transaction: Any) -> None:
    # The end of the session's transaction releases the row lock, so the next one reads
    # the head again. A released savepoint keeps it: its records and the head stay valid
    # in the enclosing transaction.
    if transaction.parent is None:
        session.info.pop(_HEAD_KEY, None)
        session.info.pop(_TOUCHED_KEY, None)


@event.listens_for(Session, "before_commit")
def _write_head(session: Any) -> None:
    # The head row moves once per transaction, not once per record (this event fires for
    # a savepoint's release too: the enclosing transaction's commit writes it).
    if not session.info.get(_TOUCHED_KEY) or session.in_nested_transaction():
        return
    head = _head(session)
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

    The record is inserted at once (one Core statement: a savepoint rolled back takes it
    with it, and nothing is buffered that could be lost); the chain tip stays in the
    session and the ``audit_head`` row is written when the transaction commits."""
    head = _head(session)
    detail = detail or {}
    at = utc(at)
    seq = head.seq + 1
    h = chain_hash(head.hash, canonical(seq, at, actor, action, outcome, person_id, entity, purpose, detail))
    session.connection().execute(
        _TABLE.insert(),
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
        },
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
