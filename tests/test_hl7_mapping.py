"""HL7 v2 -> journey events and FHIR R4 resources (validated with fhir.resources R4B)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.appointment import Appointment
from fhir.resources.R4B.encounter import Encounter
from fhir.resources.R4B.patient import Patient

from careloop.errors import PermanentError, SkipMessage
from careloop.model import Identifier, MappedEvent, RawIn
from careloop.tables import RawMessage
from connectors.hl7v2_mllp import MLLPConfig, MLLPConnector
from mapping.hl7v2 import HL7v2Mapper
from tests.conftest import CORPUS
from tests.hl7_support import HL7_FIXTURES, adt, msa, msh, seg, siu

MODELS: dict[str, Any] = {"Patient": Patient, "Appointment": Appointment, "Encounter": Encounter}


def raw_of(body: bytes, tz: str | None = "America/New_York") -> RawMessage:
    return RawMessage(
        connector="adt",
        kind="hl7v2:x",
        content_type="x-application/hl7-v2+er7",
        body=body,
        headers={"timezone": tz} if tz else {},
    )


def validate(ev: MappedEvent) -> None:
    for res in (ev.patient, ev.subject):
        if res is not None:
            MODELS[res["resourceType"]].model_validate(res)


def map_one(body: bytes, tz: str | None = "America/New_York") -> MappedEvent:
    [ev] = HL7v2Mapper().map(raw_of(body, tz))
    validate(ev)
    return ev


@pytest.mark.parametrize(
    ("trigger", "event_type", "status"),
    [
        ("A01", "encounter.admitted", "in-progress"),
        ("A02", "encounter.transferred", "in-progress"),
        ("A03", "encounter.discharged", "finished"),
        ("A04", "encounter.registered", "arrived"),
        ("A05", "encounter.registered", "planned"),
        ("A11", "encounter.cancelled", "cancelled"),
        ("A13", "encounter.admitted", "in-progress"),
    ],
)
def test_adt_triggers_map_to_encounter_events(trigger: str, event_type: str, status: str) -> None:
    ev = map_one(adt(trigger, pv1={36: "01^Home^HL70112", 45: "20260304113000-0500", 6: "3E^301^A^NWH"}))
    assert ev.type == event_type
    assert ev.subject is not None and ev.subject["resourceType"] == "Encounter"
    assert ev.subject["status"] == status
    assert ev.attributes["trigger"] == trigger and ev.attributes["control_id"] == "C1"
    if trigger == "A03":
        assert ev.subject["period"] == {
            "start": "2026-03-02T08:10:00-05:00",
            "end": "2026-03-04T11:30:00-05:00",
        }
        coding = ev.subject["hospitalization"]["dischargeDisposition"]["coding"][0]
        assert coding["code"] == "01" and coding["system"].endswith("v2-0112")
    if trigger == "A02":
        assert [loc["status"] for loc in ev.subject["location"]] == ["active", "completed"]
    if trigger == "A13":
        assert ev.attributes["discharge_cancelled"] is True
    if trigger == "A05":
        assert ev.attributes["pre_admit"] is True


@pytest.mark.parametrize("trigger", ["A08", "A28", "A31"])
def test_patient_update_triggers_map_to_patient_updated(trigger: str) -> None:
    ev = map_one(adt(trigger))
    assert ev.type == "patient.updated"
    assert ev.patient is not None and ev.patient["name"][0]["family"] == "Examplar"
    assert (ev.subject is not None) is (trigger == "A08")


def test_encounter_id_is_deterministic_from_the_visit_number() -> None:
    a01, a03 = map_one(adt("A01", "X1")), map_one(adt("A03", "X2"))
    other = map_one(adt("A01", "X3", pv1={19: "V9002^^^NWH^VN"}))
    assert a01.subject and a03.subject and other.subject
    assert a01.subject["id"] == a03.subject["id"] != other.subject["id"]
    assert a01.subject_ref == f"Encounter/{a01.subject['id']}"
    assert a01.subject["class"]["code"] == "IMP"
    assert a01.subject["identifier"][0]["value"] == "V9001"


def test_encounter_without_visit_number_falls_back_to_the_control_id() -> None:
    a = map_one(adt("A01", "Y1", pv1={19: ""}))
    b = map_one(adt("A01", "Y2", pv1={19: ""}))
    assert a.subject and b.subject and a.subject["id"] != b.subject["id"]


def test_pid_maps_identifiers_contacts_language_and_address() -> None:
    ev = map_one(adt("A01"))
    assert Identifier("NWH", "NW200001", "mrn") in ev.identifiers
    assert Identifier("phone", "+15555550111", "phone") in ev.identifiers
    assert Identifier("email", "dora.examplar@example.org", "email") in ev.identifiers
    p = ev.patient
    assert p is not None
    assert p["birthDate"] == "1990-01-01" and p["gender"] == "female"
    assert p["name"][0] == {"family": "Examplar", "given": ["Dora", "Q"]}
    assert p["communication"][0]["language"]["coding"][0]["code"] == "es"
    assert p["address"][0]["city"] == "Springfield" and p["address"][0]["use"] == "home"
    assert {"system": "phone", "value": "+15555550111", "use": "home"} in p["telecom"]
    assert p["identifier"][0]["type"]["coding"][0]["code"] == "MR"


def test_identifier_without_authority_falls_back_to_the_sending_facility() -> None:
    pid = seg("PID", {1: "1", 3: "LOCAL77", 5: "Nobody^Nemo"})
    ev = map_one(adt("A01", pid=pid))
    assert ev.identifiers == [Identifier("urn:careloop:hl7:NORTHWIND", "LOCAL77", "mrn")]


def test_social_security_numbers_are_not_used_as_identifiers() -> None:
    pid = seg("PID", {1: "1", 3: "NW1^^^NWH^MR~123-45-6789^^^USSSA^SS", 5: "Nobody^Nemo"})
    ev = map_one(adt("A01", pid=pid))
    assert [i.value for i in ev.identifiers] == ["NW1"]


def test_death_indicator_and_date_map_to_deceased() -> None:
    dead = seg("PID", {1: "1", 3: "NW3^^^NWH^MR", 29: "202603011200", 30: "Y"})
    ev = map_one(adt("A08", pid=dead))
    assert ev.patient is not None and ev.patient["deceasedDateTime"] == "2026-03-01T12:00:00-05:00"
    flag = seg("PID", {1: "1", 3: "NW3^^^NWH^MR", 30: "Y"})
    ev2 = map_one(adt("A08", pid=flag))
    assert ev2.patient is not None and ev2.patient["deceasedBoolean"] is True


def test_a40_merge_lists_the_merged_away_identifiers() -> None:
    mrg = seg("MRG", {1: "NW-OLD-1^^^NWH^MR~NW-OLD-2^^^NWH^MR"})
    ev = map_one(adt("A40", extra=[mrg]))
    assert ev.type == "patient.merged"
    assert ev.merge_from == [Identifier("NWH", "NW-OLD-1"), Identifier("NWH", "NW-OLD-2")]
    assert Identifier("NWH", "NW200001") in ev.identifiers


def test_timestamps_without_offset_use_the_site_time_zone_and_utc_by_default() -> None:
    body = adt("A01", evn_ts="20260302081500", pv1={44: "20260302081000"})
    ev = map_one(body)
    assert ev.occurred_at.isoformat() == "2026-03-02T08:15:00-05:00"
    assert ev.subject is not None and ev.subject["period"]["start"] == "2026-03-02T08:10:00-05:00"
    assert map_one(body, tz=None).occurred_at.isoformat() == "2026-03-02T08:15:00+00:00"
    summer = map_one(adt("A01", evn_ts="20260702081500"))
    assert summer.occurred_at.utcoffset() is not None and summer.occurred_at.isoformat().endswith("-04:00")


def test_occurred_at_prefers_evn_6_then_evn_2_then_msh_7() -> None:
    body = adt("A01").replace(
        b"EVN|A01|20260302081500-0500", b"EVN|A01|20260302081500-0500||||20260302070000-0500"
    )
    assert map_one(body).occurred_at == datetime.fromisoformat("2026-03-02T07:00:00-05:00")
    no_evn = b"\r".join(s for s in adt("A01").split(b"\r") if not s.startswith(b"EVN"))
    assert map_one(no_evn).occurred_at == datetime.fromisoformat("2026-03-02T09:05:00-05:00")


@pytest.mark.parametrize(
    ("trigger", "event_type", "status"),
    [
        ("S12", "appointment.booked", "booked"),
        ("S13", "appointment.rescheduled", "booked"),
        ("S14", "appointment.updated", "booked"),
        ("S15", "appointment.cancelled", "cancelled"),
        ("S16", "appointment.cancelled", "cancelled"),
        ("S17", "appointment.cancelled", "cancelled"),
        ("S26", "appointment.noshow", "noshow"),
    ],
)
def test_siu_triggers_map_to_appointment_events(trigger: str, event_type: str, status: str) -> None:
    ev = map_one(siu(trigger))
    assert ev.type == event_type
    appt = ev.subject
    assert appt is not None and appt["status"] == status
    assert appt["start"] == "2026-03-12T10:30:00-04:00" and appt["end"] == "2026-03-12T11:00:00-04:00"
    assert {i["type"]["coding"][0]["code"] for i in appt["identifier"]} == {"PLAC", "FILL"}
    assert ev.attributes["appointment_status"] == status
    if status == "cancelled":
        assert appt["cancelationReason"]["coding"][0]["code"] == "PATCANCEL"


def test_appointment_id_is_stable_across_the_appointment_lifecycle() -> None:
    ids = {map_one(siu(t, f"S-{t}")).subject["id"] for t in ("S12", "S13", "S15", "S26")}  # type: ignore[index]
    assert len(ids) == 1
    (only,) = ids
    assert len(only) == 32 and only.isalnum()


@pytest.mark.parametrize(
    ("sch25", "status"),
    [
        ("Pending", "pending"),
        ("Waitlist", "waitlist"),
        ("Started", "checked-in"),  # V2-to-FHIR ConceptMap table-hl70278-to-appointmentstatus
        ("Complete", "fulfilled"),
        ("Noshow", "noshow"),
        ("Deleted", "entered-in-error"),
        ("Overbook", "booked"),
        ("", "booked"),
    ],
)
def test_sch_25_filler_status_maps_per_the_v2_to_fhir_table(sch25: str, status: str) -> None:
    assert map_one(siu("S14", status=sch25)).subject["status"] == status  # type: ignore[index]


def test_start_and_end_fall_back_from_tq1_to_sch_11_to_ais() -> None:
    sch11 = map_one(siu("S12", tq1=False, sch11="^^30^202603131000^202603131030"))
    assert sch11.subject and sch11.subject["start"] == "2026-03-13T10:00:00-04:00"
    ais = map_one(siu("S12", tq1=False, sch11="", ais_start="202603141000"))
    assert ais.subject and ais.subject["start"] == "2026-03-14T10:00:00-04:00"
    assert ais.subject["end"] == "2026-03-14T10:45:00-04:00"  # AIS-7 45 min


def test_appointment_participants_and_types() -> None:
    appt = map_one(siu("S12")).subject
    assert appt is not None
    actors = [p["actor"].get("type") for p in appt["participant"]]
    assert actors == ["Patient", "Location", "Practitioner"]
    assert appt["participant"][0]["actor"]["identifier"] == {"system": "NWH", "value": "NW200001"}
    assert appt["serviceType"][0]["coding"][0]["code"] == "99213"
    assert appt["appointmentType"]["coding"][0]["code"] == "ROUTINE"
    assert appt["minutesDuration"] == 30


@pytest.mark.parametrize("mtype", ["ORU^R01", "ORM^O01", "ADT^A60", "MDM^T02"])
def test_unmapped_message_types_are_skipped_with_a_reason(mtype: str) -> None:
    body = (msh(mtype, "U1") + "\rPID|1||X^^^NWH\r").encode()
    with pytest.raises(SkipMessage, match=rf"message type {mtype.replace('^', '[.^]')} is not mapped"):
        HL7v2Mapper().map(raw_of(body))


def test_siu_without_sch_is_a_permanent_error() -> None:
    with pytest.raises(PermanentError):
        HL7v2Mapper().map(raw_of((msh("SIU^S12", "N1") + "\rPID|1\r").encode()))


def test_undecodable_stored_message_is_a_permanent_error_without_phi() -> None:
    body = (msh("ADT^A01", "B1", charset="ASCII") + "\rPID|1||X||Jos\xe9").encode("latin-1") + b"\r"
    with pytest.raises(PermanentError) as err:
        HL7v2Mapper().map(raw_of(body))
    assert "Jos" not in str(err.value)


def test_demo_fixtures_map_with_new_york_offsets() -> None:
    c = MLLPConnector("adt", MLLPConfig(plugin="hl7v2_mllp", timezone="America/New_York"))
    seen: dict[str, list[MappedEvent]] = {}
    for name in ("siu_s12_booked", "siu_s15_cancelled", "adt_a01_admit", "adt_a03_discharge"):
        for raw_in in c.accept((HL7_FIXTURES / f"{name}.hl7").read_bytes(), {}):
            ev = map_one(raw_in.body)
            seen.setdefault(name, []).append(ev)
    assert [e.type for e in seen["siu_s12_booked"]] == ["appointment.booked"] * 2
    booked_b = seen["siu_s12_booked"][1].subject
    cancelled = seen["siu_s15_cancelled"][0].subject
    assert booked_b and cancelled and booked_b["id"] == cancelled["id"] and cancelled["status"] == "cancelled"
    assert seen["adt_a03_discharge"][0].subject["status"] == "finished"  # type: ignore[index]
    mrns = {next(i.value for i in evs[0].identifiers if i.kind == "mrn") for evs in seen.values()}
    assert mrns == {"NW100001", "NW100002", "NW100003"}


def _corpus_files() -> list[Path]:
    root = CORPUS / "hl7v2"
    return sorted(root.rglob("*.hl7")) if root.is_dir() else []


@pytest.mark.skipif(not _corpus_files(), reason="the shared corpus is not present")
@pytest.mark.parametrize("path", _corpus_files(), ids=lambda p: p.name)
def test_corpus_message_is_accepted_and_mapped_or_skipped(path: Path) -> None:
    data = path.read_bytes()  # read-only: normalised in memory only
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r")
    connector = MLLPConnector("adt", MLLPConfig(plugin="hl7v2_mllp"))
    raws: list[RawIn] = connector.accept(data, {})
    assert raws
    for raw in raws:
        # Accepted: AA in original mode, CA in enhanced mode (or no reply if MSH-15 says NE).
        assert raw.reply is None or msa(raw.reply)[0] in {"AA", "CA"}
        stored = RawMessage(
            connector=raw.connector,
            kind=raw.kind,
            content_type=raw.content_type,
            body=raw.body,
            headers=dict(raw.headers),
        )
        try:
            events = HL7v2Mapper().map(stored)
        except SkipMessage as skip:
            assert "is not mapped" in str(skip)
            continue
        assert events
        for ev in events:
            validate(ev)
            assert ev.occurred_at.tzinfo is not None
            assert any(i.kind == "mrn" for i in ev.identifiers)
