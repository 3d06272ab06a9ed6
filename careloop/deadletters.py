"""Dead letters: list, show and retry items a stage gave up on."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from careloop import audit_log
from careloop.clock import SystemClock
from careloop.tables import DeadLetter, JourneyEvent, OutboxItem, RawMessage

_TABLES = {"map": RawMessage, "orchestrate": JourneyEvent, "deliver": OutboxItem}


def list_rows(engine: Engine, console: Console, include_retried: bool = False) -> None:
    with Session(engine) as s:
        q = select(DeadLetter).order_by(col(DeadLetter.id))
        if not include_retried:
            q = q.where(col(DeadLetter.retried_at).is_(None))
        rows = s.exec(q).all()
    table = Table(title="dead letters")
    for c in ("id", "stage", "item", "when", "error"):
        table.add_column(c)
    for d in rows:
        table.add_row(str(d.id), d.stage, str(d.item_id), d.created_at.isoformat(timespec="seconds"), d.error)
    console.print(table)


def show(engine: Engine, id: int, console: Console) -> bool:
    with Session(engine) as s:
        d = s.get(DeadLetter, id)
        if d is None:
            return False
        console.print(f"dead letter {d.id}: stage={d.stage} item={d.item_id} at={d.created_at.isoformat()}")
        console.print(f"error: {d.error}", highlight=False)
        console.print(f"retried: {d.retried_at.isoformat() if d.retried_at else 'no'}")
    return True


def retry(engine: Engine, id: int) -> str | None:
    """Re-queue the item; returns a problem description or None."""
    now = SystemClock().now()
    with Session(engine) as s:
        d = s.get(DeadLetter, id)
        if d is None:
            return f"dead letter {id}: not found"
        if d.retried_at is not None:
            return f"dead letter {id}: already retried"
        model: Any = _TABLES.get(d.stage)
        item = s.get(model, d.item_id) if model else None
        if item is None:
            return f"dead letter {id}: its item is gone"
        item.status = "pending"
        item.attempts = 0
        item.next_attempt_at = None
        d.retried_at = now
        audit_log.append(
            s,
            at=now,
            actor=audit_log.cli_actor(),
            action="item.retry",
            entity=f"{model.__tablename__}/{d.item_id}",
            detail={"dead_letter": id},
        )
        s.commit()
    return None
