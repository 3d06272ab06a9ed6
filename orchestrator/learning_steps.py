"""The orchestrate stage's learning steps (issue 10): the learner
(``orchestrator/learning.py``) picks among the gate's allowed channels, a send window and a
template variant. A later window goes through a "deferred" timer, so the gate checks again
at send time; an immediate send is gated again for the chosen channel alone. Outcomes
(``orchestrator/outcomes.py``) flow back into the evidence as events arrive; a read, click
or reply in another window's hours credits that window (``engaged_window``), not the sent one."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from careloop.clock import utc
from careloop.errors import TransientError
from careloop.tables import (
    JourneyEvent,
    Person,
    Timer,
)
from orchestrator import gate, learning, outcomes
from orchestrator.core import (
    EngineCore,
    Origin,
    log,
)
from orchestrator.playbooks import (
    Send,
)
from orchestrator.state import JourneyState
from orchestrator.templates import TemplateConfig


class LearningSteps(EngineCore):
    """Learner-chosen sends and outcome bookkeeping."""

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
        assert person.id is not None
        cfg = self._learning_cfg()
        committed = self._learn_committed(s, origin)
        if committed is not None:
            # A send the learner deferred to its window: keep that choice (its propensity was
            # logged then), unless the gate no longer allows the channel.
            info = dict(committed)
            channel = str(info["channel"])
            if channel not in verdict.allowed:
                assert verdict.channel is not None
                info.update(fallback_from=channel, channel=verdict.channel, propensity=None)
                channel = verdict.channel
            info["deferred_by"] = origin.timer_id
            at = now if verdict.outcome == "send" else verdict.deliver_at
            assert at is not None
            detail["learning"] = info
            self._learn_execute(
                s,
                person,
                state,
                a,
                origin,
                now,
                tpl,
                verdict,
                pfacts,
                detail,
                channel,
                at,
                str(info.get("variant") or "default"),
            )
            return
        segment = self._learn_segment(s, person, pfacts, now)
        earliest = now if verdict.outcome == "send" else verdict.deliver_at
        assert earliest is not None
        windows = learning.window_options(earliest, now, pfacts.timezone, cfg, self._learn_latest(state, a))
        view = learning.DbStats(s, person_key=str(person.id), segment=segment, now=now, cfg=cfg)
        model = None
        if cfg.model == "belief":
            tz = pfacts.timezone
            model = learning.Model(
                learning.history(s, person.id, now, cfg, tz),
                self._belief_links.get(s, cfg, self.config.site.timezone),
                cfg.rewards.get("read", 0.0),
            )
        rng = learning.rng_for(
            cfg, person.id, a.playbook, a.version, a.subject_ref, a.step, a.template, origin.tag()
        )
        choice = learning.choose(
            view,
            person_key=str(person.id),
            segment=segment,
            channels=list(verdict.allowed),
            windows=windows or {learning.ASAP: earliest},
            variants_for=lambda c: tpl.variants_for(self.channels[c].template_kind),
            template=a.template,
            rng=rng,
            cfg=cfg,
            tz=pfacts.timezone,
            model=model,
        )
        detail["learning"] = choice.to_json()
        self._learn_execute(
            s,
            person,
            state,
            a,
            origin,
            now,
            tpl,
            verdict,
            pfacts,
            detail,
            choice.channel,
            choice.at,
            choice.variant,
        )

    def _learn_execute(
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
        channel: str,
        at: datetime,
        variant: str,
    ) -> None:
        assert person.id is not None
        info = detail["learning"]
        propensity = info.get("propensity")
        if at <= now:
            # The gate passed the first allowed channel for quiet hours; check the chosen one.
            day, week = self._recent_counts(s, person.id, now)
            v = gate.evaluate(
                gate.GateInput(
                    now=now,
                    person=pfacts,
                    template_kinds=frozenset(tpl.kinds()),
                    phi_class=tpl.phi_class,
                    purpose=tpl.purpose or a.purpose,
                    channels=[self.channels[channel]],
                    sent_day=day,
                    sent_week=week,
                    caps=self.caps,
                    kind_of=self.kind_of,
                    quiet_hours=self.quiet,
                    not_after=a.not_after,
                    **self.opt_in,
                )
            )
            if v.outcome == "suppress":
                self._decide_step(s, person, origin, now, a, "suppress", v.reason, channel, detail)
                return
            if v.outcome == "defer":
                assert v.deliver_at is not None
                at = v.deliver_at
        if at > now:
            order = [channel] + [c for c in verdict.allowed if c != channel]
            self._defer(
                s, person, a, origin, at, order, learning={**info, "channel": channel, "at": at.isoformat()}
            )
            detail["deliver_at"] = at.isoformat()
            quiet = verdict.outcome == "defer" and at == verdict.deliver_at
            self._decide_step(
                s,
                person,
                origin,
                now,
                a,
                "defer",
                "quiet-hours" if quiet else "learning-window",
                channel,
                detail,
                propensity,
            )
            return
        ch = self.channels[channel]
        # The gate's own choice of address (a shared family phone is passed over).
        facts_only = gate.GateInput(now, pfacts, frozenset(), tpl.phi_class, a.purpose, [ch])
        recipient = gate.recipient(facts_only, ch)
        emitted = self._emit(
            s,
            person,
            state,
            a,
            origin,
            now,
            tpl,
            channel,
            recipient,
            pfacts,
            detail,
            variant=variant,
            propensity=propensity,
        )
        if emitted is None:
            return
        dec, item = emitted
        window, segment = str(info.get("window") or learning.ASAP), str(info.get("segment") or "*")
        outcomes.register(
            s,
            decision_id=dec.id,
            item=item,
            window=window,
            variant=variant,
            segment=segment,
            propensity=propensity,
            learned=True,
            now=now,
        )
        learning.record(
            s,
            self._learning_cfg(),
            person_key=str(person.id),
            segment=segment,
            arms=learning.arms(channel, window, a.template, variant),
            now=now,
            trial=True,
            delta=0.0,
            engaged=0,
        )

    def _learn_committed(self, s: Session, origin: Origin) -> dict[str, Any] | None:
        if origin.timer_id is None:
            return None
        t = s.get(Timer, origin.timer_id)
        if t is None or t.payload.get("kind") != "deferred":
            return None
        info = t.payload.get("learning")
        return dict(info) if isinstance(info, dict) else None

    def _learn_segment(self, s: Session, person: Person, pfacts: gate.PersonFacts, now: datetime) -> str:
        reach = [k for k in ("phone", "email") if pfacts.addresses.get(k)]
        return learning.segment_key(
            self._learning_cfg(),
            birth=(person.patient or {}).get("birthDate"),
            language=person.language or self.config.site.language,
            reach=reach,
            today=now.date(),
        )

    def _learn_latest(self, state: JourneyState, a: Send) -> datetime | None:
        """No window after the message's useful life, nor too close to the appointment."""
        ends = [a.not_after] if a.not_after else []
        appt = state.appointment(a.subject_ref)
        if appt is not None and appt.start is not None:
            ends.append(utc(appt.start) - timedelta(hours=self._learning_cfg().min_lead_hours))
        return min(ends) if ends else None

    def _learning_outcomes(self, s: Session, person: Person, ev: JourneyEvent, now: datetime) -> None:
        if not outcomes.carries_outcome(ev.type):
            return
        cfg = self._learning_cfg()
        tz = person.timezone or self.config.site.timezone  # as the gate's PersonFacts
        try:
            with s.begin_nested():
                for c in outcomes.on_event(s, ev, cfg, now, tz):
                    r = c.row
                    if not (cfg.enabled and r.learned) or c.new_reward == c.old_reward:
                        continue
                    sent = r.window or learning.ASAP
                    arms = learning.arms(r.channel, sent, r.template, r.variant or "default")
                    delta = c.new_reward - c.old_reward
                    engaged = int(c.new_reward > 0) - int(c.old_reward > 0)
                    seen = r.engaged_window
                    if seen is not None and seen != sent:
                        # The person engaged in another window: that window gets the reward
                        # (successes only) and counts the engagement; the sent one keeps its
                        # trial, a failure.
                        arms = [arm for arm in arms if arm[0] != "window"]
                        learning.record(
                            s,
                            cfg,
                            person_key=str(r.person_id),
                            segment=r.segment or "*",
                            arms=[("window", seen)],
                            now=now,
                            trial=False,
                            delta=delta,
                            engaged=engaged,
                            credit=True,
                        )
                    learning.record(
                        s,
                        cfg,
                        person_key=str(r.person_id),
                        segment=r.segment or "*",
                        arms=arms,
                        now=now,
                        trial=False,
                        delta=delta,
                        engaged=engaged,
                    )
        except (OperationalError, TransientError):
            raise
        except Exception as exc:  # outcome bookkeeping never blocks the journey itself
            log.error("outcome tracking failed for journey_event %s: %s", ev.id, type(exc).__name__)
