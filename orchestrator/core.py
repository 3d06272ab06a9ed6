"""The orchestrate stage's core: journey events and due timers -> decisions, timers,
outbox rows.

One transaction per batch; each event or timer in its own savepoint so a failure is
dead-lettered alone. Every decision (sent, deferred, suppressed, cancelled, escalated)
is a ``decision`` row with a reason code and an audit record, written together.

``EngineCore`` is the stage without triage and learning; their steps live in
``orchestrator/triage_steps.py`` and ``orchestrator/learning_steps.py`` and are joined
in ``orchestrator/engine.py`` (``Orchestrator``). The hooks they implement are declared
at the end of ``EngineCore``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from jinja2 import TemplateError
from sqlalchemy import event as sa_event
from sqlmodel import Session, col, select

from careloop import audit_log, writes
from careloop.clock import utc
from careloop.config import AppConfig, LearningConfig
from careloop.model import Hold
from careloop.pipeline import handle_isolated
from careloop.store import Store, write_through
from careloop.tables import (
    Consent,
    Decision,
    DeliveryReceipt,
    JourneyEvent,
    JourneyStateRow,
    OutboxItem,
    Person,
    Resource,
    Timer,
)
from orchestrator import escalation, facts, gate, learning, playbooks, templates, timezones, triage
from orchestrator.outcomes import Queued
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

_DECISION = Decision.__table__  # type: ignore[attr-defined]
_OUTBOX = OutboxItem.__table__  # type: ignore[attr-defined]
_TIMER = Timer.__table__  # type: ignore[attr-defined]
_STATE = JourneyStateRow.__table__  # type: ignore[attr-defined]
_NO_STATE_KEY = "careloop.orchestrator.no_state"
RECEIPT_STATUS = {
    "message.sent": "sent",
    "message.delivered": "delivered",
    "message.read": "read",
    "message.failed": "failed",
}
# How far along a row is; "failed" after "delivered" is a late report of an earlier attempt.
RECEIPT_RANK = {
    "pending": 0,
    "sending": 1,
    "queued": 2,
    "sent": 3,
    "unknown": 3,
    "failed": 4,
    "delivered": 5,
    "read": 6,
}
log = logging.getLogger("careloop.orchestrator")
SILENCE_KIND = "triage-silence"  # a concern that did not escalate, then silence
# Queued and not yet handed to a provider: what a STOP or a cancellation still stops.
NOT_YET_SENT = ("pending", "held")

_GATE_PARTS = frozenset({"shared", "consents", "escalations"})  # addresses: ``_addresses``
_CAP_PARTS = frozenset({"recent"})


def _opt_in_rules(config: AppConfig) -> dict[str, Any]:
    """The gate's rule 8 (no-consent) settings, from ``compliance``."""
    days = config.compliance.opt_in_max_age_days
    return {
        "opt_in_required": frozenset(config.compliance.opt_in_required),
        "opt_in_max_age": timedelta(days=days) if days is not None else None,
    }


def _rows(s: Session, stmt: Any, **params: Any) -> list[Any]:
    s.flush()  # a Core read does not autoflush: objects still pending must be seen
    return list(s.connection().execute(stmt, params).all())


@dataclass(frozen=True, slots=True)
class Decided:
    """A decision row just inserted: its id (what the outbox row, the audit record and the
    learner's outcome row refer to). No ORM object is built for it: nothing changes a
    decision once it is written."""

    id: int


@dataclass
class Origin:
    """What a decision comes from: an event, or a timer. ``attributes``: the triggering
    event's attributes that later steps of the same run still need (the product an offer is
    about, the keys of ``no_recent.same`` conditions); timers carry them in their payload."""

    event_id: int | None = None
    timer_id: int | None = None
    attributes: dict[str, Any] = field(default_factory=dict)

    def tag(self) -> str:
        return f"e{self.event_id}" if self.event_id is not None else f"t{self.timer_id}"


class EngineCore:
    """The stage without its triage and learning steps. ``channels`` describes the
    configured channels for the gate."""

    name = "orchestrate"

    def __init__(
        self,
        store: Store,
        config: AppConfig,
        playbooks: dict[str, PlaybookConfig],
        templates: dict[str, TemplateConfig],
        channels: dict[str, gate.ChannelFacts],
        batch: int = 500,
    ) -> None:
        self.store, self.config, self.batch = store, config, batch
        self.playbooks, self.templates, self.channels = playbooks, templates, channels
        self.quiet = gate.parse_quiet_hours(config.site.quiet_hours)
        self.caps = {k: gate.Cap(v.per_day, v.per_week) for k, v in config.compliance.frequency_caps.items()}
        self.opt_in = _opt_in_rules(config)  # the gate's rule 8, for every GateInput
        self.kind_of = {cid: ch.template_kind for cid, ch in channels.items()}  # the gate's rule 9
        # learning.model belief: the read and timing link, fitted in this process (learning.LinkCache)
        self._belief_links = learning.LinkCache()
        # Event types some playbook step waits for: only those need a look at pending waits.
        self._wait_types = {st.wait_for for pb in playbooks.values() for st in pb.steps if st.wait_for}
        # Event attributes a run's later steps (timers) still need: see ``Origin``.
        self._carried = {"product"} | {
            key
            for pb in playbooks.values()
            for c in [*pb.when, *(c for st in pb.steps for c in st.when)]
            if c.no_recent is not None
            for key in c.no_recent.same
        }

    # ------------------------------------------------------------------ stage loop

    async def run_once(self) -> int:
        return await asyncio.to_thread(self.run_once_sync)

    def run_once_sync(self) -> int:
        n = self._batch(self._claim_events, self.handle_event)
        return n + self._batch(self._claim_timers, self.handle_timer)

    def _batch(self, claim: Any, handle: Any) -> int:
        with self.store.session() as s:
            items = claim(s)
            if not items:
                return 0
            # The audit chain's head, locked now rather than at the first decision: every
            # transaction that decides or sends writes audit records, so none can commit a
            # send to these people between the reads below and this batch's commit (on
            # PostgreSQL a second worker did, and a person got two texts past a daily cap).
            audit_log.head(s)
            held = self._preload(s, items)  # strong refs keep the identity map warm
            pids = sorted({i.person_id for i in items if i.person_id is not None})
            facts.begin(s, pids, self.store.clock.now())  # the gate's reads, for all of them
            try:
                with writes.deferred(s):  # the batch's rows: one statement a table
                    handle_isolated(s, items, handle, "orchestrate", self.store.clock.now)
            finally:
                facts.end(s)
                s.info.pop(_NO_STATE_KEY, None)
                del held
            return len(items)

    def _preload(self, s: Session, items: list[Any]) -> list[Any]:
        """Load the batch's people, journey states and subjects in three queries, so the
        per-item ``s.get`` calls are answered from the identity map. The returned list
        holds them (the identity map keeps only weak references to clean objects).

        Journey states that do not exist yet are noted in ``s.info`` so ``_state`` creates
        them without asking again; the note is dropped on any rollback (a savepoint too,
        see ``_forget_batch``), after which ``_state`` asks the database as before."""
        pids = sorted({i.person_id for i in items if i.person_id is not None})
        if not pids:
            return []
        held: list[Any] = list(s.exec(select(Person).where(col(Person.id).in_(pids))).all())
        rows = list(s.exec(select(JourneyStateRow).where(col(JourneyStateRow.person_id).in_(pids))).all())
        held.extend(rows)
        s.info[_NO_STATE_KEY] = set(pids) - {r.person_id for r in rows}
        refs = sorted({i.subject_ref for i in items if getattr(i, "subject_ref", None)})
        if refs:
            held.extend(s.exec(select(Resource).where(col(Resource.ref).in_(refs))).all())
        return held

    def _claim_events(self, s: Session) -> list[JourneyEvent]:
        return list(
            s.exec(
                select(JourneyEvent)
                .where(JourneyEvent.status == "pending")
                .order_by(col(JourneyEvent.id))
                .limit(self.batch)
                .with_for_update(skip_locked=True)
            ).all()
        )

    def _claim_timers(self, s: Session) -> list[Timer]:
        now = self.store.clock.now()
        return list(
            s.exec(
                select(Timer)
                .where(Timer.status == "pending", col(Timer.due_at) <= now)
                .order_by(col(Timer.due_at), col(Timer.id))
                .limit(self.batch)
                .with_for_update(skip_locked=True)
            ).all()
        )

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
        # Every event may come with new demographics (an ADT or SIU carries the PID): a
        # person who moved gets the quiet hours of where they live now (a microsecond's
        # work from an address; the phone lookup only when there is none).
        tz = timezones.resolve(
            person.patient, self._addresses(s, person.id or 0).get("phone", []), self.config.site.timezone
        )
        if tz != person.timezone:
            write_through(s, person, timezone=tz)
        carried = {k: ev.attributes[k] for k in self._carried if k in ev.attributes}
        origin = Origin(event_id=ev.id, attributes=carried)
        actions: list[Action] = []
        if ev.type in ("consent.revoked", "consent.granted"):
            self._consent(s, person, ev, now)
        if ev.type in RECEIPT_STATUS:
            self._receipt(s, ev, now)
        if ev.type == "message.inbound" and ev.attributes.get("keyword") == "confirm":
            self._derive_confirmation(s, ev, state, now)
        if ev.type == "message.inbound":
            self._triage(s, person, state, ev, origin, now)
        self._learning_outcomes(s, person, ev, now)  # outcomes of earlier sends
        ctx = Ctx(state, now, ev.subject_ref, ev.type, occurred, dict(ev.attributes))
        if ev.type in self._wait_types:
            actions.extend(self._satisfied_waits(s, person.id or 0, ev, ctx))
        for pid, pb in self.playbooks.items():
            actions.extend(playbooks.on_event(pid, pb, ctx))
        self._execute(s, person, state, actions, origin, now)
        self._save(s, person.id or 0, srow, state, now)
        write_through(s, ev, status="processed")
        audit_log.append(
            s,
            at=now,
            actor="orchestrator",
            action="event.process",
            person_id=person.id,
            entity=f"journey_event/{ev.id}",
            detail={"type": ev.type, "actions": len(actions)},
        )

    def _derive_confirmation(self, s: Session, ev: JourneyEvent, state: JourneyState, now: datetime) -> None:
        """A "C" reply confirms the person's next upcoming appointment: recorded as an
        event of its own so the journey log says what happened and why. Never from an
        ``unverified`` reply (its sender is only as good as a forgeable From header)."""
        if ev.attributes.get("unverified"):
            return
        self._derive_for_next_appointment(s, ev, state, now, "confirm", "appointment.confirmed")

    def _derive_for_next_appointment(
        self, s: Session, ev: JourneyEvent, state: JourneyState, now: datetime, what: str, etype: str
    ) -> None:
        """Record ``etype`` for the person's next upcoming appointment, derived from reply
        ``ev``, as an event of its own (processed after ``ev``, like any other)."""
        nxt = state.next_appointment(now)
        if nxt is None:
            return
        s.add(
            JourneyEvent(
                event_key=f"derived:{ev.id}:{what}",
                person_id=ev.person_id,
                type=etype,
                occurred_at=ev.occurred_at,
                recorded_at=now,
                subject_ref=nxt[0],
                attributes={"source": "reply", "reply_event": ev.id},
                raw_message_id=ev.raw_message_id,
            )
        )

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
                out.extend(
                    playbooks.on_wait_satisfied(
                        t.playbook, pb, t.step, replace(ctx, subject_ref=t.subject_ref)
                    )
                )
        return out

    def _receipt(self, s: Session, ev: JourneyEvent, now: datetime) -> None:
        """A provider's delivery report moves the outbox row forward (never back)."""
        key = ev.attributes.get("outbox_key") or ev.attributes.get("key")
        item = s.exec(select(OutboxItem).where(OutboxItem.key == key)).first() if key else None
        if item is None or item.id is None:
            return
        new = RECEIPT_STATUS[ev.type]
        # A row still ``sending`` belongs to the deliver stage until it settles the send
        # (provider id, receipt, disclosure record): a report that beats the settle (a send
        # that timed out, a fast callback) is kept as a receipt and leaves the row alone.
        if item.status != "sending" and RECEIPT_RANK.get(new, 0) > RECEIPT_RANK.get(item.status, 0):
            item.status = new
        s.add(
            DeliveryReceipt(
                outbox_id=item.id,
                at=utc(ev.occurred_at),
                status=new,
                provider_id=ev.attributes.get("message_sid"),
                detail={"event": ev.id},
            )
        )

    def _consent(self, s: Session, person: Person, ev: JourneyEvent, now: datetime) -> None:
        channel = str(ev.attributes.get("channel", "*"))
        purpose = str(ev.attributes.get("purpose", "*"))
        status = "opt_out" if ev.type == "consent.revoked" else "opt_in"
        if status == "opt_in" and ev.attributes.get("unverified"):
            # An opt-in from a sender we could not authenticate is not consent; an opt-out
            # always is honoured (stopping is safe).
            audit_log.append(
                s,
                at=now,
                actor="orchestrator",
                action="consent.opt_in",
                outcome="skipped",
                person_id=person.id,
                purpose=purpose,
                detail={"channel": channel, "reason": "unverified"},
            )
            return
        # The consent counts from when it was given (a backlog must not make it look newer),
        # and an older statement arriving late does not overturn a newer one.
        given = min(utc(ev.occurred_at), now)
        row = s.exec(
            select(Consent).where(
                Consent.person_id == person.id, Consent.channel == channel, Consent.purpose == purpose
            )
        ).first()
        if row is not None and utc(row.at) > given:
            audit_log.append(
                s,
                at=now,
                actor="orchestrator",
                action=f"consent.{status}",
                outcome="skipped",
                person_id=person.id,
                purpose=purpose,
                detail={"channel": channel, "reason": "superseded-by-newer"},
            )
            return
        if row is None:
            assert person.id is not None
            s.add(
                Consent(
                    person_id=person.id,
                    channel=channel,
                    purpose=purpose,
                    status=status,
                    at=given,
                    source=str(ev.attributes.get("source", ev.type)),
                )
            )
        else:
            row.status, row.at = status, given
        audit_log.append(
            s,
            at=now,
            actor="orchestrator",
            action=f"consent.{status}",
            person_id=person.id,
            purpose=purpose,
            detail={"channel": channel},
        )
        if status == "opt_out":
            # STOP takes effect at once: nothing still queued for that channel goes out.
            q = select(OutboxItem).where(
                OutboxItem.person_id == person.id, col(OutboxItem.status).in_(NOT_YET_SENT)
            )
            for item in s.exec(q).all():
                if not _to_the_person(item, self.channels.get(item.channel)):
                    continue  # a notice to staff about them, a write-back: not theirs to stop
                # A STOP names the channel's kind (``sms``) or the deployment's id for it.
                names = ("*", item.channel, self.kind_of.get(item.channel))
                if channel in names and purpose in ("*", item.purpose):
                    self._cancel_outbox(s, item, "opted-out", now)

    # ------------------------------------------------------------------ timers

    def handle_timer(self, s: Session, t: Timer) -> None:
        now = self.store.clock.now()
        t.status = "fired"
        person = s.get(Person, t.person_id)
        assert person is not None and t.id is not None
        srow, state = self._state(s, person, now)
        state.deceased = state.deceased or person.deceased
        carried = dict(t.payload.get("attributes") or {})
        ctx = Ctx(state, now, t.subject_ref, attributes=carried)
        origin = Origin(timer_id=t.id, attributes=carried)
        pb = self.playbooks.get(t.playbook)
        kind = t.payload.get("kind", "step")
        if kind in (escalation.SLA_KIND, SILENCE_KIND):  # escalation queue timers
            self._triage_timer(s, person, state, t, now)
            self._save(s, person.id or 0, srow, state, now)
            return
        actions: list[Action]
        if pb is None:
            actions = [
                Suppress(
                    t.playbook,
                    t.playbook_version,
                    t.step,
                    t.payload.get("template"),
                    "playbook-removed",
                    t.subject_ref,
                )
            ]
        elif kind == "wait":
            actions = playbooks.on_wait_timeout(t.playbook, pb, t.step, ctx)
        elif kind == "deferred":
            actions = self._deferred(t, pb, ctx)
        else:
            actions = playbooks.on_step_timer(t.playbook, pb, t.step, utc(t.due_at), ctx)
        self._execute(s, person, state, actions, origin, now)
        self._save(s, person.id or 0, srow, state, now)

    def _deferred(self, t: Timer, pb: PlaybookConfig, ctx: Ctx) -> list[Action]:
        """A send held back by quiet hours: check the journey again, then gate again."""
        template = str(t.payload["template"])
        recheck = playbooks.on_step_timer(t.playbook, pb, t.step, utc(t.due_at), ctx)
        refusals: list[Action] = [a for a in recheck if isinstance(a, Suppress) and a.step == t.step]
        if refusals:
            return refusals[:1]
        not_after = t.payload.get("not_after")
        return [
            Send(
                t.playbook,
                t.playbook_version,
                t.step,
                template,
                t.payload.get("channels"),
                t.subject_ref,
                utc(datetime.fromisoformat(not_after)) if not_after else None,
                pb.purpose,
                pb.shadow,
            )
        ]

    # ------------------------------------------------------------------ actions

    def _execute(
        self,
        s: Session,
        person: Person,
        state: JourneyState,
        actions: list[Action],
        origin: Origin,
        now: datetime,
    ) -> None:
        for a in actions:
            if isinstance(a, Send):
                self._send(s, person, state, a, origin, now)
            elif isinstance(a, Schedule):
                self._timer(s, person, a, origin, a.due_at, {"kind": a.kind, **a.payload})
                self._decide(
                    s,
                    person,
                    origin,
                    now,
                    a.playbook,
                    a.version,
                    "schedule",
                    "scheduled",
                    template=a.payload.get("template"),
                    detail={"due_at": a.due_at.isoformat(), "kind": a.kind, "step": a.step},
                )
            elif isinstance(a, Suppress):
                self._decide(
                    s,
                    person,
                    origin,
                    now,
                    a.playbook,
                    a.version,
                    "suppress",
                    a.reason,
                    template=a.template,
                    detail={"step": a.step, "subject": a.subject_ref},
                )
            elif isinstance(a, CancelRun):
                self._cancel_run(s, person, a, origin, now)
            elif isinstance(a, Escalate):
                self._escalate(s, person, state, a, origin, now)

    def _cancel_run(self, s: Session, person: Person, a: CancelRun, origin: Origin, now: datetime) -> None:
        q = select(Timer).where(
            Timer.person_id == person.id, Timer.playbook == a.playbook, Timer.status == "pending"
        )
        for t in s.exec(q).all():
            if a.subject_ref is not None and t.subject_ref != a.subject_ref:
                continue
            t.status, t.status_reason = "cancelled", a.reason
            self._decide(
                s,
                person,
                origin,
                now,
                a.playbook,
                t.playbook_version,
                "cancel",
                a.reason,
                template=t.payload.get("template"),
                detail={"timer": t.id, "due_at": utc(t.due_at).isoformat()},
            )
        q2 = select(OutboxItem).where(
            OutboxItem.person_id == person.id,
            OutboxItem.playbook == a.playbook,
            col(OutboxItem.status).in_(NOT_YET_SENT),
        )
        for item in s.exec(q2).all():
            if a.subject_ref is None or item.subject_ref == a.subject_ref:
                self._cancel_outbox(s, item, a.reason, now)

    # ------------------------------------------------------------------ send time

    def send_check(self, s: Session, item: OutboxItem, now: datetime) -> Hold | None:
        """The gate again, just before a message to the person is sent, on its first attempt
        and every retry (channels/outbox.py ``SendCheck``): what the decision-time gate
        checked may have changed since (a death, a STOP, an open escalation, consent, the
        address now shared with someone else, quiet hours reached while it waited in a
        backlog or a retry). The frequency caps counted it when it was decided, so they
        apply again only to a message staff released from a hold, which goes later. A
        recipient no longer the person's is cancelled; one that has become shared is held
        for staff. Items that are not messages to the person pass: notices to staff about
        them (``escalation``) and system-to-system deliveries (FHIR write-back, webhooks)."""
        ch = self.channels.get(item.channel)
        if not _to_the_person(item, ch):
            return None
        assert ch is not None
        person = s.get(Person, item.person_id)
        if person is None:
            return None
        mode = "outreach"
        if item.playbook == "triage":  # an answer to what the person just wrote
            cfg = self._triage_config()
            mode = "safety" if item.purpose == "safety" or item.template == cfg.safety_reply else "reply"
        _, state = self._state(s, person, now)
        facts = self._person_facts(s, person, state)
        if ch.address_kind in gate.PERSON_FACING and item.recipient not in facts.addresses.get(
            ch.address_kind, []
        ):
            return self._send_time_cancel(s, item, now, "address-changed")  # no longer theirs
        caps: dict[str, gate.Cap] = {}
        day: dict[str, int] = {}
        week: dict[str, int] = {}
        if item.released_by is not None:
            # Staff confirmed this address may have it: not held again for sharing it, but
            # the caps count on the day it really goes (its own row aside).
            facts = replace(facts, shared=frozenset())
            caps = self.caps
            day, week = self._recent_counts(s, person.id or 0, now, exclude=item.id)
        elif mode != "safety" and item.recipient in facts.shared:
            s.add(_cancel_decision(item, now, "identity-unresolved", {"when": "send-time"}, action="hold"))
            return Hold("identity-unresolved", staff=True)
        verdict = gate.evaluate(
            gate.GateInput(
                now=now,
                person=facts,
                template_kinds=frozenset({ch.template_kind}),
                phi_class=item.phi_class,
                purpose=item.purpose,
                channels=[ch],
                sent_day=day,
                sent_week=week,
                caps=caps,
                kind_of=self.kind_of,
                quiet_hours=self.quiet,
                not_after=utc(item.not_after) if item.not_after is not None else None,
                mode=mode,
                **self.opt_in,
            )
        )
        if verdict.outcome == "send":
            return None
        if verdict.outcome == "defer":
            return Hold(verdict.reason, verdict.deliver_at)
        return self._send_time_cancel(s, item, now, verdict.reason)

    def _send_time_cancel(self, s: Session, item: OutboxItem, now: datetime, reason: str) -> Hold:
        """The decision that cancels ``item`` at send time (the deliver stage updates the row
        and audits it), so ``explain`` and replay reports show why it never went."""
        s.add(_cancel_decision(item, now, reason, {"when": "send-time"}))
        return Hold(reason)

    def _cancel_outbox(self, s: Session, item: OutboxItem, reason: str, now: datetime) -> None:
        item.status, item.last_error = "cancelled", reason
        s.add(_cancel_decision(item, now, reason))
        audit_log.append(
            s,
            at=now,
            actor="orchestrator",
            action="outbox.cancel",
            person_id=item.person_id,
            entity=f"outbox/{item.id}",
            detail={"reason": reason},
        )

    def _escalate(
        self, s: Session, person: Person, state: JourneyState, a: Escalate, origin: Origin, now: datetime
    ) -> None:
        assert person.id is not None
        # The same work queue as triage: one item per person, SLA timers and routing to staff.
        esc, opened = escalation.open_or_join(
            s,
            person_id=person.id,
            now=now,
            severity=a.severity,
            reason=a.reason,
            evidence={"playbook": a.playbook, "subject": a.subject_ref, "origin": origin.tag()},
            rule=f"playbook:{a.playbook}",
            cfg=self._triage_config(),
        )
        if opened:
            state.open_escalations += 1
        self._decide(
            s,
            person,
            origin,
            now,
            a.playbook,
            a.version,
            "escalate",
            a.reason,
            detail={"severity": a.severity, "escalation": esc.id, "joined": not opened},
        )

    def _send(
        self, s: Session, person: Person, state: JourneyState, a: Send, origin: Origin, now: datetime
    ) -> None:
        assert person.id is not None
        tpl = self.templates[a.template]
        order = a.channels or self.config.site.channels
        facts = [self.channels[c] for c in order if c in self.channels]
        pfacts = self._person_facts(s, person, state)
        day, week = self._recent_counts(s, person.id, now)
        verdict = gate.evaluate(
            gate.GateInput(
                now=now,
                person=pfacts,
                template_kinds=frozenset(tpl.kinds()),
                phi_class=tpl.phi_class,
                purpose=tpl.purpose or a.purpose,
                channels=facts,
                sent_day=day,
                sent_week=week,
                caps=self.caps,
                kind_of=self.kind_of,
                quiet_hours=self.quiet,
                not_after=a.not_after,
                **self.opt_in,
            )
        )
        detail: dict[str, Any] = {
            "step": a.step,
            "subject": a.subject_ref,
            "passed_over": [list(t) for t in verdict.tried],
        }
        if a.shadow:
            detail["would"] = verdict.outcome
            self._decide_step(
                s, person, origin, now, a, "shadow", f"shadow-{verdict.reason}", verdict.channel, detail
            )
            return
        if verdict.outcome == "suppress":
            held_on = next((c for c, why in verdict.tried if why == "identity-unresolved"), None)
            if held_on is not None:
                # Only a shared address stands between this message and the person: it
                # waits for staff, who may release it or cancel it (careloop outbox).
                kind = self.channels[held_on].address_kind
                to = pfacts.addresses[kind][0]
                self._emit(s, person, state, a, origin, now, tpl, held_on, to, pfacts, detail, hold=True)
                return
            self._decide_step(s, person, origin, now, a, "suppress", verdict.reason, verdict.channel, detail)
            return
        # The learner picks channel (among verdict.allowed only), window and variant.
        if verdict.allowed and self._learning_cfg().enabled:
            self._learn_send(s, person, state, a, origin, now, tpl, verdict, pfacts, detail)
            return
        if verdict.outcome == "defer":
            assert verdict.deliver_at is not None and verdict.channel is not None
            self._defer(s, person, a, origin, verdict.deliver_at, [verdict.channel])
            detail["deliver_at"] = verdict.deliver_at.isoformat()
            self._decide_step(s, person, origin, now, a, "defer", verdict.reason, verdict.channel, detail)
            return
        assert verdict.channel is not None and verdict.recipient is not None
        self._emit(s, person, state, a, origin, now, tpl, verdict.channel, verdict.recipient, pfacts, detail)

    def _timer(
        self,
        s: Session,
        person: Person,
        a: Send | Schedule,
        origin: Origin,
        due_at: datetime,
        payload: dict[str, Any],
    ) -> None:
        """A durable timer for step ``a`` of its playbook run."""
        assert person.id is not None
        if origin.attributes:
            payload = {**payload, "attributes": origin.attributes}
        writes.insert(
            s,
            _TIMER,
            {
                "person_id": person.id,
                "due_at": due_at,
                "playbook": a.playbook,
                "playbook_version": a.version,
                "step": a.step,
                "subject_ref": a.subject_ref,
                "created_by_event": origin.event_id,
                "status": "pending",
                "payload": payload,
            },
        )

    def _defer(
        self,
        s: Session,
        person: Person,
        a: Send,
        origin: Origin,
        at: datetime,
        channels: list[str],
        **extra: Any,
    ) -> None:
        """Send step ``a`` later, through ``channels`` in this order; the gate checks again
        when the timer fires."""
        payload = {
            "kind": "deferred",
            "template": a.template,
            "channels": channels,
            "not_after": a.not_after.isoformat() if a.not_after else None,
            **extra,
        }
        self._timer(s, person, a, origin, at, payload)

    def _emit(
        self,
        s: Session,
        person: Person,
        state: JourneyState,
        a: Send,
        origin: Origin,
        now: datetime,
        tpl: TemplateConfig,
        channel: str,
        recipient: str,
        pfacts: gate.PersonFacts,
        detail: dict[str, Any],
        *,
        variant: str | None = None,
        propensity: float | None = None,
        hold: bool = False,
    ) -> tuple[Decided, Queued] | None:
        """Render ``a``'s template for ``channel``, record the send decision and queue the
        outbox row. The idempotency key depends only on what was decided and why (person,
        playbook, version, subject, step, template, the event or timer that caused it), so
        deciding the same thing again can never queue a second message. ``hold``: the row
        waits for staff (status ``held``, decision ``hold``/``identity-unresolved``)."""
        assert person.id is not None
        ch = self.channels[channel]
        try:
            content = templates.render(
                tpl.with_variant(variant),
                ch.template_kind,
                person.language,
                self._context(person, state, a, pfacts.timezone, origin),
            )
        except TemplateError as exc:
            detail["error"] = type(exc).__name__
            content, refusal = None, "template-error"
        else:
            refusal = "no-template-for-channel"
        if content is None:
            self._decide_step(s, person, origin, now, a, "suppress", refusal, channel, detail)
            return None
        dec = self._decide(
            s,
            person,
            origin,
            now,
            a.playbook,
            a.version,
            "hold" if hold else "send",
            "identity-unresolved" if hold else "allowed",
            template=a.template,
            channel=channel,
            detail=detail,
            propensity=propensity,
        )
        key = hashlib.sha256(
            f"{person.id}|{a.playbook}|{a.version}|{a.subject_ref}|{a.step}|{a.template}|{origin.tag()}".encode()
        ).hexdigest()[:32]
        writes.insert(
            s,
            _OUTBOX,
            {
                "key": key,
                "decision_id": dec.id,
                "person_id": person.id,
                "channel": channel,
                "template": a.template,
                "playbook": a.playbook,
                "subject_ref": a.subject_ref,
                "purpose": tpl.purpose or a.purpose,
                "phi_class": tpl.phi_class,
                "recipient": recipient,
                "content": content,
                "created_at": now,
                "not_after": a.not_after,
                "next_attempt_at": now,
                "attempts": 0,
                "status": "held" if hold else "pending",
            },
        )
        item = Queued(key, person.id, channel, a.template, a.subject_ref)
        if not hold:  # a held message is not outreach until staff release it
            record_outreach(
                state, Outreach(at=now, playbook=a.playbook, template=a.template, channel=channel, key=key)
            )
        return dec, item

    def _decide_step(
        self,
        s: Session,
        person: Person,
        origin: Origin,
        now: datetime,
        a: Send,
        action: str,
        reason: str,
        channel: str | None,
        detail: dict[str, Any],
        propensity: float | None = None,
    ) -> Decided:
        """``_decide`` for a send step: its playbook, version and template."""
        return self._decide(
            s,
            person,
            origin,
            now,
            a.playbook,
            a.version,
            action,
            reason,
            template=a.template,
            channel=channel,
            detail=detail,
            propensity=propensity,
        )

    def _decide(
        self,
        s: Session,
        person: Person,
        origin: Origin,
        now: datetime,
        playbook: str,
        version: int,
        action: str,
        reason: str,
        *,
        template: str | None = None,
        channel: str | None = None,
        detail: dict[str, Any] | None = None,
        propensity: float | None = None,
    ) -> Decided:
        assert person.id is not None
        values: dict[str, Any] = {
            "person_id": person.id,
            "decided_at": now,
            "event_id": origin.event_id,
            "timer_id": origin.timer_id,
            "playbook": playbook,
            "playbook_version": version,
            "action": action,
            "template": template,
            "channel": channel,
            "reason": reason,
            "detail": detail or {},
            "propensity": propensity,
        }
        # The id the audit record and the outbox row need: handed out before the row is
        # written with the batch's others, or from one INSERT ... RETURNING.
        new_id = writes.next_id(s, _DECISION)
        if new_id is None:
            new_id = s.connection().execute(_DECISION.insert().returning(_DECISION.c.id), values).scalar_one()
        else:
            writes.insert(s, _DECISION, {**values, "id": new_id})
        dec = Decided(new_id)
        audit_log.append(
            s,
            at=now,
            actor="orchestrator",
            action=f"decision.{action}",
            person_id=person.id,
            entity=f"decision/{dec.id}",
            detail={
                "playbook": playbook,
                "version": version,
                "template": template,
                "channel": channel,
                "reason": reason,
            },
        )
        return dec

    # ------------------------------------------------------------------ lookups

    def _state(
        self, s: Session, person: Person, now: datetime
    ) -> tuple[JourneyStateRow | None, JourneyState]:
        """The person's journey state, and its row (None: there is none yet)."""
        assert person.id is not None
        missing: set[int] | None = s.info.get(_NO_STATE_KEY)
        if missing is not None and person.id in missing:
            missing.discard(person.id)  # created by ``_save``; later lookups find it
            row = None
        else:
            row = s.get(JourneyStateRow, person.id)
        if row is None:
            return None, JourneyState()
        return row, JourneyState.model_validate(row.state)

    def _save(
        self, s: Session, person_id: int, row: JourneyStateRow | None, state: JourneyState, now: datetime
    ) -> None:
        doc = state.model_dump(mode="json")
        if row is None:  # the person's first state
            values = {"person_id": person_id, "version": 1, "updated_at": now, "state": doc}
            writes.insert(s, _STATE, values)
        else:
            write_through(s, row, state=doc, version=row.version + 1, updated_at=now)

    def _facts(self, s: Session, person_id: int, now: datetime, parts: frozenset[str]) -> facts.Facts:
        """The person's facts for the gate: the batch's while they hold, else ``parts`` of
        them read now."""
        since = now - facts.WEEK
        batch = facts.current(s)
        got = batch.get(s, person_id, since) if batch is not None else None
        return got if got is not None else facts.read(s, [person_id], since, parts)[person_id]

    def _addresses(self, s: Session, person_id: int) -> dict[str, list[str]]:
        batch = facts.current(s)
        got = batch.get(s, person_id, batch.since) if batch is not None else None
        if got is not None:
            return got.addresses
        # Identifiers change only in the mapping stage, so one read per transaction will do.
        cache: dict[int, dict[str, list[str]]] = s.info.setdefault("careloop.addresses", {})
        if person_id not in cache:
            out: dict[str, list[str]] = {}
            for _, kind, value in _rows(s, facts.ONE["addresses"], pid=person_id):
                if kind in ("phone", "email", "fhir"):
                    out.setdefault(kind, []).append(value)
            cache[person_id] = out
        return cache[person_id]

    def _person_facts(self, s: Session, person: Person, state: JourneyState) -> gate.PersonFacts:
        assert person.id is not None
        f = self._facts(s, person.id, self.store.clock.now(), _GATE_PARTS)
        return gate.PersonFacts(
            deceased=person.deceased or state.deceased,
            timezone=person.timezone or self.config.site.timezone,
            addresses=self._addresses(s, person.id),
            opted_out=frozenset((c, p) for c, p, status, _ in f.consents if status == "opt_out"),
            open_escalations=f.open_escalations,
            opted_in={(c, p): at for c, p, status, at in f.consents if status == "opt_in"},
            # The person's addresses another person also holds (the gate holds sends
            # there), unless ``compliance.shared_contact`` says to send anyway.
            shared=frozenset() if self.config.compliance.shared_contact == "send" else f.shared,
        )

    def _recent_counts(
        self, s: Session, person_id: int, now: datetime, exclude: int | None = None
    ) -> tuple[dict[str, int], dict[str, int]]:
        week_ago, day_ago = now - facts.WEEK, now - timedelta(days=1)
        day: dict[str, int] = {}
        week: dict[str, int] = {}
        for oid, channel, went in self._facts(s, person_id, now, _CAP_PARTS).recent:
            if oid == exclude or went <= week_ago:
                continue
            week[channel] = week.get(channel, 0) + 1
            if went > day_ago:
                day[channel] = day.get(channel, 0) + 1
        return day, week

    def _context(
        self, person: Person, state: JourneyState, a: Send, tz: str, origin: Origin | None = None
    ) -> dict[str, Any]:
        zone = ZoneInfo(tz)
        ctx: dict[str, Any] = {
            "site": {"timezone": self.config.site.timezone},
            "person": {"language": person.language or self.config.site.language, "timezone": tz},
            "appointment": {},
            "encounter": {},
            "product": None,
            "event": {},
        }
        if (appt := state.appointment(a.subject_ref)) is not None:
            ctx["appointment"] = {
                "start": appt.start.astimezone(zone) if appt.start else None,
                "end": appt.end.astimezone(zone) if appt.end else None,
                "location": appt.location,
                "type": appt.type,
                "status": appt.status,
            }
        if (enc := state.encounter(a.subject_ref)) is not None:
            ctx["encounter"] = {
                "discharged_at": enc.discharged_at.astimezone(zone) if enc.discharged_at else None,
                "status": enc.status,
            }
        # The product this run is about (its triggering event's), else the latest mentioned.
        recent = [sig for sig in state.signals if sig.attributes.get("product")]
        if origin is not None and origin.attributes.get("product"):
            ctx["product"] = origin.attributes["product"]
        elif recent:
            ctx["product"] = recent[-1].attributes.get("product")
        return ctx

    def _learning_cfg(self) -> LearningConfig:
        return self.config.learning

    def _triage_config(self) -> triage.TriageConfig:
        cfg: triage.TriageConfig | None = getattr(self, "_triage_cfg", None)
        if cfg is None:
            cfg = triage.TriageConfig.model_validate(getattr(self.config, "triage", None) or {})
            self._triage_cfg = cfg
        return cfg

    # ------------------------------------------------------------------ hooks
    # Implemented by TriageSteps (orchestrator/triage_steps.py) and LearningSteps
    # (orchestrator/learning_steps.py).

    def _triage(
        self, s: Session, person: Person, state: JourneyState, ev: JourneyEvent, origin: Origin, now: datetime
    ) -> None:
        """Assess an inbound message and act on the plan (escalate, reply, derive events)."""
        raise NotImplementedError

    def _triage_timer(self, s: Session, person: Person, state: JourneyState, t: Timer, now: datetime) -> None:
        """An escalation SLA or silence-after-concern timer fired."""
        raise NotImplementedError

    def _learn_send(
        self,
        s: Session,
        person: Person,
        state: JourneyState,
        a: Send,
        origin: Origin,
        now: datetime,
        tpl: TemplateConfig,
        verdict: gate.Verdict,
        pfacts: gate.PersonFacts,
        detail: dict[str, Any],
    ) -> None:
        """Let the learner pick channel, window and variant among ``verdict.allowed``."""
        raise NotImplementedError

    def _learning_outcomes(self, s: Session, person: Person, ev: JourneyEvent, now: datetime) -> None:
        """Record the outcomes ``ev`` carries for earlier sends, and learn from them."""
        raise NotImplementedError


def _to_the_person(item: OutboxItem, ch: gate.ChannelFacts | None) -> bool:
    """Whether ``item`` is a message to its person (their rules apply: STOP, death, quiet
    hours ...), not a notice to staff about them (purpose ``escalation``) or a delivery to
    another system (FHIR write-back, webhook)."""
    return ch is not None and item.purpose != "escalation" and ch.address_kind in gate.PERSON_FACING


def _cancel_decision(
    item: OutboxItem, now: datetime, reason: str, extra: dict[str, Any] | None = None, action: str = "cancel"
) -> Decision:
    """The ``cancel`` (or ``hold``) decision for an outbox item that will not be sent now."""
    return Decision(
        person_id=item.person_id,
        decided_at=now,
        playbook=item.playbook or "-",
        action=action,
        template=item.template,
        channel=item.channel,
        reason=reason,
        detail={"outbox": item.id, **(extra or {})},
    )


def _same_subject(timer_subject: str | None, ev: JourneyEvent, state: JourneyState) -> bool:
    if timer_subject is None or ev.subject_ref == timer_subject:
        return True
    if ev.attributes.get("encounter") == timer_subject:
        return True
    if ev.subject_ref is None or not ev.subject_ref.startswith(timer_subject.split("/", 1)[0] + "/"):
        latest = state.latest_encounter()
        return latest is not None and latest[0] == timer_subject
    return False


@sa_event.listens_for(Session, "after_rollback")
@sa_event.listens_for(Session, "after_soft_rollback")
def _forget_batch(session: Any, *_: Any) -> None:
    # A rolled-back savepoint may have created journey states that are gone again.
    session.info.pop(_NO_STATE_KEY, None)
