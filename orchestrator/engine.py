"""The orchestrate stage: journey events and due timers -> decisions, timers, outbox rows.

One transaction per batch; each event or timer in its own savepoint so a failure is
dead-lettered alone. Every decision (sent, deferred, suppressed, cancelled, escalated)
is a ``decision`` row with a reason code and an audit record, written together.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from jinja2 import TemplateError
from sqlalchemy import func
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from careloop import audit_log
from careloop.clock import utc
from careloop.config import AppConfig
from careloop.errors import TransientError
from careloop.pipeline import dead_letter
from careloop.store import Store
from careloop.tables import (
    Consent,
    Decision,
    Escalation,
    JourneyEvent,
    JourneyStateRow,
    OutboxItem,
    Person,
    PersonIdentifier,
    Resource,
    Timer,
)
from orchestrator import escalation, gate, playbooks, templates, timezones, triage
from orchestrator.playbooks import (
    Action,
    CancelRun,
    Ctx,
    Escalate,
    PlaybookConfig,
    Schedule,
    Send,
    Suppress,
)
from orchestrator.state import JourneyState, Outreach, apply, record_outreach
from orchestrator.templates import TemplateConfig
from orchestrator.timeexpr import parse_duration

OPEN_ESCALATION = ("open", "acknowledged")
log = logging.getLogger("careloop.orchestrator")
SILENCE_KIND = "triage-silence"  # issue 9: a concern that did not escalate, then silence
LIVE_OUTBOX = ("pending", "sending", "sent", "delivered", "captured", "queued", "unknown")


@dataclass
class Origin:
    event_id: int | None = None
    timer_id: int | None = None

    def tag(self) -> str:
        return f"e{self.event_id}" if self.event_id is not None else f"t{self.timer_id}"


class Orchestrator:
    """The stage. ``channels`` describes the configured channels for the gate."""

    name = "orchestrate"

    def __init__(
        self,
        store: Store,
        config: AppConfig,
        playbooks: dict[str, PlaybookConfig],
        templates: dict[str, TemplateConfig],
        channels: dict[str, gate.ChannelFacts],
        batch: int = 200,
    ) -> None:
        self.store, self.config, self.batch = store, config, batch
        self.playbooks, self.templates, self.channels = playbooks, templates, channels
        self.quiet = gate.parse_quiet_hours(config.site.quiet_hours)
        self.caps = {k: gate.Cap(v.per_day, v.per_week) for k, v in config.compliance.frequency_caps.items()}

    # ------------------------------------------------------------------ stage loop

    async def run_once(self) -> int:
        return await asyncio.to_thread(self.run_once_sync)

    def run_once_sync(self) -> int:
        n = self._batch(self._claim_events, self.handle_event)
        return n + self._batch(self._claim_timers, self.handle_timer)

    def _batch(self, claim: Any, handle: Any) -> int:
        with self.store.session() as s:
            items = claim(s)
            for item in items:
                try:
                    with s.begin_nested():
                        handle(s, item)
                except (OperationalError, TransientError):
                    raise
                except Exception as exc:  # one bad item never stops the pipeline
                    dead_letter(s, "orchestrate", item, exc, self.store.clock.now())
            return len(items)

    def _claim_events(self, s: Session) -> list[JourneyEvent]:
        return list(s.exec(
            select(JourneyEvent).where(JourneyEvent.status == "pending").order_by(col(JourneyEvent.id))
            .limit(self.batch).with_for_update(skip_locked=True)
        ).all())

    def _claim_timers(self, s: Session) -> list[Timer]:
        now = self.store.clock.now()
        return list(s.exec(
            select(Timer).where(Timer.status == "pending", col(Timer.due_at) <= now)
            .order_by(col(Timer.due_at), col(Timer.id)).limit(self.batch).with_for_update(skip_locked=True)
        ).all())

    # ------------------------------------------------------------------ events

    def handle_event(self, s: Session, ev: JourneyEvent) -> None:
        now = self.store.clock.now()
        assert ev.person_id is not None and ev.id is not None
        person = s.get(Person, ev.person_id)
        assert person is not None
        srow, state = self._state(s, person, now)
        subject = None
        if ev.subject_ref and (res := s.get(Resource, ev.subject_ref)) is not None:
            subject = res.body
        occurred = utc(ev.occurred_at)
        state = apply(state, ev.type, occurred, ev.subject_ref, subject, ev.attributes)
        state.deceased = state.deceased or person.deceased
        if person.timezone is None or ev.type in ("patient.updated", "patient.merged"):
            person.timezone = timezones.resolve(person.patient, self._addresses(s, person.id or 0).get("phone", []),
                                                self.config.site.timezone)
        origin = Origin(event_id=ev.id)
        actions: list[Action] = []
        if ev.type in ("consent.revoked", "consent.granted"):
            self._consent(s, person, ev, now)
        if ev.type == "message.inbound" and ev.attributes.get("keyword") == "confirm":
            self._derive_confirmation(s, ev, state, now)
        # ---- issue 9: triage of inbound messages (orchestrator/triage.py, escalation.py) ----
        if ev.type == "message.inbound":
            self._triage(s, person, state, ev, origin, now)
        # ---- end issue 9 ----
        ctx = Ctx(state, now, ev.subject_ref, ev.type, occurred, dict(ev.attributes))
        actions.extend(self._satisfied_waits(s, person.id or 0, ev, ctx))
        for pid, pb in self.playbooks.items():
            actions.extend(playbooks.on_event(pid, pb, ctx))
        self._execute(s, person, state, actions, origin, now)
        self._save(srow, state, now)
        ev.status = "processed"
        audit_log.append(s, at=now, actor="orchestrator", action="event.process", person_id=person.id,
                         entity=f"journey_event/{ev.id}", detail={"type": ev.type, "actions": len(actions)})

    def _derive_confirmation(self, s: Session, ev: JourneyEvent, state: JourneyState, now: datetime) -> None:
        """A "C" reply confirms the person's next upcoming appointment: recorded as an
        event of its own so the journey log says what happened and why."""
        nxt = state.next_appointment(now)
        if nxt is None:
            return
        s.add(JourneyEvent(
            event_key=f"derived:{ev.id}:confirm", person_id=ev.person_id, type="appointment.confirmed",
            occurred_at=ev.occurred_at, recorded_at=now, subject_ref=nxt[0],
            attributes={"source": "reply", "reply_event": ev.id}, raw_message_id=ev.raw_message_id,
        ))

    def _satisfied_waits(self, s: Session, person_id: int, ev: JourneyEvent, ctx: Ctx) -> list[Action]:
        out: list[Action] = []
        waits = s.exec(select(Timer).where(Timer.person_id == person_id, Timer.status == "pending")).all()
        for t in waits:
            if t.payload.get("kind") != "wait" or t.payload.get("wait_for") != ev.type:
                continue
            if not _same_subject(t.subject_ref, ev, ctx.state):
                continue
            pb = self.playbooks.get(t.playbook)
            t.status, t.status_reason = "fired", "wait-satisfied"
            if pb is not None:
                out.extend(playbooks.on_wait_satisfied(t.playbook, pb, t.step, replace(ctx, subject_ref=t.subject_ref)))
        return out

    def _consent(self, s: Session, person: Person, ev: JourneyEvent, now: datetime) -> None:
        channel = str(ev.attributes.get("channel", "*"))
        purpose = str(ev.attributes.get("purpose", "*"))
        status = "opt_out" if ev.type == "consent.revoked" else "opt_in"
        row = s.exec(select(Consent).where(Consent.person_id == person.id, Consent.channel == channel,
                                           Consent.purpose == purpose)).first()
        if row is None:
            assert person.id is not None
            s.add(Consent(person_id=person.id, channel=channel, purpose=purpose, status=status, at=now,
                          source=str(ev.attributes.get("source", ev.type))))
        else:
            row.status, row.at = status, now
        audit_log.append(s, at=now, actor="orchestrator", action=f"consent.{status}", person_id=person.id,
                         purpose=purpose, detail={"channel": channel})
        if status == "opt_out":
            # STOP takes effect at once: nothing still queued for that channel goes out.
            q = select(OutboxItem).where(OutboxItem.person_id == person.id, OutboxItem.status == "pending")
            for item in s.exec(q).all():
                if channel in ("*", item.channel) and purpose in ("*", item.purpose):
                    self._cancel_outbox(s, item, "opted-out", now)

    # ------------------------------------------------------------------ timers

    def handle_timer(self, s: Session, t: Timer) -> None:
        now = self.store.clock.now()
        t.status = "fired"
        person = s.get(Person, t.person_id)
        assert person is not None and t.id is not None
        srow, state = self._state(s, person, now)
        state.deceased = state.deceased or person.deceased
        ctx = Ctx(state, now, t.subject_ref)
        origin = Origin(timer_id=t.id)
        pb = self.playbooks.get(t.playbook)
        kind = t.payload.get("kind", "step")
        if kind in (escalation.SLA_KIND, SILENCE_KIND):  # issue 9: escalation queue timers
            self._triage_timer(s, person, state, t, now)
            self._save(srow, state, now)
            return
        actions: list[Action]
        if pb is None:
            actions = [Suppress(t.playbook, t.playbook_version, t.step, t.payload.get("template"),
                                "playbook-removed", t.subject_ref)]
        elif kind == "wait":
            actions = playbooks.on_wait_timeout(t.playbook, pb, t.step, ctx)
        elif kind == "deferred":
            actions = self._deferred(t, pb, ctx)
        else:
            actions = playbooks.on_step_timer(t.playbook, pb, t.step, utc(t.due_at), ctx)
        self._execute(s, person, state, actions, origin, now)
        self._save(srow, state, now)

    def _deferred(self, t: Timer, pb: PlaybookConfig, ctx: Ctx) -> list[Action]:
        """A send held back by quiet hours: check the journey again, then gate again."""
        template = str(t.payload["template"])
        recheck = playbooks.on_step_timer(t.playbook, pb, t.step, utc(t.due_at), ctx)
        refusals = [a for a in recheck if isinstance(a, Suppress) and a.step == t.step]
        if refusals:
            return refusals[:1]
        not_after = t.payload.get("not_after")
        return [Send(t.playbook, t.playbook_version, t.step, template, t.payload.get("channels"), t.subject_ref,
                     utc(datetime.fromisoformat(not_after)) if not_after else None, pb.purpose, pb.shadow)]

    # ------------------------------------------------------------------ actions

    def _execute(self, s: Session, person: Person, state: JourneyState, actions: list[Action],
                 origin: Origin, now: datetime) -> None:
        for a in actions:
            if isinstance(a, Send):
                self._send(s, person, state, a, origin, now)
            elif isinstance(a, Schedule):
                assert person.id is not None
                payload = {"kind": a.kind, **a.payload}
                s.add(Timer(person_id=person.id, due_at=a.due_at, playbook=a.playbook, playbook_version=a.version,
                            step=a.step, subject_ref=a.subject_ref, created_by_event=origin.event_id,
                            payload=payload))
                self._decide(s, person, origin, now, a.playbook, a.version, "schedule", "scheduled",
                             template=a.payload.get("template"), detail={"due_at": a.due_at.isoformat(),
                                                                          "kind": a.kind, "step": a.step})
            elif isinstance(a, Suppress):
                self._decide(s, person, origin, now, a.playbook, a.version, "suppress", a.reason,
                             template=a.template, detail={"step": a.step, "subject": a.subject_ref})
            elif isinstance(a, CancelRun):
                self._cancel_run(s, person, a, origin, now)
            elif isinstance(a, Escalate):
                self._escalate(s, person, state, a, origin, now)

    def _cancel_run(self, s: Session, person: Person, a: CancelRun, origin: Origin, now: datetime) -> None:
        q = select(Timer).where(Timer.person_id == person.id, Timer.playbook == a.playbook,
                                Timer.status == "pending")
        for t in s.exec(q).all():
            if a.subject_ref is not None and t.subject_ref != a.subject_ref:
                continue
            t.status, t.status_reason = "cancelled", a.reason
            self._decide(s, person, origin, now, a.playbook, t.playbook_version, "cancel", a.reason,
                         template=t.payload.get("template"), detail={"timer": t.id, "due_at": utc(t.due_at).isoformat()})
        q2 = select(OutboxItem).where(OutboxItem.person_id == person.id, OutboxItem.playbook == a.playbook,
                                      OutboxItem.status == "pending")
        for item in s.exec(q2).all():
            if a.subject_ref is None or item.subject_ref == a.subject_ref:
                self._cancel_outbox(s, item, a.reason, now)

    def _cancel_outbox(self, s: Session, item: OutboxItem, reason: str, now: datetime) -> None:
        item.status, item.last_error = "cancelled", reason
        s.add(Decision(person_id=item.person_id, decided_at=now, playbook=item.playbook or "-", action="cancel",
                       template=item.template, channel=item.channel, reason=reason, detail={"outbox": item.id}))
        audit_log.append(s, at=now, actor="orchestrator", action="outbox.cancel", person_id=item.person_id,
                         entity=f"outbox/{item.id}", detail={"reason": reason})

    def _escalate(self, s: Session, person: Person, state: JourneyState, a: Escalate, origin: Origin,
                  now: datetime) -> None:
        assert person.id is not None
        esc = Escalation(person_id=person.id, created_at=now, severity=a.severity, reason=a.reason,
                         evidence={"playbook": a.playbook, "subject": a.subject_ref, "origin": origin.tag()})
        s.add(esc)
        s.flush()
        state.open_escalations += 1
        self._decide(s, person, origin, now, a.playbook, a.version, "escalate", a.reason,
                     detail={"severity": a.severity, "escalation": esc.id})
        audit_log.append(s, at=now, actor="orchestrator", action="escalation.open", person_id=person.id,
                         entity=f"escalation/{esc.id}", detail={"severity": a.severity, "reason": a.reason})

    def _send(self, s: Session, person: Person, state: JourneyState, a: Send, origin: Origin,
              now: datetime) -> None:
        assert person.id is not None
        tpl = self.templates[a.template]
        order = a.channels or self.config.site.channels
        facts = [self.channels[c] for c in order if c in self.channels]
        pfacts = self._person_facts(s, person, state)
        day, week = self._recent_counts(s, person.id, now)
        verdict = gate.evaluate(gate.GateInput(
            now=now, person=pfacts, template_kinds=frozenset(tpl.kinds()), phi_class=tpl.phi_class,
            purpose=tpl.purpose or a.purpose, channels=facts, sent_day=day, sent_week=week, caps=self.caps,
            quiet_hours=self.quiet, not_after=a.not_after,
        ))
        detail: dict[str, Any] = {"step": a.step, "subject": a.subject_ref,
                                  "passed_over": [list(t) for t in verdict.tried]}
        if a.shadow:
            detail["would"] = verdict.outcome
            self._decide(s, person, origin, now, a.playbook, a.version, "shadow", f"shadow-{verdict.reason}",
                         template=a.template, channel=verdict.channel, detail=detail)
            return
        if verdict.outcome == "suppress":
            self._decide(s, person, origin, now, a.playbook, a.version, "suppress", verdict.reason,
                         template=a.template, channel=verdict.channel, detail=detail)
            return
        if verdict.outcome == "defer":
            assert verdict.deliver_at is not None
            s.add(Timer(person_id=person.id, due_at=verdict.deliver_at, playbook=a.playbook,
                        playbook_version=a.version, step=a.step, subject_ref=a.subject_ref,
                        created_by_event=origin.event_id,
                        payload={"kind": "deferred", "template": a.template, "channels": [verdict.channel],
                                 "not_after": a.not_after.isoformat() if a.not_after else None}))
            detail["deliver_at"] = verdict.deliver_at.isoformat()
            self._decide(s, person, origin, now, a.playbook, a.version, "defer", verdict.reason,
                         template=a.template, channel=verdict.channel, detail=detail)
            return
        assert verdict.channel is not None and verdict.recipient is not None
        ch = self.channels[verdict.channel]
        try:
            content = templates.render(tpl, ch.template_kind, person.language,
                                       self._context(person, state, a, pfacts.timezone))
        except TemplateError as exc:
            detail["error"] = type(exc).__name__
            self._decide(s, person, origin, now, a.playbook, a.version, "suppress", "template-error",
                         template=a.template, channel=verdict.channel, detail=detail)
            return
        assert content is not None
        dec = self._decide(s, person, origin, now, a.playbook, a.version, "send", "allowed",
                           template=a.template, channel=verdict.channel, detail=detail)
        key = hashlib.sha256(
            f"{person.id}|{a.playbook}|{a.version}|{a.subject_ref}|{a.step}|{a.template}|{origin.tag()}".encode()
        ).hexdigest()[:32]
        s.add(OutboxItem(key=key, decision_id=dec.id, person_id=person.id, channel=verdict.channel,
                         template=a.template, playbook=a.playbook, subject_ref=a.subject_ref,
                         purpose=tpl.purpose or a.purpose, phi_class=tpl.phi_class, recipient=verdict.recipient,
                         content=content, created_at=now, not_after=a.not_after, next_attempt_at=now))
        record_outreach(state, Outreach(at=now, playbook=a.playbook, template=a.template,
                                        channel=verdict.channel, key=key))

    def _decide(self, s: Session, person: Person, origin: Origin, now: datetime, playbook: str, version: int,
                action: str, reason: str, *, template: str | None = None, channel: str | None = None,
                detail: dict[str, Any] | None = None) -> Decision:
        assert person.id is not None
        dec = Decision(person_id=person.id, decided_at=now, event_id=origin.event_id, timer_id=origin.timer_id,
                       playbook=playbook, playbook_version=version, action=action, template=template,
                       channel=channel, reason=reason, detail=detail or {})
        s.add(dec)
        s.flush()
        audit_log.append(s, at=now, actor="orchestrator", action=f"decision.{action}", person_id=person.id,
                         entity=f"decision/{dec.id}",
                         detail={"playbook": playbook, "version": version, "template": template,
                                 "channel": channel, "reason": reason})
        return dec

    # ------------------------------------------------------------------ lookups

    def _state(self, s: Session, person: Person, now: datetime) -> tuple[JourneyStateRow, JourneyState]:
        assert person.id is not None
        row = s.get(JourneyStateRow, person.id)
        if row is None:
            row = JourneyStateRow(person_id=person.id, updated_at=now, state={})
            s.add(row)
        return row, JourneyState.model_validate(row.state)

    def _save(self, row: JourneyStateRow, state: JourneyState, now: datetime) -> None:
        row.state = state.model_dump(mode="json")
        row.version += 1
        row.updated_at = now

    def _addresses(self, s: Session, person_id: int) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        rows = s.exec(select(PersonIdentifier).where(PersonIdentifier.person_id == person_id)
                      .order_by(col(PersonIdentifier.verified).desc(), col(PersonIdentifier.id))).all()
        for r in rows:
            if r.kind in ("phone", "email"):
                out.setdefault(r.kind, []).append(r.value)
            elif r.kind == "fhir":
                out.setdefault("fhir", []).append(r.value)
        return out

    def _person_facts(self, s: Session, person: Person, state: JourneyState) -> gate.PersonFacts:
        assert person.id is not None
        consents = s.exec(select(Consent).where(Consent.person_id == person.id, Consent.status == "opt_out")).all()
        open_esc = s.exec(select(func.count()).select_from(Escalation).where(
            Escalation.person_id == person.id, col(Escalation.status).in_(OPEN_ESCALATION))).one()
        return gate.PersonFacts(
            deceased=person.deceased or state.deceased,
            timezone=person.timezone or self.config.site.timezone,
            addresses=self._addresses(s, person.id),
            opted_out=frozenset((c.channel, c.purpose) for c in consents),
            open_escalations=int(open_esc),
        )

    def _recent_counts(self, s: Session, person_id: int, now: datetime) -> tuple[dict[str, int], dict[str, int]]:
        week_ago, day_ago = now - timedelta(days=7), now - timedelta(days=1)
        rows = s.exec(select(OutboxItem.channel, OutboxItem.created_at).where(
            OutboxItem.person_id == person_id, col(OutboxItem.status).in_(LIVE_OUTBOX),
            col(OutboxItem.created_at) > week_ago)).all()
        day: dict[str, int] = {}
        week: dict[str, int] = {}
        for channel, created in rows:
            week[channel] = week.get(channel, 0) + 1
            if utc(created) > day_ago:
                day[channel] = day.get(channel, 0) + 1
        return day, week

    def _context(self, person: Person, state: JourneyState, a: Send, tz: str) -> dict[str, Any]:
        zone = ZoneInfo(tz)
        ctx: dict[str, Any] = {"site": {"timezone": self.config.site.timezone},
                               "person": {"language": person.language or self.config.site.language,
                                          "timezone": tz},
                               "appointment": {}, "encounter": {}, "product": None, "event": {}}
        if (appt := state.appointment(a.subject_ref)) is not None:
            ctx["appointment"] = {"start": appt.start.astimezone(zone) if appt.start else None,
                                  "end": appt.end.astimezone(zone) if appt.end else None,
                                  "location": appt.location, "type": appt.type, "status": appt.status}
        if (enc := state.encounter(a.subject_ref)) is not None:
            ctx["encounter"] = {"discharged_at": enc.discharged_at.astimezone(zone) if enc.discharged_at else None,
                                "status": enc.status}
        recent = [sig for sig in state.signals if sig.attributes.get("product")]
        if recent:
            ctx["product"] = recent[-1].attributes.get("product")
        return ctx

    # ------------------------------------------------------------------ issue 9: triage and escalation
    # Inbound messages are assessed (orchestrator/triage.py, pure) and the plan executed here:
    # derived appointment events and write-back, the safety and help replies (gate modes
    # "safety" and "reply"), escalations with SLA timers (orchestrator/escalation.py).

    def _triage_config(self) -> triage.TriageConfig:
        cfg: triage.TriageConfig | None = getattr(self, "_triage_cfg", None)
        if cfg is None:
            cfg = triage.TriageConfig.model_validate(getattr(self.config, "triage", None) or {})
            self._triage_cfg = cfg
        return cfg

    def _triage(self, s: Session, person: Person, state: JourneyState, ev: JourneyEvent, origin: Origin,
                now: datetime) -> None:
        cfg = self._triage_config()
        if not cfg.enabled:
            return
        try:
            with s.begin_nested():
                self._triage_message(s, person, state, ev, cfg, origin, now)
        except (OperationalError, TransientError):
            raise
        except Exception as exc:
            # Fail safe: a message we could not triage goes to a person, never nowhere.
            assert person.id is not None
            log.error("triage failed for journey_event %s: %s", ev.id, type(exc).__name__)
            esc, opened = escalation.open_or_join(
                s, person_id=person.id, now=now, severity="urgent", reason="triage-failed",
                evidence={"event": ev.id, "channel": ev.attributes.get("channel"),
                          "message": str(ev.attributes.get("body") or ""), "error": type(exc).__name__},
                rule=None, cfg=cfg)
            state.open_escalations += int(opened)
            self._decide(s, person, origin, now, "triage", 1, "escalate", "triage-failed",
                         detail={"severity": "urgent", "escalation": esc.id, "error": type(exc).__name__})

    def _triage_message(self, s: Session, person: Person, state: JourneyState, ev: JourneyEvent,
                        cfg: triage.TriageConfig, origin: Origin, now: datetime) -> None:
        assert person.id is not None and ev.id is not None
        text = str(ev.attributes.get("body") or "")
        keyword = ev.attributes.get("keyword")
        keyword = str(keyword).lower() if keyword else None
        lex = triage.load_lexicon(cfg.lexicon_path(self.config.base_dir))
        history = self._triage_history(s, person.id, ev, now, cfg)
        a = triage.assess(text, keyword=keyword, now=now, history=history, lex=lex,
                          burst_count=cfg.burst_count, burst_within=parse_duration(cfg.burst_within))
        p = triage.plan(a, cfg, keyword)
        summary = a.to_json()  # codes and rule ids only: fit for the audit log
        self._decide(s, person, origin, now, "triage", 1, "triage", a.intent, detail=summary)
        if p.derive == "confirm" and keyword != "confirm":  # the keyword path derived it already
            self._derive_confirmation(s, ev, state, now)
        if p.derive == "cancel":
            self._triage_derive_cancel(s, ev, state, now)
        if p.derive is not None and cfg.writeback is not None:
            self._triage_writeback(s, person, state, cfg.writeback, p.derive, origin, now)
        if a.intent == "opt_out" and keyword != "stop":
            # "please stop texting me" revokes consent as surely as STOP does (any reasonable means).
            s.add(JourneyEvent(event_key=f"derived:{ev.id}:optout", person_id=person.id,
                               type="consent.revoked", occurred_at=ev.occurred_at, recorded_at=now,
                               raw_message_id=ev.raw_message_id,
                               attributes={"channel": str(ev.attributes.get("channel", "*")), "purpose": "*",
                                           "source": "reply-text", "reply_event": ev.id}))
        lang = person.language or a.language
        reply = None
        if p.safety_reply:
            reply = self._triage_reply(s, person, state, ev, cfg.safety_reply, "safety", lang, origin, now)
        if p.escalate is not None:
            severity, reason = p.escalate
            evidence = {"event": ev.id, "channel": ev.attributes.get("channel"), "message": text,
                        "assessment": summary, "matched": a.evidence, "safety_reply": reply}
            esc, opened = escalation.open_or_join(s, person_id=person.id, now=now, severity=severity,
                                                  reason=reason, evidence=evidence,
                                                  rule=a.rules[0] if a.rules else None, cfg=cfg)
            state.open_escalations += int(opened)
            self._decide(s, person, origin, now, "triage", 1, "escalate" if opened else "join", reason,
                         detail={"severity": severity, "escalation": esc.id, "rules": list(a.rules)})
        elif p.watch_silence and cfg.silence_after_concern:
            s.add(Timer(person_id=person.id, due_at=now + parse_duration(cfg.silence_after_concern),
                        playbook="triage", created_by_event=ev.id,
                        payload={"kind": SILENCE_KIND, "event": ev.id, "tier": a.tier}))
        if p.help_reply:
            self._triage_reply(s, person, state, ev, cfg.help_reply, "reply", lang, origin, now)

    def _triage_history(self, s: Session, person_id: int, ev: JourneyEvent, now: datetime,
                        cfg: triage.TriageConfig) -> triage.History:
        since = now - parse_duration(cfg.history)
        rows = s.exec(select(JourneyEvent).where(
            JourneyEvent.person_id == person_id, JourneyEvent.type == "message.inbound",
            col(JourneyEvent.id) != ev.id, col(JourneyEvent.occurred_at) >= since,
            col(JourneyEvent.occurred_at) <= utc(ev.occurred_at),
        ).order_by(col(JourneyEvent.occurred_at))).all()
        inbound = [triage.Inbound(utc(r.occurred_at), str(r.attributes.get("body") or "")) for r in rows]
        last_out = s.exec(select(func.max(OutboxItem.created_at)).where(
            OutboxItem.person_id == person_id, col(OutboxItem.status).in_(LIVE_OUTBOX),
            OutboxItem.purpose != "escalation")).one()
        last_ack = s.exec(select(func.max(Escalation.acknowledged_at)).where(
            Escalation.person_id == person_id)).one()
        answered = [utc(x) for x in (last_out, last_ack) if x is not None]
        return triage.History(inbound, max(answered) if answered else None)

    def _triage_derive_cancel(self, s: Session, ev: JourneyEvent, state: JourneyState, now: datetime) -> None:
        """A "cancel" reply cancels the person's next upcoming appointment (like "C" confirms it)."""
        nxt = state.next_appointment(now)
        if nxt is None:
            return
        s.add(JourneyEvent(
            event_key=f"derived:{ev.id}:cancel", person_id=ev.person_id, type="appointment.cancelled",
            occurred_at=ev.occurred_at, recorded_at=now, subject_ref=nxt[0],
            attributes={"source": "reply", "reply_event": ev.id}, raw_message_id=ev.raw_message_id,
        ))

    def _triage_writeback(self, s: Session, person: Person, state: JourneyState, wb: triage.WritebackConfig,
                          answer: str, origin: Origin, now: datetime) -> None:
        """Tell the EHR: the Appointment's patient participant status, or a Task for staff."""
        assert person.id is not None
        nxt = state.next_appointment(now)
        if nxt is None:
            return
        ref = nxt[0]
        status = "accepted" if answer == "confirm" else "declined"
        patient = escalation.patient_reference(s, person.id)
        if wb.mode == "appointment" and (res := s.get(Resource, ref)) is not None:
            body = dict(res.body)
            parts = [dict(p) for p in body.get("participant", [])]
            for part in parts:
                if str((part.get("actor") or {}).get("reference", "")).startswith("Patient/"):
                    part["status"] = status
            if not any(str((x.get("actor") or {}).get("reference", "")).startswith("Patient/")
                       for x in parts):
                parts.append({"actor": {"reference": patient} if patient else {"display": "patient"},
                              "status": status})
            body["participant"] = parts
            content: dict[str, Any] = {"resource": body, "interaction": "update"}
        else:
            task: dict[str, Any] = {
                "resourceType": "Task", "status": "requested", "intent": "order", "priority": "routine",
                "code": {"text": f"Patient replied: {answer} appointment"},
                "description": f"The patient replied {answer.upper()} by message; please update the "
                               "schedule.",
                "focus": {"reference": ref}, "authoredOn": utc(now).isoformat(),
            }
            if patient:
                task["for"] = {"reference": patient}
            content = {"resource": escalation.validated_task(task), "interaction": "create"}
        key = hashlib.sha256(f"{person.id}|writeback|{ref}|{answer}|{origin.tag()}".encode()).hexdigest()[:32]
        dec = self._decide(s, person, origin, now, "triage", 1, "send", f"writeback-{answer}",
                           template=f"writeback-{wb.mode}", channel=wb.channel, detail={"subject": ref})
        s.add(OutboxItem(key=key, decision_id=dec.id, person_id=person.id, channel=wb.channel,
                         template=f"writeback-{wb.mode}", playbook="triage", subject_ref=ref,
                         purpose="care-coordination", phi_class="limited", recipient="ehr", content=content,
                         created_at=now, next_attempt_at=now))
        audit_log.append(s, at=now, actor="orchestrator", action="writeback.queue", person_id=person.id,
                         entity=ref, detail={"mode": wb.mode, "answer": answer, "channel": wb.channel})

    def _triage_reply(self, s: Session, person: Person, state: JourneyState, ev: JourneyEvent, template: str,
                      mode: str, lang: str, origin: Origin, now: datetime) -> str:
        """Answer the person on the channel they wrote on (else the site's order), through
        the gate in ``mode`` (safety|reply). Returns the outcome: sent or a reason code."""
        assert person.id is not None
        tpl = self.templates.get(template)
        if tpl is None:
            self._decide(s, person, origin, now, "triage", 1, "suppress", "no-such-template",
                         template=template)
            return "no-such-template"
        inbound = str(ev.attributes.get("channel") or "")
        order = ([inbound] if inbound in self.channels else []) + [c for c in self.config.site.channels
                                                                    if c != inbound]
        purpose = tpl.purpose or ("safety" if mode == "safety" else "care-coordination")
        pfacts = self._person_facts(s, person, state)
        day, week = self._recent_counts(s, person.id, now)
        verdict = gate.evaluate(gate.GateInput(
            now=now, person=pfacts, template_kinds=frozenset(tpl.kinds()), phi_class=tpl.phi_class,
            purpose=purpose, channels=[self.channels[c] for c in order if c in self.channels], sent_day=day,
            sent_week=week,
            caps=self.caps, quiet_hours=self.quiet, mode=mode))
        detail: dict[str, Any] = {"mode": mode, "reply_to": ev.id,
                                  "passed_over": [list(t) for t in verdict.tried]}
        if verdict.outcome != "send" or verdict.channel is None or verdict.recipient is None:
            self._decide(s, person, origin, now, "triage", 1, "suppress", verdict.reason, template=template,
                         channel=verdict.channel, detail=detail)
            return verdict.reason
        a = Send("triage", 1, 0, template, None, None, None, purpose, False)
        content = templates.render(tpl, self.channels[verdict.channel].template_kind, lang,
                                   self._context(person, state, a, pfacts.timezone))
        if content is None:
            self._decide(s, person, origin, now, "triage", 1, "suppress", "no-template-for-channel",
                         template=template, channel=verdict.channel, detail=detail)
            return "no-template-for-channel"
        dec = self._decide(s, person, origin, now, "triage", 1, "send", "allowed", template=template,
                           channel=verdict.channel, detail=detail)
        key = hashlib.sha256(f"{person.id}|triage|{template}|{origin.tag()}".encode()).hexdigest()[:32]
        s.add(OutboxItem(key=key, decision_id=dec.id, person_id=person.id, channel=verdict.channel,
                         template=template, playbook="triage", purpose=purpose, phi_class=tpl.phi_class,
                         recipient=verdict.recipient, content=content, created_at=now, next_attempt_at=now))
        record_outreach(state, Outreach(at=now, playbook="triage", template=template, channel=verdict.channel,
                                        key=key))
        return "sent"

    def _triage_timer(self, s: Session, person: Person, state: JourneyState, t: Timer, now: datetime) -> None:
        cfg = self._triage_config()
        assert person.id is not None
        if t.payload.get("kind") == escalation.SLA_KIND:
            t.status_reason = escalation.sla_fired(s, t, cfg, now)
            return
        # Silence after a concern: nothing more from the person since, and nobody on it yet.
        since = s.exec(select(func.count()).select_from(JourneyEvent).where(
            JourneyEvent.person_id == person.id, JourneyEvent.type == "message.inbound",
            col(JourneyEvent.id) > int(t.payload.get("event", 0)))).one()
        if since or self._person_facts(s, person, state).open_escalations:
            t.status_reason = "not-silent" if since else "escalation-open"
            return
        esc = escalation.open_escalation(
            s, person_id=person.id, now=now, severity="routine", reason="silence-after-concern",
            evidence={"event": t.payload.get("event"), "tier": t.payload.get("tier")},
            rule="pattern.silence-after-concern", cfg=cfg)
        state.open_escalations += 1
        t.status_reason = "escalated"
        self._decide(s, person, Origin(timer_id=t.id), now, "triage", 1, "escalate", "silence-after-concern",
                     detail={"severity": "routine", "escalation": esc.id})


def _same_subject(timer_subject: str | None, ev: JourneyEvent, state: JourneyState) -> bool:
    if timer_subject is None or ev.subject_ref == timer_subject:
        return True
    if ev.attributes.get("encounter") == timer_subject:
        return True
    if ev.subject_ref is None or not ev.subject_ref.startswith(timer_subject.split("/", 1)[0] + "/"):
        latest = state.latest_encounter()
        return latest is not None and latest[0] == timer_subject
    return False
