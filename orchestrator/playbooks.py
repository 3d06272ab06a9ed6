"""Playbooks: YAML-declared journeys, decided by pure functions.

A playbook starts a *run* for a subject (an appointment, an encounter, or the person)
when one of its ``on`` events arrives, walks its ``steps`` in order, and is cancelled by
its ``cancel_on`` events. A step either sends a template (now, or at an anchor time such
as ``appointment.start - 72h``), waits for an event with a timeout, escalates, or exits.
A step that must wait becomes a durable timer; when the timer fires the step is decided
again against the journey state of that moment, so confirmations, cancellations and
reschedules that happened meanwhile are honoured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from careloop.model import is_known_event_type
from orchestrator.state import JourneyState
from orchestrator.timeexpr import parse_anchor, parse_duration

# A timer whose anchor moved later by more than this is re-scheduled, not fired.
MOVE_TOLERANCE = timedelta(minutes=1)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _event_type(v: str) -> str:
    if not is_known_event_type(v):
        raise ValueError(f"unknown event type {v!r}")
    return v


def _listify(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class NoRecent(_Strict):
    type: str
    within: str
    same: list[str] = Field(default_factory=list, description="event attributes that must match")

    _t = field_validator("type")(_event_type)

    @field_validator("within")
    @classmethod
    def _dur(cls, v: str) -> str:
        parse_duration(v)
        return v


class Condition(_Strict):
    """Exactly one test. ``reason`` names the suppression code when the test fails."""

    appointment_status: list[str] | None = Field(None, alias="appointment.status")
    encounter_status: list[str] | None = Field(None, alias="encounter.status")
    instructions_delivered: bool | None = None
    no_recent: NoRecent | None = None
    after: str | None = None  # now >= anchor
    before: str | None = None  # now < anchor
    reason: str | None = None

    @field_validator("after", "before")
    @classmethod
    def _anchor(cls, v: str | None) -> str | None:
        if v is not None:
            parse_anchor(v)
        return v

    @model_validator(mode="after")
    def _one(self) -> Condition:
        tests = [k for k in self.model_fields_set if k != "reason"]
        if len(tests) != 1:
            raise ValueError("a condition holds exactly one test")
        return self

    def code(self) -> str:
        if self.reason:
            return self.reason
        if self.appointment_status is not None:
            return "appointment-status"
        if self.encounter_status is not None:
            return "encounter-status"
        if self.instructions_delivered is not None:
            return "instructions-not-delivered" if self.instructions_delivered else "instructions-delivered"
        if self.no_recent is not None:
            return f"recent-{self.no_recent.type}"
        return "too-early" if self.after else "too-late"


class EscalateSpec(_Strict):
    severity: Literal["emergency", "urgent", "routine"] = "routine"
    reason: str


class Step(_Strict):
    send: str | None = None
    at: str | None = None
    channels: list[str] | None = None
    not_after: str | None = None
    when: list[Condition] = Field(default_factory=list)
    wait_for: str | None = None
    timeout: str | None = None
    on_timeout: Literal["escalate", "exit", "continue"] = "exit"
    escalate: EscalateSpec | None = None
    exit: bool = False

    @field_validator("at", "not_after")
    @classmethod
    def _anchor(cls, v: str | None) -> str | None:
        if v is not None:
            parse_anchor(v)
        return v

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: str | None) -> str | None:
        if v is not None:
            parse_duration(v)
        return v

    @field_validator("wait_for")
    @classmethod
    def _wait(cls, v: str | None) -> str | None:
        return _event_type(v) if v is not None else v

    @model_validator(mode="after")
    def _kind(self) -> Step:
        kinds = [k for k in ("send", "wait_for", "escalate") if getattr(self, k) is not None] + (
            ["exit"] if self.exit else []
        )
        if len(kinds) != 1:
            raise ValueError("a step does exactly one of: send, wait_for, escalate, exit")
        if self.wait_for and not self.timeout:
            raise ValueError("wait_for needs a timeout")
        return self


EventType = Annotated[str, AfterValidator(_event_type)]


class PlaybookConfig(_Strict):
    version: int = Field(1, ge=1)
    description: str | None = None
    on: list[EventType]
    cancel_on: list[EventType] = Field(default_factory=list)
    when: list[Condition] = Field(default_factory=list)
    steps: list[Step] = Field(min_length=1)
    purpose: str = "care-coordination"
    shadow: bool = False
    timeout_escalation: EscalateSpec | None = None  # what a wait_for timeout escalates with

    _l = field_validator("on", "cancel_on", mode="before")(_listify)


# ----------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Send:
    playbook: str
    version: int
    step: int
    template: str
    channels: list[str] | None
    subject_ref: str | None
    not_after: datetime | None
    purpose: str
    shadow: bool


@dataclass(frozen=True, slots=True)
class Schedule:
    playbook: str
    version: int
    step: int
    due_at: datetime
    subject_ref: str | None
    kind: str  # "step" | "wait"
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Suppress:
    playbook: str
    version: int
    step: int
    template: str | None
    reason: str
    subject_ref: str | None


@dataclass(frozen=True, slots=True)
class CancelRun:
    playbook: str
    subject_ref: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class Escalate:
    playbook: str
    version: int
    severity: str
    reason: str
    subject_ref: str | None


Action = Send | Schedule | Suppress | CancelRun | Escalate


@dataclass(frozen=True, slots=True)
class Ctx:
    """What a decision may look at: never the database, never the wall clock."""

    state: JourneyState
    now: datetime
    subject_ref: str | None
    event_type: str | None = None
    event_at: datetime | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


def anchor_time(expr: str, ctx: Ctx) -> datetime | None:
    name, offset = parse_anchor(expr)
    base: datetime | None
    if name == "now":
        base = ctx.now
    elif name == "event":
        base = ctx.event_at or ctx.now
    elif name.startswith("appointment."):
        appt = ctx.state.appointment(ctx.subject_ref)
        base = (appt.start if name.endswith("start") else appt.end or appt.start) if appt else None
    elif name.startswith("encounter."):
        enc = ctx.state.encounter(ctx.subject_ref)
        base = (enc.admitted_at if name.endswith("start") else enc.discharged_at) if enc else None
    else:  # instructions.delivered
        enc = ctx.state.encounter(ctx.subject_ref)
        base = enc.instructions_delivered_at if enc else None
    return base + offset if base else None


def failing_condition(conds: list[Condition], ctx: Ctx) -> Condition | None:
    for c in conds:
        if not _holds(c, ctx):
            return c
    return None


def _holds(c: Condition, ctx: Ctx) -> bool:
    if c.appointment_status is not None:
        appt = ctx.state.appointment(ctx.subject_ref)
        return appt is not None and appt.status in c.appointment_status
    if c.encounter_status is not None:
        enc = ctx.state.encounter(ctx.subject_ref)
        return enc is not None and enc.status in c.encounter_status
    if c.instructions_delivered is not None:
        enc = ctx.state.encounter(ctx.subject_ref)
        delivered = enc is not None and enc.instructions_delivered_at is not None
        return delivered == c.instructions_delivered
    if c.no_recent is not None:
        since = ctx.now - parse_duration(c.no_recent.within)
        for sig in ctx.state.signals:
            if (
                sig.type == c.no_recent.type
                and sig.at >= since
                and all(_same(sig.attributes.get(k), ctx.attributes.get(k)) for k in c.no_recent.same)
            ):
                return False
        return True
    expr = c.after or c.before
    assert expr is not None
    t = anchor_time(expr, ctx)
    if t is None:
        return False
    return ctx.now >= t if c.after else ctx.now < t


def _same(signal_value: Any, ours: Any) -> bool:
    """``no_recent.same``: the recent signal is about the same thing as this decision. When
    this decision does not know the value (a timer fired: a quiet-hours deferral or a
    scheduled step carries no event attributes), any recent signal counts: an offer that
    cannot be shown to be for another product is not sent while a refund is in progress."""
    return ours is None or signal_value == ours


def _escalate(pid: str, pb: PlaybookConfig, severity: str, reason: str, ctx: Ctx, step: int) -> Action:
    """An escalation, or for a shadow playbook its record only: a playbook on trial must not
    open real work for staff, nor pause the person's live outreach (the gate's
    ``escalation-open``)."""
    if pb.shadow:
        return Suppress(pid, pb.version, step, None, "shadow-escalation", ctx.subject_ref)
    return Escalate(pid, pb.version, severity, reason, ctx.subject_ref)


def _default_not_after(ctx: Ctx) -> datetime | None:
    # A reminder about an appointment is useless once the appointment has started.
    appt = ctx.state.appointment(ctx.subject_ref)
    return appt.start if appt else None


def run_from(pid: str, pb: PlaybookConfig, index: int, ctx: Ctx) -> list[Action]:
    """Walk ``pb``'s steps from ``index`` until one must wait (a timer) or the run ends."""
    out: list[Action] = []
    steps = pb.steps
    i = index
    while i < len(steps):
        st = steps[i]
        if st.exit:
            break
        if st.escalate is not None:
            out.append(_escalate(pid, pb, st.escalate.severity, st.escalate.reason, ctx, i))
            i += 1
            continue
        if st.wait_for is not None:
            if _already(st.wait_for, ctx):
                i += 1
                continue
            assert st.timeout is not None
            # The wait began when the triggering event happened (a message that arrives
            # late must not stretch it), unless this run has just sent something.
            began = ctx.now
            if (
                ctx.event_at is not None
                and ctx.event_at < ctx.now
                and not any(isinstance(a, Send) for a in out)
            ):
                began = ctx.event_at
            out.append(
                Schedule(
                    pid,
                    pb.version,
                    i,
                    began + parse_duration(st.timeout),
                    ctx.subject_ref,
                    "wait",
                    {"wait_for": st.wait_for},
                )
            )
            return out
        assert st.send is not None
        due = anchor_time(st.at, ctx) if st.at else ctx.now
        if due is None:
            out.append(Suppress(pid, pb.version, i, st.send, "missing-anchor-time", ctx.subject_ref))
            i += 1
            continue
        if due > ctx.now:
            out.append(Schedule(pid, pb.version, i, due, ctx.subject_ref, "step", {"template": st.send}))
            return out
        if _superseded(steps, i, ctx):
            out.append(Suppress(pid, pb.version, i, st.send, "superseded", ctx.subject_ref))
            i += 1
            continue
        bad = failing_condition(st.when, ctx)
        not_after = anchor_time(st.not_after, ctx) if st.not_after else _default_not_after(ctx)
        ended = _subject_refusal(pb, ctx)
        if ended is not None:
            out.append(Suppress(pid, pb.version, i, st.send, ended, ctx.subject_ref))
        elif bad is not None:
            out.append(Suppress(pid, pb.version, i, st.send, bad.code(), ctx.subject_ref))
        elif not_after is not None and ctx.now >= not_after:
            out.append(Suppress(pid, pb.version, i, st.send, "past-useful-life", ctx.subject_ref))
        else:
            out.append(
                Send(
                    pid,
                    pb.version,
                    i,
                    st.send,
                    st.channels,
                    ctx.subject_ref,
                    not_after,
                    pb.purpose,
                    pb.shadow,
                )
            )
        i += 1
    return out


def _superseded(steps: list[Step], i: int, ctx: Ctx) -> bool:
    """A missed send step is dropped when a later send step of the same template is also due."""
    for later in steps[i + 1 :]:
        if later.send is None:
            return False
        if later.send == steps[i].send:
            due = anchor_time(later.at, ctx) if later.at else ctx.now
            return due is not None and due <= ctx.now
    return False


def _already(event_type: str, ctx: Ctx) -> bool:
    if event_type == "discharge_instructions.delivered":
        enc = ctx.state.encounter(ctx.subject_ref)
        return enc is not None and enc.instructions_delivered_at is not None
    return False


_TERMINAL = {
    "appointment.confirmed": "confirmed",
    "appointment.cancelled": "cancelled",
    "appointment.noshow": "noshow",
    "appointment.fulfilled": "fulfilled",
}


def on_event(pid: str, pb: PlaybookConfig, ctx: Ctx) -> list[Action]:
    """What ``pb`` does about the event in ``ctx``: cancel its run, start one, or nothing."""
    assert ctx.event_type is not None
    out: list[Action] = []
    if ctx.event_type in pb.cancel_on:
        out.append(CancelRun(pid, ctx.subject_ref, ctx.event_type.replace(".", "-")))
    if ctx.event_type in pb.on:
        bad = failing_condition(pb.when, ctx)
        if bad is not None:
            first = next((s.send for s in pb.steps if s.send), None)
            out.append(Suppress(pid, pb.version, 0, first, bad.code(), ctx.subject_ref))
        else:
            out.extend(run_from(pid, pb, 0, ctx))
    return out


def _subject_refusal(pb: PlaybookConfig, ctx: Ctx) -> str | None:
    """The appointment is in a state this playbook is cancelled by (confirmed, cancelled, ...)."""
    appt = ctx.state.appointment(ctx.subject_ref)
    if appt is not None:
        for etype, status in _TERMINAL.items():
            if etype in pb.cancel_on and appt.status == status:
                return f"appointment-{status}"
    return None


def on_step_timer(pid: str, pb: PlaybookConfig, step: int, due_at: datetime, ctx: Ctx) -> list[Action]:
    """A step timer fired: decide the step again against the state of this moment."""
    st = pb.steps[step] if step < len(pb.steps) else None
    if st is None or st.send is None:
        return []
    ended = _subject_refusal(pb, ctx)
    if ended is not None:
        return [Suppress(pid, pb.version, step, st.send, ended, ctx.subject_ref)]
    bad = failing_condition(pb.when, ctx)
    if bad is not None:
        return [Suppress(pid, pb.version, step, st.send, bad.code(), ctx.subject_ref)]
    if st.at:
        due = anchor_time(st.at, ctx)
        if due is not None and due > ctx.now + MOVE_TOLERANCE:
            return [Schedule(pid, pb.version, step, due, ctx.subject_ref, "step", {"template": st.send})]
    return run_from(pid, pb, step, ctx)


def on_wait_timeout(pid: str, pb: PlaybookConfig, step: int, ctx: Ctx) -> list[Action]:
    st = pb.steps[step]
    if st.on_timeout == "escalate":
        spec = pb.timeout_escalation or EscalateSpec(severity="routine", reason=f"no-{st.wait_for}")
        return [_escalate(pid, pb, spec.severity, spec.reason, ctx, step)]
    if st.on_timeout == "continue":
        return run_from(pid, pb, step + 1, ctx)
    return []


def on_wait_satisfied(pid: str, pb: PlaybookConfig, step: int, ctx: Ctx) -> list[Action]:
    return run_from(pid, pb, step + 1, ctx)


def templates_used(pb: PlaybookConfig) -> list[str]:
    return [s.send for s in pb.steps if s.send]
