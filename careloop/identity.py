"""Identity linking: who the person is across systems.

Rules (no guessing):
- the same strong identifier (MRN with its assigning authority, FHIR Patient reference,
  CRM contact id) is the same person;
- contact points (phone, email) match a person only when exactly one person holds them;
  a phone or email shared by several people is ambiguous and the event is held for staff;
- strong identifiers that point at two different people are a conflict, also held;
- a CRM contact id not seen before (and no MRN/FHIR id with it) links to an existing
  person only through a *verified* phone or email (``Identifier.verified``) held by
  exactly one person; several holders: held "ambiguous-identity"; unverified contact
  points never link it (a typed-in email must not bind a CRM contact to a patient), so
  the contact then becomes a person of its own until an MRN links it;
- a merge (HL7 A40, FHIR Patient.link replaced-by) links the old person into the survivor.

Several map workers (processes) resolve at once. On PostgreSQL each holds, before it reads
who holds an event's identifiers, a transaction-scoped advisory lock on each identifier
that decides whether the event creates a person (``deciding``): so two workers resolving
the same new patient take turns, and the second reads the person the first created
(``person_identifier`` is unique per (system, value, person) only, contact points being
shared). On SQLite the writer lock (BEGIN IMMEDIATE, careloop/db.py) already makes each
transaction wait for the one before.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from copy import copy
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, text, tuple_
from sqlalchemy.orm.util import identity_key
from sqlmodel import Session, col, select

from careloop import writes
from careloop.model import Identifier
from careloop.store import attach_inserted
from careloop.tables import OutboxItem, Person, PersonIdentifier, Resource

CONTACT_KINDS = frozenset({"phone", "email"})
# An outbox key (``urn:careloop:outbox``): resolves to the person the message went to.
OUTBOX_KIND = "outbox"
# Strong ids that a contact point may link to an existing person when verified.
LINKABLE_KINDS = frozenset({"crm"})
_PERSON = Person.__table__  # type: ignore[attr-defined]
_IDENT = PersonIdentifier.__table__  # type: ignore[attr-defined]
_OUTBOX = OutboxItem.__table__  # type: ignore[attr-defined]
# A new person's column defaults (copied per row: ``patient`` is a dict).
_PERSON_DEFAULTS = {
    n: f.get_default(call_default_factory=True)
    for n, f in Person.model_fields.items()
    if n not in ("id", "created_at")
}
# Statements built once, so SQLAlchemy compiles each once; IN lists are sent in chunks.
_HOLDERS = select(_IDENT.c.system, _IDENT.c.value, _IDENT.c.person_id, _IDENT.c.verified).where(
    tuple_(_IDENT.c.system, _IDENT.c.value).in_(bindparam("keys", expanding=True))
)
_OUTBOX_PEOPLE = select(_OUTBOX.c.key, _OUTBOX.c.person_id).where(
    _OUTBOX.c.key.in_(bindparam("keys", expanding=True))
)
_VERIFY = (
    _IDENT.update()
    .where(
        _IDENT.c.system == bindparam("b_system"),
        _IDENT.c.value == bindparam("b_value"),
        _IDENT.c.person_id == bindparam("b_person"),
    )
    .values(verified=True)
)
# Advisory locks in the order given (unnest's), which callers sort: two transactions locking
# overlapping sets never wait for each other crosswise.
_LOCK = text("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) AS k")
_CHUNK = 500
_Key = tuple[str, str]  # (system, value)


def deciding(idents: Sequence[Identifier]) -> list[Identifier]:
    """Those of one event's ``idents`` whose holders decide whether ``Resolver.resolve``
    creates a person: its strong identifiers; its phones and emails when it has no strong
    one; its verified ones when its strong ones are all linkable (a CRM contact id). None
    for a delivery report (never creates)."""
    if any(i.kind == OUTBOX_KIND for i in idents):
        return []
    strong = [i for i in idents if i.kind not in CONTACT_KINDS]
    contact = [i for i in idents if i.kind in CONTACT_KINDS]
    if not strong:
        return contact
    if all(i.kind in LINKABLE_KINDS for i in strong):
        return strong + [i for i in contact if i.verified]
    return strong


def lock_key(system: str, value: str) -> int:
    """The advisory lock key (a signed 64-bit integer) for the identifier (system, value)."""
    digest = hashlib.sha256(f"careloop:identity:{system}|{value}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@dataclass(frozen=True, slots=True)
class Resolution:
    person_id: int | None
    created: bool = False
    held_reason: str | None = None  # "ambiguous-identity" | "identity-conflict"


class Resolver:
    """Identity resolution for many events in one session, with few statements.

    Each identifier's ``person_identifier`` rows (and each outbox key's person) are read
    once: ``preload`` reads a whole batch's in one query, anything else is read when first
    asked about. Later answers come from those rows plus the resolver's own writes, so
    they are what the database would answer as long as nothing else writes
    ``person_identifier`` or merges people meanwhile (``merge`` here forgets what was
    read). The identifier rows it writes (new people's, links, verified flags) are
    buffered and written by ``flush`` in one executemany: flush before anything else
    reads ``person_identifier`` with SQL and before the savepoint ends. A resolver lives
    within one savepoint: if that is rolled back, drop it unflushed (its ``lock`` may be
    taken before the savepoint begins, so that the locks outlive it).

    The people it reads are kept (the session's identity map holds them only weakly),
    so each is read at most once; people it creates are not read back at all.
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self._postgres = session.get_bind().dialect.name == "postgresql"
        self._locked: set[_Key] = set()  # identifiers this transaction holds the lock of
        self._rows: dict[_Key, dict[int, bool]] = {}  # (system, value) -> {holder: verified}
        self._outbox: dict[str, int | None] = {}  # outbox key -> the person it went to
        self._people: dict[int, Person] = {}
        self._created: dict[int, dict[str, Any]] = {}  # people inserted here -> their row
        self._new: dict[tuple[str, str, int], dict[str, Any]] = {}  # identifier rows to insert
        self._verify: set[tuple[str, str, int]] = set()  # stored rows to mark verified

    def lock(self, events: Iterable[Sequence[Identifier]]) -> None:
        """On PostgreSQL, lock (until the transaction ends) the ``deciding`` identifiers of
        each of ``events`` (an event's identifiers each) not locked by this resolver yet:
        one statement, in key order. ``resolve`` locks its event's itself; a batch locks
        all of its events' first, before ``preload`` reads their holders. Taken inside a
        savepoint, the locks go with it if it is rolled back (so does the resolver)."""
        if not self._postgres:
            return
        keys = {(i.system, i.value) for idents in events for i in deciding(idents)} - self._locked
        if not keys:
            return
        self.session.connection().execute(_LOCK, {"keys": sorted({lock_key(*k) for k in keys})})
        self._locked |= keys
        if keys & self._rows.keys():  # read before the lock: another worker may have written since
            self.flush()
            for k in keys:
                self._rows.pop(k, None)

    def preload(self, idents: Iterable[Identifier]) -> None:
        """Read, in one query each, the holders of those of ``idents`` not read yet, the
        people of the outbox keys among them, and those people's records."""
        keys: set[_Key] = set()
        outbox: set[str] = set()
        for i in idents:
            if (i.system, i.value) not in self._rows:
                keys.add((i.system, i.value))
            if i.kind == OUTBOX_KIND and i.value not in self._outbox:
                outbox.add(i.value)
        if not keys and not outbox:
            return
        self.session.flush()  # ORM changes (a merge's) must be seen: a Core read does not autoflush
        conn = self.session.connection()
        people: set[int] = set()
        for key in keys:
            self._rows[key] = {}
        for chunk in _chunks(sorted(keys)):
            for system, value, pid, verified in conn.execute(_HOLDERS, {"keys": chunk}):
                self._rows[(system, value)][pid] = bool(verified)
                people.add(pid)
        for k in outbox:
            self._outbox[k] = None
        for chunk in _chunks(sorted(outbox)):
            for k, pid in conn.execute(_OUTBOX_PEOPLE, {"keys": chunk}):
                self._outbox[k] = pid
                people.add(pid)
        ids = sorted(people - self._people.keys() - self._created.keys())
        for chunk in _chunks(ids):
            for p in self.session.exec(select(Person).where(col(Person.id).in_(chunk))):
                assert p.id is not None
                self._people[p.id] = p

    def person(self, pid: int) -> Person | None:
        """Person ``pid``, read once (one created here is attached from the row written)."""
        p = self._people.get(pid)
        if p is None:
            p = self.session.identity_map.get(identity_key(Person, pid))
            row = self._created.get(pid)
            if p is None and row is not None:
                p = Person(id=pid, **row)
                attach_inserted(self.session, p)
            elif p is None:
                p = self.session.get(Person, pid)
            if p is not None:
                self._people[pid] = p
        return p

    def survivor(self, pid: int) -> int:
        """Follow ``merged_into`` links to the surviving person."""
        seen = set()
        while pid not in seen:
            seen.add(pid)
            if pid in self._created and pid not in self._people:
                return pid  # created here, merged into no one (a merge forgets what it created)
            p = self.person(pid)
            if p is None or p.merged_into is None:
                return pid
            pid = p.merged_into
        return pid

    def holders(self, idents: list[Identifier]) -> dict[_Key, set[int]]:
        """Who (surviving records) holds each of ``idents``."""
        self.preload(idents)
        return {
            (i.system, i.value): {self.survivor(p) for p in self._rows[(i.system, i.value)]} for i in idents
        }

    def contact_holders(self, idents: list[Identifier]) -> set[int]:
        """Everyone (surviving records) who holds one of ``idents``' phones or emails."""
        contact = [i for i in idents if i.kind in CONTACT_KINDS]
        return {pid for pids in self.holders(contact).values() for pid in pids}

    def link(self, person_id: int, idents: list[Identifier]) -> None:
        """Attach identifiers to a person (idempotent): one row per (system, value),
        verified if any copy is; written by ``flush``."""
        self.preload(idents)
        for ident in idents:
            held = self._rows[(ident.system, ident.value)]
            key = (ident.system, ident.value, person_id)
            if person_id not in held:
                held[person_id] = ident.verified
                self._new[key] = {
                    "person_id": person_id,
                    "kind": ident.kind,
                    "system": ident.system,
                    "value": ident.value,
                    "verified": ident.verified,
                }
            elif ident.verified and not held[person_id]:
                held[person_id] = True
                row = self._new.get(key)
                if row is not None:
                    row["verified"] = True
                else:
                    self._verify.add(key)

    def create(self, idents: list[Identifier], now: datetime, values: Mapping[str, Any] | None = None) -> int:
        """A new person holding ``idents``, with ``values`` (other columns take their
        defaults; ``insert_with_id`` writes it); its identifiers are written by ``flush``."""
        row: dict[str, Any] = {n: copy(v) for n, v in _PERSON_DEFAULTS.items()}
        row.update(values or {}, created_at=now)
        pid = insert_with_id(self.session, _PERSON, row)
        self._created[pid] = row
        self.link(pid, idents)
        return pid

    def resolve(
        self,
        idents: list[Identifier],
        now: datetime,
        *,
        create: bool = True,
        values: Mapping[str, Any] | None = None,
    ) -> Resolution:
        """Find (or create, with column ``values``) the one person these identifiers name."""
        outbox = [i for i in idents if i.kind == OUTBOX_KIND]
        if outbox:  # a delivery report names the message we sent, hence its person; never linked
            self.preload(outbox)
            pid = self._outbox[outbox[0].value]
            if pid is None:
                return Resolution(None, held_reason="unknown-person")
            return Resolution(self.survivor(pid))
        strong = [i for i in idents if i.kind not in CONTACT_KINDS]
        contact = [i for i in idents if i.kind in CONTACT_KINDS]
        self.lock([idents])  # before the holders are read (if they were read unlocked: a bug)
        held = self.holders(idents)
        found: set[int] = set()
        for ident in strong:
            found |= held[(ident.system, ident.value)]
        if len(found) > 1:
            return Resolution(None, held_reason="identity-conflict")
        if not found and strong and all(i.kind in LINKABLE_KINDS for i in strong):
            for ident in contact:
                if ident.verified:
                    found |= held[(ident.system, ident.value)]
            if len(found) > 1:
                return Resolution(None, held_reason="ambiguous-identity")
        if not found and not strong:
            for ident in contact:
                holders = held[(ident.system, ident.value)]
                if len(holders) > 1:
                    return Resolution(None, held_reason="ambiguous-identity")
                found |= holders
            if len(found) > 1:
                return Resolution(None, held_reason="ambiguous-identity")
        if found:
            pid = found.pop()
            self.link(pid, idents)
            return Resolution(pid)
        if not create or not idents:
            return Resolution(None, held_reason="unknown-person")
        return Resolution(self.create(idents, now, values), created=True)

    def merge(self, survivor_id: int, old: list[Identifier]) -> list[int]:
        """``merge`` after a flush; then forgets what was read, which it changed."""
        self.flush()
        merged = merge(self.session, survivor_id, old)
        self._rows.clear()
        self._outbox.clear()
        self._people.clear()
        self._created.clear()
        return merged

    def flush(self) -> None:
        """Write the buffered identifier rows and verified flags."""
        conn = self.session.connection()
        if self._new:
            conn.execute(_IDENT.insert(), list(self._new.values()))
            self._new.clear()
        if self._verify:
            conn.execute(
                _VERIFY, [{"b_system": s, "b_value": v, "b_person": p} for s, v, p in sorted(self._verify)]
            )
            self._verify.clear()


def insert_with_id(session: Session, table: Table, row: dict[str, Any]) -> int:
    """Insert ``row`` into ``table`` (an integer ``id``) and return its id. Inside
    ``writes.deferred`` on SQLite the id is handed out ahead and the row queued with the
    batch's others: the id SQLite itself would give (the largest plus one, under the write
    lock). Else one INSERT ... RETURNING: PostgreSQL hands ids out ahead in blocks, and
    the ids of people and events must not depend on batching (staff see them, outbox keys
    are made from event ids, replay reports are compared across engines)."""
    new_id = writes.next_id(session, table) if session.get_bind().dialect.name == "sqlite" else None
    if new_id is None:
        returned: int = session.connection().execute(_returning_id(table), row).scalar_one()
        return returned
    writes.insert(session, table, {**row, "id": new_id})
    return new_id


@functools.cache
def _returning_id(table: Table) -> Any:
    return table.insert().returning(table.c.id)


def _chunks(items: list[Any]) -> Iterable[list[Any]]:
    return (items[k : k + _CHUNK] for k in range(0, len(items), _CHUNK))


def survivor(session: Session, person_id: int) -> int:
    """Follow ``merged_into`` links to the surviving person."""
    return Resolver(session).survivor(person_id)


def _holders(session: Session, ident: Identifier) -> set[int]:
    return Resolver(session).holders([ident])[(ident.system, ident.value)]


def contact_holders(session: Session, idents: list[Identifier]) -> set[int]:
    """Everyone (surviving records) who holds one of ``idents``' phones or emails."""
    return Resolver(session).contact_holders(idents)


def link(session: Session, person_id: int, idents: list[Identifier]) -> None:
    """Attach identifiers to a person (idempotent)."""
    r = Resolver(session)
    r.link(person_id, idents)
    r.flush()


def resolve(
    session: Session,
    idents: list[Identifier],
    now: datetime,
    *,
    create: bool = True,
    values: Mapping[str, Any] | None = None,
) -> Resolution:
    """Find (or create, with column ``values``) the one person these identifiers name.
    One event's worth of ``Resolver.resolve``, written before it returns."""
    r = Resolver(session)
    res = r.resolve(idents, now, create=create, values=values)
    r.flush()
    return res


def merge(session: Session, survivor_id: int, old: list[Identifier]) -> list[int]:
    """Link the people holding ``old`` identifiers into ``survivor_id``; returns their ids."""
    merged = []
    for ident in old:
        for pid in _holders(session, ident):
            if pid == survivor_id:
                continue
            p = session.get(Person, pid)
            assert p is not None
            p.merged_into = survivor_id
            kept = {
                (pi.system, pi.value)
                for pi in session.exec(
                    select(PersonIdentifier).where(PersonIdentifier.person_id == survivor_id)
                ).all()
            }
            for pi in session.exec(select(PersonIdentifier).where(PersonIdentifier.person_id == pid)).all():
                if (pi.system, pi.value) in kept:
                    session.delete(pi)
                else:
                    pi.person_id = survivor_id
            for res in session.exec(select(Resource).where(col(Resource.person_id) == pid)).all():
                res.person_id = survivor_id
            merged.append(pid)
    return merged
