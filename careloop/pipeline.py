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

from careloop import audit_log, identity
from careloop.clock import utc
from careloop.errors import CareloopError, SkipMessage, TransientError
from careloop.ingest import IngestSink as IngestSink  # the raw sink, re-exported
from careloop.model import MappedEvent
from careloop.store import Store, write_through
from careloop.tables import DeadLetter, JourneyEvent, Person, RawMessage, Resource

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
    name: str

    def map(self, raw: RawMessage) -> Sequence[MappedEvent]: ...


MapperLookup = Callable[[RawMessage], MapperLike | None]


class MapStage:
    """raw_message(pending) -> journey_event rows, people and subjects."""

    name = "map"

    def __init__(self, store: Store, mappers: MapperLookup, batch: int = 200) -> None:
        self.store, self.mappers, self.batch = store, mappers, batch

    async def run_once(self) -> int:
        return await asyncio.to_thread(self.run_once_sync)

    def run_once_sync(self) -> int:
        with self.store.session() as s:
            raws = s.exec(
                select(RawMessage)
                .where(RawMessage.status == "pending")
                .order_by(col(RawMessage.id))
                .limit(self.batch)
                .with_for_update(skip_locked=True)
            ).all()
            handle_isolated(s, list(raws), self._map_one, "map", self.store.clock.now)
            return len(raws)

    def _map_one(self, s: Session, raw: RawMessage) -> None:
        now = self.store.clock.now()
        actor = f"connector:{raw.connector}"
        mapper = self.mappers(raw)
        if mapper is None:
            write_through(s, raw, status="skipped", status_reason=f"no mapper for {raw.kind}")
            audit_log.append(
                s,
                at=now,
                actor="mapping",
                action="message.skip",
                entity=f"raw_message/{raw.id}",
                detail={"reason": raw.status_reason},
            )
            return
        try:
            events = mapper.map(raw)
        except SkipMessage as skip:
            write_through(s, raw, status="skipped", status_reason=str(skip)[:500])
            audit_log.append(
                s,
                at=now,
                actor=f"mapper:{mapper.name}",
                action="message.skip",
                entity=f"raw_message/{raw.id}",
                detail={"reason": raw.status_reason},
            )
            return
        ids = [apply_event(s, raw, i, ev, now) for i, ev in enumerate(events)]
        write_through(s, raw, status="mapped", status_reason=None)
        audit_log.append(
            s,
            at=now,
            actor=f"mapper:{mapper.name}",
            action="message.map",
            entity=f"raw_message/{raw.id}",
            detail={"events": [e.type for e in events], "event_ids": ids, "source": actor},
        )


def apply_event(s: Session, raw: RawMessage, index: int, ev: MappedEvent, now: datetime) -> int:
    """Resolve the person, update person and subject, and store one journey event."""
    # A sender the connector could not authenticate (an email reply without a valid reply
    # token: ``unverified``) may name an existing person but never creates one.
    res = identity.resolve(s, ev.identifiers, now, create=not ev.attributes.get("unverified"))
    pid = res.person_id
    if pid is not None:
        person = s.get(Person, pid)
        assert person is not None
        if ev.patient:
            changes: dict[str, Any] = {"patient": {**person.patient, **ev.patient, "resourceType": "Patient"}}
            if ev.patient.get("deceasedBoolean") or ev.patient.get("deceasedDateTime"):
                changes["deceased"] = True
            lang = _language(ev.patient)
            if lang:
                changes["language"] = lang
            write_through(s, person, **changes)
        if ev.merge_from:
            merged = identity.merge(s, pid, ev.merge_from)
            ev.attributes.setdefault("merged_people", merged)
        if ev.subject and ev.subject_ref:
            _put_resource(s, ev.subject_ref, ev.subject, pid, now)
    # One Core INSERT ... RETURNING for the id (nothing else reads the row in this
    # transaction), not an ORM object and a flush of the whole session per event.
    event_id: int = (
        s.connection()
        .execute(
            _EVENT.insert().returning(_EVENT.c.id),
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
        .scalar_one()
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
            for n, holder in enumerate(sorted(identity.contact_holders(s, ev.identifiers))):
                s.connection().execute(
                    _EVENT.insert(),
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


_RESOURCE = Resource.__table__  # type: ignore[attr-defined]
_RESOURCE_EXISTS = select(_RESOURCE.c.ref).where(_RESOURCE.c.ref == bindparam("ref"))


def _put_resource(s: Session, ref: str, body: dict[str, Any], pid: int, now: datetime) -> None:
    """Insert or replace the subject's latest version with Core statements. A ``Resource``
    the session already holds is refreshed too, so the two never disagree."""
    values = {"resource_type": body["resourceType"], "person_id": pid, "updated_at": now, "body": body}
    held = s.identity_map.get(identity_key(Resource, ref))
    if held is not None:
        write_through(s, held, **values)
    elif s.connection().execute(_RESOURCE_EXISTS, {"ref": ref}).first() is None:
        s.connection().execute(_RESOURCE.insert(), {"ref": ref, **values})
    else:
        s.connection().execute(_RESOURCE.update().where(_RESOURCE.c.ref == ref).values(**values))


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
        return
    except (OperationalError, TransientError):
        raise
    except Exception:
        pass
    for item in items:
        try:
            with s.begin_nested():
                handle(s, item)
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
