"""Property: deciding a batch of events together decides exactly what deciding them one at
a time does. The orchestrator reads the gate's facts once per batch, keeps people and
journey states in memory and writes its rows at the end (orchestrator/facts.py,
careloop/writes.py); none of that may change a decision, a reason, a queued message or a
timer, whatever mix of people, shared phones, consents, offers and appointment changes
arrives at once. Synthetic people only."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlmodel import Session, col, select

from careloop import config as cfgmod
from careloop.clock import VirtualClock
from careloop.db import make_engine
from careloop.hub import Hub
from careloop.store import Store
from careloop.tables import Consent, Decision, OutboxItem, Timer
from tests.conftest import FIXTURES
from tests.kernel_plugins import register

register()
NOW = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)  # 10:00 in New York: inside the send window
PHONES = ["+12125550141", "+12125550142"]  # 555-01xx: fictional; two people may share one

one_event = st.tuples(
    st.integers(min_value=0, max_value=2),  # who
    st.sampled_from(
        [
            "appointment.booked",
            "appointment.confirmed",
            "appointment.cancelled",
            "appointment.rescheduled",
            "consent.revoked",
            "consent.granted",
            "crm.offer.eligible",
            "crm.refund.initiated",
        ]
    ),
    st.integers(min_value=0, max_value=1),  # which phone
    st.integers(min_value=1, max_value=6),  # days to the appointment
)


def _body(i: int, who: int, kind: str, phone: int, days: int) -> bytes:
    doc: dict[str, Any] = {
        "id": f"e{i}",
        "type": kind,
        "at": (NOW - timedelta(minutes=60 - i)).isoformat(),
        "mrn": f"BQ-{who}",
        "phone": PHONES[phone],
    }
    if kind.startswith("appointment."):
        status = {"appointment.cancelled": "cancelled", "appointment.confirmed": "confirmed"}.get(
            kind, "booked"
        )
        start = NOW + timedelta(days=days, hours=2)
        doc["appointment"] = {"id": f"ap-{who}", "start": start.isoformat(), "status": status}
    elif kind == "consent.revoked":
        doc["attributes"] = {"channel": "sms", "purpose": "*"}
    elif kind == "consent.granted":  # marketing needs an opt-in
        doc["attributes"] = {"channel": "sms", "purpose": "marketing"}
    else:
        doc["attributes"] = {"product": f"plan-{days % 2}"}
    return json.dumps(doc).encode()


Event = tuple[int, str, int, int]


def _run(tmp: Path, waves: list[list[Event]], batch: int) -> dict[str, list[Any]]:
    engine = make_engine(f"sqlite:///{tmp}/b{batch}.db")
    hub = Hub(
        cfgmod.load(FIXTURES / "config" / "kernel-test.yaml"),
        store=Store(engine, VirtualClock(NOW)),
        capture=True,
    )
    try:
        hub.orchestrator.batch = batch
        n = 0
        for wave in waves:  # a wave arrives at once; the first makes people already known
            raws = [r for i, e in enumerate(wave, n) for r in hub.connectors["feed"].accept(_body(i, *e), {})]
            n += len(wave)
            hub.sink.put_sync(raws)
            asyncio.run(hub.drain())
        with Session(engine) as s:
            return {
                "decisions": [
                    (
                        d.person_id,
                        d.event_id,
                        d.timer_id,
                        d.playbook,
                        d.action,
                        d.reason,
                        d.template,
                        d.channel,
                    )
                    for d in s.exec(select(Decision).order_by(col(Decision.id))).all()
                ],
                "outbox": sorted(
                    (o.key, o.person_id, o.template, o.channel, o.recipient, o.status)
                    for o in s.exec(select(OutboxItem)).all()
                ),
                "timers": sorted(
                    (t.person_id, t.playbook, t.step, str(t.due_at), t.status)
                    for t in s.exec(select(Timer)).all()
                ),
                "consents": sorted(
                    (c.person_id, c.channel, c.purpose, c.status) for c in s.exec(select(Consent)).all()
                ),
            }
    finally:
        asyncio.run(hub.stop())
        engine.dispose()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(one_event, max_size=4), st.lists(one_event, min_size=1, max_size=10))
@example(  # a known person's two offers in one batch: the second text is over the cap
    first=[(0, "consent.granted", 0, 1)],
    then=[(0, "crm.offer.eligible", 0, 2), (0, "crm.offer.eligible", 0, 3)],
)
def test_a_batch_decides_what_one_event_at_a_time_decides(
    tmp_path: Path, first: list[Event], then: list[Event]
) -> None:
    run = tmp_path / f"r{abs(hash((tuple(first), tuple(then))))}"
    run.mkdir()
    together = _run(run, [first, then], batch=200)
    alone = _run(run, [first, then], batch=1)
    assert together == alone
