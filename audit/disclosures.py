"""Accounting of disclosures (45 CFR 164.528) for one patient and period.

Each entry carries the elements of 164.528(b)(2): the date of the disclosure, who received
it, a brief description of the PHI disclosed and a brief statement of the purpose. The
source is the outbox's ``disclosure`` audit records (detail: channel, recipient_kind,
purpose, phi_class, outcome), so the report needs nothing the audit log does not hold.

164.528(a)(1) exempts disclosures to the individual themself and for treatment, payment
and health care operations from the accounting a patient may demand. Every disclosure is
listed; ``accounting_required`` and ``exemption`` say which the rule requires, so the
privacy officer decides with the full picture rather than with a pre-filtered one.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import IO, Any

from sqlalchemy import select
from sqlmodel import Session, col

from audit.query import AuditQuery, iter_all
from audit.records import Rec, format_time
from careloop.clock import utc
from careloop.tables import Person

# 164.528(a)(3): an individual may ask for disclosures in the six years before the request.
LOOKBACK = timedelta(days=6 * 365 + 2)

PHI_DESCRIPTIONS = {
    "none": "no PHI: a generic notice without health information",
    "limited": "appointment or visit details (date, time, location); no diagnoses",
    "minimum": "appointment or visit details (date, time, location); no diagnoses",
    "full": "clinical information from the record (the template's content)",
}

# purpose code -> (statement, HIPAA category). Reminders and care messages are treatment
# communications; surveys are quality assessment (operations); offers are marketing.
PURPOSES: dict[str, tuple[str, str]] = {
    "treatment": ("treatment", "treatment"),
    "appointment-reminder": ("appointment reminder (treatment)", "treatment"),
    "appointment-prep": ("visit preparation instructions (treatment)", "treatment"),
    "care-coordination": ("care coordination (treatment)", "treatment"),
    # Built in, not from templates: the notice to the care team when a reply is escalated
    # (orchestrator/escalation.py) and the safety reply to the patient that goes with it.
    "escalation": ("escalation of the patient's message to the care team (treatment)", "treatment"),
    "safety": ("safety instructions after an urgent message (treatment)", "treatment"),
    "payment": ("payment", "payment"),
    "operations": ("health care operations", "operations"),
    "survey": ("patient experience survey (quality assessment, operations)", "operations"),
    "discharge-survey": ("discharge survey (quality assessment, operations)", "operations"),
    "marketing": ("marketing", "marketing"),
    "discount-offer": ("product offer (marketing)", "marketing"),
    # Not a disclosure purpose: auditors' own reads (audit.query), coded for the FHIR export.
    "audit": ("compliance audit", "compliance"),
}
_SELF = frozenset({"patient", "self", "individual"})
_TPO = frozenset({"treatment", "payment", "operations"})


@dataclass(frozen=True, slots=True)
class Disclosure:
    date: datetime
    recipient: str
    description: str
    purpose: str
    channel: str
    outcome: str
    accounting_required: bool
    exemption: str | None  # the 164.528(a)(1) paragraph that exempts it
    audit_seq: int

    def to_json(self) -> dict[str, Any]:
        return {
            "date": format_time(self.date),
            "recipient": self.recipient,
            "description": self.description,
            "purpose": self.purpose,
            "channel": self.channel,
            "outcome": self.outcome,
            "accounting_required": self.accounting_required,
            "exemption": self.exemption,
            "audit_seq": self.audit_seq,
        }


@dataclass(frozen=True, slots=True)
class DisclosureReport:
    person_id: int
    since: datetime
    until: datetime
    entries: list[Disclosure]

    def to_json(self) -> dict[str, Any]:
        return {
            "person": self.person_id,
            "since": format_time(self.since),
            "until": format_time(self.until),
            "regulation": "45 CFR 164.528",
            "entries": [e.to_json() for e in self.entries],
        }


def entry(rec: Rec) -> Disclosure:
    """One disclosure audit record as an accounting entry."""
    d = rec.detail
    kind = str(d.get("recipient_role") or d.get("recipient_kind") or "unknown")
    channel = str(d.get("channel") or "unknown")
    code = str(d.get("purpose") or rec.purpose or "unspecified")
    statement, category = PURPOSES.get(code, (code, "other"))
    phi = str(d.get("phi_class") or "unknown")
    exemption = None
    if kind in _SELF:
        exemption = "164.528(a)(1)(ii): to the individual"
    elif category in _TPO:
        exemption = "164.528(a)(1)(i): treatment, payment or health care operations"
    return Disclosure(
        date=rec.at,
        recipient=f"{'the patient' if kind in _SELF else kind} via {channel}",
        description=PHI_DESCRIPTIONS.get(phi, f"PHI class {phi}"),
        purpose=statement,
        channel=channel,
        outcome=str(d.get("outcome") or rec.outcome),
        accounting_required=exemption is None,
        exemption=exemption,
        audit_seq=rec.seq,
    )


def accounting(
    session: Session,
    person_id: int,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    now: datetime,
) -> DisclosureReport:
    """Every disclosure about ``person_id`` (and people merged into them) in [since, until)."""
    until = utc(until or now)
    since = utc(since or until - LOOKBACK)
    q = AuditQuery(person_id=person_id, action="disclosure", since=since, until=until)
    return DisclosureReport(person_id, since, until, [entry(r) for r in iter_all(session, q)])


def person_exists(session: Session, person_id: int) -> bool:
    """Whether ``person_id`` names a person in the store (a merged one too). An empty
    accounting for an id that names no one is a mistyped id, not an answer to give a patient."""
    # The id alone: no need to load the record's PHI to know it is there.
    return session.execute(select(col(Person.id)).where(col(Person.id) == person_id)).first() is not None


def write_csv(report: DisclosureReport, fp: IO[str]) -> None:
    fields = (
        "date",
        "recipient",
        "description",
        "purpose",
        "channel",
        "outcome",
        "accounting_required",
        "exemption",
        "audit_seq",
    )
    w = csv.DictWriter(fp, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for e in report.entries:
        w.writerow({k: ("" if v is None else v) for k, v in e.to_json().items()})
