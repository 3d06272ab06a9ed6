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
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, tuple_
from sqlmodel import Session, col, select

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
_PERSON_COLS = tuple(c.name for c in _PERSON.c if c.name != "id")


@dataclass(frozen=True, slots=True)
class Resolution:
    person_id: int | None
    created: bool = False
    held_reason: str | None = None  # "ambiguous-identity" | "identity-conflict"


def survivor(session: Session, person_id: int) -> int:
    """Follow ``merged_into`` links to the surviving person."""
    seen = set()
    while person_id not in seen:
        seen.add(person_id)
        p = session.get(Person, person_id)
        if p is None or p.merged_into is None:
            return person_id
        person_id = p.merged_into
    return person_id


def _holders(session: Session, ident: Identifier) -> set[int]:
    return _holders_of(session, [ident])[(ident.system, ident.value)]


_HOLDERS = select(_IDENT.c.system, _IDENT.c.value, _IDENT.c.person_id).where(
    tuple_(_IDENT.c.system, _IDENT.c.value).in_(bindparam("keys", expanding=True))
)


def _holders_of(session: Session, idents: list[Identifier]) -> dict[tuple[str, str], set[int]]:
    """Who holds each identifier, in one query (the hot path resolves every event): a
    Core statement built once, so SQLAlchemy compiles it once."""
    out: dict[tuple[str, str], set[int]] = {(i.system, i.value): set() for i in idents}
    if not idents:
        return out
    session.flush()  # identifiers ``link`` added as objects must be seen (a Core read does not autoflush)
    for system, value, pid in session.connection().execute(_HOLDERS, {"keys": list(out)}):
        out[(system, value)].add(survivor(session, pid))
    return out


def contact_holders(session: Session, idents: list[Identifier]) -> set[int]:
    """Everyone (surviving records) who holds one of ``idents``' phones or emails."""
    contact = [i for i in idents if i.kind in CONTACT_KINDS]
    return {pid for pids in _holders_of(session, contact).values() for pid in pids}


def link(session: Session, person_id: int, idents: list[Identifier]) -> None:
    """Attach identifiers to a person (idempotent)."""
    if not idents:
        return
    have = {
        (pi.system, pi.value): pi
        for pi in session.exec(select(PersonIdentifier).where(PersonIdentifier.person_id == person_id)).all()
    }
    for ident in idents:
        exists = have.get((ident.system, ident.value))
        if exists is None:
            row = PersonIdentifier(
                person_id=person_id,
                kind=ident.kind,
                system=ident.system,
                value=ident.value,
                verified=ident.verified,
            )
            session.add(row)
            have[(ident.system, ident.value)] = row
        elif ident.verified and not exists.verified:
            exists.verified = True


def resolve(session: Session, idents: list[Identifier], now: datetime, *, create: bool = True) -> Resolution:
    """Find (or create) the one person these identifiers name."""
    outbox = [i for i in idents if i.kind == OUTBOX_KIND]
    if outbox:  # a delivery report names the message we sent, hence its person; never linked
        pid = session.exec(select(OutboxItem.person_id).where(OutboxItem.key == outbox[0].value)).first()
        if pid is None:
            return Resolution(None, held_reason="unknown-person")
        return Resolution(survivor(session, pid))
    strong = [i for i in idents if i.kind not in CONTACT_KINDS]
    contact = [i for i in idents if i.kind in CONTACT_KINDS]
    held = _holders_of(session, idents)

    def _holders(_s: Session, ident: Identifier) -> set[int]:
        return held[(ident.system, ident.value)]

    found: set[int] = set()
    for ident in strong:
        found |= _holders(session, ident)
    if len(found) > 1:
        return Resolution(None, held_reason="identity-conflict")
    if not found and strong and all(i.kind in LINKABLE_KINDS for i in strong):
        verified = [i for i in contact if i.verified]
        for ident in verified:
            found |= _holders(session, ident)
        if len(found) > 1:
            return Resolution(None, held_reason="ambiguous-identity")
    if not found and not strong:
        for ident in contact:
            holders = _holders(session, ident)
            if len(holders) > 1:
                return Resolution(None, held_reason="ambiguous-identity")
            found |= holders
        if len(found) > 1:
            return Resolution(None, held_reason="ambiguous-identity")
    if found:
        pid = found.pop()
        link(session, pid, idents)
        return Resolution(pid)
    if not create or not idents:
        return Resolution(None, held_reason="unknown-person")
    return Resolution(_create(session, idents, now), created=True)


def _create(session: Session, idents: list[Identifier], now: datetime) -> int:
    """A new person holding ``idents``: Core inserts (the row with RETURNING for its id, the
    identifiers in one executemany) instead of ORM objects and a flush. The Person is then
    attached to the session as a persistent object, so a following ``session.get`` finds
    it without a query while the caller holds it, and changes to it are flushed as usual."""
    person = Person(created_at=now)
    values = {c: getattr(person, c) for c in _PERSON_COLS}
    conn = session.connection()
    person.id = conn.execute(_PERSON.insert().returning(_PERSON.c.id), values).scalar_one()
    attach_inserted(session, person)
    rows: dict[tuple[str, str], dict[str, object]] = {}
    for ident in idents:  # as ``link``: one row per (system, value), verified if any copy is
        row = rows.setdefault(
            (ident.system, ident.value),
            {
                "person_id": person.id,
                "kind": ident.kind,
                "system": ident.system,
                "value": ident.value,
                "verified": ident.verified,
            },
        )
        row["verified"] = bool(row["verified"]) or ident.verified
    if rows:
        conn.execute(_IDENT.insert(), list(rows.values()))
    return person.id


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
