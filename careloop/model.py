"""The canonical journey model that mappers produce and the orchestrator consumes.

FHIR-centric: a subject (Patient, Appointment, Encounter, ...) travels as a FHIR R4
resource (a JSON dict); a JourneyEvent references it. Mappers are pure functions from a
RawMessage to MappedEvent values; the mapping stage resolves identities and stores them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

# The controlled vocabulary. ``crm.<event>`` types are open-ended by design.
EVENT_TYPES: Final = frozenset(
    {
        "appointment.booked",
        "appointment.confirmed",
        "appointment.cancelled",
        "appointment.rescheduled",
        "appointment.noshow",
        "appointment.fulfilled",
        "appointment.updated",
        "encounter.admitted",
        "encounter.discharged",
        "encounter.transferred",
        "encounter.registered",
        "encounter.updated",
        "encounter.cancelled",
        "patient.updated",
        "patient.merged",
        "patient.deceased",
        "discharge_instructions.sent",
        "discharge_instructions.delivered",
        "message.inbound",
        "message.queued",
        "message.sent",
        "message.delivered",
        "message.read",
        "message.failed",
        "consent.granted",
        "consent.revoked",
    }
)


def is_known_event_type(name: str) -> bool:
    return name in EVENT_TYPES or (name.startswith("crm.") and len(name) > 4)


@dataclass(frozen=True, slots=True)
class Identifier:
    """A person identifier. ``kind`` drives linking: mrn/fhir/crm identify a person;
    phone/email are contact points that may be shared and so can be ambiguous.
    ``verified``: the sender vouches that this contact point belongs to the person (a
    CRM's confirmed email, say); only verified contact points may link a new CRM contact
    id to an existing person. Not part of equality."""

    system: str
    value: str
    kind: str = "mrn"
    verified: bool = field(default=False, compare=False)

    def token(self) -> str:
        return f"{self.system}|{self.value}"


@dataclass(slots=True)
class MappedEvent:
    """One event produced by a mapper, before identity resolution."""

    type: str
    occurred_at: datetime
    identifiers: list[Identifier] = field(default_factory=list)
    patient: dict[str, Any] | None = None  # FHIR Patient fragment to merge into the person
    subject: dict[str, Any] | None = None  # FHIR resource the event is about
    attributes: dict[str, Any] = field(default_factory=dict)
    merge_from: list[Identifier] = field(default_factory=list)  # A40 / Patient.link

    def __post_init__(self) -> None:
        if not is_known_event_type(self.type):
            raise ValueError(f"unknown journey event type {self.type!r}")
        if self.occurred_at.tzinfo is None:
            raise ValueError("occurred_at must be timezone-aware")

    @property
    def subject_ref(self) -> str | None:
        if not self.subject or "id" not in self.subject:
            return None
        return f"{self.subject['resourceType']}/{self.subject['id']}"


@dataclass(frozen=True, slots=True)
class RawIn:
    """What a connector hands the sink: one inbound message, before it is stored."""

    connector: str
    kind: str
    body: bytes
    content_type: str
    dedup_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    reply: bytes | None = None  # stored with the message, answered again to a duplicate
    # Why the connector did not accept it for processing (its NACK told the sender so):
    # kept for inspection with status ``error`` and this PHI-free reason, never mapped.
    rejected: str | None = None


@dataclass(frozen=True, slots=True)
class PutResult:
    """What the sink answers for one RawIn once it is committed."""

    raw_id: int
    duplicate: bool
    reply: bytes | None  # the reply stored with the first copy (an HL7 ACK), if any


@dataclass(frozen=True, slots=True)
class Hold:
    """A send-time check's answer that keeps an outbox item back (channels/outbox.py
    ``SendCheck``): ``until`` a later time (it stays pending; not counted as an attempt),
    for staff (``staff``: status ``held``, see ``careloop outbox``), or for good (cancelled)."""

    reason: str  # a compliance gate reason code (orchestrator/gate.py)
    until: datetime | None = None
    staff: bool = False  # not cancelled: ``held`` for staff to release or cancel
