"""Two orchestrator workers on PostgreSQL: while worker A's batch holds one event of a
person, worker B takes another event of the same person. A batch reads the gate's facts
once (orchestrator/facts.py), so B must not be able to commit a send to that person between
A's reads and A's commit: A locks the audit chain's head before reading, and B, which needs
it to record its decisions, waits. Before, B committed a text in that gap and A, deciding
from what it had read, sent a second one past the 1-a-day cap (a review's repro).
Synthetic people only."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from careloop import config as cfgmod
from careloop.clock import VirtualClock
from careloop.hub import Hub
from careloop.pipeline import MapStage
from careloop.store import Store
from careloop.tables import Decision, JourneyEvent, OutboxItem
from tests.conftest import FIXTURES
from tests.kernel_plugins import register

register()
NOW = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)  # 10:00 in New York


def _doc(i: int, who: int, kind: str, **extra: Any) -> bytes:
    at = (NOW - timedelta(minutes=60 - i)).isoformat()
    return json.dumps(
        {"id": f"e{i}", "type": kind, "at": at, "mrn": f"TW-{who}", "phone": f"+1212555014{who}", **extra}
    ).encode()


def test_a_second_worker_cannot_text_a_person_whose_event_another_batch_is_deciding(
    engine: Engine, hubs: list[Hub]
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("two workers at once need PostgreSQL (SQLite has one writer)")
    cfg = cfgmod.load(FIXTURES / "config" / "kernel-test.yaml")
    a = Hub(cfg, store=Store(engine, VirtualClock(NOW)), capture=True)
    b = Hub(cfg, store=Store(engine, VirtualClock(NOW)), capture=True)
    hubs.extend([a, b])
    opt_in = {"channel": "sms", "purpose": "marketing"}
    first = [
        _doc(0, 0, "consent.granted", attributes=opt_in),
        _doc(1, 1, "consent.granted", attributes=opt_in),
    ]
    a.sink.put_sync([r for d in first for r in a.connectors["feed"].accept(d, {})])
    a_map = a.stages[0]
    assert isinstance(a_map, MapStage)
    a_map.run_once_sync()
    a.orchestrator.run_once_sync()
    then = [
        _doc(2, 1, "crm.offer.eligible", attributes={"product": "plan-0"}),  # another person
        _doc(3, 0, "crm.offer.eligible", attributes={"product": "plan-0"}),  # P: worker A
        _doc(4, 0, "crm.offer.eligible", attributes={"product": "plan-1"}),  # P: worker B
    ]
    a.sink.put_sync([r for d in then for r in a.connectors["feed"].accept(d, {})])
    a_map.run_once_sync()
    a.orchestrator.batch, b.orchestrator.batch = 2, 1
    real = a.orchestrator.handle_event
    worker_b: list[threading.Thread] = []

    def handle(s: Session, ev: JourneyEvent) -> None:
        if not worker_b:  # A has read its batch's facts: B runs now, and may commit if it can
            t = threading.Thread(target=b.orchestrator.run_once_sync)
            t.start()
            worker_b.append(t)
            time.sleep(1.0)
        real(s, ev)

    a.orchestrator.handle_event = handle  # type: ignore[method-assign]
    a.orchestrator.run_once_sync()
    worker_b[0].join(timeout=60)
    assert not worker_b[0].is_alive()
    with Session(engine) as s:
        texts: dict[int, int] = {}
        for o in s.exec(select(OutboxItem)).all():
            texts[o.person_id] = texts.get(o.person_id, 0) + 1
        decided = sorted((d.person_id, d.action, d.reason) for d in s.exec(select(Decision)).all())
        pending = s.exec(select(JourneyEvent).where(JourneyEvent.status == "pending")).all()
    assert not pending
    assert max(texts.values()) == 1, decided  # sms caps: 1 a day
    assert [reason for _, _, reason in decided].count("frequency-cap") == 1
