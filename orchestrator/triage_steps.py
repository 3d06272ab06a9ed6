"""The orchestrate stage's triage steps (issue 9): inbound messages are assessed
(``orchestrator/triage.py``, pure) and the plan executed here: derived appointment events
and write-back, the safety and help replies (gate modes "safety" and "reply"), escalations
with SLA timers (``orchestrator/escalation.py``)."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import func
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from careloop.clock import utc
from careloop.errors import TransientError
from careloop.tables import (
    Escalation,
    JourneyEvent,
    OutboxItem,
    Person,
    Timer,
)
from orchestrator import escalation, gate, templates, triage
from orchestrator.core import (
    SILENCE_KIND,
    EngineCore,
    Origin,
    log,
)
from orchestrator.facts import LIVE_OUTBOX
from orchestrator.playbooks import (
    Send,
)
from orchestrator.state import JourneyState, Outreach, record_outreach
from orchestrator.timeexpr import parse_duration


class TriageSteps(EngineCore):
    """Triage of inbound messages and the escalation timers."""

    def _triage(
        self, s: Session, person: Person, state: JourneyState, ev: JourneyEvent, origin: Origin, now: datetime
    ) -> None:
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
                s,
                person_id=person.id,
                now=now,
                severity="urgent",
                reason="triage-failed",
                evidence={
                    "event": ev.id,
                    "channel": ev.attributes.get("channel"),
                    "message": str(ev.attributes.get("body") or ""),
                    "error": type(exc).__name__,
                },
                rule=None,
                cfg=cfg,
            )
            state.open_escalations += int(opened)
            self._decide(
                s,
                person,
                origin,
                now,
                "triage",
                1,
                "escalate",
                "triage-failed",
                detail={"severity": "urgent", "escalation": esc.id, "error": type(exc).__name__},
            )

    def _triage_message(
        self,
        s: Session,
        person: Person,
        state: JourneyState,
        ev: JourneyEvent,
        cfg: triage.TriageConfig,
        origin: Origin,
        now: datetime,
    ) -> None:
        assert person.id is not None and ev.id is not None
        text = str(ev.attributes.get("body") or "")
        keyword = ev.attributes.get("keyword")
        keyword = str(keyword).lower() if keyword else None
        lex = triage.load_lexicon(cfg.lexicon_path(self.config.base_dir))
        history = self._triage_history(s, person.id, ev, now, cfg)
        a = triage.assess(
            text,
            keyword=keyword,
            now=now,
            history=history,
            lex=lex,
            burst_count=cfg.burst_count,
            burst_within=parse_duration(cfg.burst_within),
        )
        p = triage.plan(a, cfg, keyword)
        unverified = bool(ev.attributes.get("unverified"))
        if unverified:
            # A sender we could not authenticate (an email reply without a valid reply
            # token): a possible emergency still reaches staff and an opt-out is still
            # honoured, but nothing is confirmed, cancelled or answered on the person's behalf.
            p = replace(p, derive=None, help_reply=False)
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
            s.add(
                JourneyEvent(
                    event_key=f"derived:{ev.id}:optout",
                    person_id=person.id,
                    type="consent.revoked",
                    occurred_at=ev.occurred_at,
                    recorded_at=now,
                    raw_message_id=ev.raw_message_id,
                    attributes={
                        "channel": str(ev.attributes.get("channel", "*")),
                        "purpose": "*",
                        "source": "reply-text",
                        "reply_event": ev.id,
                    },
                )
            )
        lang = person.language or a.language
        reply = None
        if p.safety_reply:
            reply = self._triage_reply(s, person, state, ev, cfg.safety_reply, "safety", lang, origin, now)
        if p.escalate is not None:
            severity, reason = p.escalate
            evidence = {
                "event": ev.id,
                "channel": ev.attributes.get("channel"),
                "message": text,
                "assessment": summary,
                "matched": a.evidence,
                "safety_reply": reply,
            }
            if unverified:
                evidence["unverified"] = True
            esc, opened = escalation.open_or_join(
                s,
                person_id=person.id,
                now=now,
                severity=severity,
                reason=reason,
                evidence=evidence,
                rule=a.rules[0] if a.rules else None,
                cfg=cfg,
            )
            state.open_escalations += int(opened)
            self._decide(
                s,
                person,
                origin,
                now,
                "triage",
                1,
                "escalate" if opened else "join",
                reason,
                detail={"severity": severity, "escalation": esc.id, "rules": list(a.rules)},
            )
        elif p.watch_silence and cfg.silence_after_concern:
            s.add(
                Timer(
                    person_id=person.id,
                    due_at=now + parse_duration(cfg.silence_after_concern),
                    playbook="triage",
                    created_by_event=ev.id,
                    payload={"kind": SILENCE_KIND, "event": ev.id, "tier": a.tier},
                )
            )
        if p.help_reply:
            self._triage_reply(s, person, state, ev, cfg.help_reply, "reply", lang, origin, now)

    def _triage_history(
        self, s: Session, person_id: int, ev: JourneyEvent, now: datetime, cfg: triage.TriageConfig
    ) -> triage.History:
        since = now - parse_duration(cfg.history)
        rows = s.exec(
            select(JourneyEvent)
            .where(
                JourneyEvent.person_id == person_id,
                JourneyEvent.type == "message.inbound",
                col(JourneyEvent.id) != ev.id,
                col(JourneyEvent.occurred_at) >= since,
                col(JourneyEvent.occurred_at) <= utc(ev.occurred_at),
            )
            .order_by(col(JourneyEvent.occurred_at))
        ).all()
        inbound = [triage.Inbound(utc(r.occurred_at), str(r.attributes.get("body") or "")) for r in rows]
        last_out = s.exec(
            select(func.max(OutboxItem.created_at)).where(
                OutboxItem.person_id == person_id,
                col(OutboxItem.status).in_(LIVE_OUTBOX),
                OutboxItem.purpose != "escalation",
            )
        ).one()
        last_ack = s.exec(
            select(func.max(Escalation.acknowledged_at)).where(Escalation.person_id == person_id)
        ).one()
        answered = [utc(x) for x in (last_out, last_ack) if x is not None]
        return triage.History(inbound, max(answered) if answered else None)

    def _triage_derive_cancel(self, s: Session, ev: JourneyEvent, state: JourneyState, now: datetime) -> None:
        """A "cancel" reply cancels the person's next upcoming appointment (like "C" confirms it)."""
        self._derive_for_next_appointment(s, ev, state, now, "cancel", "appointment.cancelled")

    def _triage_writeback(
        self,
        s: Session,
        person: Person,
        state: JourneyState,
        wb: triage.WritebackConfig,
        answer: str,
        origin: Origin,
        now: datetime,
    ) -> None:
        """Tell the EHR (a Task for staff on the write-back channel, focus the Appointment)."""
        assert person.id is not None
        nxt = state.next_appointment(now)
        if nxt is None:
            return
        ref = nxt[0]
        reason = "appointment-confirmed" if answer == "confirm" else "appointment-declined"
        patient = escalation.patient_reference(s, person.id)
        if patient is None:
            self._decide(
                s,
                person,
                origin,
                now,
                "triage",
                1,
                "suppress",
                "no-fhir-patient",
                template=f"writeback-{wb.mode}",
                channel=wb.channel,
                detail={"subject": ref},
            )
            return
        content = {
            "kind": "task",
            "reason": reason,
            "severity": "routine",
            "description": f"The patient replied {answer.upper()} by message; please update the schedule.",
            "created": utc(now).isoformat(),
        }
        key = hashlib.sha256(f"{person.id}|writeback|{ref}|{answer}|{origin.tag()}".encode()).hexdigest()[:32]
        dec = self._decide(
            s,
            person,
            origin,
            now,
            "triage",
            1,
            "send",
            reason,
            template=f"writeback-{wb.mode}",
            channel=wb.channel,
            detail={"subject": ref},
        )
        s.add(
            OutboxItem(
                key=key,
                decision_id=dec.id,
                person_id=person.id,
                channel=wb.channel,
                template=f"writeback-{wb.mode}",
                playbook="triage",
                subject_ref=ref,
                purpose="care-coordination",
                phi_class="limited",
                recipient=patient,
                content=content,
                created_at=now,
                next_attempt_at=now,
            )
        )

    def _triage_reply(
        self,
        s: Session,
        person: Person,
        state: JourneyState,
        ev: JourneyEvent,
        template: str,
        mode: str,
        lang: str,
        origin: Origin,
        now: datetime,
    ) -> str:
        """Answer the person on the channel they wrote on (else the site's order), through
        the gate in ``mode`` (safety|reply). Returns the outcome: sent or a reason code."""
        assert person.id is not None
        tpl = self.templates.get(template)
        if tpl is None:
            self._decide(
                s, person, origin, now, "triage", 1, "suppress", "no-such-template", template=template
            )
            return "no-such-template"
        inbound = str(ev.attributes.get("channel") or "")
        order = ([inbound] if inbound in self.channels else []) + [
            c for c in self.config.site.channels if c != inbound
        ]
        purpose = tpl.purpose or ("safety" if mode == "safety" else "care-coordination")
        pfacts = self._person_facts(s, person, state)
        day, week = self._recent_counts(s, person.id, now)
        verdict = gate.evaluate(
            gate.GateInput(
                now=now,
                person=pfacts,
                template_kinds=frozenset(tpl.kinds()),
                phi_class=tpl.phi_class,
                purpose=purpose,
                channels=[self.channels[c] for c in order if c in self.channels],
                sent_day=day,
                sent_week=week,
                caps=self.caps,
                kind_of=self.kind_of,
                quiet_hours=self.quiet,
                mode=mode,
                **self.opt_in,
            )
        )
        detail: dict[str, Any] = {
            "mode": mode,
            "reply_to": ev.id,
            "passed_over": [list(t) for t in verdict.tried],
        }
        if verdict.outcome != "send" or verdict.channel is None or verdict.recipient is None:
            self._decide(
                s,
                person,
                origin,
                now,
                "triage",
                1,
                "suppress",
                verdict.reason,
                template=template,
                channel=verdict.channel,
                detail=detail,
            )
            return verdict.reason
        a = Send("triage", 1, 0, template, None, None, None, purpose, False)
        content = templates.render(
            tpl,
            self.channels[verdict.channel].template_kind,
            lang,
            self._context(person, state, a, pfacts.timezone),
        )
        if content is None:
            self._decide(
                s,
                person,
                origin,
                now,
                "triage",
                1,
                "suppress",
                "no-template-for-channel",
                template=template,
                channel=verdict.channel,
                detail=detail,
            )
            return "no-template-for-channel"
        dec = self._decide(
            s,
            person,
            origin,
            now,
            "triage",
            1,
            "send",
            "allowed",
            template=template,
            channel=verdict.channel,
            detail=detail,
        )
        key = hashlib.sha256(f"{person.id}|triage|{template}|{origin.tag()}".encode()).hexdigest()[:32]
        s.add(
            OutboxItem(
                key=key,
                decision_id=dec.id,
                person_id=person.id,
                channel=verdict.channel,
                template=template,
                playbook="triage",
                purpose=purpose,
                phi_class=tpl.phi_class,
                recipient=verdict.recipient,
                content=content,
                created_at=now,
                next_attempt_at=now,
            )
        )
        record_outreach(
            state, Outreach(at=now, playbook="triage", template=template, channel=verdict.channel, key=key)
        )
        return "sent"

    def _triage_timer(self, s: Session, person: Person, state: JourneyState, t: Timer, now: datetime) -> None:
        cfg = self._triage_config()
        assert person.id is not None
        if t.payload.get("kind") == escalation.SLA_KIND:
            t.status_reason = escalation.sla_fired(s, t, cfg, now)
            return
        # Silence after a concern: nothing more from the person since, and nobody on it yet.
        since = s.exec(
            select(func.count())
            .select_from(JourneyEvent)
            .where(
                JourneyEvent.person_id == person.id,
                JourneyEvent.type == "message.inbound",
                col(JourneyEvent.id) > int(t.payload.get("event", 0)),
            )
        ).one()
        if since or self._person_facts(s, person, state).open_escalations:
            t.status_reason = "not-silent" if since else "escalation-open"
            return
        esc = escalation.open_escalation(
            s,
            person_id=person.id,
            now=now,
            severity="routine",
            reason="silence-after-concern",
            evidence={"event": t.payload.get("event"), "tier": t.payload.get("tier")},
            rule="pattern.silence-after-concern",
            cfg=cfg,
        )
        state.open_escalations += 1
        t.status_reason = "escalated"
        self._decide(
            s,
            person,
            Origin(timer_id=t.id),
            now,
            "triage",
            1,
            "escalate",
            "silence-after-concern",
            detail={"severity": "routine", "escalation": esc.id},
        )
