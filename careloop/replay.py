"""``careloop replay``: a feed of signals through the real pipeline on a virtual clock.

Feed: JSON Lines, one signal per line, in time order:
``{"at": ISO-8601 with offset, "connector": id, "body": string or JSON, "headers": {...}?}``.
Before each line the clock advances to ``at``, firing every timer due on the way (each at
its own due time); the line then enters the connector's accept path (after transport and
signature checks) and the pipeline runs to rest. Every channel captures instead of
sending. After the last line the clock runs on through the timers due within the
horizon. The report is deterministic: the same feed gives the same report.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from careloop.clock import VirtualClock, utc
from careloop.config import AppConfig
from careloop.db import make_engine
from careloop.errors import ConfigError
from careloop.hub import Hub
from careloop.store import Store
from careloop.tables import (
    Decision,
    DeliveryReceipt,
    Escalation,
    JourneyEvent,
    OutboxItem,
    Person,
    PersonIdentifier,
    Timer,
)

DELIVERED = ("captured", "delivered", "sent", "queued")
SUPPRESSED = ("suppress", "cancel", "shadow")


@dataclass(frozen=True, slots=True)
class FeedLine:
    at: datetime
    connector: str
    body: bytes
    headers: dict[str, str]


def read_feed(path: Path) -> list[FeedLine]:
    """Parse and check a feed; errors name the line, never its content."""
    out: list[FeedLine] = []
    problems: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            at = datetime.fromisoformat(doc["at"])
            if at.tzinfo is None:
                raise ValueError
            body = doc["body"]
            raw = body.encode("utf-8") if isinstance(body, str) else json.dumps(body).encode("utf-8")
            headers = {str(k): str(v) for k, v in (doc.get("headers") or {}).items()}
            out.append(FeedLine(utc(at), str(doc["connector"]), raw, headers))
        except (ValueError, KeyError, TypeError, AttributeError):
            problems.append(f"{path.name}:{n}: needs at (ISO-8601 with offset), connector and body")
    if problems:
        raise ConfigError(problems)
    for a, b in itertools.pairwise(out):
        if b.at < a.at:
            raise ConfigError([f"{path.name}: lines are not in time order"])
    return out


class Replayer:
    def __init__(
        self,
        config: AppConfig,
        database_url: str | None = None,
        start: datetime | None = None,
        engine: Engine | None = None,
    ) -> None:
        """A replay over a fresh temporary SQLite store, unless a database URL or an
        engine (tests: a clean schema) is given."""
        self._tmp = None
        if engine is None:
            if database_url is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="careloop-replay-")
                database_url = f"sqlite:///{self._tmp.name}/replay.db"
            engine = make_engine(database_url)
        self._own_engine = self._tmp is not None or database_url is not None
        self.clock = VirtualClock(start or datetime(2000, 1, 1).astimezone())
        self.hub = Hub(config, store=Store(engine, self.clock), capture=True)

    @property
    def store(self) -> Store:
        return self.hub.store

    async def feed(self, lines: list[FeedLine], horizon: timedelta = timedelta(days=30)) -> None:
        for line in lines:
            await self.advance(line.at)
            await self.signal(line)
        if lines:
            await self.advance(lines[-1].at + horizon)

    async def signal(self, line: FeedLine) -> None:
        conn = self.hub.connectors.get(line.connector)
        if conn is None:
            raise ConfigError(
                [
                    f"feed: unknown connector {line.connector!r} (config has: "
                    f"{', '.join(sorted(self.hub.connectors))})"
                ]
            )
        items = conn.accept(line.body, line.headers)
        self.hub.sink.put_sync(items)
        await self.hub.drain()

    async def advance(self, until: datetime) -> None:
        """Move the clock to ``until``, firing due timers (and retries) at their own times."""
        until = utc(until)
        await self.hub.drain()
        while True:
            with Session(self.store.engine) as s:
                t = s.exec(select(func.min(Timer.due_at)).where(Timer.status == "pending")).one()
                o = s.exec(
                    select(func.min(OutboxItem.next_attempt_at)).where(OutboxItem.status == "pending")
                ).one()
            due = min((utc(x) for x in (t, o) if x is not None), default=None)
            if due is None or due > until:
                break
            self.clock.set(due)
            await self.hub.drain()
        self.clock.set(until)
        await self.hub.drain()

    def close(self) -> None:
        self.hub.sink.close()
        if self._own_engine:
            self.hub.store.engine.dispose()
        if self._tmp is not None:
            self._tmp.cleanup()


def _iso(dt: datetime | None) -> str | None:
    return utc(dt).isoformat() if dt is not None else None


def build_report(store: Store) -> dict[str, Any]:
    """The replay report (the DESIGN.md contract), in a stable order."""
    with Session(store.engine) as s:
        deliveries = []
        q = (
            select(OutboxItem, func.min(DeliveryReceipt.at))
            .join(DeliveryReceipt, col(DeliveryReceipt.outbox_id) == col(OutboxItem.id), isouter=True)
            .where(col(OutboxItem.status).in_(DELIVERED))
            .group_by(col(OutboxItem.id))
            .order_by(col(OutboxItem.id))
        )
        for item, at in s.exec(q).all():
            deliveries.append(
                {
                    "at": _iso(at or item.created_at),
                    "person": str(item.person_id),
                    "channel": item.channel,
                    "template": item.template,
                    "playbook": item.playbook,
                    "key": item.key,
                }
            )
        deliveries.sort(key=lambda d: (d["at"], d["key"]))
        suppressed = [
            {
                "at": _iso(d.decided_at),
                "person": str(d.person_id),
                "playbook": d.playbook,
                "template": d.template,
                "channel": d.channel,
                "reason": d.reason,
                "action": d.action,
            }
            for d in s.exec(
                select(Decision).where(col(Decision.action).in_(SUPPRESSED)).order_by(col(Decision.id))
            ).all()
        ]
        held = [
            {
                "at": _iso(d.decided_at),
                "person": str(d.person_id),
                "playbook": d.playbook,
                "template": d.template,
                "channel": d.channel,
                "reason": d.reason,
            }
            for d in s.exec(
                select(Decision).where(Decision.action == "hold").order_by(col(Decision.id))
            ).all()
        ]
        deferred = [
            {
                "at": _iso(d.decided_at),
                "person": str(d.person_id),
                "playbook": d.playbook,
                "template": d.template,
                "channel": d.channel,
                "reason": d.reason,
                "until": d.detail.get("deliver_at"),
            }
            for d in s.exec(
                select(Decision).where(Decision.action == "defer").order_by(col(Decision.id))
            ).all()
        ]
        escalations = [
            {
                "at": _iso(e.created_at),
                "person": str(e.person_id),
                "reason": e.reason,
                "severity": e.severity,
                "status": e.status,
            }
            for e in s.exec(select(Escalation).order_by(col(Escalation.id))).all()
        ]
        events = [
            {
                "at": _iso(e.occurred_at),
                "person": str(e.person_id) if e.person_id is not None else None,
                "type": e.type,
                "status": e.status,
            }
            for e in s.exec(select(JourneyEvent).order_by(col(JourneyEvent.id))).all()
        ]
        people: dict[str, list[str]] = {}
        for p in s.exec(
            select(Person).where(col(Person.merged_into).is_(None)).order_by(col(Person.id))
        ).all():
            idents = s.exec(
                select(PersonIdentifier)
                .where(PersonIdentifier.person_id == p.id)
                .order_by(col(PersonIdentifier.id))
            ).all()
            people[str(p.id)] = [f"{i.system}|{i.value}" for i in idents]
    return {
        "deliveries": deliveries,
        "suppressed": suppressed,
        "held": held,
        "deferred": deferred,
        "escalations": escalations,
        "events": events,
        "people": people,
    }
