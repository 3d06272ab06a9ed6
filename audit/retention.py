"""Retention: raw message bodies go after N days, audit records only after six years.

Raw messages (the PHI-bearing bodies) are pruned by blanking the body, headers and ACK of
rows that are done (``mapped`` or ``skipped``) and marking them ``pruned``; the row stays as
a tombstone because journey events reference it and its dedup key still guards against a
late duplicate. The audit chain hashes no raw body, so it verifies unchanged.

Audit records are never deleted younger than ``audit.retention_days`` (config; the model
refuses less than six years, 45 CFR 164.316(b)(2)(i)). Older ones are deleted only up to a
signed checkpoint, which then anchors the rest: ``verify`` starts from its head hash and
Merkle frontier, so the remaining log stays verifiable.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlmodel import Session, col

from audit.checkpoint import latest
from careloop import audit_log
from careloop.clock import utc
from careloop.errors import ConfigError
from careloop.tables import AuditCheckpoint, AuditRecord, RawMessage

MIN_AUDIT_RETENTION_DAYS = 2190  # six years
PRUNABLE_RAW = ("mapped", "skipped")


def prune_raw_messages(session: Session, *, older_than_days: int, now: datetime) -> int:
    """Blank the bodies of finished raw messages received before ``now - older_than_days``."""
    if older_than_days < 1:
        raise ConfigError(["raw message retention must be at least 1 day"])
    cutoff = utc(now) - timedelta(days=older_than_days)
    res = session.execute(
        update(RawMessage)
        .where(col(RawMessage.status).in_(PRUNABLE_RAW), col(RawMessage.received_at) < cutoff)
        .values(body=b"", headers={}, ack=None, status="pruned", status_reason="retention")
    )
    n = int(res.rowcount or 0)  # type: ignore[attr-defined]
    if n:
        audit_log.append(
            session,
            at=now,
            actor="retention",
            action="retention.prune",
            entity="raw_message",
            detail={"table": "raw_message", "count": n, "older_than_days": older_than_days},
        )
    return n


def prune_audit_records(session: Session, *, retention_days: int, now: datetime) -> int:
    """Delete audit records older than ``retention_days``, up to the newest checkpoint that
    covers only such records. Returns how many were deleted (0 when none may go)."""
    if retention_days < MIN_AUDIT_RETENTION_DAYS:
        raise ConfigError([f"audit.retention_days: must be at least {MIN_AUDIT_RETENTION_DAYS} (six years)"])
    cutoff = utc(now) - timedelta(days=retention_days)
    audit_log.head(session)  # lock the chain: no append or checkpoint interleaves
    # The newest record that is still young decides how far we may go.
    young = session.execute(
        select(func.min(col(AuditRecord.seq))).where(col(AuditRecord.at) >= cutoff)
    ).scalar()
    newest_cp = latest(session)
    if newest_cp is None:
        return 0
    limit = newest_cp.tree_size if young is None else min(newest_cp.tree_size, young - 1)
    anchor = session.execute(
        select(col(AuditCheckpoint.tree_size))
        .where(col(AuditCheckpoint.tree_size) <= limit)
        .order_by(col(AuditCheckpoint.tree_size).desc())
        .limit(1)
    ).scalar()
    if anchor is None:
        return 0
    res = session.execute(delete(AuditRecord).where(col(AuditRecord.seq) <= anchor))
    n = int(res.rowcount or 0)  # type: ignore[attr-defined]
    if n:
        audit_log.append(
            session,
            at=now,
            actor="retention",
            action="retention.prune",
            entity="audit_record",
            detail={
                "table": "audit_record",
                "count": n,
                "through_seq": anchor,
                "retention_days": retention_days,
            },
        )
    return n
