"""Test helpers for the audit trail: a seeded synthetic log and a capture of all log output."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from careloop import audit_log
from careloop.store import Store
from careloop.tables import JourneyEvent, OutboxItem, Person, RawMessage

SYNTHETIC_NAME = "Zelda Quintrell"  # invented; must never reach an export
SYNTHETIC_PHONE = "+15555550123"


@dataclass
class Seeded:
    alice: int  # the patient the tests ask about
    bob: int  # someone else
    merged: int  # a duplicate record of alice, merged into her
    about_alice: set[int] = field(default_factory=set)  # every seq about alice
    disclosures_alice: set[int] = field(default_factory=set)
    total: int = 0


def seed(store: Store, start: datetime) -> Seeded:
    """~30 records across many transactions: receive, map, person.create, decisions,
    disclosures (alice, her merged duplicate, bob), a dead letter, an auth failure."""
    t = start
    with store.session() as s:
        a = Person(
            created_at=t,
            patient={
                "resourceType": "Patient",
                "name": [{"text": SYNTHETIC_NAME}],
                "telecom": [{"system": "phone", "value": SYNTHETIC_PHONE}],
            },
        )
        b = Person(created_at=t)
        s.add(a)
        s.add(b)
        s.flush()
        assert a.id and b.id
        m = Person(created_at=t, merged_into=a.id)
        s.add(m)
        s.flush()
        assert m.id
        ids = (a.id, b.id, m.id)
    sd = Seeded(*ids)

    def rec(person: int | None, about_alice: bool, disclosure: bool = False, **kw: object) -> None:
        nonlocal t
        t += timedelta(minutes=7)
        with store.session() as s:
            r = audit_log.append(s, at=t, person_id=person, **kw)  # type: ignore[arg-type]
            seq = r.seq
        if about_alice:
            sd.about_alice.add(seq)
            if disclosure:
                sd.disclosures_alice.add(seq)
        sd.total = seq

    for who, about in ((sd.alice, True), (sd.bob, False), (sd.merged, True)):
        with store.session() as s:
            raw = RawMessage(
                connector="adt",
                kind="hl7v2:SIU^S12",
                content_type="x-application/hl7-v2+er7",
                dedup_key=f"adt|CTL{who}",
                received_at=t,
                body=b"MSH|^~\\&|synthetic",
                status="mapped",
            )
            s.add(raw)
            s.flush()
            ev = JourneyEvent(
                event_key=f"raw:{raw.id}:0",
                person_id=who,
                type="appointment.booked",
                occurred_at=t,
                recorded_at=t,
                raw_message_id=raw.id,
                status="processed",
            )
            s.add(ev)
            s.flush()
            ob = OutboxItem(
                key=f"k{who}",
                person_id=who,
                channel="sms",
                template="appointment-reminder",
                purpose="appointment-reminder",
                phi_class="none",
                recipient=SYNTHETIC_PHONE,
                created_at=t,
            )
            s.add(ob)
            s.flush()
            raw_id, ev_id, ob_id = raw.id, ev.id, ob.id
        rec(
            None,
            about,
            actor="connector:adt",
            action="message.receive",
            entity=f"raw_message/{raw_id}",
            detail={"kind": "hl7v2:SIU^S12", "control_id": f"CTL{who}", "bytes": 17},
        )
        rec(
            None,
            about,
            actor="mapper:hl7v2",
            action="message.map",
            entity=f"raw_message/{raw_id}",
            detail={"events": ["appointment.booked"], "event_ids": [ev_id]},
        )
        rec(who, about, actor="identity", action="person.create", detail={"identifiers": 2})
        rec(
            who,
            about,
            actor="orchestrator",
            action="decision.send",
            entity=f"journey_event/{ev_id}",
            detail={"playbook": "appointment-reminders", "template": "appointment-reminder", "reason": "due"},
        )
        rec(
            who,
            about,
            True,
            actor="channel:sms",
            action="disclosure",
            entity=f"outbox/{ob_id}",
            purpose="appointment-reminder",
            detail={
                "channel": "sms",
                "recipient_kind": "patient",
                "purpose": "appointment-reminder",
                "phi_class": "none",
                "outcome": "sent",
            },
        )
        rec(
            who,
            about,
            True,
            actor="channel:email",
            action="disclosure",
            entity=f"outbox/{ob_id}",
            purpose="discount-offer",
            detail={
                "channel": "email",
                "recipient_kind": "caregiver",
                "purpose": "discount-offer",
                "phi_class": "limited",
                "outcome": "sent",
            },
        )
    rec(
        None,
        False,
        actor="map",
        action="item.dead_letter",
        outcome="failure",
        entity="raw_message/999",
        detail={"error": "PermanentError: unmapped"},
    )
    rec(None, False, actor="api", action="auth.failure", outcome="denied", detail={"reason": "missing"})
    rec(sd.bob, False, actor="orchestrator", action="decision.suppress", detail={"reason": "quiet-hours"})
    return sd


class CapturedLogs(logging.Handler):
    """Every log record emitted anywhere, formatted with its arguments and tracebacks."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))  # includes exc_info and stack_info text

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def assert_free_of(self, *needles: str) -> None:
        """Fail naming which needle (not the log line, which would itself leak it) appeared."""
        for i, n in enumerate(needles):
            assert n not in self.text, f"PHI needle #{i} appeared in log output"


@contextmanager
def capture_all_logs() -> Iterator[CapturedLogs]:
    """Capture all log output at DEBUG, from every logger (propagating or not) and from
    ``warnings``; use it around a whole pipeline run, then ``assert_free_of(name, phone)``."""
    handler = CapturedLogs()
    root = logging.getLogger()
    loggers = [root] + [
        lg
        for lg in logging.Logger.manager.loggerDict.values()
        if isinstance(lg, logging.Logger) and not lg.propagate
    ]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
    root.setLevel(logging.DEBUG)
    logging.captureWarnings(True)
    try:
        yield handler
    finally:
        logging.captureWarnings(False)
        for lg, level in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
