"""The stage machinery: the raw sink, the mapping stage and the worker loop.

raw -> mapping -> orchestrator -> outbox -> channel. Each stage claims a small batch of
work from its table, does it and writes its results and their audit records in one
transaction. A failing item is isolated in a savepoint and dead-lettered with a PHI-free
error, so the rest of the batch and the pipeline keep flowing; a transient failure of the
store rolls the batch back and the worker retries with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import bindparam
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm.util import identity_key
from sqlmodel import Session, col, select

from careloop import audit_log, identity, writes
from careloop.clock import utc
from careloop.errors import CareloopError, SkipMessage, TransientError
from careloop.ingest import IngestSink as IngestSink  # the raw sink, re-exported
from careloop.model import Identifier, MappedEvent
from careloop.store import Store, write_through
from careloop.tables import DeadLetter, JourneyEvent, RawMessage, Resource

log = logging.getLogger("careloop.pipeline")
_EVENT = JourneyEvent.__table__  # type: ignore[attr-defined]


def describe_error(exc: BaseException) -> str:
    """A PHI-free description: our own errors speak for themselves; foreign ones give only
    their type and where they were raised, since their text may quote patient data."""
    if isinstance(exc, CareloopError):
        return f"{type(exc).__name__}: {exc}"[:1000]
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}{where}"


class Stage(Protocol):
    name: str

    async def run_once(self) -> int:
        """Process one batch; return how many items were handled (0: nothing to do)."""
        ...


# --------------------------------------------------------------------------- mapping


class MapperLike(Protocol):
    @property
    def name(self) -> str:
        """Read-only, so mappers that declare it a ``ClassVar`` fit."""
        ...

    def map(self, raw: RawMessage) -> Sequence[MappedEvent]: ...


MapperLookup = Callable[[RawMessage], MapperLike | None]


class MapStage:
    """raw_message(pending) -> journey_event rows, people and subjects."""

    name = "map"

    def __init__(self, store: Store, mappers: MapperLookup, batch: int = 500) -> None:
        self.store, self.mappers, self.batch = store, mappers, batch

    async def run_once(self) -> int:
        return await asyncio.to_thread(self.run_once_sync)

    def run_once_sync(self) -> int:
        with self.store.session() as s:
            raws = list(
                s.exec(
                    select(RawMessage)
                    .where(RawMessage.status == "pending")
                    .order_by(col(RawMessage.id))
                    .limit(self.batch)
                    .with_for_update(skip_locked=True)
                ).all()
            )
            if raws and not self._map_batch(s, raws):
                handle_isolated(s, raws, self._map_one, "map", self.store.clock.now)
            return len(raws)

    def _map_batch(self, s: Session, raws: list[RawMessage]) -> bool:
        """Map ``raws`` together, in one savepoint: every mapper first (pure), then one
        ``MapBatch`` for all their events (their people and subjects read at once) and each
        message's writes in turn, queued (``writes.deferred``: new people, events and the
        messages' statuses) or buffered (identifier rows, subjects), and written at the end
        a statement a table. True if all of them were mapped. False, with nothing of it
        kept, if one failed: the caller then maps them one by one (``handle_isolated``), so
        a bad message is still dead-lettered alone. A failure of the store itself
        propagates, as in ``handle_isolated``.

        The identity locks of the events mapped (``identity.Resolver.lock``; PostgreSQL)
        are taken before the savepoint, so they are still held when the messages are mapped
        one by one after a failure (a savepoint's rollback releases the locks taken in it):
        those passes then wait for no one, and no other worker slips in between."""
        mapped: list[tuple[RawMessage, str, Sequence[MappedEvent] | str]] = []
        failed = False
        for raw in raws:
            try:
                mapped.append((raw, *self._map(raw)))
            except (OperationalError, TransientError):
                raise
            except Exception:
                failed = True
        events = [ev for _, _, out in mapped if not isinstance(out, str) for ev in out]
        resolver = identity.Resolver(s)
        resolver.lock(_identifier_sets(events))
        if failed:
            return False
        try:
            with s.begin_nested(), writes.deferred(s):
                batch = MapBatch(s, events, resolver)
                statuses = [
                    (raw, self._store(s, raw, actor, out, self.store.clock.now(), batch))
                    for raw, actor, out in mapped
                ]
                batch.flush(s)
                for raw, (status, reason) in statuses:  # together: one executemany
                    write_through(s, raw, status=status, status_reason=reason)
        except (OperationalError, TransientError):
            raise
        except Exception:
            return False
        return True

    def _map_one(self, s: Session, raw: RawMessage) -> None:
        now = self.store.clock.now()
        actor, out = self._map(raw)
        batch = MapBatch(s, [] if isinstance(out, str) else out)
        status, reason = self._store(s, raw, actor, out, now, batch)
        batch.flush(s)
        write_through(s, raw, status=status, status_reason=reason)

    def _map(self, raw: RawMessage) -> tuple[str, Sequence[MappedEvent] | str]:
        """(actor, the message's events), or (actor, why it is skipped). Raises what its
        mapper raises, but for ``SkipMessage``."""
        mapper = self.mappers(raw)
        if mapper is None:
            return "mapping", f"no mapper for {raw.kind}"
        try:
            return f"mapper:{mapper.name}", mapper.map(raw)
        except SkipMessage as skip:
            return f"mapper:{mapper.name}", str(skip)[:500]

    def _store(
        self,
        s: Session,
        raw: RawMessage,
        actor: str,
        out: Sequence[MappedEvent] | str,
        now: datetime,
        batch: MapBatch,
    ) -> tuple[str, str | None]:
        """Store one message's events (or audit its skip); returns the message's new
        status and reason, which the caller writes."""
        if isinstance(out, str):
            detail: dict[str, Any] = {"reason": out}
            audit_log.append(
                s, at=now, actor=actor, action="message.skip", entity=f"raw_message/{raw.id}", detail=detail
            )
            return "skipped", out
        ids = [apply_event(s, raw, i, ev, now, batch) for i, ev in enumerate(out)]
        audit_log.append(
            s,
            at=now,
            actor=actor,
            action="message.map",
            entity=f"raw_message/{raw.id}",
            detail={
                "events": [e.type for e in out],
                "event_ids": ids,
                "source": f"connector:{raw.connector}",
            },
        )
        return "mapped", None


_RESOURCE = Resource.__table__  # type: ignore[attr-defined]
_RESOURCE_REFS = select(_RESOURCE.c.ref).where(_RESOURCE.c.ref.in_(bindparam("refs", expanding=True)))
_RESOURCE_UPDATE = _RESOURCE.update().where(_RESOURCE.c.ref == bindparam("b_ref"))


class MapBatch:
    """What the events of one mapping pass share: an ``identity.Resolver`` (the people of
    all of them read at once), which of their subjects are stored (read at once too), and
    the subject writes, buffered. ``flush`` writes what is buffered; it must run before
    the pass's savepoint ends, and a batch whose savepoint was rolled back is dropped."""

    def __init__(
        self, s: Session, events: Sequence[MappedEvent], resolver: identity.Resolver | None = None
    ) -> None:
        self.resolver = resolver or identity.Resolver(s)
        # Who holds the events' identifiers is read under their locks (no-ops if ``resolver``
        # holds them): a worker mapping the same new patient waits for this one's commit.
        self.resolver.lock(_identifier_sets(events))
        self.resolver.preload(i for ev in events for i in ev.identifiers)
        self._stored: dict[str, bool] = {}  # subject ref -> whether its row exists
        self._insert: dict[str, dict[str, Any]] = {}  # subject rows to insert
        self._update: dict[str, dict[str, Any]] = {}  # stored subjects' new values
        self._read_refs(s, [ev.subject_ref for ev in events if ev.subject and ev.subject_ref])

    def _read_refs(self, s: Session, refs: list[str]) -> None:
        todo = sorted({r for r in refs if r not in self._stored})
        for ref in todo:
            self._stored[ref] = False
        for k in range(0, len(todo), 500):
            for (ref,) in s.connection().execute(_RESOURCE_REFS, {"refs": todo[k : k + 500]}):
                self._stored[ref] = True

    def put_resource(self, s: Session, ref: str, body: dict[str, Any], pid: int, now: datetime) -> None:
        """Insert or replace the subject's latest version. A ``Resource`` the session holds
        (a merge loaded it) is written at once and refreshed, so the two never disagree."""
        values = {"resource_type": body["resourceType"], "person_id": pid, "updated_at": now, "body": body}
        held = s.identity_map.get(identity_key(Resource, ref))
        if held is not None:
            self._update.pop(ref, None)
            write_through(s, held, **values)
            return
        self._read_refs(s, [ref])
        if ref in self._insert:
            self._insert[ref].update(values)
        elif self._stored[ref]:
            self._update[ref] = values
        else:
            self._insert[ref] = {"ref": ref, **values}

    def merge(self, s: Session, pid: int, old: list[Identifier]) -> list[int]:
        """``identity.merge``, after writing what is buffered (it reads with SQL)."""
        self.flush(s)
        return self.resolver.merge(pid, old)

    def flush(self, s: Session) -> None:
        """Write the buffered identifier rows and subjects."""
        self.resolver.flush()
        if self._insert:
            s.connection().execute(_RESOURCE.insert(), list(self._insert.values()))
            self._stored.update(dict.fromkeys(self._insert, True))
            self._insert.clear()
        if self._update:
            s.connection().execute(_RESOURCE_UPDATE, [{"b_ref": r, **v} for r, v in self._update.items()])
            self._update.clear()


def _identifier_sets(events: Sequence[MappedEvent]) -> list[list[Identifier]]:
    """Each event's identifiers, and the old person's of each merge: what a pass locks."""
    return [ev.identifiers for ev in events] + [ev.merge_from for ev in events if ev.merge_from]


def apply_event(
    s: Session, raw: RawMessage, index: int, ev: MappedEvent, now: datetime, batch: MapBatch | None = None
) -> int:
    """Resolve the person, update person and subject, and store one journey event; returns
    its id. Within a ``batch`` (one mapping pass) reads are shared and some writes wait for
    the batch's flush; without one, everything is written when it returns."""
    if batch is None:
        batch = MapBatch(s, [ev])
        written = apply_event(s, raw, index, ev, now, batch)
        batch.flush(s)
        return written
    # A sender the connector could not authenticate (an email reply without a valid reply
    # token: ``unverified``) may name an existing person but never creates one. A new
    # person is inserted with the event's patient data at once.
    res = batch.resolver.resolve(
        ev.identifiers,
        now,
        create=not ev.attributes.get("unverified"),
        values=_person_changes({}, ev.patient) if ev.patient else None,
    )
    pid = res.person_id
    if pid is not None:
        if ev.patient and not res.created:
            person = batch.resolver.person(pid)
            assert person is not None
            write_through(s, person, **_person_changes(person.patient, ev.patient))
        if ev.merge_from:
            merged = batch.merge(s, pid, ev.merge_from)
            ev.attributes.setdefault("merged_people", merged)
        if ev.subject and ev.subject_ref:
            batch.put_resource(s, ev.subject_ref, ev.subject, pid, now)
    event_id = identity.insert_with_id(
        s,
        _EVENT,
        {
            "event_key": f"raw:{raw.id}:{index}",
            "person_id": pid,
            "type": ev.type,
            "occurred_at": utc(ev.occurred_at),
            "recorded_at": now,
            "subject_ref": ev.subject_ref,
            "attributes": _jsonable(ev.attributes),
            "raw_message_id": raw.id,
            "status": "pending" if pid is not None else "held",
            "status_reason": res.held_reason,
            "attempts": 0,
            "next_attempt_at": None,
        },
    )
    if res.held_reason:
        audit_log.append(
            s,
            at=now,
            actor="identity",
            action="identity.hold",
            entity=f"journey_event/{event_id}",
            outcome="held",
            detail={"reason": res.held_reason},
        )
        if res.held_reason == "ambiguous-identity" and ev.type == "consent.revoked":
            # Stopping is always safe: a STOP from a phone or email several people hold stops
            # messages to it for each of them at once (the held event stays for staff).
            for n, holder in enumerate(sorted(batch.resolver.contact_holders(ev.identifiers))):
                identity.insert_with_id(
                    s,
                    _EVENT,
                    {
                        "event_key": f"raw:{raw.id}:{index}:holder{n}",
                        "person_id": holder,
                        "type": ev.type,
                        "occurred_at": utc(ev.occurred_at),
                        "recorded_at": now,
                        "subject_ref": None,
                        "attributes": _jsonable({**ev.attributes, "shared_address": True}),
                        "raw_message_id": raw.id,
                        "status": "pending",
                        "status_reason": None,
                        "attempts": 0,
                        "next_attempt_at": None,
                    },
                )
    elif res.created:
        audit_log.append(
            s,
            at=now,
            actor="identity",
            action="person.create",
            person_id=pid,
            detail={"identifiers": len(ev.identifiers)},
        )
    return event_id


def _person_changes(current: dict[str, Any], patient: dict[str, Any]) -> dict[str, Any]:
    """The person columns a FHIR Patient fragment sets, merged into ``current`` (the
    person's Patient so far)."""
    changes: dict[str, Any] = {"patient": {**current, **patient, "resourceType": "Patient"}}
    if patient.get("deceasedBoolean") or patient.get("deceasedDateTime"):
        changes["deceased"] = True
    lang = _language(patient)
    if lang:
        changes["language"] = lang
    return changes


def _language(patient: dict[str, Any]) -> str | None:
    for comm in patient.get("communication", []):
        for coding in comm.get("language", {}).get("coding", []):
            code = coding.get("code")
            if isinstance(code, str):
                return code.split("-")[0].lower()
    return None


def _jsonable(v: Any) -> Any:
    if isinstance(v, datetime):
        return utc(v).isoformat()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


def handle_isolated(
    s: Session,
    items: list[Any],
    handle: Callable[[Session, Any], None],
    stage: str,
    now: Callable[[], datetime],
) -> None:
    """Handle every item in ``s``'s transaction; one that fails is dead-lettered alone.

    Optimistic: the whole batch runs in one savepoint. Only if an item fails is that
    savepoint rolled back and the batch redone item by item, each in its own savepoint, so
    the good items are kept and the bad one is isolated. (A savepoint per item costs more
    than the work of a small item.) A failure of the store itself is not an item's fault:
    it propagates, and the worker retries the batch with backoff.
    """
    try:
        with s.begin_nested():
            for item in items:
                handle(s, item)
            writes.flush(s)  # rows a handler queued fail here, inside the savepoint
        return
    except (OperationalError, TransientError):
        raise
    except Exception:
        pass
    for item in items:
        try:
            with s.begin_nested():
                handle(s, item)
                writes.flush(s)
        except (OperationalError, TransientError):
            raise
        except Exception as exc:  # one bad item never stops the pipeline
            dead_letter(s, stage, item, exc, now())


def dead_letter(s: Session, stage: str, item: Any, exc: BaseException, now: datetime) -> None:
    """Mark ``item`` dead and record why, in the caller's transaction."""
    err = describe_error(exc)
    item.status = "dead"
    if "status_reason" in type(item).model_fields:
        item.status_reason = err[:500]
    else:
        item.last_error = err[:500]
    s.add(DeadLetter(stage=stage, item_id=item.id, created_at=now, error=err))
    audit_log.append(
        s,
        at=now,
        actor=stage,
        action="item.dead_letter",
        outcome="failure",
        entity=f"{type(item).__tablename__}/{item.id}",
        detail={"error": err},
    )
    log.warning("stage %s dead-lettered item %s: %s", stage, item.id, err)


# --------------------------------------------------------------------------- workers


async def run_stage(
    stage: Stage,
    stop: asyncio.Event,
    idle: float = 0.2,
    max_backoff: float = 30.0,
    *,
    wake: asyncio.Event | None = None,
    then: asyncio.Event | None = None,
) -> None:
    """Run ``stage`` until ``stop`` is set; finish the batch in hand before leaving.

    With nothing to do it sleeps ``idle`` seconds (longer after store failures), or until
    ``wake`` is set: the stage before it (or the raw sink) sets it when it produced work,
    so an item moves through the stages without waiting for their polls. After handling
    something it sets ``then``, the next stage's ``wake``. Polling stays as the fallback
    (timers fall due without anyone waking the stage, other processes write too)."""
    backoff = idle
    while not stop.is_set():
        try:
            n = await stage.run_once()
            backoff = idle
        except (OperationalError, TransientError) as exc:
            log.warning("stage %s: transient failure, retrying: %s", stage.name, describe_error(exc))
            n = 0
            backoff = min(max_backoff, backoff * 2) * (0.5 + random.random() / 2)
        if n > 0 and then is not None:
            then.set()
        if n == 0:
            await _sleep(stop, wake, backoff)


async def _sleep(stop: asyncio.Event, wake: asyncio.Event | None, timeout: float) -> None:
    waits = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waits.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        if wake is not None:
            wake.clear()


async def drain(stages: Sequence[Stage], max_rounds: int = 10_000) -> None:
    """Run the stages in order until none has work (replay, demo and tests)."""
    for _ in range(max_rounds):
        total = 0
        for st in stages:
            while (n := await st.run_once()) > 0:
                total += n
        if total == 0:
            return
    raise RuntimeError("pipeline did not settle")
