"""HL7 v2 ADT and SIU messages -> journey events with FHIR R4 subjects.

Segment maps follow the HL7 V2-to-FHIR IG: PID -> Patient, PV1 -> Encounter,
SCH/TQ1/AIS/AIL/AIP -> Appointment, MRG -> the merged-away identifiers.

Time zones: an HL7 DTM without an offset is read in the site's time zone, taken from the
raw message's ``headers["timezone"]`` (the connector stamps the configured site zone
there) and UTC when that header is absent or unknown. Values with an offset keep it.
"""

from __future__ import annotations

from datetime import datetime, timedelta, tzinfo
from typing import Any, ClassVar, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from careloop.errors import PermanentError, SkipMessage
from careloop.hl7v2.parse import Message, Segment, leaf, parse_bytes
from careloop.model import Identifier, MappedEvent
from careloop.tables import RawMessage
from mapping.hl7v2_fhir import (
    V2_0203,
    address,
    authority,
    codeable,
    comps,
    contact_point,
    cx_authority,
    fhir_date,
    fhir_datetime,
    human_name,
    location_display,
    parse_dtm,
    practitioner,
    short_id,
)

ADT_EVENTS: Final[dict[str, str]] = {
    "A01": "encounter.admitted",
    "A02": "encounter.transferred",
    "A03": "encounter.discharged",
    "A04": "encounter.registered",
    "A05": "encounter.registered",
    "A08": "patient.updated",
    "A28": "patient.updated",
    "A31": "patient.updated",
    "A11": "encounter.cancelled",
    "A13": "encounter.admitted",
    "A40": "patient.merged",
}

SIU_EVENTS: Final[dict[str, str]] = {
    "S12": "appointment.booked",
    "S13": "appointment.rescheduled",
    "S14": "appointment.updated",
    "S15": "appointment.cancelled",
    "S16": "appointment.cancelled",
    "S17": "appointment.cancelled",
    "S26": "appointment.noshow",
}

# Encounter.status per trigger (A08 keeps what PV1 says: finished when PV1-45 is set).
_ENCOUNTER_STATUS: Final = {
    "A01": "in-progress",
    "A02": "in-progress",
    "A03": "finished",
    "A04": "arrived",
    "A05": "planned",
    "A11": "cancelled",
    "A13": "in-progress",
}

# PV1-2 patient class (table 0004) -> v3 ActCode.
_CLASS: Final = {
    "E": ("EMER", "emergency"),
    "I": ("IMP", "inpatient encounter"),
    "O": ("AMB", "ambulatory"),
    "P": ("PRENC", "pre-admission"),
    "R": ("AMB", "ambulatory"),
    "B": ("IMP", "inpatient encounter"),
    "C": ("AMB", "ambulatory"),
}
_ACTCODE: Final = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

# SCH-25 filler status (table 0278) -> Appointment.status (V2-to-FHIR ConceptMap). The IG
# leaves Dc, Blocked and Overbook unmapped: Dc is read as cancelled, Blocked and Overbook as booked.
# Keys are upper case without spaces, hyphens or underscores ("No Show" reads as NOSHOW);
# CANCELED is the US spelling some senders put in the text.
FILLER_STATUS: Final[dict[str, str]] = {
    "PENDING": "pending",
    "WAITLIST": "waitlist",
    "BOOKED": "booked",
    "STARTED": "checked-in",
    "COMPLETE": "fulfilled",
    "CANCELLED": "cancelled",
    "CANCELED": "cancelled",
    "DC": "cancelled",
    "DELETED": "entered-in-error",
    "BLOCKED": "booked",
    "OVERBOOK": "booked",
    "NOSHOW": "noshow",
}
_TRIGGER_STATUS: Final = {"S15": "cancelled", "S16": "cancelled", "S17": "cancelled", "S26": "noshow"}

# An SCH-25 that ends the appointment decides the journey event of a trigger that does not
# itself end it (S12 booked, S13 rescheduled, S14 modified): several EHRs send a cancellation
# as S14 with SCH-25 Cancelled rather than S15. Keyed on Appointment.status, as mapping/fhir.py
# maps an Appointment's status: cancelled (Cancelled, Dc) and entered-in-error (Deleted) ->
# the S15/S16/S17 event, noshow -> the S26 event, fulfilled (Complete) -> appointment.fulfilled.
# S12 too: a booking notice for an appointment the filler already reports ended (a queue
# catching up, or a feed that sends each appointment's current state) must not start a
# booking journey; appointment.booked would also set the journey's appointment back to booked
# (orchestrator/state.py), so its reminders would go out. The ending triggers S15-S17 and
# S26 keep their own event and status whatever SCH-25 says: the trigger is the sender's
# explicit statement, and SCH-25 is often left stale on them (a Booked S15).
_ENDED_BY_FILLER: Final[dict[str, str]] = {
    "cancelled": SIU_EVENTS["S15"],
    "entered-in-error": SIU_EVENTS["S17"],
    "noshow": SIU_EVENTS["S26"],
    "fulfilled": "appointment.fulfilled",
}
_STATUS_NOISE: Final = str.maketrans("", "", " -_")

_GENDER: Final = {"M": "male", "F": "female", "O": "other", "A": "other", "N": "other", "U": "unknown"}
_SKIP_ID_TYPES: Final = frozenset({"SS", "SSN"})  # never link people on social security numbers


class HL7v2Mapper:
    """Maps HL7 v2 ADT (A01-A05, A08, A11, A13, A28, A31, A40) and SIU (S12-S17, S26)
    messages to journey events; other message types raise ``SkipMessage``."""

    name: ClassVar[str] = "hl7v2"
    accepts: ClassVar[frozenset[str]] = frozenset({"hl7v2:*"})

    def __init__(self, id: str = "hl7v2", config: Any = None) -> None:
        self.id = id

    def map(self, raw: RawMessage) -> list[MappedEvent]:
        headers = raw.headers or {}
        msg = parse_bytes(bytes(raw.body))
        return map_message(msg, site_tz(headers.get("timezone")))


def site_tz(name: object) -> tzinfo:
    if isinstance(name, str) and name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return ZoneInfo("UTC")


def map_message(msg: Message, tz: tzinfo) -> list[MappedEvent]:
    mtype, trigger = msg.message_type
    if mtype == "ADT" and trigger in ADT_EVENTS:
        return _map_adt(msg, trigger, tz)
    if mtype == "SIU" and trigger in SIU_EVENTS:
        return [_map_siu(msg, trigger, tz)]
    raise SkipMessage(f"message type {mtype or '?'}^{trigger or '?'} is not mapped")


# --------------------------------------------------------------------------- common


class _Ctx:
    """Per-message values the segment maps share: the message's segments by name (in
    message order) and the default identifier authority (computed when first needed)."""

    __slots__ = ("_default_authority", "cs", "enc", "msg", "segments", "tz")

    def __init__(self, msg: Message, tz: tzinfo) -> None:
        self.msg, self.tz, self.enc, self.cs = msg, tz, msg.enc, msg.charset
        self.segments: dict[str, list[Segment]] = {}
        for seg in msg.segments:
            self.segments.setdefault(seg.name, []).append(seg)
        self._default_authority: str | None = None

    @property
    def default_authority(self) -> str:
        """``urn:careloop:hl7:`` + the sending facility (MSH-4.1, else .2, else MSH-3.1)."""
        if self._default_authority is None:
            msh = self.msg.msh
            fac = msh.get(4, 1) or msh.get(4, 2) or msh.get(3, 1) or "unknown"
            self._default_authority = f"urn:careloop:hl7:{fac}"
        return self._default_authority

    def first(self, name: str) -> Segment | None:
        """The first segment named ``name`` (``Message.segment``)."""
        segs = self.segments.get(name)
        return segs[0] if segs else None

    def all(self, name: str) -> list[Segment]:
        """Every segment named ``name``, in message order (``Message.all``)."""
        return self.segments.get(name, [])

    def dtm(self, value: str) -> datetime | None:
        return parse_dtm(value, self.tz)


def _occurred_at(ctx: _Ctx) -> datetime:
    evn = ctx.first("EVN")
    for value in (evn.get(6), evn.get(2)) if evn else ():
        dt = ctx.dtm(value)
        if dt is not None:
            return dt
    dt = ctx.dtm(ctx.msg.msh.get(7))
    if dt is None:
        raise PermanentError("MSH-7 (date/time of message) is missing or not a valid DTM")
    return dt


def _attributes(msg: Message, mtype: str, trigger: str) -> dict[str, Any]:
    return {"message_type": f"{mtype}^{trigger}", "trigger": trigger, "control_id": msg.control_id[:64]}


def _cx_list(ctx: _Ctx, seg: Segment, field: int) -> list[tuple[str, str, str]]:
    """(value, identifier type, system) of each CX repetition of ``seg``-``field`` that has
    a value and is not a social security number, in order, duplicates kept."""
    out = []
    enc, cs = ctx.enc, ctx.cs
    for rep in seg.repetitions(field):
        c = comps(rep, enc, cs, 5)
        value, id_type = c[0].strip(), c[4].strip().upper()
        if not value or id_type in _SKIP_ID_TYPES:
            continue
        out.append((value, id_type, cx_authority(rep, enc, cs) or ctx.default_authority))
    return out


def _mrns(cx: list[tuple[str, str, str]]) -> list[Identifier]:
    """The CX list as linking identifiers, duplicates dropped."""
    out: list[Identifier] = []
    for value, _, system in cx:
        ident = Identifier(system=system, value=value, kind="mrn")
        if ident not in out:
            out.append(ident)
    return out


def _cx_identifiers(ctx: _Ctx, seg: Segment, field: int) -> list[Identifier]:
    return _mrns(_cx_list(ctx, seg, field))


def _patient(ctx: _Ctx, pid: Segment) -> tuple[dict[str, Any], list[Identifier]]:
    """PID -> (FHIR Patient, identifiers for linking)."""
    enc, cs = ctx.enc, ctx.cs
    cx = _cx_list(ctx, pid, 3)
    idents = _mrns(cx)
    patient: dict[str, Any] = {"resourceType": "Patient"}
    fhir_ids = []
    for value, id_type, system in cx:
        entry: dict[str, Any] = {"value": value, "system": system}
        if id_type:
            entry["type"] = {"coding": [{"system": V2_0203, "code": id_type}]}
        fhir_ids.append(entry)
    if fhir_ids:
        patient["identifier"] = fhir_ids
    names = [n for n in (human_name(r, enc, cs) for r in pid.repetitions(5)) if n]
    if names:
        patient["name"] = names
    birth = fhir_date(pid.get(7))
    if birth:
        patient["birthDate"] = birth
    gender = _GENDER.get(pid.get(8).strip().upper())
    if gender:
        patient["gender"] = gender
    telecom: list[dict[str, Any]] = []
    for field, business in ((13, False), (14, True)):
        for rep in pid.repetitions(field):
            cp = contact_point(rep, enc, cs, business)
            if cp and cp not in telecom:
                telecom.append(cp)
    if telecom:
        patient["telecom"] = telecom
    for cp in telecom:
        if cp["system"] == "phone":
            ident = Identifier("phone", cp["value"], kind="phone")
        elif cp["system"] == "email":
            ident = Identifier("email", cp["value"], kind="email")
        else:
            continue
        if ident not in idents:
            idents.append(ident)
    addrs = [a for a in (address(r, enc, cs) for r in pid.repetitions(11)) if a]
    if addrs:
        patient["address"] = addrs
    lang = codeable(pid.raw_rep(15), enc, cs)
    if lang:
        patient["communication"] = [{"language": lang, "preferred": True}]
    death = ctx.dtm(pid.get(29))
    indicator = pid.get(30).strip().upper()
    if death is not None:
        patient["deceasedDateTime"] = fhir_datetime(death)
    elif indicator in ("Y", "N"):
        patient["deceasedBoolean"] = indicator == "Y"
    return patient, idents


# --------------------------------------------------------------------------- ADT


def _map_adt(msg: Message, trigger: str, tz: tzinfo) -> list[MappedEvent]:
    ctx = _Ctx(msg, tz)
    occurred = _occurred_at(ctx)
    etype = ADT_EVENTS[trigger]
    pids = ctx.all("PID")
    if not pids:
        raise PermanentError(f"ADT^{trigger} has no PID segment")
    if trigger == "A40":
        return _map_merge(msg, ctx, occurred)
    patient, idents = _patient(ctx, pids[0])
    pv1 = ctx.first("PV1")
    subject = None
    if pv1 is not None and (trigger in _ENCOUNTER_STATUS or (trigger == "A08" and pv1.get(19).strip())):
        subject = _encounter(ctx, pv1, trigger)
    attrs = _attributes(msg, "ADT", trigger)
    if trigger == "A13":
        attrs["discharge_cancelled"] = True
    if trigger == "A05":
        attrs["pre_admit"] = True
    if subject is not None:
        attrs["encounter_status"] = subject["status"]
        attrs["patient_class"] = subject["class"]["code"]
    return [MappedEvent(etype, occurred, idents, patient, subject, attrs)]


def _map_merge(msg: Message, ctx: _Ctx, occurred: datetime) -> list[MappedEvent]:
    """A40: each PID (survivor) is followed by its MRG (the merged-away identifiers)."""
    events = []
    current: Segment | None = None
    for seg in msg.segments:
        if seg.name == "PID":
            current = seg
        elif seg.name == "MRG" and current is not None:
            patient, idents = _patient(ctx, current)
            merge_from = [i for i in _cx_identifiers(ctx, seg, 1) if i not in idents]
            attrs = _attributes(msg, "ADT", "A40")
            attrs["merged_identifiers"] = len(merge_from)
            events.append(MappedEvent("patient.merged", occurred, idents, patient, None, attrs, merge_from))
            current = None
    if not events:
        raise PermanentError("ADT^A40 has no PID/MRG pair")
    return events


def _encounter(ctx: _Ctx, pv1: Segment, trigger: str) -> dict[str, Any]:
    enc, cs = ctx.enc, ctx.cs
    visit = pv1.raw_rep(19)
    visit_id = leaf(visit, 1, 1, enc, cs).strip()
    start, end = ctx.dtm(pv1.get(44)), ctx.dtm(pv1.get(45))
    if visit_id:
        auth = cx_authority(visit, enc, cs) or ctx.default_authority
        eid = short_id("visit", auth, visit_id)
    else:
        msh = ctx.msg.msh
        auth = ""
        eid = short_id("msh", msh.raw(3), msh.raw(4), ctx.msg.control_id)
    status = _ENCOUNTER_STATUS.get(trigger) or ("finished" if end else "in-progress")
    klass = _CLASS.get(pv1.get(2).strip().upper())
    encounter: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": eid,
        "status": status,
        "class": (
            {"system": _ACTCODE, "code": klass[0], "display": klass[1]}
            if klass
            else {"system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor", "code": "UNK"}
        ),
    }
    if visit_id:
        encounter["identifier"] = [
            {
                "type": {"coding": [{"system": V2_0203, "code": "VN"}]},
                "system": auth,
                "value": visit_id,
            }
        ]
    locations = []
    loc = location_display(pv1.raw_rep(3), enc, cs)
    if loc:
        locations.append(
            {"location": {"display": loc}, "status": "completed" if status == "finished" else "active"}
        )
    prior = location_display(pv1.raw_rep(6), enc, cs) if trigger == "A02" else None
    if prior:
        locations.append({"location": {"display": prior}, "status": "completed"})
    if locations:
        encounter["location"] = locations
    period: dict[str, str] = {}
    if start:
        period["start"] = fhir_datetime(start)
    if end and status == "finished":
        period["end"] = fhir_datetime(end)
    if period:
        encounter["period"] = period
    hosp: dict[str, Any] = {}
    disposition = codeable(pv1.raw_rep(36), enc, cs)
    if disposition:
        for coding in disposition.get("coding", []):
            coding.setdefault("system", "http://terminology.hl7.org/CodeSystem/v2-0112")
        hosp["dischargeDisposition"] = disposition
    admit_source = pv1.get(14).strip()
    if admit_source:
        hosp["admitSource"] = {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0023", "code": admit_source}]
        }
    if hosp:
        encounter["hospitalization"] = hosp
    attending = practitioner(pv1.raw_rep(7), enc, cs)
    if attending:
        encounter["participant"] = [
            {
                "type": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "ATND",
                            }
                        ]
                    }
                ],
                "individual": attending,
            }
        ]
    return encounter


# --------------------------------------------------------------------------- SIU


def _map_siu(msg: Message, trigger: str, tz: tzinfo) -> MappedEvent:
    ctx = _Ctx(msg, tz)
    sch = ctx.first("SCH")
    if sch is None:
        raise PermanentError(f"SIU^{trigger} has no SCH segment")
    pid = ctx.first("PID")
    patient, idents = _patient(ctx, pid) if pid is not None else (None, [])
    appt = _appointment(ctx, sch, trigger, idents)
    attrs = _attributes(msg, "SIU", trigger)
    attrs["appointment_status"] = appt["status"]
    occurred = _occurred_at(ctx)
    etype = SIU_EVENTS[trigger]
    if trigger not in _TRIGGER_STATUS:
        etype = _ENDED_BY_FILLER.get(appt["status"], etype)
    return MappedEvent(etype, occurred, idents, patient, appt, attrs)


def _filler_status(ctx: _Ctx, sch: Segment) -> str | None:
    """SCH-25 (CE/CWE, table 0278) as an Appointment.status; None when empty or unknown.
    Senders write the table's code in component 1, or only its text in component 2, or a
    local code in 1 with the text in 2, in any case: the identifier is read first, then the
    text, then the alternate identifier and text (components 4 and 5)."""
    c = comps(sch.raw_rep(25), ctx.enc, ctx.cs, 5)
    for value in (c[0], c[1], c[3], c[4]):
        status = FILLER_STATUS.get(value.upper().translate(_STATUS_NOISE))
        if status is not None:
            return status
    return None


def _status(trigger: str, filler: str | None) -> str:
    """Appointment.status for an SIU trigger and its SCH-25 status. An ending trigger (S15-S17,
    S26) keeps its own status unless SCH-25 ends the appointment the same way: an S17 (or S15)
    whose SCH-25 is Deleted is entered-in-error, as an S14 with Deleted is; a stale Booked on
    an S15 leaves it cancelled."""
    own = _TRIGGER_STATUS.get(trigger)
    if own is None:
        return filler or "booked"
    if filler is not None and _ENDED_BY_FILLER.get(filler) == SIU_EVENTS[trigger]:
        return filler
    return own


def _ei(ctx: _Ctx, sch: Segment, field: int) -> tuple[str, str] | None:
    value, namespace, universal = comps(sch.raw_rep(field), ctx.enc, ctx.cs, 3)
    value = value.strip()
    if not value:
        return None
    return authority(namespace, universal) or ctx.default_authority, value


def _appointment(ctx: _Ctx, sch: Segment, trigger: str, idents: list[Identifier]) -> dict[str, Any]:
    enc, cs, msg = ctx.enc, ctx.cs, ctx.msg
    placer, filler = _ei(ctx, sch, 1), _ei(ctx, sch, 2)
    # The filler (the scheduling system) owns the appointment, so its id wins.
    key = filler or placer
    if key is not None:
        aid = short_id("appointment", *key)
    else:
        aid = short_id("msh", msg.msh.raw(3), msg.msh.raw(4), msg.control_id)
    status = _status(trigger, _filler_status(ctx, sch))
    appt: dict[str, Any] = {"resourceType": "Appointment", "id": aid, "status": status}
    ids = []
    for code, pair in (("PLAC", placer), ("FILL", filler)):
        if pair:
            ids.append(
                {"type": {"coding": [{"system": V2_0203, "code": code}]}, "system": pair[0], "value": pair[1]}
            )
    if ids:
        appt["identifier"] = ids
    start, end = _timing(ctx, sch)
    if start:
        appt["start"] = fhir_datetime(start)
    if end:
        appt["end"] = fhir_datetime(end)
    if start and end and end > start:
        appt["minutesDuration"] = int((end - start).total_seconds() // 60)
    if status == "cancelled":
        reason = codeable(sch.raw_rep(6), enc, cs)
        if reason:
            appt["cancelationReason"] = reason
    reason_code = codeable(sch.raw_rep(7), enc, cs)
    if reason_code:
        appt["reasonCode"] = [reason_code]
    appt_type = codeable(sch.raw_rep(8), enc, cs)
    if appt_type:
        appt["appointmentType"] = appt_type
    services = [c for c in (codeable(s.raw_rep(3), enc, cs) for s in ctx.all("AIS")) if c]
    if services:
        appt["serviceType"] = services
    participants: list[dict[str, Any]] = []
    mrn = next((i for i in idents if i.kind == "mrn"), None)
    if mrn is not None:
        participants.append(
            {
                "actor": {"type": "Patient", "identifier": {"system": mrn.system, "value": mrn.value}},
                "status": "accepted",
            }
        )
    for ail in ctx.all("AIL"):
        loc = location_display(ail.raw_rep(3), enc, cs)
        if loc:
            part: dict[str, Any] = {"actor": {"type": "Location", "display": loc}, "status": "accepted"}
            role = codeable(ail.raw_rep(4), enc, cs)
            if role:
                part["type"] = [role]
            participants.append(part)
    for aip in ctx.all("AIP"):
        ref = practitioner(aip.raw_rep(3), enc, cs)
        if ref:
            part = {"actor": ref, "status": "accepted"}
            role = codeable(aip.raw_rep(4), enc, cs)
            if role:
                part["type"] = [role]
            participants.append(part)
    if not participants:
        participants.append({"status": "needs-action", "type": [{"text": "unknown"}]})
    appt["participant"] = participants
    return appt


def _timing(ctx: _Ctx, sch: Segment) -> tuple[datetime | None, datetime | None]:
    """Start and end: TQ1-7/8 (TQ1-6 duration when TQ1-8 is empty), else SCH-11 (TQ .4/.5),
    else the first AIS-4 plus duration; SCH-9/10 last for a missing end."""
    enc, cs = ctx.enc, ctx.cs
    tq1 = ctx.first("TQ1")
    start = end = None
    if tq1 is not None:
        start, end = ctx.dtm(tq1.get(7)), ctx.dtm(tq1.get(8))
        if start is not None and end is None:
            duration = tq1.raw_rep(6)  # TQ1-6 service duration (CQ: quantity^units)
            end = _plus(start, *comps(duration, enc, cs, 2))
    if start is None:
        tq = sch.raw_rep(11)
        _, _, _, tq_start, tq_end = comps(tq, enc, cs, 5)
        start, end = ctx.dtm(tq_start), ctx.dtm(tq_end)
    if start is None:
        for ais in ctx.all("AIS"):
            start = ctx.dtm(ais.get(4))
            if start is not None:
                if end is None:
                    end = _plus(start, ais.get(7), comps(ais.raw_rep(8), enc, cs, 1)[0])
                break
    if start is not None and end is None:
        end = _plus(start, sch.get(9), sch.get(10))
    if start is not None and end is not None and end < start:
        end = None
    return start, end


_UNITS: Final = {
    "MIN": 60,
    "M": 60,
    "MINUTES": 60,
    "S": 1,
    "SEC": 1,
    "H": 3600,
    "HR": 3600,
    "HOURS": 3600,
    "D": 86400,
    "DAY": 86400,
}


def _plus(start: datetime, amount: str, unit: str) -> datetime | None:
    amount = amount.strip()
    if not amount:
        return None
    try:
        n = float(amount)
    except ValueError:
        return None
    secs = _UNITS.get(unit.strip().upper() or "MIN")
    if secs is None or n <= 0 or n > 100_000:
        return None
    return start + timedelta(seconds=n * secs)
