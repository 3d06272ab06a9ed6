"""mapping.fhir: FHIR R4 resources -> journey events (pure; corpus + synthetic cases)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from careloop.errors import PermanentError, SkipMessage
from careloop.model import Identifier, MappedEvent
from careloop.tables import RawMessage
from mapping.fhir import BASE_HEADER, FhirMapper
from tests.conftest import CORPUS, needs_corpus

BASE = "http://ehr.test/fhir"
R4 = CORPUS / "fhir-r4" / "examples"
MAPPED = ("Appointment", "Encounter", "Patient", "Communication", "Consent")
RECEIVED = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)


def raw(doc: dict[str, Any] | bytes, kind: str | None = None) -> RawMessage:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    if kind is None:
        kind = "fhir:" + json.loads(body)["resourceType"]
    return RawMessage(
        id=1,
        connector="ehr",
        kind=kind,
        content_type="application/fhir+json",
        received_at=RECEIVED,
        body=body,
        headers={BASE_HEADER: BASE},
    )


def run(doc: dict[str, Any]) -> list[MappedEvent]:
    return list(FhirMapper().map(raw(doc)))


def patient_ref(pid: str) -> Identifier:
    return Identifier(f"{BASE}/Patient", pid, "fhir")


CORPUS_FILES = sorted(p for p in R4.glob("*.json") if p.name.split("-", 1)[0] in MAPPED)


@needs_corpus
def test_corpus_has_the_examples_we_promise_to_cover() -> None:
    kinds = {p.name.split("-", 1)[0] for p in CORPUS_FILES}
    assert kinds == set(MAPPED)
    assert len(CORPUS_FILES) == 50


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
def test_every_corpus_example_is_mapped_or_skipped_with_a_reason(path: Path) -> None:
    body = path.read_bytes()
    try:
        events = FhirMapper().map(raw(body))
    except SkipMessage as skip:
        assert str(skip).strip(), "a skip must say why"
        return
    assert events
    for ev in events:
        assert ev.identifiers, "every mapped event names its person"
        assert ev.occurred_at.tzinfo is not None
        if ev.subject is not None:
            assert ev.subject_ref == f"{ev.subject['resourceType']}/{json.loads(body)['id']}"


@needs_corpus
def test_corpus_outcomes_per_type() -> None:
    seen: dict[str, set[str]] = {}
    for path in CORPUS_FILES:
        try:
            types = {e.type for e in FhirMapper().map(raw(path.read_bytes()))}
        except SkipMessage:
            types = {"skipped"}
        seen.setdefault(path.name.split("-", 1)[0], set()).update(types)
    assert seen["Appointment"] == {"appointment.booked", "appointment.confirmed", "skipped"}
    assert seen["Encounter"] == {"encounter.admitted", "encounter.discharged"}
    assert "patient.deceased" in seen["Patient"] and "patient.updated" in seen["Patient"]
    # The R4 Consent examples are privacy/sharing consents, not contact preferences.
    assert seen["Consent"] == {"skipped"}


def appointment(status: str, patient_status: str = "needs-action", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Appointment",
        "id": "a1",
        "status": status,
        "start": "2026-03-10T09:00:00Z",
        "end": "2026-03-10T09:30:00Z",
        "meta": {"lastUpdated": "2026-03-02T10:00:00Z"},
        "participant": [
            {"actor": {"reference": "Patient/p1"}, "status": patient_status},
            {"actor": {"reference": "Practitioner/d1"}, "status": "accepted"},
        ],
        **extra,
    }


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("booked", ["appointment.booked"]),
        ("cancelled", ["appointment.cancelled"]),
        ("entered-in-error", ["appointment.cancelled"]),
        ("noshow", ["appointment.noshow"]),
        ("fulfilled", ["appointment.fulfilled"]),
    ],
)
def test_appointment_status_maps_to_event(status: str, expected: list[str]) -> None:
    events = run(appointment(status))
    assert [e.type for e in events] == expected
    assert events[0].subject_ref == "Appointment/a1"
    assert events[0].identifiers == [patient_ref("p1")]
    assert events[0].occurred_at == datetime(2026, 3, 2, 10, tzinfo=UTC)


def test_patient_participant_accepted_is_a_confirmation() -> None:
    assert [e.type for e in run(appointment("booked", "accepted"))] == [
        "appointment.booked",
        "appointment.confirmed",
    ]


def test_rescheduled_only_when_the_resource_says_so() -> None:
    ext = [
        {
            "url": "http://hl7.org/fhir/5.0/StructureDefinition/extension-Appointment.previousAppointment",
            "valueReference": {"reference": "Appointment/a0"},
        }
    ]
    assert [e.type for e in run(appointment("booked", extension=ext))] == ["appointment.rescheduled"]


def test_proposed_appointment_is_skipped_with_reason() -> None:
    with pytest.raises(SkipMessage, match="proposed"):
        run(appointment("proposed"))


def test_unknown_extensions_are_tolerated() -> None:
    doc = appointment("booked", extension=[{"url": "http://vendor.example/x", "valueString": "y"}])
    doc["participant"][0]["extension"] = [{"url": "http://vendor.example/z", "valueBoolean": True}]
    assert run(doc)[0].type == "appointment.booked"


def test_invalid_resource_is_permanent_without_phi() -> None:
    doc = appointment("booked")
    doc["start"] = "Jane Roe 555-0100"
    with pytest.raises(PermanentError) as err:
        run(doc)
    assert "start" in str(err.value) and "Jane" not in str(err.value) and "555" not in str(err.value)


def test_encounter_finished_carries_discharge_disposition() -> None:
    doc = {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "finished",
        "class": {"code": "IMP"},
        "subject": {"reference": "Patient/p1"},
        "period": {"start": "2026-03-01T08:00:00Z", "end": "2026-03-02T11:00:00Z"},
        "hospitalization": {
            "dischargeDisposition": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/discharge-disposition", "code": "home"}
                ]
            }
        },
    }
    (ev,) = run(doc)
    assert ev.type == "encounter.discharged"
    assert ev.attributes["discharge_disposition"] == "home"
    assert ev.occurred_at == datetime(2026, 3, 2, 11, tzinfo=UTC)
    doc["status"] = "in-progress"
    (ev,) = run(doc)
    assert ev.type == "encounter.admitted" and ev.occurred_at == datetime(2026, 3, 1, 8, tzinfo=UTC)


def test_patient_identifiers_telecom_and_language() -> None:
    doc = {
        "resourceType": "Patient",
        "id": "p1",
        "identifier": [
            {
                "type": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]
                },
                "system": "urn:oid:1.2.3",
                "value": "MRN001",
            },
            {"system": "urn:ssn", "value": "999-00-0000"},
            {"value": "no-system"},
        ],
        "telecom": [
            {"system": "phone", "value": "(555) 555-0101", "use": "mobile"},
            {"system": "email", "value": "Test.Person@Example.org"},
        ],
        "communication": [{"language": {"coding": [{"code": "es"}]}}],
        "address": [{"city": "Springfield"}],
    }
    (ev,) = run(doc)
    assert ev.type == "patient.updated"
    assert ev.identifiers == [
        patient_ref("p1"),
        Identifier("urn:oid:1.2.3", "MRN001", "mrn"),
        Identifier("urn:ssn", "999-00-0000", "other"),
        Identifier("phone", "+15555550101", "phone"),
        Identifier("email", "test.person@example.org", "email"),
    ]
    assert ev.patient is not None and ev.patient["telecom"][0]["value"] == "+15555550101"
    assert ev.patient["address"] == [{"city": "Springfield"}]
    assert ev.patient["communication"][0]["language"]["coding"][0]["code"] == "es"


def test_deceased_patient_emits_deceased() -> None:
    types = [
        e.type
        for e in run({"resourceType": "Patient", "id": "p1", "deceasedDateTime": "2026-03-01T10:00:00Z"})
    ]
    assert types == ["patient.updated", "patient.deceased"]


def test_replaced_by_link_merges_into_the_survivor() -> None:
    (ev,) = run(
        {
            "resourceType": "Patient",
            "id": "old",
            "active": False,
            "link": [{"type": "replaced-by", "other": {"reference": "Patient/new"}}],
        }
    )
    assert ev.type == "patient.merged"
    assert ev.identifiers == [patient_ref("new")]
    assert ev.merge_from == [patient_ref("old")]


def test_inbound_patient_message_from_portal() -> None:
    (ev,) = run(
        {
            "resourceType": "Communication",
            "id": "c1",
            "status": "completed",
            "sender": {"reference": "Patient/p1"},
            "sent": "2026-03-02T09:00:00Z",
            "payload": [{"contentString": "Can I move my visit?"}],
        }
    )
    assert ev.type == "message.inbound"
    assert ev.attributes["channel"] == "portal" and ev.attributes["body"] == "Can I move my visit?"
    assert ev.identifiers == [patient_ref("p1")]


@pytest.mark.parametrize(
    ("received", "expected"),
    [(None, "discharge_instructions.sent"), ("2026-03-02T12:00:00Z", "discharge_instructions.delivered")],
)
def test_discharge_instructions_communication(received: str | None, expected: str) -> None:
    doc: dict[str, Any] = {
        "resourceType": "Communication",
        "id": "c2",
        "status": "completed",
        "category": [{"coding": [{"system": "http://loinc.org", "code": "8653-8"}]}],
        "subject": {"reference": "Patient/p1"},
        "sent": "2026-03-02T11:00:00Z",
    }
    if received:
        doc["received"] = received
    (ev,) = run(doc)
    assert ev.type == expected


def test_discharge_instructions_document_reference() -> None:
    (ev,) = run(
        {
            "resourceType": "DocumentReference",
            "id": "d1",
            "status": "current",
            "type": {"coding": [{"system": "http://loinc.org", "code": "8653-8"}]},
            "subject": {"reference": "Patient/p1"},
            "content": [{"attachment": {"url": "Binary/1"}}],
        }
    )
    assert ev.type == "discharge_instructions.sent" and ev.subject_ref == "DocumentReference/d1"


def test_consent_opt_out_per_channel_and_purpose() -> None:
    doc = {
        "resourceType": "Consent",
        "id": "k1",
        "status": "active",
        "scope": {"coding": [{"code": "patient-privacy"}]},
        "category": [{"coding": [{"code": "comms"}]}],
        "patient": {"reference": "Patient/p1"},
        "dateTime": "2026-03-02T09:00:00Z",
        "policyRule": {"coding": [{"code": "OPTOUT"}]},
        "provision": {
            "type": "deny",
            "action": [{"coding": [{"code": "sms"}]}],
            "purpose": [{"code": "HMARKT"}],
            "provision": [{"type": "permit", "action": [{"coding": [{"code": "email"}]}]}],
        },
    }
    events = run(doc)
    assert [(e.type, e.attributes["channel"], e.attributes["purpose"]) for e in events] == [
        ("consent.revoked", "sms", "marketing"),
        ("consent.granted", "email", "*"),
    ]


def test_notification_bookkeeping_is_skipped_with_reason() -> None:
    with pytest.raises(SkipMessage, match="notification"):
        FhirMapper().map(raw(b"", kind="fhir:notification"))


def test_unmapped_type_is_skipped() -> None:
    with pytest.raises(SkipMessage, match="Observation"):
        run({"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"}})


def test_patient_accepted_confirms_unless_the_connector_says_it_is_a_default() -> None:
    import json as _json
    from datetime import UTC as _UTC
    from datetime import datetime as _dt

    from careloop.tables import RawMessage as _Raw
    from mapping.fhir import FhirMapper as _Mapper

    appt = {
        "resourceType": "Appointment",
        "id": "a-acc",
        "status": "booked",
        "start": "2026-03-12T15:00:00Z",
        "participant": [{"actor": {"reference": "Patient/p-acc"}, "status": "accepted"}],
    }
    raw = _Raw(
        id=1,
        connector="ehr",
        kind="fhir:Appointment",
        content_type="application/fhir+json",
        received_at=_dt(2026, 3, 2, tzinfo=_UTC),
        body=_json.dumps(appt).encode(),
        headers={},
    )
    assert [e.type for e in _Mapper().map(raw)] == ["appointment.booked", "appointment.confirmed"]
    assert [e.type for e in _Mapper(accepted_confirms=False).map(raw)] == ["appointment.booked"]
