"""Escalations: the work queue that puts a person in the loop.

An escalation has a severity (emergency|urgent|routine), a reason code, evidence (the
message, the assessment, the rules that matched: PHI, kept in the store and shown only to
authenticated staff), an SLA (``triage.sla`` per severity) and a level. Opening one
announces it on the configured routes (outbox rows: a FHIR Task for the EHR's work list, an
email, a webhook, a page); when nobody acknowledges before the SLA, a durable timer
(``Timer.payload.kind == "escalation-sla"``) raises the level and announces it again on
that level's routes, up to ``triage.max_level``. While one is open or acknowledged the
compliance gate pauses automated outreach to that person (rule ``escalation-open``).

Staff acknowledge and resolve, recording feedback (``needed`` / ``not_needed``) from
which ``precision_report`` computes the precision of each rule. Every state change is an
audit record (ids, codes and levels only: no message text, no names).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from careloop import audit_log
from careloop.clock import utc
from careloop.tables import Escalation, JourneyStateRow, OutboxItem, PersonIdentifier, Timer
from orchestrator.triage import RouteConfig, TriageConfig

OPEN = ("open", "acknowledged")
STATUSES = ("open", "acknowledged", "resolved")
FEEDBACK = ("needed", "not_needed")
SLA_KIND = "escalation-sla"
PSEUDO_PLAYBOOK = "escalation"  # Timer.playbook / OutboxItem.playbook for queue work


class EscalationError(ValueError):
    """A request the queue refuses (unknown id, wrong state, bad feedback). No PHI."""


# ----------------------------------------------------------------------------- opening and routing


def open_escalation(
    s: Session,
    *,
    person_id: int,
    now: datetime,
    severity: str,
    reason: str,
    evidence: dict[str, Any],
    rule: str | None,
    cfg: TriageConfig,
    actor: str = "orchestrator",
) -> Escalation:
    """Open an escalation, start its SLA timer and announce it on the level-0 routes."""
    esc = Escalation(
        person_id=person_id,
        created_at=now,
        severity=severity,
        reason=reason[:64],
        evidence=evidence,
        rule=rule,
        level=0,
        due_at=now + cfg.sla_for(severity),
    )
    s.add(esc)
    s.flush()
    assert esc.id is not None
    audit_log.append(
        s,
        at=now,
        actor=actor,
        action="escalation.open",
        person_id=person_id,
        entity=f"escalation/{esc.id}",
        detail={"severity": severity, "reason": esc.reason, "rule": rule, "level": 0},
    )
    _schedule_sla(s, esc, now)
    route(s, esc, cfg, now)
    return esc


_RANK = {"emergency": 3, "urgent": 2, "routine": 1}


def open_or_join(
    s: Session,
    *,
    person_id: int,
    now: datetime,
    severity: str,
    reason: str,
    evidence: dict[str, Any],
    rule: str | None,
    cfg: TriageConfig,
) -> tuple[Escalation, bool]:
    """One work item per person at a time: a new concern while one is open joins it (its
    evidence is appended); a more severe one raises the item's severity, restarts its SLA
    and announces it again. Returns (escalation, opened)."""
    cur = s.exec(
        select(Escalation)
        .where(Escalation.person_id == person_id, col(Escalation.status).in_(OPEN))
        .order_by(col(Escalation.id).desc())
    ).first()
    if cur is None:
        return open_escalation(
            s,
            person_id=person_id,
            now=now,
            severity=severity,
            reason=reason,
            evidence=evidence,
            rule=rule,
            cfg=cfg,
        ), True
    assert cur.id is not None
    followups = [
        *cur.evidence.get("followups", []),
        {"at": utc(now).isoformat(), "severity": severity, "reason": reason, **evidence},
    ]
    cur.evidence = {**cur.evidence, "followups": followups}
    raised = _RANK.get(severity, 0) > _RANK.get(cur.severity, 0)
    audit_log.append(
        s,
        at=now,
        actor="orchestrator",
        action="escalation.join",
        person_id=person_id,
        entity=f"escalation/{cur.id}",
        detail={"severity": severity, "reason": reason[:64], "rule": rule, "raised": raised},
    )
    if raised:
        old = cur.severity
        cur.severity, cur.reason, cur.rule = severity, reason[:64], rule
        cur.status, cur.level, cur.due_at = "open", 0, now + cfg.sla_for(severity)
        _cancel_timers(s, cur, "severity-raised")
        audit_log.append(
            s,
            at=now,
            actor="orchestrator",
            action="escalation.raise",
            person_id=person_id,
            entity=f"escalation/{cur.id}",
            detail={"from": old, "to": severity},
        )
        _schedule_sla(s, cur, now)
        route(s, cur, cfg, now, tag="raise")
    return cur, False


def _schedule_sla(s: Session, esc: Escalation, now: datetime) -> None:
    assert esc.id is not None and esc.due_at is not None
    s.add(
        Timer(
            person_id=esc.person_id,
            due_at=esc.due_at,
            playbook=PSEUDO_PLAYBOOK,
            step=esc.level,
            payload={"kind": SLA_KIND, "escalation": esc.id, "level": esc.level},
        )
    )


def route(s: Session, esc: Escalation, cfg: TriageConfig, now: datetime, tag: str = "") -> list[OutboxItem]:
    """One outbox row per configured route for this level and severity."""
    assert esc.id is not None
    out: list[OutboxItem] = []
    for i, r in enumerate(cfg.routes):
        if esc.level not in r.levels or esc.severity not in r.severities:
            continue
        detail: dict[str, Any] = {"channel": r.channel, "kind": r.kind, "level": esc.level}
        recipient = r.to or r.kind
        if r.kind == "task":
            # An EHR Task is for a patient: without the person's FHIR Patient id there is
            # nothing to attach it to (the other routes still carry the notice).
            ref = patient_reference(s, esc.person_id)
            if ref is None:
                audit_log.append(
                    s,
                    at=now,
                    actor="orchestrator",
                    action="escalation.route",
                    outcome="skipped",
                    person_id=esc.person_id,
                    entity=f"escalation/{esc.id}",
                    detail={**detail, "reason": "no-fhir-patient"},
                )
                continue
            recipient = ref
        content, phi = _notice(esc, r)
        key = hashlib.sha256(
            f"escalation|{esc.id}|{esc.level}|{i}|{r.channel}|{tag}|{esc.severity}".encode()
        ).hexdigest()[:32]
        item = OutboxItem(
            key=key,
            person_id=esc.person_id,
            channel=r.channel,
            template=f"escalation-{r.kind}",
            playbook=PSEUDO_PLAYBOOK,
            subject_ref=None,
            purpose="escalation",
            phi_class=phi,
            recipient=recipient,
            content=content,
            created_at=now,
            next_attempt_at=now,
        )
        s.add(item)
        out.append(item)
        audit_log.append(
            s,
            at=now,
            actor="orchestrator",
            action="escalation.route",
            person_id=esc.person_id,
            entity=f"escalation/{esc.id}",
            detail=detail,
        )
    return out


def summary(esc: Escalation) -> str:
    """A staff notice that holds no PHI: ids and codes only; the evidence is in the queue."""
    return (
        f"careloop escalation #{esc.id}: {esc.severity} ({esc.reason}), level {esc.level}. "
        f"Review it in the escalation queue: careloop escalations show {esc.id}"
    )


def _notice(esc: Escalation, r: RouteConfig) -> tuple[dict[str, Any], str]:
    text = summary(esc)
    if r.kind == "task":
        return task_content(esc), "limited"
    if r.kind == "email":
        return {"subject": f"[careloop] {esc.severity} escalation #{esc.id}", "text": text}, "none"
    if r.kind == "webhook":
        return {
            "json": {
                "type": "escalation",
                "id": esc.id,
                "severity": esc.severity,
                "reason": esc.reason,
                "level": esc.level,
                "due_at": _iso(esc.due_at),
            },
            "text": text,
        }, "none"
    return {"text": text}, "none"


def task_content(esc: Escalation) -> dict[str, Any]:
    """Outbox ``content`` for the ``fhir_writeback`` channel's Task (its documented
    contract: kind, reason, severity, escalation_id, description, created, due); the
    channel builds and validates the FHIR R4 Task, with ``recipient`` as Task.for."""
    return {
        "kind": "task",
        "reason": esc.reason,
        "severity": esc.severity,
        "escalation_id": esc.id,
        "description": f"careloop escalation #{esc.id}: {esc.severity} ({esc.reason}), level {esc.level}. "
        "Review it in the escalation queue.",
        "created": _iso(esc.created_at),
        "due": _iso(esc.due_at),
    }


def patient_reference(s: Session, person_id: int) -> str | None:
    ident = s.exec(
        select(PersonIdentifier)
        .where(PersonIdentifier.person_id == person_id, PersonIdentifier.kind == "fhir")
        .order_by(col(PersonIdentifier.id))
    ).first()
    if ident is None:
        return None
    value = ident.value
    return value if value.startswith("Patient/") or "/Patient/" in value else f"Patient/{value}"


# ----------------------------------------------------------------------------- SLA


def sla_fired(s: Session, t: Timer, cfg: TriageConfig, now: datetime) -> str:
    """An SLA timer fired: re-escalate when the escalation is still unacknowledged.
    Returns an outcome code: reescalated|max-level|settled|stale."""
    esc = s.get(Escalation, t.payload.get("escalation"))
    if esc is None:
        return "stale"
    if esc.status != "open":
        return "settled"
    if esc.level != t.payload.get("level"):
        return "stale"
    if esc.level >= cfg.max_level:
        # The last level has had its SLA too: it stays at the top of the queue, breached.
        audit_log.append(
            s,
            at=now,
            actor="orchestrator",
            action="escalation.sla_breach",
            person_id=esc.person_id,
            entity=f"escalation/{esc.id}",
            detail={"severity": esc.severity, "level": esc.level},
        )
        return "max-level"
    esc.level += 1
    esc.due_at = now + cfg.sla_for(esc.severity)
    audit_log.append(
        s,
        at=now,
        actor="orchestrator",
        action="escalation.reescalate",
        person_id=esc.person_id,
        entity=f"escalation/{esc.id}",
        detail={"severity": esc.severity, "level": esc.level},
    )
    _schedule_sla(s, esc, now)
    route(s, esc, cfg, now)
    return "reescalated"


def _cancel_timers(s: Session, esc: Escalation, reason: str) -> None:
    for t in s.exec(
        select(Timer).where(
            Timer.person_id == esc.person_id, Timer.status == "pending", Timer.playbook == PSEUDO_PLAYBOOK
        )
    ).all():
        if t.payload.get("escalation") == esc.id:
            t.status, t.status_reason = "cancelled", reason


# ----------------------------------------------------------------------------- staff actions


def get(s: Session, esc_id: int) -> Escalation:
    esc = s.get(Escalation, esc_id)
    if esc is None:
        raise EscalationError(f"escalation {esc_id} not found")
    return esc


def list_escalations(
    s: Session,
    *,
    status: Sequence[str] | None = None,
    severity: str | None = None,
    person_id: int | None = None,
    limit: int = 100,
) -> list[Escalation]:
    """The queue, most severe first, then oldest first."""
    q = select(Escalation)
    if status:
        q = q.where(col(Escalation.status).in_(list(status)))
    if severity:
        q = q.where(Escalation.severity == severity)
    if person_id is not None:
        q = q.where(Escalation.person_id == person_id)
    rows = list(s.exec(q.order_by(col(Escalation.created_at), col(Escalation.id))).all())
    rank = {"emergency": 0, "urgent": 1, "routine": 2}
    rows.sort(key=lambda e: (e.status == "resolved", rank.get(e.severity, 3), utc(e.created_at), e.id or 0))
    return rows[:limit]


def acknowledge(s: Session, esc_id: int, *, actor: str, now: datetime) -> Escalation:
    """Staff took it: the SLA timer stops (no more re-escalation)."""
    esc = get(s, esc_id)
    if esc.status != "open":
        raise EscalationError(f"escalation {esc_id} is {esc.status}, not open")
    esc.status, esc.acknowledged_at, esc.acknowledged_by = "acknowledged", now, actor[:128]
    _cancel_timers(s, esc, "acknowledged")
    audit_log.append(
        s,
        at=now,
        actor=actor,
        action="escalation.acknowledge",
        person_id=esc.person_id,
        entity=f"escalation/{esc.id}",
        detail={"severity": esc.severity, "level": esc.level},
    )
    return esc


def resolve(s: Session, esc_id: int, *, actor: str, now: datetime, feedback: str) -> Escalation:
    """Close it with the staff's verdict: was a human needed (``needed``) or not."""
    if feedback not in FEEDBACK:
        raise EscalationError(f"feedback must be one of {', '.join(FEEDBACK)}")
    esc = get(s, esc_id)
    if esc.status == "resolved":
        raise EscalationError(f"escalation {esc_id} is already resolved")
    if esc.acknowledged_at is None:
        esc.acknowledged_at, esc.acknowledged_by = now, actor[:128]
    esc.status, esc.resolved_at, esc.resolved_by, esc.feedback = "resolved", now, actor[:128], feedback
    _cancel_timers(s, esc, "resolved")
    _recount(s, esc.person_id)
    audit_log.append(
        s,
        at=now,
        actor=actor,
        action="escalation.resolve",
        person_id=esc.person_id,
        entity=f"escalation/{esc.id}",
        detail={"severity": esc.severity, "feedback": feedback, "rule": esc.rule},
    )
    return esc


def set_feedback(s: Session, esc_id: int, *, actor: str, now: datetime, feedback: str) -> Escalation:
    """Correct the feedback of a resolved escalation."""
    if feedback not in FEEDBACK:
        raise EscalationError(f"feedback must be one of {', '.join(FEEDBACK)}")
    esc = get(s, esc_id)
    if esc.status != "resolved":
        raise EscalationError(f"escalation {esc_id} is {esc.status}: resolve it with feedback")
    old, esc.feedback = esc.feedback, feedback
    audit_log.append(
        s,
        at=now,
        actor=actor,
        action="escalation.feedback",
        person_id=esc.person_id,
        entity=f"escalation/{esc.id}",
        detail={"feedback": feedback, "previous": old},
    )
    return esc


def _recount(s: Session, person_id: int) -> None:
    """Keep the journey state's open-escalation count true after a resolution."""
    row = s.get(JourneyStateRow, person_id)
    if row is None:
        return
    n = s.exec(
        select(func.count())
        .select_from(Escalation)
        .where(Escalation.person_id == person_id, col(Escalation.status).in_(OPEN))
    ).one()
    row.state = {**row.state, "open_escalations": int(n)}


# ----------------------------------------------------------------------------- views and report


def to_json(esc: Escalation, *, evidence: bool = True) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": esc.id,
        "person": esc.person_id,
        "created_at": _iso(esc.created_at),
        "severity": esc.severity,
        "reason": esc.reason,
        "rule": esc.rule,
        "status": esc.status,
        "level": esc.level,
        "due_at": _iso(esc.due_at),
        "acknowledged_at": _iso(esc.acknowledged_at),
        "acknowledged_by": esc.acknowledged_by,
        "resolved_at": _iso(esc.resolved_at),
        "resolved_by": esc.resolved_by,
        "feedback": esc.feedback,
    }
    if evidence:
        doc["evidence"] = esc.evidence
    return doc


@dataclass(frozen=True, slots=True)
class RulePrecision:
    rule: str
    escalations: int
    needed: int
    not_needed: int

    @property
    def precision(self) -> float | None:
        judged = self.needed + self.not_needed
        return self.needed / judged if judged else None


def precision_report(s: Session, since: datetime | None = None) -> list[RulePrecision]:
    """Per rule: how many escalations it took part in and how staff judged them. An
    escalation counts for every red-flag rule that matched it (``evidence.assessment.rules``),
    or for its reason code when no rule did (frustration, playbook time-outs)."""
    counts: dict[str, list[int]] = {}
    q = select(Escalation)
    if since is not None:
        q = q.where(col(Escalation.created_at) >= since)
    for esc in s.exec(q).all():
        rules = (esc.evidence.get("assessment") or {}).get("rules") or [esc.rule or f"reason:{esc.reason}"]
        for r in rules:
            c = counts.setdefault(str(r), [0, 0, 0])
            c[0] += 1
            c[1] += esc.feedback == "needed"
            c[2] += esc.feedback == "not_needed"
    return [RulePrecision(r, *c) for r, c in sorted(counts.items())]


def _iso(dt: datetime | None) -> str | None:
    return utc(dt).isoformat() if dt is not None else None
