"""``/metrics``: the hub's state in the Prometheus text format (version 0.0.4).

Read from the store at scrape time, so every process sharing the database reports the same
figures and nothing is lost across restarts: work waiting and settled per stage and status,
dead letters not yet retried, events held for identity, open escalations by severity, and
the audit chain's length. Counts and codes only, never PHI. No client library: the format
is a few lines of text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from careloop.tables import AuditHead, DeadLetter, Escalation, JourneyEvent, OutboxItem, RawMessage, Timer

_STAGE_TABLES: tuple[Any, ...] = (
    RawMessage.__table__,  # type: ignore[attr-defined]
    JourneyEvent.__table__,  # type: ignore[attr-defined]
    OutboxItem.__table__,  # type: ignore[attr-defined]
    Timer.__table__,  # type: ignore[attr-defined]
)


def _lines(name: str, help_: str, samples: Iterable[tuple[dict[str, str], int]]) -> list[str]:
    out = [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
    for labels, value in samples:
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
        out.append(f"{name}{{{text}}} {value}" if text else f"{name} {value}")
    return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(engine: Engine) -> str:
    """The exposition text for the store behind ``engine``."""
    lines: list[str] = []
    with engine.connect() as conn:
        rows: list[tuple[dict[str, str], int]] = []
        for table in _STAGE_TABLES:
            status = table.c.status
            for value, n in conn.execute(select(status, func.count()).group_by(status)):
                rows.append(({"table": table.name, "status": str(value)}, int(n)))
        lines += _lines("careloop_items", "Rows per stage table and status.", rows)
        dl = DeadLetter.__table__.c  # type: ignore[attr-defined]
        dead = conn.execute(
            select(dl.stage, func.count()).where(dl.retried_at.is_(None)).group_by(dl.stage)
        ).all()
        lines += _lines(
            "careloop_dead_letters",
            "Dead letters not yet retried, per stage.",
            (({"stage": s}, n) for s, n in dead),
        )
        ec = Escalation.__table__.c  # type: ignore[attr-defined]
        esc = conn.execute(
            select(ec.severity, func.count())
            .where(ec.status.in_(("open", "acknowledged")))
            .group_by(ec.severity)
        ).all()
        lines += _lines(
            "careloop_escalations_open",
            "Open or acknowledged escalations, per severity.",
            (({"severity": s}, n) for s, n in esc),
        )
        hc = AuditHead.__table__.c  # type: ignore[attr-defined]
        seq = conn.execute(select(hc.seq).where(hc.id == 1)).scalar()
        lines += _lines("careloop_audit_records", "Records on the audit hash chain.", [({}, int(seq or 0))])
    return "\n".join(lines) + "\n"
