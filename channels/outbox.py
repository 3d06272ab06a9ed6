"""The deliver stage: outbox(pending, due) -> channel.send -> receipt, audited as a disclosure.

Exactly-once in effect, and the choice made where it cannot be guaranteed:

1. Claim: each item is moved ``pending -> sending`` by a conditional UPDATE (``WHERE
   status = 'pending'``) that is committed *before* the provider call. Only one worker
   wins an item, on SQLite and PostgreSQL alike, without holding a lock across the send;
   and at most one item per worker is in flight, so a crash leaves at most that one
   in doubt. Channels whose receiver de-duplicates on the key
   (``capabilities.idempotent_key``: FHIR conditional create, Standard Webhooks) are the
   exception: their items are claimed in groups of up to ``group`` per commit (one
   UPDATE for the group, and their outcomes settled together in the next commit), since
   an interrupted one is simply sent again. While an item is ``sending``, ``next_attempt_at``
   holds the time the attempt started (the lease start) and ``attempts`` counts it.
2. Send, then commit the outcome in one transaction with its ``delivery_receipt`` row and
   a ``disclosure`` audit record (channel, template, PHI class, recipient kind, purpose,
   outcome; never the address or the text).
3. Crash or doubt (the process died between 1 and 2, the commit in 2 failed, or the
   channel raised ``DeliveryUncertain`` because a request may have reached the provider):
   the item stays ``sending``. ``recover()`` picks up items whose lease is older than
   ``sending_lease`` (longer than any send may take, so a live worker's item is never
   touched) and settles each one:
   - the channel can ask its provider (``capabilities.can_query_status``) and the answer
     is a receipt: the receipt is adopted, nothing is resent;
   - the provider confirms it never got the message (``Receipt(ABSENT)``): the item goes
     back to ``pending`` and is sent again, which is safe;
   - the receiver de-duplicates on the key (``idempotent_key``): it is sent again;
   - otherwise (no status API, or the provider cannot tell): the item becomes ``unknown``
     for staff review. We never resend blindly: a duplicate reminder is a visible harm, an
     unknown item is a visible, reviewable state.
   A provider's message belongs to one outbox item. A lookup that finds a message by its
   content (Twilio has no key to ask by) may find a twin's: an identical text to the same
   phone. So a receipt naming a provider id that another outbox row already holds, or that
   the lookup of another item in the same pass also named, is not adopted: the lookup is
   inconclusive, as if the provider could not tell (``unknown``, or a resend for a channel
   whose receiver de-duplicates on the key), audited with the reason (``provider-id-owned``
   or ``provider-id-contested``). The lookups of a pass all run before any is settled, so
   two twins both in doubt are both left to staff, not one of them guessed; a message found
   by its text is not adopted either while a twin is ``sending`` or ``unknown`` (its own
   lookup may have failed, or it may be in flight); and each adoption commits before the
   next is checked.
   ``run_once`` calls ``recover()`` every ``recover_every`` seconds, so a runtime needs no
   separate job; call it directly at start to settle a crash at once.

Transient errors are retried with exponential backoff and jitter (half fixed, half random,
so a fleet of workers does not retry in lock-step) up to ``max_attempts``, then dead-
lettered; permanent errors dead-letter at once. A provider that says when to come back (an
HTTP ``Retry-After`` on a 429 or 503: ``TransientError.retry_after``, at most
``channels._http.MAX_RETRY_AFTER``) is obeyed: the retry is due no sooner than that (the
later of our backoff and its wait), and the channel is paused until the wait is over, for
every worker: the pause is written to ``channel_pause`` with the answer's settle (the later
end kept if another worker's answer paused it too; audited once, ``channel.pause``: channel,
until when, why), and every worker's due read and claim leave a paused channel's items
pending, untouched: no request, no write, no audit record per item. When the pause ends they
come up in their usual order (a rate-limited channel spaces them); one whose ``not_after``
passes meanwhile is cancelled as expired by the recovery pass, and crash recovery leaves the
channel's stale ``sending`` items for after the pause. Recovery's own status lookups are
answers too: a lookup answered so pauses the channel the same way (the same record, caps and
audit), its item and the channel's others left ``sending`` for a pass after the pause, and no
further lookup made on the channel in that pass. A pause ending later than any wait a
provider may ask for from now is a fast clock's and is not obeyed (``PAUSE_SKEW``). A
credentials refusal (``ChannelUnavailable``) holds the channel in this process only: whether
it is the channel's or one item's is judged per process (``_worked``), and one item's must
not stop every worker. The rest of a group already claimed when the
answer came (this process remembers the pause at once, ``_paused``) goes back to pending for
the end of the wait without a request, the claim not counted as an attempt (audited
``outbox.defer``, reason ``provider-retry-after``). A send another worker claimed before
the pause was committed still goes out.

Each channel may be rate limited (``ChannelConfig.rate_per_second``), and the rate holds for
every worker on the database together, not per process: the channel's schedule is one row
of ``channel_rate`` (its next free send slot, on the database's clock, the one clock every
worker shares). Each send reserves its slot with one atomic upsert just before the request
(``_reserve``: ``next_at = max(next_at, now) + 1/rate``) and sleeps until the slot. Bursts
are what the per-process token bucket it replaced allowed: up to ``max(1, rate)`` at once
after a quiet spell, then ``rate`` per second (a generic cell rate algorithm: that bucket
kept in one number), now for all workers together. A worker that dies holding a reserved
slot leaves it unused: the next sends are delayed by one interval, never blocked. A claim
waits for its slot only as long as half the lease allows, counted from the claim on the
store's clock (the other half is for the send itself and for clocks apart: recovery takes a
claim older than the lease for a dead worker's and may resend it, so a worker still waiting
then would send it twice). With many workers sharing a low rate the next slot may be further
off: then it is not reserved at all (the schedule is left as it was, so no later send is
delayed by it) and the item goes back to pending for that slot, the claim not counted as an
attempt (audited ``outbox.defer``, reason ``rate-limit``). A channel without a rate, and
the capture channel (it stands in for the real ones in replay, with their config), never
touch the table. Items past
``not_after`` are cancelled with reason ``expired`` instead of being sent late (also a
retry that a provider's wait pushed past ``not_after``, when it comes up).

Every claim, first attempt or retry, is first put to the ``check`` the runtime wires in
(``SendCheck``; the orchestrator's compliance gate): an item that a death, a STOP or an
open escalation since its decision has made unsendable is cancelled with that reason, and
one whose retry fell into the recipient's quiet hours waits for the next allowed time.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple, Protocol

from sqlalchemy import BindParameter, Double, and_, bindparam, cast, func, union_all
from sqlalchemy import case as sa_case
from sqlalchemy import exists as sa_exists
from sqlalchemy import literal as sa_literal
from sqlalchemy import select as select_core
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm.instrumentation import manager_of_class
from sqlmodel import Session, col, or_, select

from careloop import audit_log
from careloop.clock import utc
from careloop.errors import ChannelUnavailable, PermanentError, RecipientOptedOut, TransientError
from careloop.model import Hold
from careloop.pipeline import dead_letter, describe_error
from careloop.store import Store
from careloop.tables import ChannelPause, ChannelRate, DeliveryReceipt, JourneyEvent, OutboxItem
from channels._http import MAX_RETRY_AFTER
from channels.base import ABSENT, Channel, DeliveryUncertain, Receipt

log = logging.getLogger("careloop.outbox")
_OUTBOX = OutboxItem.__table__  # type: ignore[attr-defined]
_RECEIPT = DeliveryReceipt.__table__  # type: ignore[attr-defined]
_EVENT = JourneyEvent.__table__  # type: ignore[attr-defined]
_PAUSE = ChannelPause.__table__  # type: ignore[attr-defined]
_RATE = ChannelRate.__table__  # type: ignore[attr-defined]


class _DisclosedRow(NamedTuple):
    """The columns of an outbox row that its disclosure records (SQLAlchemy's ``Row``
    answers an attribute by way of a failed lookup, which costs more than the rest)."""

    id: int
    person_id: int
    channel: str
    template: str
    phi_class: str
    recipient: str
    purpose: str
    playbook: str | None
    attempts: int


_DISCLOSED_COLS = tuple(_OUTBOX.c[n] for n in _DisclosedRow._fields)


# A provider's report that beat the settle (the orchestrator keeps it as a receipt and
# leaves a ``sending`` row alone): the settled row takes the furthest of them, as the
# orchestrator would have moved it (never back: read > delivered > failed > sent).
_REPORT_RANK = {"sent": 3, "failed": 4, "delivered": 5, "read": 6, "captured": 9}


def _settled_status(status: str) -> Any:
    """``status``, unless an earlier report from the provider went further."""
    whens = [
        (
            sa_exists().where(
                _RECEIPT.c.outbox_id == _OUTBOX.c.id,
                _RECEIPT.c.status == reported,
                _RECEIPT.c.at >= _OUTBOX.c.next_attempt_at,  # this attempt's, not an earlier one's
            ),
            reported,
        )
        for reported in ("read", "delivered", "failed")
        if _REPORT_RANK[reported] > _REPORT_RANK.get(status, 0)
    ]
    return sa_case(*whens, else_=sa_literal(status)) if whens else status


# The time of a due read or a claim (one parameter, however often a statement uses it).
_NOW = bindparam("now", type_=_OUTBOX.c.next_attempt_at.type)

# The channels paused at ``now`` (``channel_pause``: a provider's Retry-After, recorded by
# whichever worker got it): their items are neither read as due nor claimed, by any worker;
# they stay pending, untouched, until the pause is over. A small table, read per statement.
# A pause that ends later than any wait a provider may ask for from now (``latest``: now +
# ``_http.MAX_RETRY_AFTER`` + ``PAUSE_SKEW``) is not obeyed: it came from a worker whose
# clock runs ahead, and must not stop every worker for hours.
PAUSE_SKEW = timedelta(minutes=5)
_LATEST = bindparam("latest", type_=_OUTBOX.c.next_attempt_at.type)
_PAUSED = select_core(_PAUSE.c.channel).where(_PAUSE.c.until > _NOW, _PAUSE.c.until <= _LATEST)


def _pause_params(now: datetime) -> dict[str, datetime]:
    """``now`` and ``latest`` for a statement that reads ``_PAUSED``."""
    return {"now": now, "latest": now + MAX_RETRY_AFTER + PAUSE_SKEW}


# Claim a group: every item still pending goes to ``sending``, its attempt counted and
# the lease started; the rows come back whole, to build the items that go to the channel.
# An item of a channel paused meanwhile (another worker's 429 since the due read) is not.
# (``status || ''``: a plain ``status = 'pending'`` has SQLite find the group through
# ``ix_outbox_due``, reading every pending row; this way it looks each id up by its key.)
# On PostgreSQL a row another worker holds is skipped, not waited for: that worker may in
# turn be waiting for the audit chain's head, which this transaction already holds after
# settling its previous group (a deadlock that rolled back a settle; SQLite has one writer).
_CLAIMABLE = (
    select_core(_OUTBOX.c.id)
    .where(
        _OUTBOX.c.id.in_(bindparam("ids", expanding=True)),
        _OUTBOX.c.status.concat("") == "pending",
        _OUTBOX.c.channel.not_in(_PAUSED),
    )
    .with_for_update(skip_locked=True)
)
_CLAIM = (
    _OUTBOX.update()
    .where(_OUTBOX.c.id.in_(_CLAIMABLE.scalar_subquery()))
    .values(
        status="sending",
        attempts=_OUTBOX.c.attempts + 1,
        next_attempt_at=_NOW,
    )
    .returning(*_OUTBOX.c)
)

# Settle a group: the rows still ``sending``, locked until the settle commits (PostgreSQL;
# SQLite's write transaction already excludes everyone), with what a disclosure records.
_STILL_SENDING = (
    select_core(*_DISCLOSED_COLS)
    .where(_OUTBOX.c.id.in_(bindparam("ids", expanding=True)), _OUTBOX.c.status == "sending")
    .order_by(_OUTBOX.c.id)
    .with_for_update()
)


# The items due: pending, with no attempt time or one that has come; the longest due
# first (no time first, by id), then by time and id. Read in two halves of at most ``n``
# rows each, both found through ``ix_outbox_due`` (status, next_attempt_at): the untimed
# items by id (SQLite reads them so from the index, whose entries end in the rowid;
# PostgreSQL sorts them, or walks the primary key when most are untimed; they are few: the
# orchestrator times what it queues, untimed are items put back, released or re-queued),
# then the due ones in the index's order of time (ties sorted by id), stopping after ``n``.
# One ordered read (``ORDER BY next_attempt_at NULLS FIRST, id``) served on SQLite, but
# PostgreSQL's index keeps NULLs last: it read and sorted every pending row for each batch.
# The outer ORDER BY (of at most ``2n`` rows) gives the order; UNION ALL alone promises none.
# Items of a paused channel (``_PAUSED``) are left out of both halves: read past, not claimed.
_DUE_COLS = (_OUTBOX.c.id, _OUTBOX.c.channel, _OUTBOX.c.next_attempt_at)
_DUE_UNTIMED = (
    select_core(*_DUE_COLS)
    .where(
        _OUTBOX.c.status == "pending",
        _OUTBOX.c.next_attempt_at.is_(None),
        _OUTBOX.c.channel.not_in(_PAUSED),
    )
    .order_by(_OUTBOX.c.id)
    .limit(bindparam("n"))
    .subquery()
)
_DUE_TIMED = (
    select_core(*_DUE_COLS)
    .where(
        _OUTBOX.c.status == "pending",
        _OUTBOX.c.next_attempt_at <= _NOW,
        _OUTBOX.c.channel.not_in(_PAUSED),
    )
    .order_by(_OUTBOX.c.next_attempt_at, _OUTBOX.c.id)
    .limit(bindparam("n"))
    .subquery()
)
_DUE_BOTH = union_all(select_core(_DUE_UNTIMED), select_core(_DUE_TIMED)).subquery("due")
_DUE = (
    select_core(_DUE_BOTH.c.id, _DUE_BOTH.c.channel)
    .order_by(_DUE_BOTH.c.next_attempt_at.asc().nulls_first(), _DUE_BOTH.c.id)
    .limit(bindparam("n"))
)


def _upsert(table: Any, dialect: str) -> postgresql.Insert | sqlite.Insert:
    """An insert into ``table`` that can say what to do on a conflict (both engines have
    ``ON CONFLICT``, each through its own dialect's insert)."""
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise RuntimeError(f"{table.name}: careloop runs on SQLite and PostgreSQL, not {dialect}")


@functools.cache
def _pause_statement(dialect: str) -> Any:
    """Record a channel's pause (``channel``, ``until``, ``reason``, ``updated_at``): one
    statement, an insert or, for a channel paused before, an update that keeps the later
    ``until`` (and its reason), so two workers' answers never shorten a pause."""
    stmt = _upsert(_PAUSE, dialect)
    later = stmt.excluded.until > _PAUSE.c.until
    return stmt.on_conflict_do_update(
        index_elements=[_PAUSE.c.channel],
        set_={
            "until": sa_case((later, stmt.excluded.until), else_=_PAUSE.c.until),
            "reason": sa_case((later, stmt.excluded.reason), else_=_PAUSE.c.reason),
            "updated_at": stmt.excluded.updated_at,
        },
    )


# A rate-limited channel's shared schedule (``channel_rate``): ``gap`` is ``1 / rate``, the
# seconds between two sends; ``span`` is ``max(1, 1 / rate)``, how far ahead of the clock the
# schedule may run before a send waits (a burst of ``max(1, rate)`` sends, as the token bucket
# had); ``within``: the longest wait the claim can cover (``DeliverStage._claim_left``): a slot
# further off is not reserved; ``horizon`` (``_schedule_params``: a lease and a span): a schedule
# further ahead of the clock than that is no backlog of live reservations (none waits longer
# than half a lease, then the schedule is a span ahead) but a clock that stepped back, and
# restarts from now.
_GAP: BindParameter[float] = bindparam("gap", type_=Double())
_SPAN: BindParameter[float] = bindparam("span", type_=Double())
_WITHIN: BindParameter[float] = bindparam("within", type_=Double())
_HORIZON: BindParameter[float] = bindparam("horizon", type_=Double())


def _db_now(dialect: str) -> Any:
    """The database's clock in seconds since the Unix epoch, read once per statement: the
    one clock every worker shares (their own may be apart)."""
    if dialect == "postgresql":
        return cast(func.extract("epoch", func.statement_timestamp()), Double())
    if dialect == "sqlite":
        return (func.julianday("now") - 2440587.5) * 86400.0
    raise RuntimeError(f"channel rate: careloop runs on SQLite and PostgreSQL, not {dialect}")


@functools.cache
def _reserve_statement(dialect: str) -> Any:
    """Reserve the next send slot of a channel (``channel``) if the wait for it is at most
    ``within``: one upsert on its primary key, atomic on both engines (PostgreSQL locks the
    row; SQLite has one writer), that moves the schedule on by ``gap`` from the later of its
    old value and now, and returns how long to wait for the slot (at most 0: send now). A
    slot further off is not taken: the row is left as it was and no row comes back. (A new
    row is a slot at once.) Now is the database's clock (``_db_now``)."""
    stmt = _upsert(_RATE, dialect)
    now = _db_now(dialect)
    ahead = and_(_RATE.c.next_at > now, _RATE.c.next_at <= now + _HORIZON)
    moved = sa_case((ahead, _RATE.c.next_at), else_=now) + _GAP
    return (
        stmt.values(channel=bindparam("channel"), next_at=now + _GAP)
        .on_conflict_do_update(
            index_elements=[_RATE.c.channel],
            set_={"next_at": moved},
            where=moved - _SPAN - now <= _WITHIN,
        )
        .returning(_RATE.c.next_at - _SPAN - now)
    )


@functools.cache
def _lead_statement(dialect: str) -> Any:
    """How far (seconds) the schedules of the channels ``channels`` run ahead of the
    database's clock, by channel (no row: none reserved yet)."""
    return select_core(_RATE.c.channel, _RATE.c.next_at - _db_now(dialect)).where(
        _RATE.c.channel.in_(bindparam("channels", expanding=True))
    )


class _Slot(NamedTuple):
    """A reservation's answer: the seconds until the channel's next slot (0 or less: now),
    and whether this send took it (``_reserve``)."""

    wait: float
    reserved: bool


def _rate_of(channel: Channel) -> float | None:
    """``channel``'s configured sends per second, or None: not limited. In replay a capture
    channel stands in with the real one's config: a provider's rate limit must not slow a
    replay down to wall-clock speed (nor touch the shared schedule)."""
    rate = getattr(getattr(channel, "config", None), "rate_per_second", None)
    if not rate or rate <= 0 or getattr(channel, "name", None) == "capture":
        return None
    return float(rate)


def _row_status(receipt: Receipt) -> str:
    return ROW_STATUS.get(receipt.status, "sent")


@functools.cache
def _settle_statement(status: str, returning: bool) -> Any:
    """The UPDATE that settles one row (``oid``) still ``sending`` with a receipt (``pid``)
    as ``status``, run executemany for a group, or returning what its disclosure records;
    built once per variant, so SQLAlchemy's statement cache hits."""
    stmt = (
        _OUTBOX.update()
        .where(_OUTBOX.c.id == bindparam("oid"), _OUTBOX.c.status == "sending")
        .values(status=_settled_status(status), provider_id=bindparam("pid"), last_error=None)
    )
    return stmt.returning(*_DISCLOSED_COLS) if returning else stmt


# Recovery: another outbox row of the channel that already holds a provider id (a lookup in
# ``uq_outbox_provider``, run only when a recovered receipt is about to be adopted). The index
# is the guarantee (two recoveries passing this check at once cannot both write the id); the
# check spares the common case a savepoint and a failed write, and names the owner for the log.
_OWNER = (
    select_core(_OUTBOX.c.id)
    .where(
        _OUTBOX.c.channel == bindparam("ch"),
        _OUTBOX.c.provider_id == bindparam("pid"),
        _OUTBOX.c.id != bindparam("oid"),
    )
    .order_by(_OUTBOX.c.id)
    .limit(1)
)
PROVIDER_ID_INDEX = "uq_outbox_provider"


def _provider_id_taken(exc: IntegrityError) -> bool:
    """Whether ``exc`` is a write of a provider id another row of the channel holds (the
    unique index ``uq_outbox_provider``; SQLite names its columns, PostgreSQL the index)."""
    text = str(exc.orig)
    return PROVIDER_ID_INDEX in text or "outbox.channel, outbox.provider_id" in text


_ITEM_CLASS = manager_of_class(OutboxItem)
CLOCK_SKEW = timedelta(minutes=2)  # ours and a provider's clock, as Twilio's lookup allows


def _provider_created(receipt: Receipt) -> datetime | None:
    """When the provider says it created the message a recovered receipt names, if it says."""
    raw = receipt.detail.get("provider_created")
    try:
        return utc(datetime.fromisoformat(raw)) if isinstance(raw, str) else None
    except ValueError:
        return None


def _detached_item(names: Sequence[str], row: Sequence[Any]) -> OutboxItem:
    """A transient ``OutboxItem`` holding ``row`` (a whole row, its columns ``names``),
    built as the ORM builds a loaded object (no pydantic validation, no attribute events):
    the constructor costs more than the claim's statement. It behaves like
    ``OutboxItem(**dict(zip(names, row)))``."""
    item: OutboxItem = _ITEM_CLASS.new_instance()
    item.__dict__.update(zip(names, row, strict=True))
    object.__setattr__(item, "__pydantic_fields_set__", set(names))
    return item


@dataclass(slots=True)
class _Sent:
    """One send's outcome, recorded in the next transaction: the channel's receipt, or
    what it raised."""

    item: OutboxItem
    receipt: Receipt | None = None
    error: Exception | None = None
    until: datetime | None = None  # not sent: due again then (its channel paused, or no slot)
    pause: datetime | None = None  # its answer (Retry-After) pauses its channel until then
    reason: str = "provider-retry-after"  # why not sent (``until``): audited by ``_defer_in``


_CHECK_FAILED = "send-check-failed"


class SendCheck(Protocol):
    """Asked in the claiming transaction just before an item is sent, on its first attempt
    and on every retry (a provider outage, a dead letter put back), so that what changed
    since the decision still counts: a death, a STOP, quiet hours reached while the item
    waited. None sends. The orchestrator's compliance gate answers (Hub wires it)."""

    def __call__(self, s: Session, item: OutboxItem, now: datetime) -> Hold | None: ...


class _Disclosed(Protocol):
    """What a disclosure record is built from: an ``OutboxItem`` or a row of its columns."""

    @property
    def id(self) -> int | None: ...
    @property
    def person_id(self) -> int: ...
    @property
    def channel(self) -> str: ...
    @property
    def template(self) -> str: ...
    @property
    def phi_class(self) -> str: ...
    @property
    def recipient(self) -> str: ...
    @property
    def purpose(self) -> str: ...
    @property
    def playbook(self) -> str | None: ...
    @property
    def attempts(self) -> int: ...


# Receipt status -> outbox row status.
ROW_STATUS = {
    "queued": "sent",
    "accepted": "sent",
    "sent": "sent",
    "delivered": "delivered",
    "read": "delivered",
    "failed": "failed",
    "undelivered": "failed",
    "captured": "captured",
}


@dataclass
class Recovery:
    """What one ``recover()`` pass did, by outcome."""

    adopted: int = 0  # the provider had it: receipt recorded, not resent
    resend: int = 0  # the provider confirmed it never got it: back to pending
    unknown: int = 0  # nobody can tell: left for staff review
    deferred: int = 0  # the provider could not be asked now: try again next pass
    keys: dict[str, list[str]] = field(default_factory=dict)

    def note(self, outcome: str, key: str) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)
        self.keys.setdefault(outcome, []).append(key)


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> timedelta:
    """Delay before retry number ``attempt`` (1-based): exponential, capped, with jitter
    drawn from the upper half (never zero, never more than the cap)."""
    ceiling = min(cap, base * math.pow(2, max(0, attempt - 1)))
    return timedelta(seconds=ceiling / 2 + rng.uniform(0, ceiling / 2))


class DeliverStage:
    """Delivers due outbox items through their channels (see the module docstring)."""

    name = "deliver"

    def __init__(
        self,
        store: Store,
        channels: dict[str, Channel],
        batch: int = 50,
        max_attempts: int = 6,
        group: int = 50,
        *,
        backoff_base: float = 2.0,
        backoff_cap: float = 3600.0,
        sending_lease: timedelta = timedelta(minutes=5),
        recover_every: float = 60.0,
        rng: random.Random | None = None,
        check: SendCheck | None = None,
    ) -> None:
        self.store, self.channels, self.batch, self.max_attempts = store, channels, batch, max_attempts
        self.group = group  # at most this many ``idempotent_key`` items per claim
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.sending_lease, self.recover_every = sending_lease, recover_every
        self.rng = rng or random.Random()
        self.check = check
        # channel id -> store time until which its provider asked us to wait (Retry-After):
        # known here at once, for the rest of a group already claimed; ``channel_pause`` (written
        # with the answer's settle) is what keeps every worker's due reads and claims off it
        self._paused: dict[str, datetime] = {}
        # channel id -> whether it sent anything since it was last unavailable (ChannelUnavailable)
        self._worked: dict[str, bool] = {}
        self._last_recover = -math.inf

    # ------------------------------------------------------------------ the loop

    async def run_once(self) -> int:
        """Recover stale ``sending`` items when due, then deliver one batch of due items;
        returns how many items were handled."""
        handled = 0
        if time.monotonic() - self._last_recover >= self.recover_every:
            r = await self.recover()
            handled += r.adopted + r.resend + r.unknown
            handled += await asyncio.to_thread(self._expire_held)
        # One transaction per group: it settles the previous group and claims the next, so
        # a claim is still committed before its send. A group is one item, or a run of
        # items for channels whose receiver de-duplicates on the key (``idempotent_key``):
        # for those an interrupted send is simply sent again, so several may be in doubt.
        # The first one also reads which items are due.
        groups, items = await asyncio.to_thread(self._first_step)
        for group in [*groups[1:], []]:
            sent: list[_Sent] = []
            for item in items:
                handled += 1
                if item.status == "sending":
                    sent.append(await self._deliver(item))
            if not sent and not group:
                break
            items = await asyncio.to_thread(self._step, sent, group)
        return handled

    def _groups(self, due: list[tuple[int, str]], backlog: dict[str, float] | None = None) -> list[list[int]]:
        """The claims of a batch ``due``: single items, and runs of ``idempotent_key`` items
        (``_group_size``, given each channel's ``backlog``, ``_backlog_in``)."""
        backlog = backlog or {}
        groups: list[list[int]] = []
        run: list[int] = []
        for item_id, channel_id in due:
            channel = self.channels.get(channel_id)
            if channel is not None and channel.capabilities.idempotent_key:
                run.append(item_id)
                if len(run) >= self._group_size(channel, backlog.get(channel_id, 0.0)):
                    groups.append(run)
                    run = []
                continue
            if run:
                groups.append(run)
                run = []
            groups.append([item_id])
        if run:
            groups.append(run)
        return groups

    def _group_size(self, channel: Channel, backlog: float = 0.0) -> int:
        """At most ``group``, and few enough that a rate-limited channel sends the whole
        group within half the lease (what ``_deliver`` lets a claim wait; else the rest is
        deferred), after the ``backlog`` (seconds) its shared schedule already holds. Other
        workers' reservations meanwhile are not foreseen: those items are deferred."""
        rate = _rate_of(channel)
        if rate is None:
            return self.group
        room = self.sending_lease.total_seconds() / 2 - backlog
        return max(1, min(self.group, int(rate * room)))

    def _first_step(self) -> tuple[list[list[int]], list[OutboxItem]]:
        """The batch's groups of due items, and the first group claimed, in one transaction."""
        with self.store.session() as s:
            now = self.store.clock.now()
            due = self._due_in(s, now)
            groups = self._groups(due, self._backlog_in(s, due))
            return groups, self._claim_in(s, groups[0], now) if groups else []

    def _backlog_in(self, s: Session, due: list[tuple[int, str]]) -> dict[str, float]:
        """How long (seconds) a send would wait now for a slot of each rate-limited channel
        whose items are claimed in groups (``idempotent_key``) among ``due``: one read of
        their schedules per batch, none when there is no such channel."""
        rates: dict[str, float] = {}
        for _, channel_id in due:
            channel = self.channels.get(channel_id)
            if channel is not None and channel.capabilities.idempotent_key:
                rate = _rate_of(channel)
                if rate is not None:
                    rates[channel_id] = rate
        if not rates:
            return {}
        conn = s.connection()
        leads = conn.execute(_lead_statement(conn.dialect.name), {"channels": sorted(rates)}).all()
        return {
            channel_id: max(0.0, self._wait_after(float(lead), rates[channel_id]))
            for channel_id, lead in leads
        }

    def _step(self, sent: list[_Sent], claim: list[int]) -> list[OutboxItem]:
        try:
            with self.store.session() as s:
                now = self.store.clock.now()
                self._pauses_in(s, now, sent)
                self._settle_in(s, now, sent)
                return self._claim_in(s, claim, now) if claim else []
        except IntegrityError as exc:
            if not _provider_id_taken(exc):
                raise
        # A receipt named a provider id another row of its channel holds (a FHIR server that
        # reused an id or answered a conditional create with another item's resource): all
        # of it rolled back. Settle again item by item, that one left ``unknown`` for staff
        # (its message may be the other row's); rare, so the usual path takes no savepoint.
        with self.store.session() as s:
            now = self.store.clock.now()
            self._pauses_in(s, now, sent)
            for o in sent:
                try:
                    with s.begin_nested():
                        self._settle_in(s, now, [o])
                except IntegrityError as exc:
                    if not _provider_id_taken(exc):
                        raise
                    log.warning("outbox %s: the provider's id for it is another item's", o.item.id)
                    self._unknown_in(s, now, o.item, "provider-id-owned", recovered=False)
            return self._claim_in(s, claim, now) if claim else []

    async def _deliver(self, item: OutboxItem) -> _Sent:
        """Send ``item``; return its outcome, to record in the next transaction."""
        channel = self.channels.get(item.channel)
        try:
            if channel is None:
                raise PermanentError(f"channel {item.channel!r} is not configured")
            until = self._paused_until(channel.id)
            if until is not None:
                return _Sent(item, until=until)
            rate = _rate_of(channel)
            if rate is not None:
                left = self._claim_left(item)
                slot = _Slot(0.0, False)  # no time left on the claim: nothing reserved
                if left >= 0:
                    slot = await asyncio.to_thread(self._reserve, channel.id, rate, left)
                if not slot.reserved:
                    # The slot is further off than the claim covers: back to pending for
                    # it, not an attempt (recovery would take a claim waited on for longer
                    # for a dead worker's and resend it while this one still waits).
                    until = self.store.clock.now() + timedelta(seconds=max(0.0, slot.wait))
                    return _Sent(item, until=until, reason="rate-limit")
                if slot.wait > 0:
                    await asyncio.sleep(slot.wait)
            receipt = await channel.send(item)
            self._worked[channel.id] = True
            return _Sent(item, receipt=receipt)
        except Exception as exc:  # settled by kind: uncertain, transient, anything else dead
            if (
                isinstance(exc, ChannelUnavailable)
                and channel is not None
                and self._worked.pop(channel.id, False)
            ):
                # The channel sent something since it was last unavailable: this refusal may
                # be the item's own (a receiver that answers 401 for one tenant), so it counts
                # as an ordinary attempt and holds nothing; one bad item never stops a channel.
                # A second refusal with nothing sent between is the channel's outage.
                exc = TransientError(str(exc))
            if isinstance(exc, TransientError) and channel is not None:
                pause = self._asked_to_wait(channel.id, exc)
                if pause is not None:
                    return _Sent(item, error=exc, pause=pause)
            return _Sent(item, error=exc)

    def _asked_to_wait(self, channel_id: str, exc: TransientError) -> datetime | None:
        """The provider's answer ``exc`` (to a send, or to recovery's status lookup) asked
        ``channel_id``'s requests to wait (``retry_after``, capped where it was read): this
        process holds the channel until then at once (``_paused``, the later end kept); the
        end is returned when the wait is every worker's, for ``_pauses_in`` to record."""
        if exc.retry_after is None:
            return None
        until = self.store.clock.now() + exc.retry_after
        self._paused[channel_id] = max(until, self._paused.get(channel_id, until))
        if isinstance(exc, ChannelUnavailable):
            # The provider's own wait is every worker's. A credentials refusal is judged
            # per process (``_worked``: it may be one item's own), so its hold stays here:
            # a shared one would let one tenant's 401 stop the fleet.
            return None
        return until

    def _paused_until(self, channel_id: str) -> datetime | None:
        """The end of the wait ``channel_id``'s provider asked this process for, if it is
        still ahead: for the rest of a group claimed before the answer came (the store's
        pause, written with the answer's settle, keeps every worker's claims off after)."""
        until = self._paused.get(channel_id)
        if until is None:
            return None
        if until <= self.store.clock.now():
            del self._paused[channel_id]
            return None
        return until

    def _claim_left(self, item: OutboxItem) -> float:
        """The seconds ``item``'s claim can still wait for a slot: half the lease (the other
        half covers the send itself and workers' clocks apart, as ``_group_size`` plans),
        less what has passed since the claim, on the store's clock that timed the claim
        (``next_attempt_at``) and that recovery's stale read uses."""
        half = self.sending_lease.total_seconds() / 2
        if item.next_attempt_at is None:
            return half
        passed = (self.store.clock.now() - utc(item.next_attempt_at)).total_seconds()
        return min(half, half - passed)

    def _schedule_params(self, rate: float) -> dict[str, float]:
        """``gap``, ``span`` and ``horizon`` of a channel's schedule at ``rate``."""
        gap = 1.0 / rate
        span = max(1.0, gap)
        return {"gap": gap, "span": span, "horizon": self.sending_lease.total_seconds() + span}

    def _wait_after(self, lead: float, rate: float) -> float:
        """The wait ``_reserve_statement`` would give a send now, the schedule ``lead``
        seconds ahead of the database's clock."""
        p = self._schedule_params(rate)
        if not 0 < lead <= p["horizon"]:
            lead = 0.0
        return lead + p["gap"] - p["span"]

    def _reserve(self, channel_id: str, rate: float, within: float | None = None) -> _Slot:
        """Reserve ``channel_id``'s next send slot in the schedule every worker shares
        (``channel_rate``) if it comes within ``within`` seconds (default: half the lease),
        and return the seconds to wait for it (0 or less: send now) and whether it was.

        One statement in a transaction of its own, committed before the wait, so no lock is
        held while waiting and the reservation is the only write. The row keeps the channel's
        theoretical next send time ``next_at``; a send at ``now`` takes the slot
        ``max(now, next_at - (span - gap))`` and moves ``next_at`` to ``max(next_at, now) +
        gap``: the token bucket of capacity ``max(1, rate)`` filling at ``rate``, kept in one
        number (a generic cell rate algorithm), so bursts are what the bucket allowed. A slot
        reserved by a worker that then died is simply never used: it delays the next send by
        one ``gap``. A slot further off than ``within`` is not reserved at all (the caller
        does not wait for it, and a slot taken and left would push every later send back by
        a ``gap``); then a second read says how far off it was. A schedule more than a lease
        and a span ahead of now (``_schedule_params``: no reservation puts it there) is a
        clock that stepped back and restarts from now, so it cannot hold the channel longer.

        The store cannot be reached: nothing was sent, and the item is retried as after a
        transient error of the channel (``TransientError``: no PHI, the engine's error type)."""
        limit = self.sending_lease.total_seconds() / 2 if within is None else within
        params: dict[str, Any] = {"channel": channel_id, "within": limit, **self._schedule_params(rate)}
        try:
            with self.store.engine.begin() as conn:
                dialect = conn.dialect.name
                wait = conn.execute(_reserve_statement(dialect), params).scalar()
                if wait is not None:
                    return _Slot(float(wait), True)
                lead = conn.execute(_lead_statement(dialect), {"channels": [channel_id]}).all()
        except DBAPIError as exc:
            raise TransientError(
                f"channel rate: the store could not reserve a send slot ({type(exc).__name__})"
            ) from exc
        wait = self._wait_after(float(lead[0][1]), rate) if lead else 0.0
        return _Slot(max(wait, limit), False)

    # ------------------------------------------------------------------ transactions

    def _expire_held(self) -> int:
        """Cancel items past their useful life (``not_after``) that no claim will reach soon:
        ``held`` ones, which staff never released (a reminder for a visit that is over must
        not wait in their list for ever), and ``pending`` ones of a paused channel, which the
        due read passes over until the pause ends (a provider that keeps throttling could
        keep them there well past their end)."""
        now = self.store.clock.now()
        expired = (
            ("held", "expired: not_after has passed while held", "expired-while-held", None),
            ("pending", "expired: not_after has passed", "expired", _OUTBOX.c.channel.in_(_PAUSED)),
        )
        n = 0
        with self.store.session() as s:
            for status, error, reason, where in expired:
                q = _OUTBOX.update().where(_OUTBOX.c.status == status, _OUTBOX.c.not_after < now)
                if where is not None:
                    q = q.where(where)
                gone = (
                    s.connection()
                    .execute(
                        q.values(status="cancelled", last_error=error).returning(
                            _OUTBOX.c.id, _OUTBOX.c.person_id, _OUTBOX.c.purpose, _OUTBOX.c.channel
                        ),
                        _pause_params(now),
                    )
                    .all()
                )
                for oid, pid, purpose, channel in gone:
                    audit_log.append(
                        s,
                        at=now,
                        actor="deliver",
                        action="outbox.expire",
                        person_id=pid,
                        entity=f"outbox/{oid}",
                        purpose=purpose,
                        detail={"channel": channel, "reason": reason},
                    )
                n += len(gone)
        return n

    def _pauses(self, sent: list[_Sent]) -> None:
        """``_pauses_in`` in a transaction of its own (recovery's lookups: nothing to settle)."""
        with self.store.session() as s:
            self._pauses_in(s, self.store.clock.now(), sent)

    def _pauses_in(self, s: Session, now: datetime, sent: list[_Sent]) -> None:
        """Record in ``s`` the pauses the answers ``sent`` asked for (``_Sent.pause``): each
        channel's row in ``channel_pause`` (the later ``until`` kept), and one audit record
        per answer (``channel.pause``: the channel, until when, why; no item, no person).
        The rows first, in the order of their channels, and before any audit record takes
        the chain's head: on PostgreSQL two workers each holding what the other waits for
        (a pause row, the head) would deadlock, and the settle would be lost."""
        asked = [(o.item.channel, o.pause, "provider-retry-after") for o in sent if o.pause is not None]
        if not asked:
            return
        upsert = _pause_statement(s.get_bind().dialect.name)
        for channel, until, reason in sorted(asked):
            s.connection().execute(
                upsert, {"channel": channel, "until": until, "reason": reason, "updated_at": now}
            )
        for channel, until, reason in asked:
            audit_log.append(
                s,
                at=now,
                actor="deliver",
                action="channel.pause",
                entity=f"channel/{channel}",
                detail={"channel": channel, "reason": reason, "until": utc(until).isoformat()},
            )

    def _due_in(self, s: Session, now: datetime) -> list[tuple[int, str]]:
        """The ids and channels of the first ``batch`` items due at ``now`` (``_DUE``)."""
        rows = s.connection().execute(_DUE, {**_pause_params(now), "n": self.batch})
        return [(i, c) for i, c in rows]

    def _claim_in(self, s: Session, ids: list[int], now: datetime) -> list[OutboxItem]:
        """Move the items ``ids`` that are still pending to ``sending`` in ``s`` (the caller
        commits before sending any of them), each then put to the send-time check; in the
        order of ``ids``, without those no longer pending.

        One Core ``UPDATE ... WHERE id IN (...) RETURNING`` for the group, and detached
        ``OutboxItem``s built from its rows: no ORM load, flush or expunge per item.

        The group is checked in one savepoint, optimistically (a savepoint per item costs
        more than checking an item that passes). Only if something in it fails is that
        savepoint rolled back and the group checked again item by item, each check in its
        own savepoint (``_checked``): the failing check holds back its own item alone, and
        what the others' checks did is kept, as if each had had its savepoint throughout."""
        got = s.connection().execute(_CLAIM, {"ids": ids, **_pause_params(now)})
        names = tuple(got.keys())
        at = names.index("id")
        by_id = {r[at]: r for r in got.all()}
        rows = [by_id[i] for i in ids if i in by_id]
        if self.check is not None and rows:
            try:
                with s.begin_nested():
                    return [self._claimed_in(s, _detached_item(names, r), now, isolated=False) for r in rows]
            except Exception:
                pass  # rolled back: redone one by one below, where the failure is isolated
        return [self._claimed_in(s, _detached_item(names, r), now) for r in rows]

    def _claimed_in(self, s: Session, row: OutboxItem, now: datetime, isolated: bool = True) -> OutboxItem:
        """``row``, just claimed, as it is to go: still ``sending``, or held back by the
        check, or cancelled because it expired. ``isolated``: the check runs in its own
        savepoint (else the caller's savepoint covers it, and a failure propagates)."""
        hold: Hold | None = None
        if self.check is not None:
            hold = self._checked(s, row, now) if isolated else self.check(s, row, now)
        if hold is not None:
            return self._hold_in(s, row, hold, now)
        not_after = row.not_after
        if not_after is not None and utc(not_after) < now:
            row.status, row.last_error = "cancelled", "expired: not_after has passed"
            row.attempts -= 1  # not an attempt: nothing was sent
            s.connection().execute(
                _OUTBOX.update()
                .where(_OUTBOX.c.id == row.id)
                .values(status=row.status, last_error=row.last_error, attempts=row.attempts)
            )
            _audit(s, now, row, "outbox.expire", {"reason": "expired"})
            s.flush()
        return row

    def _checked(self, s: Session, row: OutboxItem, now: datetime) -> Hold | None:
        """``check``'s answer, in a savepoint: a check that fails (a bug, a lost
        connection) holds this item back a while instead of sending it unchecked, and
        neither rolls back the sends this transaction records nor stops the others."""
        assert self.check is not None
        try:
            with s.begin_nested():
                return self.check(s, row, now)
        except Exception as exc:
            log.error("outbox %s: send-time check failed, retrying later: %s", row.id, type(exc).__name__)
            return Hold(_CHECK_FAILED, now + timedelta(minutes=5))

    def _hold_in(self, s: Session, row: OutboxItem, hold: Hold, now: datetime) -> OutboxItem:
        """Keep ``row`` back as ``hold`` says (its claim was not an attempt, unless the check
        itself failed: that counts, and after ``max_attempts`` the item is dead-lettered, a
        fault for staff to see rather than a message put off for ever)."""
        if hold.reason == _CHECK_FAILED:
            if row.attempts >= self.max_attempts:
                dead = s.get(OutboxItem, row.id)
                assert dead is not None
                dead_letter(
                    s, "deliver", dead, PermanentError("the send-time compliance check kept failing"), now
                )
                return dead
        else:
            row.attempts -= 1
        if hold.until is not None:
            row.status, row.next_attempt_at = "pending", hold.until
            values: dict[str, Any] = {"next_attempt_at": hold.until}
            action, detail = "outbox.defer", {"reason": hold.reason, "until": utc(hold.until).isoformat()}
        elif hold.staff:
            row.status = "held"
            values, action, detail = {}, "outbox.hold", {"reason": hold.reason}
        else:
            row.status, row.last_error = "cancelled", hold.reason
            values = {"last_error": hold.reason}
            action, detail = "outbox.cancel", {"reason": hold.reason}
        s.connection().execute(
            _OUTBOX.update()
            .where(_OUTBOX.c.id == row.id)
            .values(status=row.status, attempts=row.attempts, **values)
        )
        _audit(s, now, row, action, detail)
        return row

    def _sending(self, s: Session, item: OutboxItem) -> OutboxItem | None:
        """The item's row, if it is still ``sending`` (else settled elsewhere meanwhile,
        e.g. by another worker's recovery)."""
        row = s.get(OutboxItem, item.id, populate_existing=True)
        assert row is not None and row.id is not None
        return row if row.status == "sending" else None

    def _settle_in(self, s: Session, now: datetime, sent: list[_Sent], recovered: bool = False) -> None:
        """Record the outcomes ``sent`` in ``s``, in order: each item still ``sending`` (else
        settled elsewhere meanwhile, e.g. by another worker's recovery, and left alone) gets
        its receipt row and status, or its retry, doubt or dead letter, and its disclosure.

        The hot path of every delivery, a receipt, is in Core. One receipt (a channel that
        claims one item per commit) costs a conditional ``UPDATE ... RETURNING`` what the
        disclosure records; more cost one SELECT that locks the rows still ``sending`` and
        reads that, then one executemany UPDATE per settled status. The receipt rows go in
        last, in one INSERT: a settled status looks for provider reports that beat it."""
        if not sent:
            return
        conn = s.connection()
        ids = [o.item.id for o in sent]
        got = [oid for oid, o in zip(ids, sent, strict=True) if o.receipt is not None]
        one = len(got) == 1
        rows: dict[int, _DisclosedRow] = {}
        if len(got) > 1:
            rows = {r[0]: _DisclosedRow(*r) for r in conn.execute(_STILL_SENDING, {"ids": got}).all()}
        settled: dict[str, list[dict[str, Any]]] = {}
        receipts: list[dict[str, Any]] = []
        for oid, o in zip(ids, sent, strict=True):
            if o.receipt is None:
                if o.until is not None:
                    self._defer_in(s, now, o.item, o.until, o.reason)
                elif isinstance(o.error, DeliveryUncertain):
                    self._uncertain_in(s, now, o.item, o.error)
                elif isinstance(o.error, TransientError):
                    self._retry_in(s, now, o.item, o.error)
                else:  # PermanentError, or a foreign error: dead letter, no resend
                    self._dead_in(s, now, o.item, o.error or PermanentError("no receipt"))
                continue
            assert oid is not None
            status = _row_status(o.receipt)
            params = {"oid": oid, "pid": o.receipt.provider_id}
            row: _DisclosedRow | None
            if one:
                one_row = conn.execute(_settle_statement(status, True), params).one_or_none()
                row = None if one_row is None else _DisclosedRow(*one_row)
            elif (row := rows.get(oid)) is not None:
                settled.setdefault(status, []).append(params)
            if row is not None:
                receipts.append(self._received_in(s, now, row, o.receipt, recovered))
        for status, group in settled.items():
            conn.execute(_settle_statement(status, False), group)
        if receipts:
            conn.execute(_RECEIPT.insert(), receipts)

    @staticmethod
    def _received_in(
        s: Session, now: datetime, row: _Disclosed, receipt: Receipt, recovered: bool
    ) -> dict[str, Any]:
        """Append the disclosure of ``receipt`` for ``row`` to ``s``; return its
        ``delivery_receipt`` row, for the caller to insert."""
        disclose(s, row, receipt.status, now, ok=_row_status(receipt) != "failed")
        return {
            "outbox_id": row.id,
            "at": now,
            "status": receipt.status,
            "provider_id": receipt.provider_id,
            "detail": {**receipt.detail, "recovered": True} if recovered else dict(receipt.detail),
        }

    def _done_in(
        self, s: Session, now: datetime, item: OutboxItem, receipt: Receipt, recovered: bool
    ) -> None:
        """Record ``receipt`` for ``item`` in ``s``, if it is still ``sending``."""
        self._settle_in(s, now, [_Sent(item, receipt=receipt)], recovered)

    def _retry_in(self, s: Session, now: datetime, item: OutboxItem, exc: BaseException) -> None:
        row = self._sending(s, item)
        if row is None:
            return
        disclose(s, row, "transient-error", now, ok=False)
        unavailable = isinstance(exc, ChannelUnavailable)
        if unavailable:
            row.attempts -= 1  # the channel's outage, not the item's failure
        if row.attempts >= self.max_attempts:
            dead_letter(s, "deliver", row, exc, now)
            return
        row.status, row.last_error = "pending", describe_error(exc)[:500]
        row.next_attempt_at = now + backoff(row.attempts, self.backoff_base, self.backoff_cap, self.rng)
        wait = exc.retry_after if isinstance(exc, TransientError) else None
        if wait is not None:  # the provider's wait (capped where it was read): never sooner
            row.next_attempt_at = max(row.next_attempt_at, now + wait)
        if unavailable and wait is not None:
            # after the channel's other items, held until ``now + wait``: if they go through,
            # this refusal was the item's own and its next one counts (see ``_deliver``)
            row.next_attempt_at = (
                now + wait + backoff(row.attempts, self.backoff_base, self.backoff_cap, self.rng)
            )

    def _defer_in(self, s: Session, now: datetime, item: OutboxItem, until: datetime, reason: str) -> None:
        """Put ``item``, claimed but not sent, back to pending for ``until``: its provider
        asked this process to wait (``provider-retry-after``), or its channel's next slot
        was further off than its claim could cover (``rate-limit``). Nothing was sent, so
        no disclosure, and the claim is not an attempt (as a quiet-hours deferral)."""
        row = self._sending(s, item)
        if row is None:
            return
        row.status, row.next_attempt_at = "pending", until
        row.attempts -= 1
        _audit(s, now, row, "outbox.defer", {"reason": reason, "until": utc(until).isoformat()})

    def _uncertain_in(self, s: Session, now: datetime, item: OutboxItem, exc: BaseException) -> None:
        # Stay in ``sending``: recovery settles it once the lease has passed.
        row = self._sending(s, item)
        if row is None:
            return
        row.last_error = describe_error(exc)[:500]
        disclose(s, row, "uncertain", now, ok=False)

    def _dead_in(self, s: Session, now: datetime, item: OutboxItem, exc: BaseException) -> None:
        row = self._sending(s, item)
        if row is None:
            return
        disclose(s, row, "permanent-error", now, ok=False)
        dead_letter(s, "deliver", row, exc, now)
        if isinstance(exc, RecipientOptedOut):
            self._opted_out_in(s, row, now)

    def _opted_out_in(self, s: Session, row: OutboxItem, now: datetime) -> None:
        """The provider holds an opt-out we never saw: record it for the person as the
        orchestrator records a STOP (a ``consent.revoked`` event for the channel's kind), so
        the next message is suppressed instead of refused, and what is queued is cancelled."""
        channel = self.channels.get(row.channel)
        kind = channel.capabilities.template_kind if channel is not None else row.channel
        s.connection().execute(
            _EVENT.insert(),
            {
                "event_key": f"outbox/{row.id}/recipient-opted-out",
                "person_id": row.person_id,
                "type": "consent.revoked",
                "occurred_at": now,
                "recorded_at": now,
                "attributes": {
                    "channel": kind,
                    "purpose": "*",
                    "keyword": None,
                    "source": "provider-refusal",
                },
                "status": "pending",
                "attempts": 0,
            },
        )

    def _adopt(self, item: OutboxItem, receipt: Receipt, by_content: bool) -> tuple[str, int] | None:
        """Record the recovered ``receipt`` for ``item``, unless another outbox row already
        holds its provider id, or (``by_content``: the provider found it by its text, not
        by a key or a known id) a twin still in doubt could be its owner: the same text to
        the same address, ``sending`` or ``unknown`` (its own lookup may have failed this
        pass). Then nothing is written, and the reason and that row's id are returned. The
        checks and the settle share a transaction, and every earlier adoption has committed.
        A recovery of another worker that adopts the same id meanwhile (past the check, not
        yet committed) makes the write fail on ``uq_outbox_provider``: the same outcome."""
        with self.store.session() as s:
            owned = {"ch": item.channel, "pid": receipt.provider_id, "oid": item.id}
            if receipt.provider_id is not None:
                owner = s.connection().execute(_OWNER, owned).scalar()
                if owner is not None:
                    return "provider-id-owned", int(owner)
            if by_content:
                twins = s.exec(
                    select(OutboxItem).where(
                        OutboxItem.channel == item.channel,
                        OutboxItem.recipient == item.recipient,
                        col(OutboxItem.status).in_(("sending", "unknown")),
                        OutboxItem.id != item.id,
                    )
                ).all()
                made = _provider_created(receipt)
                twin = next(
                    (t.id for t in twins if t.content == item.content and self._could_make(t, made)), None
                )
                if twin is not None:
                    return "provider-id-contested", twin
            try:
                with s.begin_nested():
                    self._done_in(s, self.store.clock.now(), item, receipt, True)
            except IntegrityError as exc:
                if not _provider_id_taken(exc):
                    raise
                owner = s.connection().execute(_OWNER, owned).scalar()
                return "provider-id-owned", -1 if owner is None else int(owner)
        return None

    def _could_make(self, twin: OutboxItem, made: datetime | None) -> bool:
        """Whether ``twin``'s attempt (started at its ``next_attempt_at``, in flight for at
        most the lease) could have created a provider message at ``made``, clocks apart by
        up to ``CLOCK_SKEW``; unknown times: it could."""
        if made is None or twin.next_attempt_at is None:
            return True
        start = utc(twin.next_attempt_at)
        return start - CLOCK_SKEW <= made <= start + self.sending_lease + CLOCK_SKEW

    # ------------------------------------------------------------------ recovery

    async def recover(self, stale_after: timedelta | None = None) -> Recovery:
        """Settle items left in ``sending`` for longer than ``stale_after`` (default: the
        lease): adopt the provider's receipt, resend what the provider never got, or mark
        ``unknown`` for staff review. The items of a channel paused now (``channel_pause``:
        its provider asked every worker to wait) are left alone: no lookup, no write, no
        audit record; they stay ``sending``, reported ``deferred``, and the first pass after
        the pause settles them. A lookup answered with the provider's wait (a 429 or 503 with
        ``Retry-After``) pauses the channel as a send's answer does (``_pauses_in``: the
        ``channel_pause`` row, one ``channel.pause`` record), committed at once; its item and
        the channel's items not yet asked about stay ``sending``, deferred, untouched, and
        no further lookup goes to that provider in this pass (answers it gave before still
        settle their items: settling asks it nothing)."""
        self._last_recover = time.monotonic()
        lease = self.sending_lease if stale_after is None else stale_after
        report = Recovery()
        # Ask about every item first, so that two items whose lookups name the same provider
        # message (twins: the same text to the same phone) are both seen before either is
        # settled: neither is guessed to be its owner.
        answers: list[tuple[OutboxItem, Channel | None, Receipt | None]] = []
        stale, paused = await asyncio.to_thread(self._stale, lease)
        for item in stale:
            if item.channel in paused:
                report.note("deferred", item.key)
                continue
            channel = self.channels.get(item.channel)
            answer: Receipt | None = None
            if channel is not None and channel.capabilities.can_query_status:
                try:
                    answer = await channel.status(item)
                except TransientError as exc:
                    log.warning(
                        "outbox %s: status lookup failed, retrying later: %s", item.id, describe_error(exc)
                    )
                    report.note("deferred", item.key)
                    # A credentials refusal holds nothing here, as before: sends judge it.
                    unavailable = isinstance(exc, ChannelUnavailable)
                    pause = None if unavailable else self._asked_to_wait(channel.id, exc)
                    if pause is not None:  # the provider asked every worker to wait
                        paused.add(item.channel)
                        await asyncio.to_thread(self._pauses, [_Sent(item, error=exc, pause=pause)])
                    continue
                except Exception as exc:
                    log.warning("outbox %s: status lookup failed: %s", item.id, describe_error(exc))
            answers.append((item, channel, answer))
        named = Counter(
            a.provider_id for _, _, a in answers if a is not None and a.status != ABSENT and a.provider_id
        )
        for item, channel, answer in answers:
            why: str | None = None  # why a receipt the provider gave is not adopted
            if answer is not None and answer.status != ABSENT:
                if answer.provider_id and named[answer.provider_id] > 1:
                    why = "provider-id-contested"
                    log.warning("outbox %s: recovered provider id also found for another item", item.id)
                else:
                    by_content = not item.provider_id and not (
                        channel is not None and channel.capabilities.idempotent_key
                    )
                    other = await asyncio.to_thread(self._adopt, item, answer, by_content)
                    if other is None:
                        report.note("adopted", item.key)
                        continue
                    why = other[0]
                    log.warning("outbox %s: recovered provider message may be outbox %s's", item.id, other[1])
                answer = None  # inconclusive: settled below as if the provider could not tell
            if answer is not None:  # ABSENT
                await asyncio.to_thread(self._absent, item, "provider confirmed it never got it")
                report.note("resend", item.key)
            elif channel is not None and channel.capabilities.idempotent_key:
                if item.attempts >= self.max_attempts:
                    # Every attempt ended in doubt (a receiver that times out after taking
                    # the request): staff review, not an endless claim-doubt-resend loop.
                    await asyncio.to_thread(self._unknown, item, why)
                    report.note("unknown", item.key)
                else:
                    await asyncio.to_thread(self._absent, item, "the receiver de-duplicates on the key", why)
                    report.note("resend", item.key)
            else:
                await asyncio.to_thread(self._unknown, item, why)
                report.note("unknown", item.key)
        if report.adopted or report.resend or report.unknown:
            log.info(
                "outbox recovery: %s adopted, %s resend, %s unknown, %s deferred",
                report.adopted,
                report.resend,
                report.unknown,
                report.deferred,
            )
        return report

    def _stale(self, lease: timedelta) -> tuple[list[OutboxItem], set[str]]:
        """The items ``sending`` for longer than ``lease``, and the channels paused now."""
        now = self.store.clock.now()
        cutoff = now - lease
        with self.store.session() as s:
            paused = set(s.connection().execute(_PAUSED, _pause_params(now)).scalars())
            rows = list(
                s.exec(
                    select(OutboxItem)
                    .where(OutboxItem.status == "sending")
                    .where(
                        or_(
                            col(OutboxItem.next_attempt_at).is_(None),
                            col(OutboxItem.next_attempt_at) <= cutoff,
                        )
                    )
                    .order_by(col(OutboxItem.id))
                ).all()
            )
            for r in rows:
                s.expunge(r)
        return rows, paused

    def _absent(self, item: OutboxItem, why: str, reason: str | None = None) -> None:
        """Put ``item`` back to pending, to be sent again; ``reason``: why a receipt the
        provider gave was not adopted (audited)."""
        now = self.store.clock.now()
        with self.store.session() as s:
            row = self._sending(s, item)
            if row is None:
                return
            row.status, row.next_attempt_at = "pending", now
            row.last_error = f"interrupted send; {why}" + (f" ({reason})" if reason else "")
            detail = {"channel": row.channel, "outcome": "resend"}
            if reason:
                detail["reason"] = reason
            audit_log.append(
                s,
                at=now,
                actor="deliver",
                action="outbox.recover",
                person_id=row.person_id,
                entity=f"outbox/{row.id}",
                purpose=row.purpose,
                detail=detail,
            )

    def _unknown(self, item: OutboxItem, reason: str | None = None) -> None:
        """Mark ``item`` unknown for staff review; ``reason``: why a receipt the provider
        gave was not adopted (audited; ``provider-id-owned``, ``provider-id-contested``)."""
        with self.store.session() as s:
            self._unknown_in(s, self.store.clock.now(), item, reason)

    def _unknown_in(
        self, s: Session, now: datetime, item: OutboxItem, reason: str | None, recovered: bool = True
    ) -> None:
        """``_unknown`` in ``s``; not ``recovered``: the answer of a send, not of recovery."""
        row = self._sending(s, item)
        if row is None:
            return
        row.status = "unknown"
        row.last_error = "interrupted send; provider cannot say whether it was delivered: staff review"
        detail = {"channel": row.channel, "outcome": "unknown"}
        if reason:
            detail["reason"] = reason
            row.last_error = (
                f"{'interrupted send' if recovered else 'sent'}; the provider's message found for it "
                f"is another outbox item's or could be ({reason}): staff review"
            )
        audit_log.append(
            s,
            at=now,
            actor="deliver",
            action="outbox.recover" if recovered else "outbox.settle",
            outcome="failure",
            person_id=row.person_id,
            entity=f"outbox/{row.id}",
            purpose=row.purpose,
            detail=detail,
        )
        # It may have been disclosed: record the disclosure as of uncertain outcome.
        disclose(s, row, "unknown", now, ok=False)


def _audit(
    s: Session, now: datetime, row: OutboxItem, action: str, detail: dict[str, Any], outcome: str = "success"
) -> None:
    """The deliver stage's audit record of what it did with ``row`` (its channel and
    template, and ``detail``: codes only)."""
    audit_log.append(
        s,
        at=now,
        actor="deliver",
        action=action,
        outcome=outcome,
        person_id=row.person_id,
        entity=f"outbox/{row.id}",
        purpose=row.purpose,
        detail={"channel": row.channel, "template": row.template, **detail},
    )


def disclose(s: Session, row: _Disclosed, outcome: str, now: datetime, ok: bool) -> None:
    """The ``disclosure`` audit record of one send attempt (channel, template, PHI class,
    recipient kind and role, purpose, outcome; never the address or the text): the deliver
    stage writes it for every attempt, and staff resolving an ``unknown`` item write it
    through here too, so the accounting of disclosures sees every message alike."""
    audit_log.append(
        s,
        at=now,
        actor=f"channel:{row.channel}",
        action="disclosure",
        outcome="success" if ok else "failure",
        person_id=row.person_id,
        entity=f"outbox/{row.id}",
        purpose=row.purpose,
        detail={
            "channel": row.channel,
            "template": row.template,
            "phi_class": row.phi_class,
            "recipient_kind": recipient_kind(row.recipient),
            "recipient_role": recipient_role(row),
            "purpose": row.purpose,
            "outcome": outcome,
            "attempt": row.attempts,
        },
    )


def recipient_kind(recipient: str) -> str:
    """The kind of address, for audit records that must not hold the address itself."""
    if recipient.startswith("+"):
        return "phone"
    if "@" in recipient:
        return "email"
    if "/" in recipient:
        return "fhir"
    return "other"


_recipient_kind = recipient_kind  # the earlier private name


def recipient_role(row: _Disclosed) -> str:
    """Who received it, for the accounting of disclosures: outreach goes to the patient's
    own phone or email; escalation routes and EHR write-back go to the care team."""
    if row.playbook == "escalation" or recipient_kind(row.recipient) in ("fhir", "other"):
        return "care-team"
    return "patient"


def due(item: OutboxItem, now: datetime) -> bool:
    return item.next_attempt_at is None or utc(item.next_attempt_at) <= now
