"""FHIR R4 resources -> journey events (pure: no I/O, no clock).

Raw kinds are ``fhir:<ResourceType>`` for one resource and ``fhir:notification`` for the
subscription bookkeeping the connector keeps (handshakes, heartbeats, status), which is
skipped with a reason. Each resource is validated with the fhir.resources R4B model of its
type (unknown extensions are fine: extensions are generic in FHIR); a resource that fails is
a ``PermanentError`` naming only the failing element paths, never their values.

The subject of every event is the source resource itself, as FHIR R4 JSON with its server
id (``Appointment/<id>``). People are identified by their FHIR Patient reference
(``Identifier(system="<base>/Patient", value=<id>, kind="fhir")``) plus any business
identifier the resource carries (kind ``mrn`` for type MR, else ``other``).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, ClassVar

import phonenumbers
from pydantic import ValidationError

from careloop.clock import utc
from careloop.errors import PermanentError, SkipMessage
from careloop.model import Identifier, MappedEvent
from careloop.tables import RawMessage

BASE_HEADER = "x-careloop-fhir-base"
VERSION_HEADER = "x-careloop-fhir-version"  # "5.0" for resources carried by an R5 notification
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
MAPPED_TYPES = ("Appointment", "Encounter", "Patient", "Communication", "Consent", "DocumentReference")
# LOINC 8653-8 "Hospital Discharge instructions"; 18842-5 "Discharge summary" is a clinical
# summary, not instructions for the patient, so it is deliberately not in this set.
DISCHARGE_CODES = frozenset({"8653-8", "discharge-instructions", "discharge-instruction", "DISCHINST"})
_CHANNELS = {
    "sms": "sms",
    "text": "sms",
    "smswrit": "sms",
    "email": "email",
    "emailwrit": "email",
    "phone": "voice",
    "voice": "voice",
    "call": "voice",
    "portal": "portal",
    "onlinewrit": "portal",
    "mail": "mail",
    "mailwrit": "mail",
    "letter": "mail",
}
_PURPOSES = {
    "hmarkt": "marketing",
    "treat": "care",
    "hoperat": "operations",
    "hpaymt": "billing",
    "pubhlth": "public-health",
    "hresch": "research",
}


def _model(resource_type: str) -> Any:
    module = importlib.import_module(f"fhir.resources.R4B.{resource_type.lower()}")
    return getattr(module, resource_type)


def validate(doc: dict[str, Any]) -> None:
    """Validate with the R4B model; PermanentError lists failing paths (no values)."""
    rtype = str(doc.get("resourceType"))
    try:
        _model(rtype).model_validate(doc)
    except ValidationError as err:
        where = sorted({".".join(str(p) for p in e["loc"]) or "(root)" for e in err.errors()})[:8]
        raise PermanentError(f"{rtype} failed R4B validation at {', '.join(where)}") from None


def r5_to_r4(doc: dict[str, Any]) -> dict[str, Any]:
    """Down-convert the R5 shapes our mapped types meet in R5 notifications to R4: Encounter
    ``class`` (a list of CodeableConcept in R5, one Coding in R4), ``actualPeriod``, the
    ``completed`` status and ``admission``; then drop elements R4 does not have, which carry
    nothing the journey needs."""
    out = dict(doc)
    if out.get("resourceType") == "Encounter":
        cls = out.get("class")
        if isinstance(cls, list):
            codings = [cd for c in cls if isinstance(c, dict) for cd in c.get("coding") or []]
            if codings:
                out["class"] = codings[0]
            else:
                out.pop("class")
        if "actualPeriod" in out and "period" not in out:
            out["period"] = out.pop("actualPeriod")
        if out.get("status") in ("completed", "discharged"):
            out["status"] = "finished"
        if "admission" in out and "hospitalization" not in out:
            out["hospitalization"] = out.pop("admission")
        if isinstance(out.get("serviceType"), list):
            out.pop("serviceType")
    fields = {f.alias or name for name, f in _model(str(out["resourceType"])).model_fields.items()}
    return {k: v for k, v in out.items() if k in fields or k == "resourceType"}


def _codes(*concepts: Any) -> list[tuple[str, str]]:
    """(system, code) of every coding in CodeableConcepts / Codings / lists of them."""
    out: list[tuple[str, str]] = []
    for c in concepts:
        if isinstance(c, list):
            out.extend(_codes(*c))
        elif isinstance(c, dict):
            if "code" in c and "coding" not in c:
                out.append((str(c.get("system", "")), str(c["code"])))
            for cd in c.get("coding") or []:
                if cd.get("code"):
                    out.append((str(cd.get("system", "")), str(cd["code"])))
    return out


def parse_instant(value: Any) -> datetime | None:
    """A FHIR instant/dateTime as an aware datetime (more than 6 fractional digits truncated)."""
    import re
    from datetime import UTC

    if not isinstance(value, str) or len(value) < 4:
        return None
    v = re.sub(r"(\.\d{6})\d+", r"\1", value.strip()).replace("Z", "+00:00")
    try:
        if len(v) == 4:
            return datetime(int(v), 1, 1, tzinfo=UTC)
        if len(v) == 7:
            return datetime(int(v[:4]), int(v[5:7]), 1, tzinfo=UTC)
        dt = datetime.fromisoformat(v)
    except ValueError:
        return None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def e164(raw: str, region: str = "US") -> str | None:
    try:
        num = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(num):
        return None
    return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)


class FhirMapper:
    """Maps FHIR R4 Appointment, Encounter, Patient, Communication, Consent and
    DocumentReference resources to journey events; skips the rest with a reason."""

    name: ClassVar[str] = "fhir"
    accepts: ClassVar[frozenset[str]] = frozenset({"fhir:*"})

    def __init__(self, base_url: str | None = None, *, accepted_confirms: bool = True) -> None:
        self.base_url = base_url.rstrip("/") if base_url else None
        # Whether a booked Appointment whose patient participant is "accepted" counts as the
        # patient's confirmation. Some EHRs set "accepted" by default at booking; for them
        # this must be off, or every booking would cancel its own reminders.
        self.accepted_confirms = accepted_confirms

    # ------------------------------------------------------------------ entry

    def map(self, raw: RawMessage) -> Sequence[MappedEvent]:
        kind = raw.kind.split(":", 1)[1] if ":" in raw.kind else raw.kind
        if kind == "notification":
            raise SkipMessage(
                "subscription notification bookkeeping (status kept, resources stored separately)"
            )
        try:
            doc = json.loads(raw.body)
        except ValueError:
            raise PermanentError(f"{raw.kind}: body is not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("resourceType"), str):
            raise PermanentError(f"{raw.kind}: body is not a FHIR resource")
        rtype = doc["resourceType"]
        if rtype not in MAPPED_TYPES:
            raise SkipMessage(f"no journey events for a {rtype}")
        if (raw.headers or {}).get(VERSION_HEADER, "").startswith("5"):
            doc = r5_to_r4(doc)
        validate(doc)
        base = (raw.headers or {}).get(BASE_HEADER) or self.base_url or "urn:careloop:fhir"
        received = utc(raw.received_at)
        handler = getattr(self, f"_{rtype.lower()}")
        events: list[MappedEvent] = handler(doc, str(base).rstrip("/"), received)
        return events

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _occurred(doc: dict[str, Any], received: datetime, *candidates: Any) -> datetime:
        for c in (*candidates, (doc.get("meta") or {}).get("lastUpdated")):
            dt = parse_instant(c)
            if dt is not None and len(str(c)) > 10:  # a bare date is not a moment
                return dt
        return received

    @staticmethod
    def _subject(doc: dict[str, Any]) -> dict[str, Any]:
        if not doc.get("id"):
            raise PermanentError(f"{doc['resourceType']} has no id; a subject needs a stable server id")
        return doc

    def _patient_ref(self, ref: Any, base: str) -> list[Identifier]:
        """Identifiers of a Reference to a Patient (literal and/or logical)."""
        if not isinstance(ref, dict):
            return []
        out: list[Identifier] = []
        r = ref.get("reference")
        if isinstance(r, str) and not r.startswith("#"):
            parts = r.split("/")
            if "_history" in parts:
                parts = parts[: parts.index("_history")]
            if len(parts) >= 2 and parts[-2] == "Patient":
                system = "/".join(parts[:-1]) if len(parts) > 2 else f"{base}/Patient"
                out.append(Identifier(system=system, value=parts[-1], kind="fhir"))
        ident = ref.get("identifier")
        if isinstance(ident, dict):
            out.extend(self._identifiers([ident]))
        return out

    @staticmethod
    def _identifiers(idents: Iterable[Any]) -> list[Identifier]:
        out: list[Identifier] = []
        for i in idents:
            if not isinstance(i, dict) or not i.get("system") or not i.get("value"):
                continue  # without a system an identifier cannot link people safely
            if (i.get("use") == "old") or ((i.get("period") or {}).get("end")):
                continue
            mr = any(code == "MR" for _, code in _codes(i.get("type")))
            ident = Identifier(system=str(i["system"]), value=str(i["value"]), kind="mrn" if mr else "other")
            if ident not in out:
                out.append(ident)
        return out

    @staticmethod
    def _ref_type(ref: Any) -> str | None:
        r = (ref or {}).get("reference") if isinstance(ref, dict) else None
        if not isinstance(r, str):
            return (ref or {}).get("type") if isinstance(ref, dict) else None
        parts = [p for p in r.split("/") if p]
        if "_history" in parts:
            parts = parts[: parts.index("_history")]
        return parts[-2] if len(parts) >= 2 else None

    def _require_person(self, idents: list[Identifier], rtype: str) -> list[Identifier]:
        if not idents:
            raise SkipMessage(f"{rtype} names no patient; nothing for a journey")
        return idents

    # ------------------------------------------------------------------ Appointment

    def _appointment(self, doc: dict[str, Any], base: str, received: datetime) -> list[MappedEvent]:
        status = doc.get("status")
        patients = [p for p in doc.get("participant") or [] if self._ref_type(p.get("actor")) == "Patient"]
        idents: list[Identifier] = []
        for p in patients:
            idents.extend(i for i in self._patient_ref(p.get("actor"), base) if i not in idents)
        idents = self._require_person(idents, "Appointment")
        subject = self._subject(doc)
        when = self._occurred(doc, received)
        attrs: dict[str, Any] = {
            "status": status,
            "start": doc.get("start"),
            "end": doc.get("end"),
            "source": "fhir",
        }
        if status in ("proposed", "pending", "waitlist"):
            raise SkipMessage(f"Appointment status {status}: not booked yet")
        types: list[str]
        if status == "booked":
            types = ["appointment.rescheduled" if self._rescheduled(doc) else "appointment.booked"]
            # The patient's own participation accepted: the patient confirmed.
            if self.accepted_confirms and any(p.get("status") == "accepted" for p in patients):
                types.append("appointment.confirmed")
        elif status in ("cancelled", "entered-in-error"):
            types = ["appointment.cancelled"]
            reason = _codes(doc.get("cancelationReason"))
            if reason:
                attrs["reason"] = reason[0][1]
        elif status == "noshow":
            types = ["appointment.noshow"]
        elif status == "fulfilled":
            types = ["appointment.fulfilled"]
        elif status in ("arrived", "checked-in"):
            types = ["appointment.updated"]
        else:
            raise SkipMessage(f"Appointment status {status or '(none)'} has no journey meaning")
        return [
            MappedEvent(
                type=t, occurred_at=when, identifiers=list(idents), subject=subject, attributes=dict(attrs)
            )
            for t in types
        ]

    @staticmethod
    def _rescheduled(doc: dict[str, Any]) -> bool:
        # Only what the resource itself says: an R5 cross-version previousAppointment /
        # originatingAppointment extension, or a "rescheduled" tag the EHR sets.
        for ext in doc.get("extension") or []:
            url = str(ext.get("url", ""))
            if url.endswith(("Appointment.previousAppointment", "Appointment.originatingAppointment")):
                return True
        return any(
            code.lower() == "rescheduled" for _, code in _codes((doc.get("meta") or {}).get("tag") or [])
        )

    # ------------------------------------------------------------------ Encounter

    def _encounter(self, doc: dict[str, Any], base: str, received: datetime) -> list[MappedEvent]:
        idents = self._require_person(self._patient_ref(doc.get("subject"), base), "Encounter")
        status = doc.get("status")
        period = doc.get("period") or {}
        attrs: dict[str, Any] = {"status": status, "source": "fhir"}
        cls = _codes(doc.get("class"))
        if cls:
            attrs["class"] = cls[0][1]
        if status == "in-progress":
            etype, when = "encounter.admitted", self._occurred(doc, received, period.get("start"))
        elif status == "finished":
            etype, when = "encounter.discharged", self._occurred(doc, received, period.get("end"))
            disp = (doc.get("hospitalization") or {}).get("dischargeDisposition")
            codes = _codes(disp)
            if codes:
                attrs["discharge_disposition"] = codes[0][1]
                attrs["discharge_disposition_system"] = codes[0][0]
        elif status in ("planned", "arrived", "triaged"):
            etype, when = "encounter.registered", self._occurred(doc, received)
        elif status in ("cancelled", "entered-in-error"):
            etype, when = "encounter.cancelled", self._occurred(doc, received)
        elif status == "onleave":
            etype, when = "encounter.updated", self._occurred(doc, received)
        else:
            raise SkipMessage(f"Encounter status {status or '(none)'} has no journey meaning")
        return [
            MappedEvent(
                type=etype, occurred_at=when, identifiers=idents, subject=self._subject(doc), attributes=attrs
            )
        ]

    # ------------------------------------------------------------------ Patient

    def _patient(self, doc: dict[str, Any], base: str, received: datetime) -> list[MappedEvent]:
        if not doc.get("id"):
            raise PermanentError("Patient has no id")
        self_ref = Identifier(system=f"{base}/Patient", value=str(doc["id"]), kind="fhir")
        idents = [self_ref, *self._identifiers(doc.get("identifier") or [])]
        telecom = []
        for cp in doc.get("telecom") or []:
            if not isinstance(cp, dict) or not cp.get("value") or (cp.get("period") or {}).get("end"):
                continue
            system, value = cp.get("system"), str(cp["value"])
            if system in ("phone", "sms"):
                num = e164(value)
                if num is None:
                    continue
                telecom.append({**cp, "value": num})
                if Identifier("phone", num, "phone") not in idents:
                    idents.append(Identifier("phone", num, "phone"))
            elif system == "email" and "@" in value:
                telecom.append({**cp, "value": value.strip().lower()})
                if Identifier("email", value.strip().lower(), "email") not in idents:
                    idents.append(Identifier("email", value.strip().lower(), "email"))
            else:
                telecom.append(cp)
        patient: dict[str, Any] = {"resourceType": "Patient"}
        for key in (
            "identifier",
            "name",
            "gender",
            "birthDate",
            "address",
            "communication",
            "deceasedBoolean",
            "deceasedDateTime",
            "active",
            "link",
        ):
            if key in doc:
                patient[key] = doc[key]
        if telecom:
            patient["telecom"] = telecom
        when = self._occurred(doc, received)
        attrs = {"source": "fhir", "id": doc["id"]}
        events = []
        merged = self._merge_links(doc, base)
        if merged is not None:
            survivor, old = merged
            if survivor == [self_ref]:
                # this record replaces the old one(s): it is the survivor
                events.append(
                    MappedEvent(
                        type="patient.merged",
                        occurred_at=when,
                        identifiers=idents,
                        patient=patient,
                        attributes=dict(attrs),
                        merge_from=old,
                    )
                )
            else:
                # this record was replaced: the survivor absorbs it; don't update the old person
                return [
                    MappedEvent(
                        type="patient.merged",
                        occurred_at=when,
                        identifiers=survivor,
                        attributes=dict(attrs),
                        merge_from=idents,
                    )
                ]
        else:
            events.append(
                MappedEvent(
                    type="patient.updated",
                    occurred_at=when,
                    identifiers=idents,
                    patient=patient,
                    attributes=dict(attrs),
                )
            )
        if doc.get("deceasedBoolean") is True or doc.get("deceasedDateTime"):
            dt = parse_instant(doc.get("deceasedDateTime")) or when
            events.append(
                MappedEvent(
                    type="patient.deceased",
                    occurred_at=dt,
                    identifiers=idents,
                    patient=patient,
                    attributes=dict(attrs),
                )
            )
        return events

    def _merge_links(
        self, doc: dict[str, Any], base: str
    ) -> tuple[list[Identifier], list[Identifier]] | None:
        replaced_by = [lk for lk in doc.get("link") or [] if lk.get("type") == "replaced-by"]
        replaces = [lk for lk in doc.get("link") or [] if lk.get("type") == "replaces"]
        self_ref = Identifier(system=f"{base}/Patient", value=str(doc["id"]), kind="fhir")
        if replaced_by:
            survivor = self._patient_ref(replaced_by[0].get("other"), base)
            return (survivor, [self_ref]) if survivor else None
        if replaces:
            old = [i for lk in replaces for i in self._patient_ref(lk.get("other"), base)]
            return ([self_ref], old) if old else None
        return None

    # ------------------------------------------------------------------ Communication

    def _communication(self, doc: dict[str, Any], base: str, received: datetime) -> list[MappedEvent]:
        status = doc.get("status")
        if status in ("entered-in-error", "not-done"):
            raise SkipMessage(f"Communication status {status}")
        categories = {code for _, code in _codes(doc.get("category"))}
        subject = self._subject(doc)
        if categories & DISCHARGE_CODES or self._is_discharge_text(doc.get("category")):
            idents = self._require_person(
                self._patient_ref(doc.get("subject"), base)
                or [i for r in doc.get("recipient") or [] for i in self._patient_ref(r, base)],
                "Communication",
            )
            if status == "completed" and doc.get("received"):
                return [
                    MappedEvent(
                        type="discharge_instructions.delivered",
                        occurred_at=self._occurred(doc, received, doc.get("received")),
                        identifiers=idents,
                        subject=subject,
                        attributes={"source": "fhir"},
                    )
                ]
            return [
                MappedEvent(
                    type="discharge_instructions.sent",
                    occurred_at=self._occurred(doc, received, doc.get("sent")),
                    identifiers=idents,
                    subject=subject,
                    attributes={"source": "fhir"},
                )
            ]
        if self._ref_type(doc.get("sender")) == "Patient":
            idents = self._patient_ref(doc.get("sender"), base)
            body = "\n".join(
                p["contentString"]
                for p in doc.get("payload") or []
                if isinstance(p.get("contentString"), str)
            )
            return [
                MappedEvent(
                    type="message.inbound",
                    occurred_at=self._occurred(doc, received, doc.get("sent"), doc.get("received")),
                    identifiers=idents,
                    subject=subject,
                    attributes={"channel": "portal", "body": body, "source": "fhir"},
                )
            ]
        raise SkipMessage("Communication is neither a message from the patient nor discharge instructions")

    @staticmethod
    def _is_discharge_text(concepts: Any) -> bool:
        for c in concepts or []:
            text = str((c or {}).get("text", "")).lower()
            if "discharge" in text and "instruction" in text:
                return True
        return False

    # ------------------------------------------------------------------ DocumentReference

    def _documentreference(self, doc: dict[str, Any], base: str, received: datetime) -> list[MappedEvent]:
        codes = {code for _, code in _codes(doc.get("type"), doc.get("category"))}
        if not (
            codes & DISCHARGE_CODES
            or self._is_discharge_text([doc.get("type"), *(doc.get("category") or [])])
        ):
            raise SkipMessage("DocumentReference is not discharge instructions")
        if doc.get("status") == "entered-in-error":
            raise SkipMessage("DocumentReference status entered-in-error")
        idents = self._require_person(self._patient_ref(doc.get("subject"), base), "DocumentReference")
        return [
            MappedEvent(
                type="discharge_instructions.sent",
                occurred_at=self._occurred(doc, received, doc.get("date")),
                identifiers=idents,
                subject=self._subject(doc),
                attributes={"source": "fhir", "document": "DocumentReference"},
            )
        ]

    # ------------------------------------------------------------------ Consent

    def _consent(self, doc: dict[str, Any], base: str, received: datetime) -> list[MappedEvent]:
        if doc.get("status") in ("draft", "proposed", "entered-in-error"):
            raise SkipMessage(f"Consent status {doc.get('status')}")
        idents = self._require_person(self._patient_ref(doc.get("patient"), base), "Consent")
        policy = {code.upper() for _, code in _codes(doc.get("policyRule"))}
        base_rule = (
            "deny" if policy & {"OPTOUT", "OPTOUTE"} else "permit" if policy & {"OPTIN", "OPTINR"} else None
        )
        when = self._occurred(doc, received, doc.get("dateTime"))
        events: list[MappedEvent] = []
        for prov, rule in self._provisions(doc.get("provision"), base_rule):
            channels = sorted(
                {
                    _CHANNELS[c.lower()]
                    for _, c in _codes(
                        prov.get("action"), prov.get("code"), prov.get("class"), doc.get("category")
                    )
                    if c.lower() in _CHANNELS
                }
            )
            if not channels or rule is None:
                continue
            purposes = sorted(
                {_PURPOSES.get(c.lower(), c.lower()) for _, c in _codes(prov.get("purpose"))}
            ) or ["*"]
            inactive = doc.get("status") in ("inactive", "rejected")
            granted = (rule == "permit") != inactive  # an inactive opt-in no longer permits
            for ch in channels:
                for purpose in purposes:
                    events.append(
                        MappedEvent(
                            type="consent.granted" if granted else "consent.revoked",
                            occurred_at=when,
                            identifiers=list(idents),
                            subject=self._subject(doc),
                            attributes={"channel": ch, "purpose": purpose, "source": "fhir"},
                        )
                    )
        if not events:
            scope = ",".join(code for _, code in _codes(doc.get("scope"))) or "unknown"
            raise SkipMessage(f"Consent (scope {scope}) names no outreach channel; not a contact preference")
        return events

    def _provisions(self, prov: Any, rule: str | None) -> list[tuple[dict[str, Any], str | None]]:
        if not isinstance(prov, dict):
            return []
        own = prov.get("type") or rule
        out: list[tuple[dict[str, Any], str | None]] = [(prov, own)]
        for sub in prov.get("provision") or []:
            out.extend(self._provisions(sub, own))
        return out
