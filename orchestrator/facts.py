"""The gate's reads for a whole batch of events, loaded in one query each.

Deciding a send needs, for its person: their addresses, the addresses of theirs that
someone else also holds, their consents, whether an escalation is open, and what went to
them in the last week (caps). Asked per send, that is five statements per event; for a
batch of a few hundred events it is five statements in all.

A batch's facts stay true only while nothing changes them. Every statement the batch's
connection runs is watched (``_watch``), and so is every row queued for the batch's
deferred writes (``_queued``: it is stale before it is written): an INSERT into ``outbox``, ``consent`` or
``escalation`` makes the facts of the person it names stale; any other write to those
tables, any write to ``person_identifier`` (it changes who shares what) and a merge of
people make every person's facts stale. A stale person's facts are read from the database
again, as before. Dropping is conservative: a savepoint rolled back after a write leaves
the person stale, never the other way round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, event, func, select
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session

from careloop import writes
from careloop.clock import utc
from careloop.tables import Consent, Escalation, OutboxItem, Person, PersonIdentifier
from orchestrator import gate

OPEN_ESCALATION = ("open", "acknowledged")
LIVE_OUTBOX = ("pending", "sending", "sent", "delivered", "read", "captured", "queued", "unknown")
WEEK = timedelta(days=7)
_KEY = "careloop.orchestrator.batch_facts"

_IDENT_T = PersonIdentifier.__table__  # type: ignore[attr-defined]
_CONSENT_T = Consent.__table__  # type: ignore[attr-defined]
_ESC_T = Escalation.__table__  # type: ignore[attr-defined]
_OUTBOX_T = OutboxItem.__table__  # type: ignore[attr-defined]
_PERSON_T = Person.__table__  # type: ignore[attr-defined]
_OTHER_IDENT = _IDENT_T.alias("other")

# Each statement answers for one person (``pid``) or for a batch (``pids``).


def _who(column: Any, many: bool) -> Any:
    return column.in_(bindparam("pids", expanding=True)) if many else column == bindparam("pid")


def _addresses(many: bool) -> Any:
    return (
        select(_IDENT_T.c.person_id, _IDENT_T.c.kind, _IDENT_T.c.value)
        .where(_who(_IDENT_T.c.person_id, many))
        .order_by(_IDENT_T.c.verified.desc(), _IDENT_T.c.id)
    )


def _shared(many: bool) -> Any:
    """The person's phone numbers and emails that another live (unmerged) person also holds."""
    return (
        select(_IDENT_T.c.person_id, _IDENT_T.c.value)
        .distinct()
        .join(
            _OTHER_IDENT,
            (_OTHER_IDENT.c.system == _IDENT_T.c.system)
            & (_OTHER_IDENT.c.value == _IDENT_T.c.value)
            & (_OTHER_IDENT.c.person_id != _IDENT_T.c.person_id),
        )
        .join(_PERSON_T, _PERSON_T.c.id == _OTHER_IDENT.c.person_id)
        .where(
            _who(_IDENT_T.c.person_id, many),
            _IDENT_T.c.kind.in_(sorted(gate.PERSON_FACING)),
            _PERSON_T.c.merged_into.is_(None),
        )
    )


def _consents(many: bool) -> Any:
    """One row per (channel, purpose): the latest opt-in or opt-out for it."""
    c = _CONSENT_T.c
    return select(c.person_id, c.channel, c.purpose, c.status, c.at).where(_who(c.person_id, many))


def _escalations(many: bool) -> Any:
    return (
        select(_ESC_T.c.person_id, func.count())
        .where(_who(_ESC_T.c.person_id, many), _ESC_T.c.status.in_(OPEN_ESCALATION))
        .group_by(_ESC_T.c.person_id)
    )


# What counts against the person's frequency caps: not the notices to staff about them.
# A message staff released from a hold counts from its release (when it could go).
_WENT_AT = func.coalesce(_OUTBOX_T.c.released_at, _OUTBOX_T.c.created_at)


def _recent(many: bool) -> Any:
    o = _OUTBOX_T.c
    return select(o.person_id, o.id, o.channel, _WENT_AT).where(
        _who(o.person_id, many),
        o.status.in_(LIVE_OUTBOX),
        bindparam("since") < _WENT_AT,
        o.purpose != "escalation",
    )


ONE = {
    "addresses": _addresses(False),
    "shared": _shared(False),
    "consents": _consents(False),
    "escalations": _escalations(False),
    "recent": _recent(False),
}
MANY = {
    "addresses": _addresses(True),
    "shared": _shared(True),
    "consents": _consents(True),
    "escalations": _escalations(True),
    "recent": _recent(True),
}


@dataclass
class Facts:
    """One person's facts as the gate needs them (before the journey state is applied)."""

    addresses: dict[str, list[str]] = field(default_factory=dict)
    shared: frozenset[str] = frozenset()
    consents: list[tuple[str, str, str, datetime]] = field(default_factory=list)
    open_escalations: int = 0
    recent: list[tuple[int, str, datetime]] = field(default_factory=list)  # (outbox id, channel, went)


ALL = frozenset(ONE)


def read(s: Session, pids: Sequence[int], since: datetime, parts: frozenset[str] = ALL) -> dict[int, Facts]:
    """The facts of ``pids`` (those named in ``parts``; the others are left empty), with what
    went to them after ``since``: one statement a part, however many people."""
    s.flush()  # a Core read does not autoflush: objects still pending must be seen
    out = {pid: Facts() for pid in pids}
    conn = s.connection()
    many = len(pids) != 1
    stmts = MANY if many else ONE
    params: dict[str, Any] = {"pids": list(pids)} if many else {"pid": pids[0]}
    if "addresses" in parts:
        for pid, kind, value in conn.execute(stmts["addresses"], params):
            if kind in ("phone", "email", "fhir"):
                out[pid].addresses.setdefault(kind, []).append(value)
    if "shared" in parts:
        shared: dict[int, set[str]] = {}
        for pid, value in conn.execute(stmts["shared"], params):
            shared.setdefault(pid, set()).add(value)
        for pid, values in shared.items():
            out[pid].shared = frozenset(values)
    if "consents" in parts:
        for pid, channel, purpose, status, at in conn.execute(stmts["consents"], params):
            out[pid].consents.append((channel, purpose, status, utc(at)))
    if "escalations" in parts:
        for pid, n in conn.execute(stmts["escalations"], params):
            out[pid].open_escalations = int(n)
    if "recent" in parts:
        for pid, oid, channel, went in conn.execute(stmts["recent"], {**params, "since": since}):
            out[pid].recent.append((oid, channel, utc(went)))
    return out


class BatchFacts:
    """The facts of a batch's people, read at its start and kept while they hold."""

    def __init__(self, facts: dict[int, Facts], since: datetime) -> None:
        self.facts, self.since = facts, since
        self.watched: dict[Any, Any] | None = None  # the connection's ``info`` it is noted in

    def get(self, s: Session, person_id: int, since: datetime) -> Facts | None:
        """The person's facts if they still hold and cover ``since``; else None (read them)."""
        if person_id not in self.facts or since < self.since:
            return None
        s.flush()  # objects still pending are written (and watched) first
        return self.facts.get(person_id)

    def stale(self, person_ids: Sequence[int] | None) -> None:
        if person_ids is None:
            self.facts.clear()
        else:
            for pid in person_ids:
                self.facts.pop(pid, None)


def begin(s: Session, pids: Sequence[int], now: datetime) -> BatchFacts | None:
    """Read the facts of ``pids`` for a batch decided from ``now`` on, and watch the
    batch's connection for changes to them until ``end``."""
    if not pids:
        return None
    since = now - WEEK
    batch = BatchFacts(read(s, pids, since), since)
    conn = s.connection()
    _listen(conn.engine)
    batch.watched = conn.info
    conn.info[_KEY] = batch
    s.info[_KEY] = batch
    return batch


def end(s: Session) -> None:
    """Stop using and watching the batch's facts (safe after a failed transaction too)."""
    batch: BatchFacts | None = s.info.pop(_KEY, None)
    if batch is not None and batch.watched is not None:
        batch.watched.pop(_KEY, None)


def current(s: Session) -> BatchFacts | None:
    batch: BatchFacts | None = s.info.get(_KEY)
    return batch


_WATCHED = {"outbox", "consent", "escalation", "person_identifier", "person"}
_BY_PERSON = {"outbox", "consent", "escalation"}  # an INSERT names the one person it concerns


def _watch(
    conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    batch: BatchFacts | None = conn.info.get(_KEY)
    if batch is None or not batch.facts or writes.flushing(conn):
        return  # (rows the deferred writes are writing now were seen when queued: ``_queued``)
    verb = statement[:6].upper()
    if verb not in ("INSERT", "UPDATE", "DELETE"):
        return
    words = statement.split(None, 3)
    table = (words[1] if verb == "UPDATE" else words[2] if len(words) > 2 else "").strip('"')
    if table not in _WATCHED:
        return
    if table == "person" and "merged_into" not in statement:
        return  # a person's timezone, language or record: not a fact kept here
    rows = getattr(context, "compiled_parameters", None) if context is not None else None
    if verb == "INSERT" and table in _BY_PERSON and rows and all("person_id" in r for r in rows):
        batch.stale([r["person_id"] for r in rows])
    else:
        batch.stale(None)


def _queued(s: Session, table: Any, values: dict[str, Any], is_insert: bool) -> None:
    """A row queued with the batch's deferred writes (careloop.writes) changes facts as
    its statement will: stale before it is even written."""
    batch = current(s)
    if batch is None or not batch.facts or table.name not in _WATCHED:
        return
    if table.name == "person" and "merged_into" not in values:
        return
    if is_insert and table.name in _BY_PERSON and "person_id" in values:
        batch.stale([values["person_id"]])
    else:
        batch.stale(None)


writes.watch(_queued)


def _listen(engine: Engine) -> None:
    if not event.contains(engine, "before_cursor_execute", _watch):
        event.listen(engine, "before_cursor_execute", _watch)
