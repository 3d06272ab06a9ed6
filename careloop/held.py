"""Journey events held for staff because identity linking would have had to guess.

The mapping stage holds an event (``journey_event.status = "held"``) when its identifiers
name no one it may create (``unknown-person``), several people (``identity-conflict``), or
a phone or email several people share (``ambiguous-identity``); see careloop/identity.py.
Staff list them here and assign each to the right person, which releases it to the
orchestrator as if it had been linked on arrival. Every listing and assignment is audited.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from careloop import audit_log
from careloop.clock import SystemClock
from careloop.identity import survivor
from careloop.tables import JourneyEvent, Person, RawMessage


def _actor() -> str:
    return audit_log.cli_actor()


def list_held(engine: Engine, console: Console) -> int:
    """Print the held events (no identifiers or message text: they are PHI); returns how many."""
    now = SystemClock().now()
    with Session(engine) as s:
        rows = s.exec(
            select(JourneyEvent, RawMessage.connector)
            .join(RawMessage, col(RawMessage.id) == col(JourneyEvent.raw_message_id), isouter=True)
            .where(JourneyEvent.status == "held")
            .order_by(col(JourneyEvent.id))
        ).all()
        lines = [
            (
                str(ev.id),
                ev.type,
                ev.status_reason or "",
                ev.recorded_at.isoformat(timespec="seconds"),
                connector or "",
                str(ev.raw_message_id or ""),
            )
            for ev, connector in rows
        ]
        audit_log.append(s, at=now, actor=_actor(), action="held.list", detail={"count": len(rows)})
        s.commit()
    table = Table(title="events held for staff (identity)")
    for c in ("event", "type", "reason", "received", "connector", "raw message"):
        table.add_column(c)
    for line in lines:
        table.add_row(*line)
    console.print(table)
    return len(rows)


def assign(engine: Engine, event_id: int, person_id: int) -> str | None:
    """Assign held event ``event_id`` to ``person_id`` and release it; a problem, or None."""
    now = SystemClock().now()
    with Session(engine) as s:
        ev = s.get(JourneyEvent, event_id, with_for_update=True)  # two staff, one event
        if ev is None or ev.status != "held":
            return f"event {event_id}: not a held event"
        if s.get(Person, person_id) is None:
            return f"person {person_id}: not found"
        pid = survivor(s, person_id)
        reason = ev.status_reason
        ev.person_id, ev.status, ev.status_reason = pid, "pending", None
        audit_log.append(
            s,
            at=now,
            actor=_actor(),
            action="identity.assign",
            person_id=pid,
            entity=f"journey_event/{event_id}",
            detail={"reason": reason},
        )
        s.commit()
    return None
