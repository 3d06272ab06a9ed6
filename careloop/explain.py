"""``careloop explain PERSON``: events, decisions with their reasons, and deliveries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from careloop.clock import utc
from careloop.tables import Decision, DeliveryReceipt, JourneyEvent, OutboxItem, Person, PersonIdentifier

STYLE = {
    "send": "green",
    "suppress": "yellow",
    "cancel": "yellow",
    "defer": "cyan",
    "escalate": "red bold",
    "schedule": "dim",
    "shadow": "magenta",
}


def timeline(s: Session, person_id: int) -> list[tuple[datetime, str, str, str]]:
    """(at, kind, what, why) rows in time order; no message content, only codes."""
    rows: list[tuple[datetime, str, str, str]] = []
    for e in s.exec(select(JourneyEvent).where(JourneyEvent.person_id == person_id)).all():
        rows.append((utc(e.occurred_at), "event", e.type, e.subject_ref or ""))
    for d in s.exec(select(Decision).where(Decision.person_id == person_id)).all():
        what = (d.template or d.action) + (f" via {d.channel}" if d.channel else "")
        why = f"{d.reason} [{d.playbook} v{d.playbook_version}]"
        if d.action == "schedule" and "due_at" in d.detail:
            why += f" for {d.detail['due_at']}"
        passed = [f"{ch}: {why_not}" for ch, why_not in d.detail.get("passed_over", [])]
        if passed and d.action in ("send", "defer"):
            why += f" (passed over {', '.join(passed)})"
        if d.action == "defer" and "deliver_at" in d.detail:
            why += f" until {d.detail['deliver_at']}"
        if isinstance(d.detail.get("learning"), dict):  # issue 10: why the learner chose this
            why += f"; learned: {d.detail['learning'].get('explain', '')}"
        rows.append((utc(d.decided_at), d.action, what, why))
    q = (
        select(DeliveryReceipt, OutboxItem)
        .join(OutboxItem, col(OutboxItem.id) == col(DeliveryReceipt.outbox_id))
        .where(OutboxItem.person_id == person_id)
    )
    for r, item in s.exec(q).all():
        rows.append((utc(r.at), "delivery", f"{item.template} via {item.channel}", r.status))
    order = {
        "event": 0,
        "schedule": 1,
        "cancel": 1,
        "suppress": 1,
        "defer": 1,
        "escalate": 1,
        "send": 1,
        "shadow": 1,
        "delivery": 2,
    }
    rows.sort(key=lambda r: (r[0], order.get(r[1], 1)))
    return rows


def find_person(engine: Engine, ref: str) -> int | None:
    """The surviving person for an internal id or a ``system|value`` identifier."""
    from careloop.identity import survivor

    with Session(engine) as s:
        if ref.isdigit():
            return survivor(s, int(ref)) if s.get(Person, int(ref)) is not None else None
        system, sep, value = ref.rpartition("|")
        if not sep:
            return None
        pid = s.exec(
            select(PersonIdentifier.person_id).where(
                PersonIdentifier.system == system, PersonIdentifier.value == value
            )
        ).first()
        return survivor(s, pid) if pid is not None else None


def audit_view(engine: Engine, person_id: int, actor: str, view: str = "timeline") -> None:
    """Record that ``actor`` is shown ``view`` of ``person_id``'s record (HIPAA: every access
    to PHI), committed before anything is shown."""
    from careloop import audit_log
    from careloop.clock import SystemClock

    with Session(engine) as s:
        audit_log.append(
            s,
            at=SystemClock().now(),
            actor=actor,
            action="person.view",
            person_id=person_id,
            entity=f"person/{person_id}",
            detail={"view": view},
        )
        s.commit()


def render_timeline(engine: Engine, person_id: int, console: Console, tz: Any = None) -> bool:
    with Session(engine) as s:
        person = s.get(Person, person_id)
        if person is None:
            return False
        idents = s.exec(select(PersonIdentifier).where(PersonIdentifier.person_id == person_id)).all()
        kinds = sorted({i.kind for i in idents})
        rows = timeline(s, person_id)
    table = Table(
        title=f"person {person_id}  (identifiers: {', '.join(kinds) or 'none'}"
        f"{'; deceased' if person.deceased else ''})"
    )
    for c in ("when (UTC)", "what", "", "why"):
        table.add_column(c)
    for at, kind, what, why in rows:
        when = at.astimezone(tz) if tz else at
        table.add_row(
            *(Text(c) for c in (when.strftime("%Y-%m-%d %H:%M"), kind, what, why)), style=STYLE.get(kind)
        )
    console.print(table)
    return True
