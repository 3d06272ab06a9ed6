"""Appending to the hash-chained audit log, inside the caller's transaction.

Each record's ``hash`` is SHA-256 over the previous record's hash and the record's
canonical JSON (``canonical``), so an offline verifier can re-hash the chain. The chain
tip lives in ``audit_head``, read once per transaction with a row lock, which keeps the
chain linear when several workers or processes append at once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import event
from sqlmodel import Session

from careloop.clock import utc
from careloop.tables import AuditHead, AuditRecord

GENESIS = "0" * 64
_HEAD_KEY = "careloop.audit_head"
_BUF_KEY = "careloop.audit_buffer"
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


def _head(session: Session) -> AuditHead:
    head: AuditHead | None = session.info.get(_HEAD_KEY)
    if head is None:
        head = session.get(AuditHead, 1, with_for_update=True, populate_existing=True)
        if head is None:
            head = AuditHead(id=1, seq=0, hash=GENESIS)
            session.add(head)
        session.info[_HEAD_KEY] = head
    return head


def head(session: Session) -> AuditHead:
    """The chain tip, row-locked for the rest of ``session``'s transaction (the same row
    ``append`` uses, so a checkpoint taken in this transaction sees a stable tree)."""
    return _head(session)


@event.listens_for(Session, "after_rollback")
@event.listens_for(Session, "after_soft_rollback")
def _forget_head(session: Any, *_: Any) -> None:
    # A rollback (of a savepoint too) discards what was appended since the last flush:
    # a savepoint always starts with a flush, so those records belong to it.
    session.info.pop(_HEAD_KEY, None)
    session.info.pop(_BUF_KEY, None)


@event.listens_for(Session, "after_transaction_end")
def _forget_head_at_end(session: Any, transaction: Any) -> None:
    # The end of the session's transaction releases the row lock, so the next one reads
    # the head again. A released savepoint keeps it: its flushed records and the head
    # stay valid in the enclosing transaction, and re-reading the head per savepoint
    # costs an ORM load each time (the orchestrator opens one per event).
    if transaction.parent is None:
        session.info.pop(_HEAD_KEY, None)
        session.info.pop(_BUF_KEY, None)


@event.listens_for(Session, "before_flush")
def _write_buffered(session: Any, *_: Any) -> None:
    # Records go to the database with the rest of the flush, as one executemany of plain
    # rows: an ORM object per record would cost more than everything else it audits.
    buf = session.info.pop(_BUF_KEY, None)
    if buf:
        session.connection().execute(_TABLE.insert(), buf)


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
    beyond identifiers (ids, codes, channel names, reason codes)."""
    head = _head(session)
    detail = detail or {}
    at = utc(at)
    seq = head.seq + 1
    body = canonical(seq, at, actor, action, outcome, person_id, entity, purpose, detail)
    h = chain_hash(head.hash, body)
    session.info.setdefault(_BUF_KEY, []).append(
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
    head.seq, head.hash = seq, h  # marks the session dirty, so the next flush writes the buffer
    return Appended(seq, h)


_HEAD_T = AuditHead.__table__  # type: ignore[attr-defined]


def append_now(
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
    """``append``, written at once with three Core statements (read the head with its row
    lock, insert the record, move the head) instead of an ORM load of the head and a flush.

    For short transactions that append one or two records (the deliver stage settles one
    item per commit): there the ORM head costs more than the work it audits. The same
    chain, the same lock; when ``append`` already holds the head in this transaction the
    record goes through it instead, so the two never disagree about the tip. A later
    ``append`` in the same transaction re-reads the head (``populate_existing``)."""
    if session.info.get(_HEAD_KEY) is not None:
        return append(
            session,
            at=at,
            actor=actor,
            action=action,
            outcome=outcome,
            person_id=person_id,
            entity=entity,
            purpose=purpose,
            detail=detail,
        )
    conn = session.connection()
    row = conn.execute(
        _HEAD_T.select()
        .with_only_columns(_HEAD_T.c.seq, _HEAD_T.c.hash)
        .where(_HEAD_T.c.id == 1)
        .with_for_update()
    ).one_or_none()
    prev_seq, prev = (row[0], row[1]) if row is not None else (0, GENESIS)
    detail = detail or {}
    at = utc(at)
    seq = prev_seq + 1
    h = chain_hash(prev, canonical(seq, at, actor, action, outcome, person_id, entity, purpose, detail))
    conn.execute(
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
            "prev_hash": prev,
            "hash": h,
        },
    )
    if row is None:
        conn.execute(_HEAD_T.insert(), {"id": 1, "seq": seq, "hash": h})
    else:
        conn.execute(_HEAD_T.update().where(_HEAD_T.c.id == 1).values(seq=seq, hash=h))
    return Appended(seq, h)
