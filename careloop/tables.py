"""The store's tables (SQLModel). Schema changes go through Alembic (careloop/migrations).

Each pipeline stage reads the previous stage's table and writes its own:
raw_message -> journey_event -> decision/timer/outbox -> delivery_receipt, with
audit_record written in the same transaction as each piece of work.
Times are stored in UTC; read them back through ``careloop.clock.utc``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Double, Index, LargeBinary, UniqueConstraint, text
from sqlmodel import Field, SQLModel


def _ts(**kw: Any) -> Any:
    return Field(sa_column=Column(DateTime(timezone=True), **kw))


def _json() -> Any:
    return Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class RawMessage(SQLModel, table=True):
    """Every inbound signal, exactly as received; append-only except for its status."""

    __tablename__ = "raw_message"
    __table_args__ = (
        UniqueConstraint("connector", "dedup_key", name="uq_raw_dedup"),
        Index("ix_raw_status", "status", "id"),
    )
    id: int | None = Field(default=None, primary_key=True)
    connector: str = Field(max_length=64)
    kind: str = Field(max_length=64)  # e.g. "hl7v2:SIU^S12", "fhir:Appointment", "crm:refund.initiated"
    content_type: str = Field(max_length=64)
    dedup_key: str | None = Field(default=None, max_length=255)
    received_at: datetime = _ts(nullable=False)
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    headers: dict[str, Any] = _json()
    ack: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    status: str = Field(default="pending", max_length=16)  # pending|mapped|skipped|error|dead
    status_reason: str | None = Field(default=None, max_length=500)
    attempts: int = 0
    next_attempt_at: datetime | None = _ts(nullable=True)


class Person(SQLModel, table=True):
    """One human across systems. ``merged_into`` points at the survivor after a merge."""

    __tablename__ = "person"
    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = _ts(nullable=False)
    merged_into: int | None = Field(default=None, foreign_key="person.id")
    deceased: bool = False
    language: str | None = Field(default=None, max_length=16)
    timezone: str | None = Field(default=None, max_length=64)
    patient: dict[str, Any] = _json()  # FHIR R4 Patient, the merged view of every source


class PersonIdentifier(SQLModel, table=True):
    """A linked identifier. The same (system, value) is the same person, except for
    contact points (phone/email), which may be shared and are then ambiguous."""

    __tablename__ = "person_identifier"
    __table_args__ = (
        UniqueConstraint("system", "value", "person_id", name="uq_ident"),
        Index("ix_ident_lookup", "system", "value"),
    )
    id: int | None = Field(default=None, primary_key=True)
    person_id: int = Field(foreign_key="person.id", index=True)
    kind: str = Field(max_length=16)  # mrn|fhir|crm|phone|email|other
    system: str = Field(max_length=255)
    value: str = Field(max_length=255)
    verified: bool = False


class Resource(SQLModel, table=True):
    """The latest FHIR R4 version of each subject (Appointment, Encounter, ...)."""

    __tablename__ = "resource"
    ref: str = Field(primary_key=True, max_length=255)  # "Appointment/<id>"
    resource_type: str = Field(max_length=64)
    person_id: int | None = Field(default=None, foreign_key="person.id", index=True)
    updated_at: datetime = _ts(nullable=False)
    body: dict[str, Any] = _json()


class JourneyEvent(SQLModel, table=True):
    __tablename__ = "journey_event"
    __table_args__ = (Index("ix_event_status", "status", "id"),)
    id: int | None = Field(default=None, primary_key=True)
    event_key: str = Field(max_length=255, unique=True)  # idempotency: raw id + position
    person_id: int | None = Field(default=None, foreign_key="person.id", index=True)
    type: str = Field(max_length=64)
    occurred_at: datetime = _ts(nullable=False)
    recorded_at: datetime = _ts(nullable=False)
    subject_ref: str | None = Field(default=None, max_length=255)
    attributes: dict[str, Any] = _json()
    raw_message_id: int | None = Field(default=None, foreign_key="raw_message.id")
    status: str = Field(default="pending", max_length=16)  # pending|processed|held|dead
    status_reason: str | None = Field(default=None, max_length=500)
    attempts: int = 0
    next_attempt_at: datetime | None = _ts(nullable=True)


class JourneyStateRow(SQLModel, table=True):
    """A snapshot of a person's journey state, folded from their events."""

    __tablename__ = "journey_state"
    person_id: int = Field(primary_key=True, foreign_key="person.id")
    version: int = 0
    updated_at: datetime = _ts(nullable=False)
    state: dict[str, Any] = _json()


class Consent(SQLModel, table=True):
    """The latest consent or opt-out per person, channel and purpose ("*" = any)."""

    __tablename__ = "consent"
    __table_args__ = (UniqueConstraint("person_id", "channel", "purpose", name="uq_consent"),)
    id: int | None = Field(default=None, primary_key=True)
    person_id: int = Field(foreign_key="person.id", index=True)
    channel: str = Field(max_length=32)
    purpose: str = Field(max_length=64)
    status: str = Field(max_length=16)  # opt_in|opt_out
    at: datetime = _ts(nullable=False)
    source: str = Field(max_length=64)


class Decision(SQLModel, table=True):
    """Every decision, sent or suppressed, with its reason code."""

    __tablename__ = "decision"
    id: int | None = Field(default=None, primary_key=True)
    person_id: int = Field(foreign_key="person.id", index=True)
    decided_at: datetime = _ts(nullable=False)
    event_id: int | None = Field(default=None, foreign_key="journey_event.id")
    timer_id: int | None = Field(default=None)
    playbook: str = Field(max_length=64)
    playbook_version: int = 1
    action: str = Field(max_length=16)  # send|suppress|defer|schedule|cancel|escalate|shadow|hold|release
    template: str | None = Field(default=None, max_length=64)
    channel: str | None = Field(default=None, max_length=32)
    reason: str = Field(max_length=64)
    detail: dict[str, Any] = _json()
    propensity: float | None = None


class Timer(SQLModel, table=True):
    """A durable wake-up; re-evaluated against the current journey state when it fires."""

    __tablename__ = "timer"
    __table_args__ = (Index("ix_timer_due", "status", "due_at"),)
    id: int | None = Field(default=None, primary_key=True)
    person_id: int = Field(foreign_key="person.id", index=True)
    due_at: datetime = _ts(nullable=False)
    playbook: str = Field(max_length=64)
    playbook_version: int = 1
    step: int = 0
    subject_ref: str | None = Field(default=None, max_length=255)
    created_by_event: int | None = None
    status: str = Field(default="pending", max_length=16)  # pending|fired|cancelled
    status_reason: str | None = Field(default=None, max_length=64)
    payload: dict[str, Any] = _json()


class OutboxItem(SQLModel, table=True):
    """One message to deliver. ``key`` is the idempotency key given to providers."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_due", "status", "next_attempt_at"),
        # A provider's message belongs to one item (migration 0005): two recoveries cannot
        # both adopt it. Per channel: a provider id is unique only within its provider (two
        # EHRs may both hand out ``Communication/1``); no channel gives two items of its own
        # one id (keys, key-derived Message-IDs, Twilio SIDs, FHIR resources created or
        # found by the item's own key). Rows without one are left out.
        Index(
            "uq_outbox_provider",
            "channel",
            "provider_id",
            unique=True,
            postgresql_where=text("provider_id IS NOT NULL"),
            sqlite_where=text("provider_id IS NOT NULL"),
        ),
    )
    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(max_length=128, unique=True)
    decision_id: int | None = Field(default=None, foreign_key="decision.id")
    person_id: int = Field(foreign_key="person.id", index=True)
    channel: str = Field(max_length=32)
    template: str = Field(max_length=64)
    playbook: str | None = Field(default=None, max_length=64)
    subject_ref: str | None = Field(default=None, max_length=255)
    purpose: str = Field(max_length=64)
    phi_class: str = Field(max_length=16)
    recipient: str = Field(max_length=255)
    content: dict[str, Any] = _json()  # rendered subject/body per the channel's needs
    created_at: datetime = _ts(nullable=False)
    not_after: datetime | None = _ts(nullable=True)
    status: str = Field(default="pending", max_length=16)
    # pending|held|sending|sent|delivered|failed|unknown|dead|captured|cancelled
    attempts: int = 0
    next_attempt_at: datetime | None = _ts(nullable=True)
    provider_id: str | None = Field(default=None, max_length=128)
    last_error: str | None = Field(default=None, max_length=500)
    # ``held`` for staff (a shared address), then released by this actor (``cli:<user>``) at
    # this time: caps and learning count a released message from when it could go.
    released_by: str | None = Field(default=None, max_length=64)
    released_at: datetime | None = _ts(nullable=True)


class ChannelPause(SQLModel, table=True):
    """A channel its provider asked us to wait for (an HTTP ``Retry-After`` on a 429 or 503,
    ``reason`` provider-retry-after): no deliver worker claims the channel's items before
    ``until`` (channels/outbox.py). One row per channel, written by the worker that got the
    answer (the later ``until`` wins), read by every worker's due read; a row whose ``until``
    has passed pauses nothing and is overwritten by the next pause."""

    __tablename__ = "channel_pause"
    channel: str = Field(primary_key=True, max_length=32)
    until: datetime = _ts(nullable=False)
    reason: str = Field(max_length=64)  # provider-retry-after
    updated_at: datetime = _ts(nullable=False)


class ChannelRate(SQLModel, table=True):
    """The shared send schedule of a rate-limited channel (``ChannelConfig.rate_per_second``),
    so that the rate holds across every deliver worker on the database, not per process
    (channels/outbox.py). One row per channel: ``next_at`` is the channel's theoretical next
    send time, in seconds since the Unix epoch on the database's clock (the one clock every
    worker shares; a float, so that one statement on either engine does the arithmetic).
    Each send first reserves its slot by moving ``next_at`` on by ``1 / rate`` in one
    atomic upsert, then waits for the slot (a slot further off than its claim covers is not
    reserved: the item is deferred to it). A slot reserved and never used (a worker that
    died waiting) only delays the next sends by ``1 / rate``; a row far ahead of the clock
    (more than a lease and a burst's span: the clock stepped back) is restarted from now."""

    __tablename__ = "channel_rate"
    channel: str = Field(primary_key=True, max_length=32)
    next_at: float = Field(sa_column=Column(Double, nullable=False))


class DeliveryReceipt(SQLModel, table=True):
    __tablename__ = "delivery_receipt"
    id: int | None = Field(default=None, primary_key=True)
    outbox_id: int = Field(foreign_key="outbox.id", index=True)
    at: datetime = _ts(nullable=False)
    status: str = Field(max_length=32)
    provider_id: str | None = Field(default=None, max_length=128)
    detail: dict[str, Any] = _json()


class Escalation(SQLModel, table=True):
    __tablename__ = "escalation"
    id: int | None = Field(default=None, primary_key=True)
    person_id: int = Field(foreign_key="person.id", index=True)
    created_at: datetime = _ts(nullable=False)
    severity: str = Field(max_length=16)  # emergency|urgent|routine
    reason: str = Field(max_length=64)
    evidence: dict[str, Any] = _json()
    status: str = Field(default="open", max_length=16)  # open|acknowledged|resolved
    due_at: datetime | None = _ts(nullable=True)
    resolved_at: datetime | None = _ts(nullable=True)
    # Work queue (orchestrator/escalation.py): who took it, the SLA level reached, and the
    # staff's verdict (needed|not_needed) that the per-rule precision report is built from.
    rule: str | None = Field(default=None, max_length=64)  # the deciding rule id (triage), if any
    level: int = 0  # 0 = first notice; +1 per re-escalation after an unacknowledged SLA
    acknowledged_at: datetime | None = _ts(nullable=True)
    acknowledged_by: str | None = Field(default=None, max_length=128)
    resolved_by: str | None = Field(default=None, max_length=128)
    feedback: str | None = Field(default=None, max_length=16)  # needed|not_needed


class DeadLetter(SQLModel, table=True):
    """An item a stage gave up on, with the error (no PHI); ``retry`` re-queues it."""

    __tablename__ = "dead_letter"
    id: int | None = Field(default=None, primary_key=True)
    stage: str = Field(max_length=16)  # map|orchestrate|deliver
    item_id: int
    created_at: datetime = _ts(nullable=False)
    error: str = Field(max_length=1000)
    retried_at: datetime | None = _ts(nullable=True)


class AuditRecord(SQLModel, table=True):
    """One hash-chained audit record; ``hash`` covers every other column and ``prev_hash``."""

    __tablename__ = "audit_record"
    __table_args__ = (Index("ix_audit_person", "person_id", "seq"),)
    seq: int = Field(primary_key=True)
    at: datetime = _ts(nullable=False)
    actor: str = Field(max_length=128)
    action: str = Field(max_length=64)
    outcome: str = Field(max_length=16)
    person_id: int | None = Field(default=None)
    entity: str | None = Field(default=None, max_length=255)
    purpose: str | None = Field(default=None, max_length=64)
    detail: dict[str, Any] = _json()
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class AuditHead(SQLModel, table=True):
    """The chain's tip, one row; locked by every append so the chain stays linear."""

    __tablename__ = "audit_head"
    id: int = Field(default=1, primary_key=True)
    seq: int = 0
    hash: str = Field(default="0" * 64, max_length=64)


class AuditCheckpoint(SQLModel, table=True):
    """A signed tree head: the RFC 6962 Merkle root over the first ``tree_size`` audit records,
    signed with Ed25519 (see audit/checkpoint.py). ``frontier`` (the right-edge subtree hashes)
    lets the next checkpoint, or a verifier starting after pruned records, continue from here."""

    __tablename__ = "audit_checkpoint"
    id: int | None = Field(default=None, primary_key=True)
    tree_size: int = Field(unique=True)
    root_hash: str = Field(max_length=64)
    head_hash: str = Field(max_length=64)  # the chain hash of record ``tree_size``
    created_at: datetime = _ts(nullable=False)
    key_id: str = Field(max_length=64)
    signature: str = Field(max_length=128)  # base64 Ed25519 signature over audit.checkpoint.message()
    frontier: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))


class FhirSubscriptionState(SQLModel, table=True):
    """What the hub knows about one FHIR Subscription of a connector: the event numbers it has
    stored (every number <= ``contiguous``, plus ``seen_above``), the server's own counter, the
    silence/heartbeat clock and the server-side status. Gap recovery and the heartbeat watchdog
    work from this row; ``name`` is set for subscriptions the hub manages from its config."""

    __tablename__ = "fhir_subscription_state"
    __table_args__ = (UniqueConstraint("connector", "subscription", name="uq_fhir_sub"),)
    id: int | None = Field(default=None, primary_key=True)
    connector: str = Field(max_length=64)
    subscription: str = Field(max_length=255)  # server id ("abc"), or "config:<name>" before creation
    name: str | None = Field(default=None, max_length=64)
    topic: str | None = Field(default=None, max_length=255)
    resource_types: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="unknown", max_length=16)  # requested|active|error|off|unknown
    heartbeat_s: int | None = None
    events_since_start: int = 0  # the largest counter the server reported
    contiguous: int = 0  # every event number <= this is stored
    seen_above: list[int] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    last_event_at: datetime | None = _ts(nullable=True)  # timestamp of the last event we hold
    last_seen_at: datetime | None = _ts(nullable=True)  # last notification of any type
    gap_since: datetime | None = _ts(nullable=True)
    pending_fetch: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    error: str | None = Field(default=None, max_length=255)
    updated_at: datetime = _ts(nullable=False)


class OutreachOutcome(SQLModel, table=True):
    """What became of one sent outreach (issue 10, orchestrator/outcomes.py): each outcome's
    first time, joined back to the decision that caused it, and the reward it earned.
    ``learned``: the send was counted as a trial in ``learning_stat`` (rewards then flow there).
    ``engaged_window``: the send window holding the moment of the read, click or reply that
    first earned a reward (the person's own timing); the reward's changes credit that window."""

    __tablename__ = "outreach_outcome"
    __table_args__ = (Index("ix_outcome_person_sent", "person_id", "sent_at"),)
    id: int | None = Field(default=None, primary_key=True)
    decision_id: int | None = Field(default=None, foreign_key="decision.id", unique=True)
    outbox_key: str = Field(max_length=128, unique=True)
    person_id: int = Field(foreign_key="person.id")
    channel: str = Field(max_length=32)
    template: str = Field(max_length=64)
    subject_ref: str | None = Field(default=None, max_length=255)
    window: str | None = Field(default=None, max_length=32)
    variant: str | None = Field(default=None, max_length=64)
    segment: str | None = Field(default=None, max_length=128)
    propensity: float | None = None
    engaged_window: str | None = Field(default=None, max_length=32)
    sent_at: datetime = _ts(nullable=False)
    delivered_at: datetime | None = _ts(nullable=True)
    read_at: datetime | None = _ts(nullable=True)
    clicked_at: datetime | None = _ts(nullable=True)
    replied_at: datetime | None = _ts(nullable=True)
    confirmed_at: datetime | None = _ts(nullable=True)
    attended_at: datetime | None = _ts(nullable=True)
    noshow_at: datetime | None = _ts(nullable=True)
    failed_at: datetime | None = _ts(nullable=True)
    opted_out_at: datetime | None = _ts(nullable=True)
    reward: float = 0.0
    learned: bool = False
    updated_at: datetime = _ts(nullable=False)


class LearningStat(SQLModel, table=True):
    """The learner's evidence for one option (issue 10, orchestrator/learning.py) at one level
    of pooling: ``scope`` population ("*"), segment (its key) or person (the person id).
    ``successes``/``failures`` are reward mass, decayed by the configured half-life as of
    ``updated_at``; ``trials``/``engaged`` are plain counts kept for explanations."""

    __tablename__ = "learning_stat"
    __table_args__ = (UniqueConstraint("scope", "scope_key", "dimension", "option", name="uq_learning_stat"),)
    id: int | None = Field(default=None, primary_key=True)
    scope: str = Field(max_length=16)  # population|segment|person
    scope_key: str = Field(max_length=128)
    dimension: str = Field(max_length=16)  # channel|window|variant
    option: str = Field(max_length=128)  # channel id, window name, or "<template>/<variant>"
    successes: float = 0.0
    failures: float = 0.0
    trials: int = 0
    engaged: int = 0
    updated_at: datetime = _ts(nullable=False)
