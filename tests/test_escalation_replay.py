"""Two-way conversations through replay (issue 9): replies confirm, cancel and opt out;
red flags escalate with a safety reply; unacknowledged escalations re-escalate."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from careloop import config as cfgmod
from careloop.replay import Replayer, build_report, read_feed
from careloop.tables import AuditRecord, Consent, Escalation, OutboxItem, Timer
from channels.fhir_writeback import build_task
from orchestrator import escalation
from tests.conftest import FIXTURES
from tests.escalation_plugins import register

register()
CONFIG = FIXTURES / "config" / "escalation-test.yaml"
APPT = {
    "id": "a1",
    "start": "2026-03-10T15:00:00+00:00",
    "end": "2026-03-10T15:30:00+00:00",
    "participant": [{"actor": {"reference": "Patient/p1"}, "status": "needs-action"}],
}
WHO = {"mrn": "MRN001", "phone": "+15555550101"}


ENGINE: Engine | None = None


@pytest.fixture(autouse=True)
def _engine(engine: Engine) -> None:
    """Every replay here runs on the test's engine: SQLite, and PostgreSQL when configured."""
    global ENGINE
    ENGINE = engine


def line(at: str, **body: Any) -> str:
    return json.dumps({"at": at, "connector": "feed", "body": {"at": at, **WHO, **body}})


def booked(at: str = "2026-03-01T14:00:00+00:00") -> str:
    return line(at, id="b1", type="appointment.booked", appointment=APPT, fhir_patient="p-1")


def reply(at: str, mid: str, body: str) -> str:
    """An SMS reply as Twilio posts it (form fields), through the real connector and mapper."""
    fields = {"From": WHO["phone"], "To": "+15550109999", "Body": body, "MessageSid": f"SM{mid:0>32}"}
    return json.dumps({"at": at, "connector": "sms", "body": fields})


class Run:
    def __init__(self, tmp_path: Path, lines: list[str]) -> None:
        feed = tmp_path / "feed.jsonl"
        feed.write_text("\n".join(lines) + "\n")
        self.lines = read_feed(feed)
        self.rp = Replayer(cfgmod.load(CONFIG), start=self.lines[0].at, engine=ENGINE)

    def all(self) -> dict[str, Any]:
        asyncio.run(self.rp.feed(self.lines))
        return build_report(self.rp.store)

    def outbox(self, **where: Any) -> list[OutboxItem]:
        with Session(self.rp.store.engine) as s:
            q = select(OutboxItem).order_by(col(OutboxItem.id))
            for k, v in where.items():
                q = q.where(getattr(OutboxItem, k) == v)
            return list(s.exec(q).all())

    def escalations(self) -> list[Escalation]:
        with Session(self.rp.store.engine) as s:
            return list(s.exec(select(Escalation).order_by(col(Escalation.id))).all())

    def close(self) -> None:
        self.rp.close()


def test_c_reply_confirms_and_triggers_appointment_prep(tmp_path: Path) -> None:
    run = Run(tmp_path, [booked(), reply("2026-03-08T16:00:00+00:00", "r1", "C")])
    try:
        rep = run.all()
        sms = [d["template"] for d in rep["deliveries"] if d["channel"] == "sms"]
        assert sms == ["appointment-reminder", "appointment-prep"]
        assert rep["escalations"] == []
        assert ("appointment-reminder", "appointment-confirmed") in {
            (s["template"], s["reason"]) for s in rep["suppressed"]
        }
        # Written back to the EHR as a Task for staff, in the fhir_writeback channel's contract.
        [wb] = run.outbox(channel="ehr-writeback")
        assert (wb.template, wb.subject_ref, wb.recipient) == (
            "writeback-task",
            "Appointment/a1",
            "Patient/p-1",
        )
        task = build_task(wb)
        assert task["code"]["coding"][0]["code"] == "appointment-confirmed"
        assert task["focus"] == {"reference": "Appointment/a1"} and task["for"] == {
            "reference": "Patient/p-1"
        }
    finally:
        run.close()


def test_free_text_yes_confirms_like_c(tmp_path: Path) -> None:
    run = Run(tmp_path, [booked(), reply("2026-03-08T16:00:00+00:00", "r1", "Yes I'll be there 👍")])
    try:
        rep = run.all()
        assert [d["template"] for d in rep["deliveries"] if d["channel"] == "sms"] == [
            "appointment-reminder",
            "appointment-prep",
        ]
        assert "appointment.confirmed" in [e["type"] for e in rep["events"]]
    finally:
        run.close()


def test_cancel_reply_cancels_appointment_stops_reminders_and_writes_back(tmp_path: Path) -> None:
    run = Run(
        tmp_path, [booked(), reply("2026-03-02T16:00:00+00:00", "r1", "I need to cancel, something came up")]
    )
    try:
        rep = run.all()
        assert rep["deliveries"] == [d for d in rep["deliveries"] if d["channel"] == "ehr-writeback"]
        assert "appointment.cancelled" in [e["type"] for e in rep["events"]]
        [wb] = run.outbox(channel="ehr-writeback")
        assert build_task(wb)["code"]["coding"][0]["code"] == "appointment-declined"
        assert rep["escalations"] == []
    finally:
        run.close()


def test_chest_pain_escalates_emergency_sends_safety_reply_and_pauses_reminders(tmp_path: Path) -> None:
    # 02:00 in New York: quiet hours must not hold the safety reply back.
    run = Run(
        tmp_path, [booked(), reply("2026-03-05T07:00:00+00:00", "r1", "No, I have chest pain right now")]
    )
    try:
        rep = run.all()
        assert [(e["severity"], e["reason"]) for e in rep["escalations"]] == [
            ("emergency", "red-flag-emergency")
        ]
        safety = [d for d in rep["deliveries"] if d["template"] == "safety-reply"]
        assert [(d["channel"], d["at"]) for d in safety] == [("sms", "2026-03-05T07:00:00+00:00")]
        [item] = run.outbox(template="safety-reply")
        assert "911" in item.content["text"]
        assert not [d for d in rep["deliveries"] if d["template"] == "appointment-reminder"]
        paused = [s for s in rep["suppressed"] if s["template"] == "appointment-reminder"]
        assert {s["reason"] for s in paused} == {"escalation-open"} and len(paused) == 2
        [esc] = run.escalations()
        assert esc.rule == "em.chest-pain" and esc.evidence["message"] == "No, I have chest pain right now"
        assert esc.evidence["safety_reply"] == "sent"
        # Routed at once: a FHIR Task (stat) for the EHR and an email to the nurse line.
        [task] = [o for o in run.outbox(channel="ehr-writeback") if o.template == "escalation-task"]
        fhir_task = build_task(task)
        assert (fhir_task["priority"], fhir_task["for"]) == ("stat", {"reference": "Patient/p-1"})
        assert {"system": "urn:careloop:escalation", "value": str(esc.id)} in fhir_task["identifier"]
        emails = run.outbox(channel="email")
        assert emails[0].recipient == "nurse-line@example.test"
        assert "chest" not in json.dumps(emails[0].content).lower()  # the notice carries no message text
    finally:
        run.close()


def test_spanish_red_flag_gets_spanish_safety_reply(tmp_path: Path) -> None:
    run = Run(
        tmp_path,
        [booked(), reply("2026-03-05T15:00:00+00:00", "r1", "tengo dolor de pecho y me falta el aire")],
    )
    try:
        run.all()
        [item] = run.outbox(template="safety-reply")
        assert item.content["text"].startswith("Si es una emergencia")
    finally:
        run.close()


def test_negated_chest_pain_is_not_an_emergency(tmp_path: Path) -> None:
    run = Run(tmp_path, [booked(), reply("2026-03-05T15:00:00+00:00", "r1", "no chest pain, feeling great")])
    try:
        rep = run.all()
        assert rep["escalations"] == []
        assert not run.outbox(template="safety-reply")
        assert [d["template"] for d in rep["deliveries"]].count("appointment-reminder") == 2
    finally:
        run.close()


def test_stop_is_an_opt_out_not_an_escalation(tmp_path: Path) -> None:
    # The Twilio mapper turns STOP into consent.revoked (then the message itself).
    run = Run(tmp_path, [booked(), reply("2026-03-02T16:00:00+00:00", "r1", "STOP")])
    try:
        rep = run.all()
        assert rep["escalations"] == []
        assert rep["deliveries"] == []
        assert {s["reason"] for s in rep["suppressed"] if s["template"] == "appointment-reminder"} == {
            "opted-out"
        }
        assert not run.outbox(template="help-reply")
    finally:
        run.close()


def test_plain_language_opt_out_revokes_consent(tmp_path: Path) -> None:
    run = Run(tmp_path, [booked(), reply("2026-03-02T16:00:00+00:00", "r1", "please stop texting me")])
    try:
        rep = run.all()
        assert rep["escalations"] == []
        assert "consent.revoked" in [e["type"] for e in rep["events"]]
        with Session(run.rp.store.engine) as s:
            assert [(c.channel, c.status) for c in s.exec(select(Consent)).all()] == [("sms", "opt_out")]
        assert not [d for d in rep["deliveries"] if d["template"] == "appointment-reminder"]
    finally:
        run.close()


def test_help_gets_help_reply_even_in_quiet_hours(tmp_path: Path) -> None:
    run = Run(tmp_path, [booked(), reply("2026-03-03T04:00:00+00:00", "r1", "HELP")])
    try:
        rep = run.all()
        helps = [d for d in rep["deliveries"] if d["template"] == "help-reply"]
        assert [(d["at"], d["channel"]) for d in helps] == [("2026-03-03T04:00:00+00:00", "sms")]
        assert rep["escalations"] == []
    finally:
        run.close()


def test_unacknowledged_escalation_reescalates_after_sla(tmp_path: Path) -> None:
    run = Run(tmp_path, [booked(), reply("2026-03-05T15:00:00+00:00", "r1", "fever of 103 since last night")])
    try:
        run.all()
        [esc] = run.escalations()
        assert esc.severity == "urgent" and esc.status == "open"
        assert esc.level == 2  # 2 h SLA, nobody acknowledged: level 1 at 17:00, level 2 at 19:00
        hooks = run.outbox(channel="team-hook")
        assert [(h.content["json"]["level"], h.created_at.isoformat()[:16]) for h in hooks] == [
            (1, "2026-03-05T17:00"),
            (2, "2026-03-05T19:00"),
        ]
        with Session(run.rp.store.engine) as s:
            actions = [
                a.action
                for a in s.exec(
                    select(AuditRecord)
                    .where(col(AuditRecord.action).startswith("escalation."))
                    .order_by(col(AuditRecord.seq))
                ).all()
            ]
        assert actions.count("escalation.reescalate") == 2 and actions[-1] == "escalation.sla_breach"
    finally:
        run.close()


def test_acknowledged_escalation_does_not_reescalate(tmp_path: Path) -> None:
    run = Run(tmp_path, [booked(), reply("2026-03-05T15:00:00+00:00", "r1", "fever of 103 since last night")])
    rp = run.rp

    async def go() -> None:
        for ln in run.lines:
            await rp.advance(ln.at)
            await rp.signal(ln)
        await rp.advance(datetime.fromisoformat("2026-03-05T16:00:00+00:00"))
        with rp.store.session() as s:
            [esc] = escalation.list_escalations(s, status=["open"])
            assert esc.id is not None
            escalation.acknowledge(s, esc.id, actor="staff:nurse1", now=rp.clock.now())
        await rp.advance(datetime.fromisoformat("2026-03-06T16:00:00+00:00"))

    try:
        asyncio.run(go())
        [esc] = run.escalations()
        assert (esc.status, esc.level, esc.acknowledged_by) == ("acknowledged", 0, "staff:nurse1")
        assert run.outbox(channel="team-hook") == []
        with Session(rp.store.engine) as s:
            timers = s.exec(select(Timer).where(Timer.playbook == escalation.PSEUDO_PLAYBOOK)).all()
            assert [(t.status, t.status_reason) for t in timers] == [("cancelled", "acknowledged")]
    finally:
        run.close()


def test_resolving_escalation_resumes_outreach(tmp_path: Path) -> None:
    run = Run(tmp_path, [booked(), reply("2026-03-05T15:00:00+00:00", "r1", "need a refill on my meds")])
    rp = run.rp

    async def go() -> None:
        for ln in run.lines:
            await rp.advance(ln.at)
            await rp.signal(ln)
        await rp.advance(datetime.fromisoformat("2026-03-06T12:00:00+00:00"))
        with rp.store.session() as s:
            [esc] = escalation.list_escalations(s, status=["open"])
            assert esc.severity == "routine" and esc.id is not None
            escalation.resolve(s, esc.id, actor="staff:nurse1", now=rp.clock.now(), feedback="needed")
        await rp.advance(datetime.fromisoformat("2026-03-12T00:00:00+00:00"))

    try:
        asyncio.run(go())
        rep = build_report(rp.store)
        sent = [d["at"][:10] for d in rep["deliveries"] if d["template"] == "appointment-reminder"]
        assert sent == ["2026-03-07", "2026-03-09"]
    finally:
        run.close()


def test_burst_of_unanswered_questions_escalates_as_frustration(tmp_path: Path) -> None:
    run = Run(
        tmp_path,
        [
            booked(),
            reply("2026-03-02T16:00:00+00:00", "r1", "is there parking at the clinic?"),
            reply("2026-03-02T16:03:00+00:00", "r2", "hello?"),
            reply("2026-03-02T16:05:00+00:00", "r3", "anyone there"),
        ],
    )
    try:
        rep = run.all()
        # One work item per person: the first question opened it, the rest joined it; the
        # third message in five minutes, after unanswered questions, reads as frustration.
        assert [e["reason"] for e in rep["escalations"]] == ["question-request"]
        [esc] = run.escalations()
        assert [f["reason"] for f in esc.evidence["followups"]] == ["question-request", "frustration"]
        with Session(run.rp.store.engine) as s:
            from careloop.tables import Decision

            tri = [
                d.detail
                for d in s.exec(
                    select(Decision).where(Decision.action == "triage").order_by(col(Decision.id))
                ).all()
            ]
        assert "pattern.burst" in tri[-1]["patterns"] and "pattern.unanswered-question" in tri[-1]["patterns"]
    finally:
        run.close()


def test_red_flag_while_routine_item_open_raises_it_to_emergency(tmp_path: Path) -> None:
    run = Run(
        tmp_path,
        [
            booked(),
            reply("2026-03-05T15:00:00+00:00", "r1", "need a refill on my meds"),
            reply("2026-03-05T18:00:00+00:00", "r2", "now my chest feels tight and heavy"),
        ],
    )
    try:
        rep = run.all()
        assert [(e["severity"], e["reason"]) for e in rep["escalations"]] == [
            ("emergency", "red-flag-emergency")
        ]
        safety = [d["at"] for d in rep["deliveries"] if d["template"] == "safety-reply"]
        assert safety == ["2026-03-05T18:00:00+00:00"]  # the open item does not hold the safety reply
        tasks = [o for o in run.outbox(channel="ehr-writeback") if o.template == "escalation-task"]
        assert [build_task(t)["priority"] for t in tasks] == ["routine", "stat"]
    finally:
        run.close()


def _config_with(tmp_path: Path, **triage: Any) -> Path:
    from careloop.config import load_raw

    raw = load_raw(CONFIG)
    raw["triage"] = {**raw["triage"], **triage}
    out = tmp_path / "escalation-variant.json"  # JSON is YAML: load() reads it
    out.write_text(json.dumps(raw))
    return out


def test_concern_below_threshold_then_silence_escalates(tmp_path: Path) -> None:
    cfg = _config_with(
        tmp_path,
        severity={"emergency": "emergency", "urgent": "urgent", "routine": None},
        silence_after_concern="24h",
    )
    feed = tmp_path / "feed.jsonl"
    feed.write_text(
        "\n".join([booked(), reply("2026-03-03T15:00:00+00:00", "r1", "bit of a rash on my arm")])
    )
    lines = read_feed(feed)
    rp = Replayer(cfgmod.load(cfg), start=lines[0].at, engine=ENGINE)
    try:
        asyncio.run(rp.feed(lines))
        rep = build_report(rp.store)
        assert [(e["at"], e["severity"], e["reason"]) for e in rep["escalations"]] == [
            ("2026-03-04T15:00:00+00:00", "routine", "silence-after-concern")
        ]
    finally:
        rp.close()


def test_concern_then_another_message_is_not_silence(tmp_path: Path) -> None:
    cfg = _config_with(
        tmp_path, severity={"emergency": "emergency", "urgent": "urgent", "routine": None}, intent_severity={}
    )
    feed = tmp_path / "feed.jsonl"
    feed.write_text(
        "\n".join(
            [
                booked(),
                reply("2026-03-03T15:00:00+00:00", "r1", "bit of a rash on my arm"),
                reply("2026-03-03T18:00:00+00:00", "r2", "thanks, all good now"),
            ]
        )
    )
    lines = read_feed(feed)
    rp = Replayer(cfgmod.load(cfg), start=lines[0].at, engine=ENGINE)
    try:
        asyncio.run(rp.feed(lines))
        assert build_report(rp.store)["escalations"] == []
    finally:
        rp.close()


def test_message_that_cannot_be_triaged_goes_to_a_person(tmp_path: Path) -> None:
    from orchestrator.triage import TriageConfig

    run = Run(tmp_path, [booked(), reply("2026-03-05T15:00:00+00:00", "r1", "I have chest pain")])
    # The lexicon file vanished after start-up: triage raises, the message must still reach staff.
    run.rp.hub.orchestrator._triage_cfg = TriageConfig(lexicon=str(tmp_path / "gone.yaml"))
    try:
        rep = run.all()
        assert [(e["severity"], e["reason"]) for e in rep["escalations"]] == [("urgent", "triage-failed")]
        [esc] = run.escalations()
        assert esc.evidence["message"] == "I have chest pain" and esc.evidence["error"] == "ValueError"
        assert [e["status"] for e in rep["events"] if e["type"] == "message.inbound"] == ["processed"]
    finally:
        run.close()


def test_stop_with_a_red_flag_still_escalates_but_respects_the_opt_out(tmp_path: Path) -> None:
    run = Run(tmp_path, [booked(), reply("2026-03-05T15:00:00+00:00", "r1", "STOP I can't breathe")])
    try:
        rep = run.all()
        assert [(e["severity"], e["reason"]) for e in rep["escalations"]] == [
            ("emergency", "red-flag-emergency")
        ]
        [esc] = run.escalations()
        # SMS consent is revoked first (carrier rules), so the safety reply cannot go by SMS;
        # the person reaches staff through the escalation instead.
        assert esc.evidence["safety_reply"] == "opted-out"
        assert not run.outbox(template="safety-reply")
    finally:
        run.close()


def test_bare_cancel_is_a_carrier_opt_out_not_an_appointment_cancellation(tmp_path: Path) -> None:
    run = Run(tmp_path, [booked(), reply("2026-03-02T16:00:00+00:00", "r1", "CANCEL")])
    try:
        rep = run.all()
        types = [e["type"] for e in rep["events"]]
        assert "consent.revoked" in types and "appointment.cancelled" not in types
        assert rep["escalations"] == [] and run.outbox(channel="ehr-writeback") == []
    finally:
        run.close()
