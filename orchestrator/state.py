"""Journey state: a pure fold of a person's events into what playbooks need to know.

Stored as JSON in ``journey_state``; ``apply`` never does I/O. Subjects (Appointment,
Encounter) are read from the FHIR resource that came with the event.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from careloop.clock import utc

MAX_HISTORY = 100
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class AppointmentState(BaseModel):
    status: str = "booked"  # booked|confirmed|cancelled|noshow|fulfilled|pending|proposed
    start: datetime | None = None
    end: datetime | None = None
    location: str | None = None
    type: str | None = None
    updated_at: datetime | None = None


class EncounterState(BaseModel):
    status: str = "in-progress"  # in-progress|finished|cancelled|planned
    admitted_at: datetime | None = None
    discharged_at: datetime | None = None
    klass: str | None = None
    disposition: str | None = None
    instructions_sent_at: datetime | None = None
    instructions_delivered_at: datetime | None = None


class Outreach(BaseModel):
    at: datetime
    playbook: str
    template: str
    channel: str
    key: str
    status: str = "pending"


class Signal(BaseModel):
    type: str
    at: datetime
    subject: str | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)


class JourneyState(BaseModel):
    appointments: dict[str, AppointmentState] = Field(default_factory=dict)
    encounters: dict[str, EncounterState] = Field(default_factory=dict)
    outreach: list[Outreach] = Field(default_factory=list)
    signals: list[Signal] = Field(default_factory=list)  # crm.* and inbound messages
    deceased: bool = False
    open_escalations: int = 0
    last_event_at: datetime | None = None

    def appointment(self, ref: str | None) -> AppointmentState | None:
        return self.appointments.get(ref) if ref else None

    def encounter(self, ref: str | None) -> EncounterState | None:
        return self.encounters.get(ref) if ref else None

    def next_appointment(self, now: datetime) -> tuple[str, AppointmentState] | None:
        """The soonest upcoming appointment that is still booked or confirmed."""
        live = [
            (a.start, ref, a)
            for ref, a in self.appointments.items()
            if a.start and a.start > now and a.status in ("booked", "confirmed", "pending")
        ]
        if not live:
            return None
        _, ref, a = min(live, key=lambda t: (t[0], t[1]))
        return ref, a

    def latest_encounter(self) -> tuple[str, EncounterState] | None:
        if not self.encounters:
            return None
        ref = max(self.encounters, key=lambda r: self.encounters[r].admitted_at or _EPOCH)
        return ref, self.encounters[ref]


def _dt(v: Any) -> datetime | None:
    if not v:
        return None
    if isinstance(v, datetime):
        return utc(v)
    try:
        return utc(datetime.fromisoformat(str(v)))
    except ValueError:
        return None


APPOINTMENT_STATUS = {
    "appointment.booked": "booked",
    "appointment.confirmed": "confirmed",
    "appointment.cancelled": "cancelled",
    "appointment.noshow": "noshow",
    "appointment.fulfilled": "fulfilled",
}


def apply(
    state: JourneyState,
    etype: str,
    at: datetime,
    subject_ref: str | None,
    subject: dict[str, Any] | None,
    attributes: dict[str, Any],
) -> JourneyState:
    """Fold one event into ``state`` (returns a new state)."""
    st = state.model_copy(deep=True)
    st.last_event_at = at
    if etype.startswith("appointment.") and subject_ref:
        appt = st.appointments.get(subject_ref) or AppointmentState()
        if subject:
            appt.start = _dt(subject.get("start")) or appt.start
            appt.end = _dt(subject.get("end")) or appt.end
            appt.type = _code_text(subject.get("appointmentType")) or appt.type
            if subject.get("status") in ("cancelled", "noshow", "fulfilled", "entered-in-error"):
                appt.status = "cancelled" if subject["status"] == "entered-in-error" else subject["status"]
        if etype in APPOINTMENT_STATUS:
            appt.status = APPOINTMENT_STATUS[etype]
        elif etype == "appointment.rescheduled" and appt.status not in ("cancelled",):
            appt.status = "booked"  # a new time needs a new confirmation
        appt.updated_at = at
        st.appointments[subject_ref] = appt
    elif etype.startswith("encounter.") and subject_ref:
        enc = st.encounters.get(subject_ref) or EncounterState()
        period = (subject or {}).get("period", {})
        enc.admitted_at = (
            _dt(period.get("start")) or enc.admitted_at or (at if etype == "encounter.admitted" else None)
        )
        if etype == "encounter.discharged":
            enc.status = "finished"
            enc.discharged_at = _dt(period.get("end")) or at
            disp = (subject or {}).get("hospitalization", {}).get("dischargeDisposition")
            enc.disposition = _code_text(disp)
        elif etype == "encounter.cancelled":
            enc.status = "cancelled"
        elif etype == "encounter.admitted":
            enc.status, enc.discharged_at = "in-progress", None
        enc.klass = ((subject or {}).get("class") or {}).get("code") or enc.klass
        st.encounters[subject_ref] = enc
    elif etype in ("discharge_instructions.sent", "discharge_instructions.delivered"):
        ref = subject_ref if subject_ref in st.encounters else attributes.get("encounter")
        if ref is None and (latest := st.latest_encounter()):
            ref = latest[0]
        if ref:
            enc = st.encounters.get(ref) or EncounterState()
            if etype.endswith(".sent"):
                enc.instructions_sent_at = enc.instructions_sent_at or at
            else:
                enc.instructions_sent_at = enc.instructions_sent_at or at
                enc.instructions_delivered_at = enc.instructions_delivered_at or at
            st.encounters[ref] = enc
    elif etype == "patient.deceased" or (etype == "patient.updated" and attributes.get("deceased")):
        st.deceased = True
    elif etype.startswith("message.") and (key := attributes.get("outbox_key") or attributes.get("key")):
        for o in st.outreach:
            if o.key == key:
                o.status = etype.split(".", 1)[1]
    if etype.startswith("crm.") or etype == "message.inbound":
        st.signals.append(Signal(type=etype, at=at, subject=subject_ref, attributes=_small(attributes)))
        st.signals = st.signals[-MAX_HISTORY:]
    return st


def record_outreach(state: JourneyState, o: Outreach) -> None:
    state.outreach.append(o)
    state.outreach = state.outreach[-MAX_HISTORY:]


def _small(attrs: dict[str, Any]) -> dict[str, Any]:
    # Keep codes and short values only; message bodies stay in the raw store.
    return {k: v for k, v in attrs.items() if k != "body" and isinstance(v, str | int | float | bool)}


def _code_text(cc: Any) -> str | None:
    if not isinstance(cc, dict):
        return None
    for coding in cc.get("coding", []):
        if coding.get("code"):
            return str(coding["code"])
    return cc.get("text")
