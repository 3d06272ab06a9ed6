"""FHIR R4 AuditEvent export shaped after IHE Basic Audit Log Patterns (BALP).

Minimal AuditEvents: identifiers and codes only, never names, contact points, message text
or diagnoses. The patient is an entity with role Patient whose ``what`` is an identifier in
careloop's person-id system (BALP's "patient identifier" pattern; one patient per
AuditEvent, because a record concerns at most one person). The chain position and hash ride
along as an entity with ``detail`` entries, so an exported event can be traced back to the
verifiable record it came from.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from audit.disclosures import PURPOSES
from audit.records import Rec, format_time

DCM = "http://dicom.nema.org/resources/ontology/DCM"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
LIFECYCLE = "http://terminology.hl7.org/CodeSystem/dicom-audit-lifecycle"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
ROLE_TYPE = "http://terminology.hl7.org/CodeSystem/extra-security-role-type"

PERSON_SYSTEM = "urn:careloop:person"
ACTOR_SYSTEM = "urn:careloop:actor"
ACTION_SYSTEM = "urn:careloop:audit-action"
ENTITY_SYSTEM = "urn:careloop:entity"
RECORD_SYSTEM = "urn:careloop:audit-record"
RECIPIENT_SYSTEM = "urn:careloop:recipient-kind"
RECIPIENT_ROLE_SYSTEM = "urn:careloop:recipient-role"
_NS = uuid.UUID("0e6f4c1e-3d0f-5b51-9c1d-6a7f2b8e4c10")

# action -> (DICOM event type code, display, FHIR action code C/R/U/D/E)
_TYPES: dict[str, tuple[str, str, str]] = {
    "message.receive": ("110107", "Import", "C"),
    "message.duplicate": ("110107", "Import", "E"),
    "person.create": ("110110", "Patient Record", "C"),
    "identity.hold": ("110110", "Patient Record", "E"),
    "person.view": ("110110", "Patient Record", "R"),
    "disclosure": ("110106", "Export", "R"),
    "audit.query": ("110112", "Query", "E"),
    "auth.failure": ("110114", "User Authentication", "E"),
    "retention.prune": ("110100", "Application Activity", "D"),
}
_DEFAULT_TYPE = ("110100", "Application Activity", "E")
# Actions only people take (through the CLI or a bearer token, whose subject is the actor);
# the rest are the hub's own stages, connectors and channels.
_HUMAN_ACTIONS = frozenset(
    {
        "audit.query",
        "escalation.view",
        "escalation.acknowledge",
        "escalation.resolve",
        "escalation.feedback",
        "message.view",
        "message.reprocess",
        "person.view",
        "identity.assign",
        "held.list",
        "item.retry",
        "outbox.resolve",
        "outbox.list",
        "outbox.release",
        "outbox.cancel",
    }
)
_ACT_REASON = {
    "treatment": "TREAT",
    "payment": "HPAYMT",
    "operations": "HOPERAT",
    "marketing": "HMARKT",
    "compliance": "HCOMPL",
}
# Detail keys that are codes or ids by the audit contract; everything else stays out.
_DETAIL_KEYS = (
    "kind",
    "control_id",
    "channel",
    "recipient_kind",
    "recipient_role",
    "phi_class",
    "reason",
    "playbook",
    "template",
    "choice",  # a staff resolution (outbox.resolve: sent or not-sent)
)


def _outcome(outcome: str) -> str:
    if outcome in ("failure", "error", "dead"):
        return "8"  # serious failure
    if outcome in ("denied", "rejected"):
        return "4"  # minor failure
    return "0"


def _coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    c = {"system": system, "code": code}
    if display:
        c["display"] = display
    return c


def audit_event(rec: Rec, *, about: int | None = None) -> dict[str, Any]:
    """One audit record as a minimal AuditEvent (a plain dict, JSON-ready).

    ``about`` is the patient the record was selected for, when it carries no person id of
    its own (a message is received before anyone knows whose it is): the event still names
    its patient."""
    code, display, action = _TYPES.get(rec.action, _DEFAULT_TYPE)
    human = rec.action in _HUMAN_ACTIONS or rec.actor.startswith("cli:")
    agents: list[dict[str, Any]] = [
        {
            "type": {
                "coding": [
                    _coding(ROLE_TYPE, "humanuser", "human user")
                    if human
                    else _coding(DCM, "110150", "Application")
                ]
            },
            "who": {"identifier": {"system": ACTOR_SYSTEM, "value": rec.actor}},
            "requestor": True,
        }
    ]
    entities: list[dict[str, Any]] = []
    patient = rec.person_id if rec.person_id is not None else about
    if patient is not None:
        entities.append(
            {
                "what": {"identifier": {"system": PERSON_SYSTEM, "value": str(patient)}},
                "type": _coding(ENTITY_TYPE, "1", "Person"),
                "role": _coding(OBJECT_ROLE, "1", "Patient"),
            }
        )
    if rec.action == "disclosure":
        # Who received it: the patient or the care team (recipient_role); older records
        # name only the kind of address (phone, email, fhir).
        role = rec.detail.get("recipient_role")
        who = (
            {"system": RECIPIENT_ROLE_SYSTEM, "value": str(role)}
            if role
            else {"system": RECIPIENT_SYSTEM, "value": str(rec.detail.get("recipient_kind") or "unknown")}
        )
        agents.append(
            {
                "type": {"coding": [_coding(DCM, "110152", "Destination Role ID")]},
                "who": {"identifier": who},
                "requestor": False,
            }
        )
    if rec.entity:
        obj: dict[str, Any] = {
            "what": {"identifier": {"system": ENTITY_SYSTEM, "value": rec.entity}},
            "type": _coding(ENTITY_TYPE, "2", "System Object"),
            "role": _coding(OBJECT_ROLE, "4", "Domain Resource"),
        }
        if rec.action == "disclosure":
            obj["lifecycle"] = _coding(LIFECYCLE, "11", "Disclosure")
        entities.append(obj)
    details = [
        {"type": k, "valueString": str(rec.detail[k])}
        for k in _DETAIL_KEYS
        if rec.detail.get(k) not in (None, "", [], {})
    ]
    details += [
        {"type": "seq", "valueString": str(rec.seq)},
        {"type": "hash", "valueString": rec.hash},
        {"type": "prev_hash", "valueString": rec.prev_hash},
    ]
    entities.append(
        {
            "what": {"identifier": {"system": RECORD_SYSTEM, "value": str(rec.seq)}},
            "type": _coding(ENTITY_TYPE, "2", "System Object"),
            "role": _coding(OBJECT_ROLE, "13", "Security Resource"),
            "detail": details,
        }
    )
    ev: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"careloop-{rec.seq}",
        "type": _coding(DCM, code, display),
        "subtype": [_coding(ACTION_SYSTEM, rec.action)],
        "action": action,
        "recorded": format_time(rec.at),
        "outcome": _outcome(rec.outcome),
        "outcomeDesc": rec.outcome,
        "agent": agents,
        "source": {
            "site": "careloop",
            "observer": {"identifier": {"system": "urn:careloop:system", "value": "careloop"}},
            "type": [_coding(SOURCE_TYPE, "4", "Application Server")],
        },
        "entity": entities,
    }
    purpose = rec.purpose or (str(rec.detail["purpose"]) if rec.detail.get("purpose") else None)
    if purpose:
        category = PURPOSES.get(purpose, (purpose, "other"))[1]
        concept: dict[str, Any] = {"text": purpose}
        if category in _ACT_REASON:
            concept["coding"] = [_coding(ACT_REASON, _ACT_REASON[category])]
        ev["purposeOfEvent"] = [concept]
    return ev


def bundle(recs: Iterable[Rec], *, at: datetime, person_id: int | None = None) -> dict[str, Any]:
    """A ``collection`` Bundle of AuditEvents (fullUrls are stable per record). ``person_id``:
    the patient the records were selected for (``AuditQuery.person_id``), named in each
    event that does not carry a person of its own."""
    entries = []
    for r in recs:
        ev = audit_event(r, about=person_id)
        entries.append({"fullUrl": f"urn:uuid:{uuid.uuid5(_NS, f'{r.seq}:{r.hash}')}", "resource": ev})
    return {"resourceType": "Bundle", "type": "collection", "timestamp": format_time(at), "entry": entries}


def validate(doc: dict[str, Any]) -> None:
    """Raise pydantic.ValidationError unless ``doc`` is a valid R4 Bundle (fhir.resources R4B models)."""
    from fhir.resources.R4B.bundle import Bundle  # heavy import, only when asked

    Bundle.model_validate(doc)
