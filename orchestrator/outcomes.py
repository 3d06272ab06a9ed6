"""What became of each outreach (issue 10): outcomes joined back to the decision that caused them.

One ``outreach_outcome`` row per sent outbox item (created at send time when the learner
chose it, else on its first outcome), updated online as journey events arrive:

- ``message.delivered|read|failed`` (and any ``*.clicked``) name the outbox item by key
  (``attributes.key`` or ``attributes.outbox_key``);
- ``message.inbound`` is a reply to the person's latest outreach within
  ``reply_window_hours`` (the same channel first, else any); the STOP keyword is an opt-out,
  which zeroes the reward;
- ``appointment.confirmed`` credits the latest outreach about that appointment within
  ``confirm_window_days``; ``appointment.fulfilled``/``appointment.noshow`` every outreach
  about it.

The reward is the best configured weight among the outcomes seen (``learning.rewards``),
capped at 1, or 0 after an opt-out. Each outcome keeps its first time only, so duplicate
or replayed events change nothing.

When a person reads, clicks or replies tells which send window they are active in: the
outcome of theirs that first earns the send a reward sets ``engaged_window`` (the window
holding that moment in their timezone, ``learning.engaged_window``; the window it was sent
in when it came within ``prompt_hours`` of the message's arrival), once. Deliveries,
failures, opt-outs and appointment outcomes (recorded at a clerk's or the EHR's time) say
nothing about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select

from careloop.clock import utc
from careloop.config import LearningConfig
from careloop.tables import Decision, JourneyEvent, OutboxItem, OutreachOutcome
from orchestrator import learning

FIELDS = {
    "delivered": "delivered_at",
    "read": "read_at",
    "clicked": "clicked_at",
    "replied": "replied_at",
    "confirmed": "confirmed_at",
    "attended": "attended_at",
    "noshow": "noshow_at",
}
MESSAGE_EVENTS = {
    "message.delivered": "delivered",
    "message.read": "read",
    "message.clicked": "clicked",
    "message.failed": "failed",
}
APPOINTMENT_OUTCOMES = ("appointment.confirmed", "appointment.fulfilled", "appointment.noshow")
NOT_SENT = ("pending", "held", "cancelled", "dead")  # receipts move a sent item on (delivered, read, ...)
NOT_OUTREACH = ("triage",)  # answers to the person's own messages are not outreach to learn from
TIMED = ("read", "clicked", "replied")  # the person's own actions, at a moment of their choosing


@dataclass(frozen=True, slots=True)
class Change:
    row: OutreachOutcome
    outcome: str
    old_reward: float
    new_reward: float


def reward(row: OutreachOutcome, weights: dict[str, float]) -> float:
    if row.opted_out_at is not None:
        return 0.0
    got = [weights.get(o, 0.0) for o, f in FIELDS.items() if getattr(row, f) is not None]
    return min(1.0, max(got, default=0.0))


@dataclass(frozen=True, slots=True)
class Queued:
    """An outbox row a send just queued, as far as its outcome row needs it."""

    key: str
    person_id: int
    channel: str
    template: str
    subject_ref: str | None


def register(
    s: Session,
    *,
    decision_id: int,
    item: Queued,
    window: str | None,
    variant: str | None,
    segment: str | None,
    propensity: float | None,
    learned: bool,
    now: datetime,
) -> OutreachOutcome:
    """The outcome row of a send, created with it (the learner's sends)."""
    row = OutreachOutcome(
        decision_id=decision_id,
        outbox_key=item.key,
        person_id=item.person_id,
        channel=item.channel,
        template=item.template,
        subject_ref=item.subject_ref,
        window=window,
        variant=variant,
        segment=segment,
        propensity=propensity,
        sent_at=now,
        learned=learned,
        updated_at=now,
    )
    s.add(row)
    return row


def _for_item(s: Session, item: OutboxItem) -> OutreachOutcome:
    row = s.exec(select(OutreachOutcome).where(OutreachOutcome.outbox_key == item.key)).first()
    if row is not None:
        return row
    dec = s.get(Decision, item.decision_id) if item.decision_id is not None else None
    row = OutreachOutcome(
        decision_id=item.decision_id,
        outbox_key=item.key,
        person_id=item.person_id,
        channel=item.channel,
        template=item.template,
        subject_ref=item.subject_ref,
        propensity=dec.propensity if dec is not None else None,
        sent_at=utc(item.released_at or item.created_at),
        learned=False,
        updated_at=utc(item.released_at or item.created_at),
    )
    s.add(row)
    s.flush()
    return row


def _outreach(
    s: Session, person_id: int, since: datetime, until: datetime, subject_ref: str | None = None
) -> list[OutboxItem]:
    went = func.coalesce(col(OutboxItem.released_at), col(OutboxItem.created_at))  # see ``released_at``
    q = select(OutboxItem).where(
        OutboxItem.person_id == person_id,
        col(OutboxItem.status).not_in(NOT_SENT),
        went >= since,
        went <= until,
        col(OutboxItem.playbook).not_in(NOT_OUTREACH),
    )
    if subject_ref is not None:
        q = q.where(OutboxItem.subject_ref == subject_ref)
    return list(s.exec(q.order_by(went.desc(), col(OutboxItem.id).desc())).all())


def _targets(s: Session, ev: JourneyEvent, cfg: LearningConfig) -> list[tuple[OutboxItem, str]]:
    at = utc(ev.occurred_at)
    attrs = ev.attributes
    if ev.type.startswith("message.") and ev.type != "message.inbound":
        outcome = MESSAGE_EVENTS.get(ev.type) or ("clicked" if ev.type.endswith(".clicked") else None)
        key = attrs.get("key") or attrs.get("outbox_key")
        if outcome is None or not isinstance(key, str):
            return []
        item = s.exec(select(OutboxItem).where(OutboxItem.key == key)).first()
        return [(item, outcome)] if item is not None else []
    if ev.person_id is None:
        return []
    if ev.type == "message.inbound":
        if attrs.get("unverified"):  # a sender we could not authenticate teaches nothing
            return []
        items = _outreach(s, ev.person_id, at - timedelta(hours=cfg.reply_window_hours), at)
        same = [i for i in items if i.channel == attrs.get("channel")]
        pick = (same or items)[:1]
        outcome = "opted_out" if str(attrs.get("keyword") or "").lower() == "stop" else "replied"
        return [(i, outcome) for i in pick]
    if ev.type == APPOINTMENT_OUTCOMES[0] and ev.subject_ref:
        items = _outreach(s, ev.person_id, at - timedelta(days=cfg.confirm_window_days), at, ev.subject_ref)
        return [(i, "confirmed") for i in items[:1]]
    if ev.type in APPOINTMENT_OUTCOMES[1:] and ev.subject_ref:
        items = _outreach(s, ev.person_id, at - timedelta(days=90), at, ev.subject_ref)
        return [(i, ev.type.split(".", 1)[1].replace("fulfilled", "attended")) for i in items]
    return []


def carries_outcome(event_type: str) -> bool:
    """Whether an event of this type can be the outcome of an earlier send (``on_event``
    finds nothing for any other type)."""
    return event_type.startswith("message.") or event_type in APPOINTMENT_OUTCOMES


def on_event(
    s: Session, ev: JourneyEvent, cfg: LearningConfig, now: datetime, tz: str | None = None
) -> list[Change]:
    """Record the outcomes ``ev`` carries; returns each row whose outcome was new. ``tz``:
    the timezone of ``ev``'s person, to place their read, click or reply in a send window
    (without it, or for another person's outreach, no ``engaged_window`` is set)."""
    changes: list[Change] = []
    at = utc(ev.occurred_at)
    for item, outcome in _targets(s, ev, cfg):
        row = _for_item(s, item)
        attr = (
            "opted_out_at"
            if outcome == "opted_out"
            else ("failed_at" if outcome == "failed" else FIELDS[outcome])
        )
        if getattr(row, attr) is not None:
            continue  # the first time counts; duplicates and replays change nothing
        old = row.reward
        setattr(row, attr, at)
        row.reward = reward(row, cfg.rewards)
        if (
            tz is not None
            and outcome in TIMED
            and old <= 0.0 < row.reward
            and row.engaged_window is None
            and row.person_id == ev.person_id
        ):
            # Set once, by the outcome that first earned a reward: every later change of the
            # reward (a reply after a read, a STOP) then moves mass in the same window.
            # the clock starts when the message reached them: its delivery receipt, else its
            # release by staff, else its send (a message retried for hours is not read late)
            came = max(utc(t) for t in (row.sent_at, item.released_at, row.delivered_at) if t is not None)
            prompt = at - came <= timedelta(hours=cfg.prompt_hours)
            row.engaged_window = row.window if prompt else learning.engaged_window(at, tz, cfg)
        row.updated_at = now
        changes.append(Change(row, outcome, old, row.reward))
    return changes
