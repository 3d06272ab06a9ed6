"""The escalation work queue on the real store (SQLite, and PostgreSQL when configured):
state changes, SLA timers, routing rows, audit without PHI, the precision report, the
staff HTTP API (bearer JWT, staff role) and the CLI."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlmodel import Session, col, select
from typer.testing import CliRunner

from careloop import tokens
from careloop.clock import VirtualClock, utc
from careloop.store import Store
from careloop.tables import AuditRecord, Escalation, OutboxItem, Person, PersonIdentifier, Timer
from channels.fhir_writeback import build_task
from orchestrator import escalation
from orchestrator.escalation_api import make_router
from orchestrator.triage import RouteConfig, TriageConfig

MESSAGE = "Synthetic Patient here, chest pain since noon"
CFG = TriageConfig(
    routes=[
        RouteConfig(channel="ehr-writeback", kind="task"),
        RouteConfig(channel="email", kind="email", to="team@example.test", levels=[0, 1]),
    ],
    sla={"emergency": "15m", "urgent": "2h", "routine": "1d"},
    max_level=1,
)


def _person(store: Store) -> int:
    with store.session() as s:
        p = Person(created_at=store.clock.now())
        s.add(p)
        s.flush()
        assert p.id is not None
        s.add(PersonIdentifier(person_id=p.id, kind="fhir", system="fhir", value="Patient/p-77"))
        return p.id


def _open(store: Store, pid: int, severity: str = "emergency", rules: list[str] | None = None) -> int:
    with store.session() as s:
        esc = escalation.open_escalation(
            s,
            person_id=pid,
            now=store.clock.now(),
            severity=severity,
            reason=f"red-flag-{severity}",
            evidence={"message": MESSAGE, "assessment": {"rules": rules or ["em.chest-pain"]}},
            rule=(rules or ["em.chest-pain"])[0],
            cfg=CFG,
        )
        assert esc.id is not None
        return esc.id


def test_open_sets_sla_timer_routes_and_audits_without_phi(store: Store) -> None:
    pid = _person(store)
    eid = _open(store, pid)
    with Session(store.engine) as s:
        esc = s.get(Escalation, eid)
        assert esc is not None and esc.status == "open" and esc.level == 0
        assert esc.due_at is not None
        [timer] = s.exec(select(Timer).where(Timer.playbook == escalation.PSEUDO_PLAYBOOK)).all()
        assert timer.payload == {"kind": escalation.SLA_KIND, "escalation": eid, "level": 0}
        assert timer.due_at == esc.due_at
        items = s.exec(select(OutboxItem).order_by(col(OutboxItem.id))).all()
        assert [(i.channel, i.template) for i in items] == [
            ("ehr-writeback", "escalation-task"),
            ("email", "escalation-email"),
        ]
        assert items[0].recipient == "Patient/p-77"
        task = build_task(items[0])  # the fhir_writeback channel's own builder accepts the row
        assert task["for"] == {"reference": "Patient/p-77"} and task["priority"] == "stat"
        audit = s.exec(select(AuditRecord).order_by(col(AuditRecord.seq))).all()
        assert [a.action for a in audit] == ["escalation.open", "escalation.route", "escalation.route"]
        blob = json.dumps([a.detail for a in audit]) + json.dumps([i.content for i in items])
        assert "chest pain since" not in blob and "Synthetic" not in blob


def test_sla_fires_reescalation_then_breach_at_max_level(store: Store, clock: VirtualClock) -> None:
    pid = _person(store)
    eid = _open(store, pid)
    for expected in ("reescalated", "max-level"):
        clock.set(clock.now() + timedelta(minutes=16))
        with store.session() as s:
            t = s.exec(select(Timer).where(Timer.status == "pending")).first()
            assert t is not None
            t.status = "fired"
            assert escalation.sla_fired(s, t, CFG, clock.now()) == expected
    with Session(store.engine) as s:
        esc = s.get(Escalation, eid)
        assert esc is not None and esc.level == 1
        emails = s.exec(select(OutboxItem).where(OutboxItem.channel == "email")).all()
        assert len(emails) == 2  # level 0 and level 1 notices


def test_acknowledge_stops_reescalation(store: Store, clock: VirtualClock) -> None:
    pid = _person(store)
    eid = _open(store, pid)
    with store.session() as s:
        escalation.acknowledge(s, eid, actor="staff:rn1", now=clock.now())
    with store.session() as s:
        [t] = s.exec(select(Timer)).all()
        assert (t.status, t.status_reason) == ("cancelled", "acknowledged")
        assert escalation.sla_fired(s, t, CFG, clock.now()) == "settled"
        with pytest.raises(escalation.EscalationError, match="acknowledged, not open"):
            escalation.acknowledge(s, eid, actor="staff:rn1", now=clock.now())


def test_resolve_needs_valid_feedback_and_only_once(store: Store, clock: VirtualClock) -> None:
    pid = _person(store)
    eid = _open(store, pid)
    with store.session() as s:
        with pytest.raises(escalation.EscalationError, match="feedback must be"):
            escalation.resolve(s, eid, actor="staff:rn1", now=clock.now(), feedback="maybe")
        esc = escalation.resolve(s, eid, actor="staff:rn1", now=clock.now(), feedback="not_needed")
        assert (esc.status, esc.feedback, esc.resolved_by) == ("resolved", "not_needed", "staff:rn1")
    with store.session() as s, pytest.raises(escalation.EscalationError, match="already resolved"):
        escalation.resolve(s, eid, actor="staff:rn1", now=clock.now(), feedback="needed")


def test_precision_report_per_rule_from_feedback(store: Store, clock: VirtualClock) -> None:
    pid = _person(store)
    verdicts = [
        (["em.chest-pain"], "needed"),
        (["em.chest-pain", "ro.symptom"], "not_needed"),
        (["em.chest-pain"], "needed"),
        (["ur.fever"], "not_needed"),
        (["ur.fever"], None),
    ]
    for rules, fb in verdicts:
        eid = _open(store, pid, rules=rules)
        if fb:
            with store.session() as s:
                escalation.resolve(s, eid, actor="staff:rn1", now=clock.now(), feedback=fb)
    with Session(store.engine) as s:
        rep = {
            r.rule: (r.escalations, r.needed, r.not_needed, r.precision)
            for r in escalation.precision_report(s)
        }
    escalations, needed, not_needed, precision = rep["em.chest-pain"]
    assert (escalations, needed, not_needed) == (3, 2, 1) and precision == pytest.approx(2 / 3)
    assert rep["ro.symptom"] == (1, 0, 1, 0.0)
    assert rep["ur.fever"] == (2, 0, 1, 0.0)


def test_new_concern_joins_open_item_and_higher_severity_raises_it(store: Store, clock: VirtualClock) -> None:
    pid = _person(store)
    with store.session() as s:
        first, opened = escalation.open_or_join(
            s,
            person_id=pid,
            now=clock.now(),
            severity="routine",
            reason="question-request",
            evidence={},
            rule=None,
            cfg=CFG,
        )
        assert opened
    with store.session() as s:
        same, opened = escalation.open_or_join(
            s,
            person_id=pid,
            now=clock.now(),
            severity="urgent",
            reason="red-flag-urgent",
            evidence={"event": 9},
            rule="ur.fever",
            cfg=CFG,
        )
        assert not opened and same.id == first.id
        assert (same.severity, same.rule, len(same.evidence["followups"])) == ("urgent", "ur.fever", 1)
    with Session(store.engine) as s:
        pending = s.exec(select(Timer).where(Timer.status == "pending")).all()
        assert len(pending) == 1 and utc(pending[0].due_at) == clock.now() + timedelta(hours=2)


# ----------------------------------------------------------------------------- HTTP API


class TestClient:
    """Drives the ASGI app in-process through httpx (starlette's TestClient wants httpx2)."""

    __test__ = False

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
                return await c.request(method, path, **kw)

        return asyncio.run(go())

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self._call("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self._call("POST", path, **kw)


@pytest.fixture
def api(store: Store, tmp_path: Path) -> tuple[TestClient, dict[str, str]]:
    keyfile = tmp_path / "token.key"
    tokens.generate_token_key(keyfile)
    key = tokens.load_token_key(keyfile)
    app = FastAPI()
    app.include_router(make_router(store, key))
    staff = tokens.issue(key, subject="rn1", roles=["staff"])
    auditor = tokens.issue(key, subject="aud", roles=["auditor"])
    return TestClient(app), {"staff": f"Bearer {staff}", "auditor": f"Bearer {auditor}"}


def test_api_requires_staff_role_and_audits_refusals(
    store: Store, api: tuple[TestClient, dict[str, str]]
) -> None:
    client, auth = api
    assert client.get("/escalations").status_code == 401
    assert client.get("/escalations", headers={"Authorization": auth["auditor"]}).status_code == 403
    with Session(store.engine) as s:
        reasons = [
            a.detail["reason"]
            for a in s.exec(select(AuditRecord).where(AuditRecord.action == "auth.failure")).all()
        ]
    assert reasons == ["missing", "role"]


def test_api_work_queue_round_trip(store: Store, api: tuple[TestClient, dict[str, str]]) -> None:
    client, auth = api
    h = {"Authorization": auth["staff"]}
    pid = _person(store)
    eid = _open(store, pid)
    listed = client.get("/escalations", headers=h).json()["escalations"]
    assert [e["id"] for e in listed] == [eid] and "evidence" not in listed[0]
    shown = client.get(f"/escalations/{eid}", headers=h).json()
    assert shown["evidence"]["message"] == MESSAGE
    assert client.post(f"/escalations/{eid}/acknowledge", headers=h).json()["acknowledged_by"] == "staff:rn1"
    assert client.post(f"/escalations/{eid}/acknowledge", headers=h).status_code == 409
    assert client.post(f"/escalations/{eid}/resolve", headers=h, json={"feedback": "nope"}).status_code == 422
    done = client.post(f"/escalations/{eid}/resolve", headers=h, json={"feedback": "needed"}).json()
    assert (done["status"], done["feedback"]) == ("resolved", "needed")
    assert client.get("/escalations", headers=h).json()["escalations"] == []
    assert client.get("/escalations/999", headers=h).status_code == 404
    rules = client.get("/escalations/report", headers=h).json()["rules"]
    assert rules == [
        {"rule": "em.chest-pain", "escalations": 1, "needed": 1, "not_needed": 0, "precision": 1.0}
    ]
    with Session(store.engine) as s:
        views = s.exec(select(AuditRecord).where(AuditRecord.action == "escalation.view")).all()
        assert [(v.actor, v.entity) for v in views] == [("staff:rn1", f"escalation/{eid}")]


# ----------------------------------------------------------------------------- CLI


def test_cli_list_ack_resolve_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from careloop.db import make_engine, upgrade
    from orchestrator.escalation_cli import app

    url = f"sqlite:///{tmp_path}/cli.db"
    engine = make_engine(url)
    upgrade(engine)
    store = Store(engine, VirtualClock(datetime(2026, 3, 5, tzinfo=UTC)))
    pid = _person(store)
    eid = _open(store, pid, severity="urgent", rules=["ur.fever"])
    monkeypatch.setenv("CARELOOP_DATABASE_URL", url)
    run = CliRunner().invoke
    out = run(app, ["list"])
    assert out.exit_code == 0 and f"#{eid}" in out.output and "urgent" in out.output
    assert MESSAGE not in out.output  # the list holds no message text
    assert run(app, ["ack", str(eid)]).exit_code == 0
    assert run(app, ["ack", str(eid)]).exit_code == 1
    bad = run(app, ["resolve", str(eid), "--feedback", "perhaps"])
    assert bad.exit_code == 1 and "feedback must be" in bad.output
    assert run(app, ["resolve", str(eid), "-f", "not_needed"]).exit_code == 0
    rep = run(app, ["report", "--json"])
    assert json.loads(rep.output) == [
        {"rule": "ur.fever", "escalations": 1, "needed": 0, "not_needed": 1, "precision": 0.0}
    ]
    shown = run(app, ["show", str(eid)])
    assert json.loads(shown.output)["evidence"]["message"] == MESSAGE
    engine.dispose()
