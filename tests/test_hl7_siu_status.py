"""SIU events follow SCH-25 (filler status, table 0278) when it says the appointment has
ended: an S14 whose SCH-25 is Cancelled is a cancellation, as an S15 is. Public corpus
messages (the HL7 examples' invented people) with only MSH-9 or SCH-25 edited, in memory,
and synthetic messages from tests.hl7_support."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from careloop.clock import VirtualClock
from careloop.config import AppConfig
from careloop.hub import Hub
from careloop.model import MappedEvent
from careloop.store import Store
from careloop.tables import OutboxItem, RawMessage, Timer
from mapping.hl7v2 import HL7v2Mapper
from tests.conftest import CORPUS, needs_corpus
from tests.hl7_support import siu

MS = CORPUS / "hl7v2" / "microsoft-fhir-converter"


def corpus(name: str, *, trigger: str | None = None, sch25: str | None = None) -> bytes:
    """A corpus message with CR segment ends (no BOM), MSH-9 and SCH-25 optionally set."""
    text = (MS / f"{name}.hl7").read_bytes().removeprefix(b"\xef\xbb\xbf").decode()
    lines = text.replace("\r\n", "\n").replace("\r", "\n").strip("\n").split("\n")
    out = []
    for line in lines:
        fields = line.split("|")
        if fields[0] == "MSH" and trigger is not None:
            fields[8] = f"SIU^{trigger}^SIU_{trigger}"  # MSH-9 (MSH-1 is the separator itself)
        if fields[0] == "SCH" and sch25 is not None:
            fields[25] = sch25
        out.append("|".join(fields))
    return ("\r".join(out) + "\r").encode()


def map_one(body: bytes) -> MappedEvent:
    raw = RawMessage(
        connector="siu", kind="hl7v2:x", content_type="x", body=body, headers={"timezone": "UTC"}
    )
    [ev] = HL7v2Mapper().map(raw)
    return ev


def status(ev: MappedEvent) -> str:
    assert ev.subject is not None
    return str(ev.subject["status"])


# --------------------------------------------------------------------------- corpus


@needs_corpus
def test_corpus_sch_25_values_are_as_these_tests_assume() -> None:
    """What the corpus has: no S14 with a terminal SCH-25, so the tests below make one."""
    seen = {}
    for path in sorted(MS.glob("SIU-S1[2-7]-0*.hl7")) + sorted(MS.glob("SIU-S26-0*.hl7")):
        sch = next(line for line in path.read_text().splitlines() if line.startswith("SCH|"))
        seen[path.stem] = sch.split("|")[25]
    assert seen["SIU-S14-01"] == seen["SIU-S14-02"] == "Booked"
    assert seen["SIU-S15-01"] == "Cancelled" and seen["SIU-S17-01"] == "Deleted"
    assert seen["SIU-S26-01"] == "Noshow" and seen["SIU-S16-01"] == "Dc"


@needs_corpus
def test_an_s14_that_says_cancelled_is_the_same_cancellation_as_the_s15() -> None:
    s15 = map_one(corpus("SIU-S15-01"))
    s14 = map_one(corpus("SIU-S14-01", sch25="Cancelled"))
    assert s15.type == s14.type == "appointment.cancelled"
    assert status(s15) == status(s14) == "cancelled"
    assert s14.attributes["appointment_status"] == s15.attributes["appointment_status"] == "cancelled"
    assert s14.attributes["message_type"] == "SIU^S14"  # explain still shows what came in
    assert s14.subject is not None and s15.subject is not None
    assert s14.subject["id"] == s15.subject["id"]
    assert s14.subject["cancelationReason"] == s15.subject["cancelationReason"]  # SCH-6


@needs_corpus
def test_an_s14_as_the_corpus_sends_it_stays_an_update() -> None:
    ev = map_one(corpus("SIU-S14-01"))
    assert (ev.type, status(ev)) == ("appointment.updated", "booked")


@needs_corpus
@pytest.mark.parametrize(
    ("source", "sch25", "event_type", "appt_status"),
    [
        ("SIU-S17-01", "Deleted", "appointment.cancelled", "entered-in-error"),
        ("SIU-S16-01", "Dc", "appointment.cancelled", "cancelled"),
        ("SIU-S26-01", "Noshow", "appointment.noshow", "noshow"),
    ],
)
def test_an_s14_carrying_the_corpus_terminal_status_maps_to_that_triggers_event(
    source: str, sch25: str, event_type: str, appt_status: str
) -> None:
    own = map_one(corpus(source))
    as_s14 = map_one(corpus(source, trigger="S14"))
    assert own.type == as_s14.type == event_type
    # Appointment.status is SCH-25's (V2-to-FHIR ConceptMap), whichever trigger carries it;
    # the orchestrator reads entered-in-error as cancelled, as it does for a FHIR Appointment.
    assert status(own) == status(as_s14) == appt_status


# --------------------------------------------------------------------------- forms


@pytest.mark.parametrize(
    ("sch25", "event_type", "appt_status"),
    [
        ("Cancelled", "appointment.cancelled", "cancelled"),
        ("CANCELLED", "appointment.cancelled", "cancelled"),
        ("cancelled", "appointment.cancelled", "cancelled"),
        ("Cancelled^Cancelled^HL70278", "appointment.cancelled", "cancelled"),
        ("^Cancelled", "appointment.cancelled", "cancelled"),  # text only
        ("CX^Cancelled^L", "appointment.cancelled", "cancelled"),  # local code, table text
        ("^Canceled", "appointment.cancelled", "cancelled"),  # US spelling
        ("CX^Appt gone^L^Cancelled^Cancelled^HL70278", "appointment.cancelled", "cancelled"),  # alternate
        ("Dc", "appointment.cancelled", "cancelled"),
        ("Deleted", "appointment.cancelled", "entered-in-error"),
        ("^deleted", "appointment.cancelled", "entered-in-error"),
        ("Noshow", "appointment.noshow", "noshow"),
        ("^No Show", "appointment.noshow", "noshow"),
        ("Complete", "appointment.fulfilled", "fulfilled"),
        ("^complete", "appointment.fulfilled", "fulfilled"),
        ("Booked", "appointment.updated", "booked"),
        ("^Booked", "appointment.updated", "booked"),
        ("Started", "appointment.updated", "checked-in"),
        ("^started", "appointment.updated", "checked-in"),  # text only, not terminal
        ("Pending", "appointment.updated", "pending"),
        ("Overbook", "appointment.updated", "booked"),
        ("XYZ^Whatever^L", "appointment.updated", "booked"),
        ("", "appointment.updated", "booked"),
    ],
)
def test_s14_event_follows_sch_25_code_or_text_in_any_case(
    sch25: str, event_type: str, appt_status: str
) -> None:
    ev = map_one(siu("S14", status=sch25))
    assert (ev.type, status(ev), ev.attributes["appointment_status"]) == (
        event_type,
        appt_status,
        appt_status,
    )


@pytest.mark.parametrize(
    ("trigger", "sch25", "event_type", "appt_status"),
    [
        # A booking or rescheduling notice for an appointment the filler already reports
        # ended is that ending: appointment.booked would start the reminders.
        ("S12", "Cancelled", "appointment.cancelled", "cancelled"),
        ("S12", "^Noshow", "appointment.noshow", "noshow"),
        ("S12", "Complete", "appointment.fulfilled", "fulfilled"),
        ("S12", "Booked", "appointment.booked", "booked"),
        ("S13", "Cancelled", "appointment.cancelled", "cancelled"),
        ("S13", "Booked", "appointment.rescheduled", "booked"),
        # The ending triggers are explicit; a stale SCH-25 does not change them.
        ("S15", "Booked", "appointment.cancelled", "cancelled"),
        ("S15", "Noshow", "appointment.cancelled", "cancelled"),
        ("S17", "Complete", "appointment.cancelled", "cancelled"),
        # SCH-25 that ends it the same way gives the status: Deleted is entered-in-error.
        ("S17", "Deleted", "appointment.cancelled", "entered-in-error"),
        ("S15", "^deleted", "appointment.cancelled", "entered-in-error"),
        ("S15", "Dc", "appointment.cancelled", "cancelled"),
        ("S17", "", "appointment.cancelled", "cancelled"),
        ("S26", "^No Show", "appointment.noshow", "noshow"),
        ("S26", "Cancelled", "appointment.noshow", "noshow"),
    ],
)
def test_other_triggers_with_sch_25(trigger: str, sch25: str, event_type: str, appt_status: str) -> None:
    ev = map_one(siu(trigger, status=sch25))
    assert (ev.type, status(ev)) == (event_type, appt_status)


# --------------------------------------------------------------------------- end to end

# Before the corpus appointment (TQ1-7 2021-09-24 09:30 +02:15), after its S12 was sent.
NOW = datetime(2021, 9, 15, 12, 0, tzinfo=UTC)

CONFIG: dict[str, Any] = {
    "site": {"timezone": "UTC", "quiet_hours": "00:00-24:00", "channels": ["out"]},
    "connectors": {"siu": {"plugin": "hl7v2_mllp", "port": 2599}},
    "channels": {"out": {"plugin": "capture"}},
    "templates": {
        "appointment-reminder": {"phi_class": "none", "text": {"en": "Visit {{ appointment.start }}"}}
    },
    "playbooks": {
        "appointment-reminders": {
            "on": ["appointment.booked", "appointment.rescheduled"],
            "cancel_on": ["appointment.confirmed", "appointment.cancelled", "appointment.noshow"],
            "steps": [
                {"send": "appointment-reminder", "at": "appointment.start - 72h"},
                {"send": "appointment-reminder", "at": "appointment.start - 24h"},
            ],
        }
    },
}


def _ingest(engine: Engine, hubs: list[Hub], *bodies: bytes) -> list[tuple[str, str | None]]:
    hub = Hub(AppConfig.model_validate(CONFIG), store=Store(engine, VirtualClock(NOW)), capture=True)
    hubs.append(hub)
    conn = hub.connectors["siu"]
    for body in bodies:  # one drain each: the order the sender sent them in
        hub.sink.put_sync(conn.accept(body, {}))
        asyncio.run(hub.drain())
    with Session(engine) as s:
        assert not s.exec(select(OutboxItem)).all()  # nothing due before 2021-09-21
        timers = s.exec(select(Timer).order_by(col(Timer.id))).all()
        return [(t.status, t.status_reason) for t in timers]


@needs_corpus
def test_a_cancelling_s14_over_the_pipeline_cancels_the_reminder_timer(
    engine: Engine, hubs: list[Hub]
) -> None:
    timers = _ingest(engine, hubs, corpus("SIU-S12-01"), corpus("SIU-S14-01", sch25="Cancelled"))
    assert timers == [("cancelled", "appointment-cancelled")]


@needs_corpus
def test_a_modifying_s14_over_the_pipeline_leaves_the_reminder_timer(engine: Engine, hubs: list[Hub]) -> None:
    timers = _ingest(engine, hubs, corpus("SIU-S12-01"), corpus("SIU-S14-01"))
    assert timers == [("pending", None)]


@needs_corpus
def test_an_s12_that_says_cancelled_schedules_no_reminder(engine: Engine, hubs: list[Hub]) -> None:
    assert _ingest(engine, hubs, corpus("SIU-S12-01", sch25="Cancelled")) == []
