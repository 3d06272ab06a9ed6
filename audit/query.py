"""Auditor queries over the audit log: by person, actor, action, outcome and time; paged.

"By person" means every record about that patient: records carrying the person id (and the
ids of people merged into them) and records about their messages, events, decisions,
outbox items, escalations and FHIR subjects, which were written before or without the
person id (a message is received before anyone knows whose it is).

Every query run through ``run_query`` is itself an audit record (``audit.query``), written
in the same transaction as the read, with the querying actor and the filters (ids only).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import IO, Any

from sqlalchemy import ColumnElement, and_, or_, select
from sqlmodel import Session, col

from audit.records import Rec, format_time, from_row
from careloop import audit_log
from careloop.clock import utc
from careloop.tables import (
    AuditRecord,
    Decision,
    Escalation,
    JourneyEvent,
    OutboxItem,
    Person,
    Resource,
)

MAX_LIMIT = 1000
CSV_FIELDS = ("seq", "at", "actor", "action", "outcome", "person", "entity", "purpose", "detail", "hash")
_T = AuditRecord.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Filters (all optional, combined with AND). ``action`` ending in ``*`` is a prefix
    (``message.*``). Paging is by keyset: pass the previous page's ``next_after``."""

    person_id: int | None = None
    actor: str | None = None
    action: str | None = None
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None  # exclusive
    after: int = 0
    limit: int = 100

    def filters(self) -> dict[str, Any]:
        """The filters as PHI-free JSON, for the ``audit.query`` record."""
        out: dict[str, Any] = {}
        for k, v in asdict(self).items():
            if v is None or k in ("after", "limit"):
                continue
            out[k] = format_time(v) if isinstance(v, datetime) else v
        return out


@dataclass(frozen=True, slots=True)
class Page:
    records: list[Rec]
    next_after: int | None  # None: this was the last page


def merged_people(session: Session, person_id: int) -> set[int]:
    """``person_id`` and everyone merged into them, transitively."""
    ids, frontier = {person_id}, {person_id}
    while frontier:
        rows = (
            session.execute(select(col(Person.id)).where(col(Person.merged_into).in_(frontier)))
            .scalars()
            .all()
        )
        frontier = {r for r in rows if r is not None} - ids
        ids |= frontier
    return ids


def person_entities(session: Session, people: set[int]) -> set[str]:
    """The entity references (``table/id``, ``Type/id``) that belong to these people."""
    refs: set[str] = set()
    ev = session.execute(
        select(col(JourneyEvent.id), col(JourneyEvent.raw_message_id)).where(
            col(JourneyEvent.person_id).in_(people)
        )
    ).all()
    for ev_id, raw_id in ev:
        refs.add(f"journey_event/{ev_id}")
        if raw_id is not None:
            refs.add(f"raw_message/{raw_id}")
    for table, name in ((OutboxItem, "outbox"), (Decision, "decision"), (Escalation, "escalation")):
        ids = session.execute(select(col(table.id)).where(col(table.person_id).in_(people))).scalars().all()
        refs.update(f"{name}/{i}" for i in ids)
    refs.update(
        session.execute(select(col(Resource.ref)).where(col(Resource.person_id).in_(people))).scalars()
    )
    return refs


def _where(session: Session, q: AuditQuery) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = [_T.c.seq > q.after]
    if q.person_id is not None:
        people = merged_people(session, q.person_id)
        refs = person_entities(session, people)
        about = [_T.c.person_id.in_(sorted(people))]
        refs_sorted = sorted(refs)
        for i in range(0, len(refs_sorted), 5000):  # stay well under every engine's parameter limit
            about.append(_T.c.entity.in_(refs_sorted[i : i + 5000]))
        conds.append(or_(*about))
    if q.actor is not None:
        conds.append(_T.c.actor == q.actor)
    if q.action is not None:
        if q.action.endswith("*"):
            conds.append(_T.c.action.startswith(q.action[:-1], autoescape=True))
        else:
            conds.append(_T.c.action == q.action)
    if q.outcome is not None:
        conds.append(_T.c.outcome == q.outcome)
    if q.since is not None:
        conds.append(_T.c.at >= utc(q.since))  # SQLite compares UTC text
    if q.until is not None:
        conds.append(_T.c.at < utc(q.until))
    return conds


def search(session: Session, q: AuditQuery) -> Page:
    """One page of matching records in seq order (no self-audit; see ``run_query``)."""
    limit = max(1, min(q.limit, MAX_LIMIT))
    audit_log.flush(session)  # records appended earlier in this transaction are found too
    rows = (
        session.connection()
        .execute(select(_T).where(and_(*_where(session, q))).order_by(_T.c.seq).limit(limit + 1))
        .all()
    )
    recs = [from_row(r) for r in rows[:limit]]
    return Page(recs, recs[-1].seq if len(rows) > limit else None)


def run_query(
    session: Session, q: AuditQuery, *, actor: str, at: datetime, via: str, kind: str = "records"
) -> Page:
    """``search`` plus its own ``audit.query`` record, in the caller's transaction."""
    page = search(session, q)
    record_query(
        session,
        actor=actor,
        at=at,
        via=via,
        kind=kind,
        person_id=q.person_id,
        filters=q.filters(),
        returned=len(page.records),
    )
    return page


def record_query(
    session: Session,
    *,
    actor: str,
    at: datetime,
    via: str,
    kind: str,
    person_id: int | None,
    filters: dict[str, Any],
    returned: int,
) -> None:
    """The ``audit.query`` record for one auditor read (the person read about goes into
    ``person_id``, so it shows in that patient's own access history)."""
    audit_log.append(
        session,
        at=at,
        actor=actor,
        action="audit.query",
        person_id=person_id,
        purpose="audit",
        entity=f"audit/{kind}",
        detail={"via": via, "filters": filters, "returned": returned},
    )


# --------------------------------------------------------------------------- output


def to_json(page: Page) -> dict[str, Any]:
    return {"records": [r.to_json() for r in page.records], "next_after": page.next_after}


def write_csv(recs: Iterable[Rec], fp: IO[str]) -> None:
    w = csv.writer(fp, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for r in recs:
        d = r.to_json()
        w.writerow(
            [
                d["seq"],
                d["at"],
                d["actor"],
                d["action"],
                d["outcome"],
                "" if d["person"] is None else d["person"],
                d["entity"] or "",
                d["purpose"] or "",
                json.dumps(d["detail"], sort_keys=True, separators=(",", ":")),
                d["hash"],
            ]
        )


def iter_all(session: Session, q: AuditQuery) -> Iterable[Rec]:
    """Every matching record, page by page."""
    after = q.after
    while True:
        page = search(session, AuditQuery(**{**asdict(q), "after": after, "limit": MAX_LIMIT}))
        yield from page.records
        if page.next_after is None:
            return
        after = page.next_after


__all__: Sequence[str] = ("AuditQuery", "Page", "iter_all", "run_query", "search", "to_json", "write_csv")
