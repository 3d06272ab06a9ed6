"""connectors.fhir_subscription: the rest-hook endpoint, auth before parsing, dedup, gap
recovery ($events and search), the heartbeat watchdog and error reactivation. The EHR is
tests/fhir_local_server.py served on 127.0.0.1; the hub endpoint is served by uvicorn too."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlmodel import Session, func, select

from careloop.clock import VirtualClock
from careloop.pipeline import IngestSink, MapStage
from careloop.store import Store
from careloop.tables import AuditRecord, JourneyEvent, RawMessage
from careloop.wiring import MapperRegistry
from connectors.fhir_subscription import FhirSubscriptionConfig, FhirSubscriptionConnector
from tests.conftest import CORPUS, needs_corpus
from tests.fhir_local_server import Event, LocalFhirServer, serve

SECRET = "s3cret-for-tests"
AUTH = {"Authorization": f"Bearer {SECRET}"}
NOTIFICATIONS = sorted((CORPUS / "fhir-r5" / "subscriptions").glob("notification-*.json")) + sorted(
    (CORPUS / "fhir-r4-backport" / "json").glob("r4-notification-*.json")
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Hub:
    conn: FhirSubscriptionConnector
    url: str
    store: Store
    clock: VirtualClock
    ehr: LocalFhirServer

    def count(self, kind: str | None = None) -> int:
        with Session(self.store.engine) as s:
            q = select(func.count()).select_from(RawMessage)
            if kind:
                q = q.where(RawMessage.kind == kind)
            return int(s.exec(q).one())

    def dedup_keys(self, kind: str) -> list[str]:
        with Session(self.store.engine) as s:
            return [k for k in s.exec(select(RawMessage.dedup_key).where(RawMessage.kind == kind)) if k]


async def _hub(store: Store, ehr: LocalFhirServer, ehr_url: str, **cfg: Any) -> AsyncIterator[Hub]:
    cfg.setdefault("default_heartbeat_s", 60)
    ehr.base = f"{ehr_url}/fhir"
    config = FhirSubscriptionConfig.model_validate(
        {
            "plugin": "fhir_subscription",
            "path": "/fhir/ehr",
            "base_url": ehr.base,
            "secret": SECRET,
            "grace_s": 30,
            **cfg,
        }
    )
    async with httpx.AsyncClient() as http:
        conn = FhirSubscriptionConnector("ehr", config, store=store, http=http)
        app = FastAPI()
        app.include_router(conn.router())
        async with serve(app) as url:
            await conn.start(IngestSink(store))
            assert isinstance(store.clock, VirtualClock)
            yield Hub(conn, f"{url}/fhir/ehr", store, store.clock, ehr)
            await conn.settle()
            await conn.stop()


@pytest.fixture
async def hub(store: Store) -> AsyncIterator[Hub]:
    ehr = LocalFhirServer()
    async with serve(ehr.app) as ehr_url:
        async for h in _hub(store, ehr, ehr_url):
            yield h


async def post(
    url: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST"
) -> httpx.Response:
    async with httpx.AsyncClient() as c:
        return await c.request(
            method, url, content=body, headers={"Content-Type": "application/fhir+json", **(headers or {})}
        )


def appt(i: int, status: str = "booked") -> dict[str, Any]:
    return {
        "resourceType": "Appointment",
        "id": f"appt{i}",
        "status": status,
        "start": "2026-03-10T09:00:00Z",
        "end": "2026-03-10T09:30:00Z",
        "participant": [{"actor": {"reference": f"Patient/pat{i}"}, "status": "needs-action"}],
    }


# ---------------------------------------------------------------- corpus


@pytest.mark.anyio
@pytest.mark.parametrize("path", NOTIFICATIONS, ids=lambda p: p.name)
async def test_every_corpus_notification_is_accepted_and_mapped_or_skipped(hub: Hub, path: Path) -> None:
    r = await post(hub.url, path.read_bytes(), AUTH)
    assert r.status_code == 200, r.text
    await hub.conn.settle()
    assert hub.count() >= (0 if "heartbeat" in path.name else 1)
    await MapStage(hub.store, MapperRegistry({})).run_once()
    with Session(hub.store.engine) as s:
        raws = s.exec(select(RawMessage)).all()
    for raw in raws:
        assert raw.status in ("mapped", "skipped"), (raw.kind, raw.status, raw.status_reason)
        if raw.status == "skipped":
            assert raw.status_reason
    if "full-resource" in path.name or "query-event" in path.name or "multi-resource" in path.name:
        assert any(raw.kind == "fhir:Encounter" and raw.status == "mapped" for raw in raws)


@needs_corpus
def test_corpus_notification_set_is_complete() -> None:
    assert len(NOTIFICATIONS) == 22  # 10 R5 + 12 backport R4 (incl. the bare $status Parameters)


# ---------------------------------------------------------------- auth before parsing


@pytest.mark.anyio
async def test_unauthenticated_unparseable_body_is_rejected_before_parsing(hub: Hub) -> None:
    junk = b"{this is not json <xml/>"
    r = await post(hub.url, junk)
    assert r.status_code == 401
    assert r.json()["resourceType"] == "OperationOutcome"
    r = await post(hub.url, junk, {"Authorization": "Bearer wrong"})
    assert r.status_code == 403 and r.json()["issue"][0]["code"] == "forbidden"
    r = await post(hub.url, junk, {"X-Signature": "00" * 32})
    assert r.status_code == 403
    assert hub.count() == 0
    # Authenticated, the same body is parsed and explained as invalid.
    r = await post(hub.url, junk, AUTH)
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    assert hub.count() == 0


@pytest.mark.anyio
async def test_medplum_style_bare_resource_with_hmac_signature(hub: Hub) -> None:
    body = json.dumps({**appt(1), "meta": {"versionId": "3"}}).encode()
    sig = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    r = await post(hub.url, body, {"X-Signature": sig})
    assert r.status_code == 200
    assert hub.dedup_keys("fhir:Appointment") == ["res|Appointment/appt1|3"]
    tampered = body.replace(b"booked", b"cancelled")
    assert (await post(hub.url, tampered, {"X-Signature": sig})).status_code == 403


@pytest.mark.anyio
async def test_hapi_style_put_of_the_resource(hub: Hub) -> None:
    body = json.dumps(appt(2)).encode()
    r = await post(f"{hub.url}/Appointment/appt2", body, AUTH, method="PUT")
    assert r.status_code == 200
    assert hub.count("fhir:Appointment") == 1
    r = await post(f"{hub.url}/Appointment/other", body, AUTH, method="PUT")
    assert r.status_code == 400 and "does not match" in r.json()["issue"][0]["diagnostics"]


@pytest.mark.anyio
async def test_empty_ping_is_stored_and_answered(hub: Hub) -> None:
    r = await post(hub.url, b"", AUTH)
    assert r.status_code == 200
    assert hub.count("fhir:notification") == 1


# ---------------------------------------------------------------- dedup


@needs_corpus
@pytest.mark.anyio
async def test_repeated_event_number_is_stored_once(hub: Hub) -> None:
    body = (CORPUS / "fhir-r4-backport" / "json" / "r4-notification-full-resource.json").read_bytes()
    for _ in range(3):
        assert (await post(hub.url, body, AUTH)).status_code == 200
    assert hub.count("fhir:notification") == 1
    assert hub.count("fhir:Encounter") == 1
    with Session(hub.store.engine) as s:
        dups = s.exec(
            select(func.count()).select_from(AuditRecord).where(AuditRecord.action == "message.duplicate")
        ).one()
    assert dups == 4  # two redeliveries x (notification + Encounter)


# ---------------------------------------------------------------- gaps and recovery


async def _appointments_with_losses(hub: Hub, n: int, drop: set[int]) -> None:
    sid = hub.ehr.subscribe(hub.url, [f"Authorization: Bearer {SECRET}"])
    assert (await hub.ehr.handshake(sid)).status_code == 200
    hub.ehr.drop = drop
    for i in range(1, n + 1):
        await hub.ehr.change(appt(i))


@pytest.mark.anyio
@pytest.mark.parametrize("has_events", [True, False], ids=["via-$events", "via-search"])
async def test_dropped_notifications_are_recovered_exactly_once(hub: Hub, has_events: bool) -> None:
    hub.ehr.has_events = has_events
    await _appointments_with_losses(hub, 5, drop={2, 4})
    assert hub.count("fhir:Appointment") == 3
    (state,) = hub.conn.states()
    assert (state.contiguous, state.seen_above, state.events_since_start) == (1, [3, 5], 5)
    assert state.gap_since is not None

    await hub.conn.check()  # within the grace period: the server may still redeliver
    assert hub.count("fhir:Appointment") == 3
    hub.clock.set(hub.clock.now() + timedelta(seconds=31))
    await hub.conn.check()
    await hub.conn.settle()

    keys = hub.dedup_keys("fhir:Appointment")
    assert sorted(keys) == [f"res|Appointment/appt{i}|1" for i in range(1, 6)]
    (state,) = hub.conn.states()
    assert (state.contiguous, state.seen_above, state.gap_since) == (5, [], None)
    used = [r for r in hub.ehr.requests if "$events" in r]
    assert bool(used) and ("eventsSinceNumber=2" in used[0]) and ("eventsUntilNumber=4" in used[0])
    if not has_events:
        assert any(r.startswith("GET Appointment?") for r in hub.ehr.requests)

    await hub.conn.check()  # nothing left to do: nothing stored twice
    assert hub.count("fhir:Appointment") == 5
    stage = MapStage(hub.store, MapperRegistry({}))
    while await stage.run_once():
        pass
    with Session(hub.store.engine) as s:
        booked = s.exec(
            select(JourneyEvent.subject_ref).where(JourneyEvent.type == "appointment.booked")
        ).all()
    assert sorted(booked, key=str) == [f"Appointment/appt{i}" for i in range(1, 6)]


@pytest.mark.anyio
async def test_silent_subscription_gets_status_check_and_recovers(hub: Hub) -> None:
    await _appointments_with_losses(hub, 3, drop={3})  # the last one is lost: no later event shows it
    (state,) = hub.conn.states()
    assert (state.contiguous, state.gap_since, state.heartbeat_s) == (2, None, 60)
    hub.clock.set(hub.clock.now() + timedelta(seconds=60))
    await hub.conn.check()  # silent, but not yet past heartbeat + grace
    assert "GET Subscription/sub1/$status" not in hub.ehr.requests
    assert hub.count("fhir:Appointment") == 2
    hub.clock.set(hub.clock.now() + timedelta(seconds=31))
    await hub.conn.check()
    assert "GET Subscription/sub1/$status" in hub.ehr.requests
    assert sorted(hub.dedup_keys("fhir:Appointment")) == [f"res|Appointment/appt{i}|1" for i in (1, 2, 3)]


@pytest.mark.anyio
async def test_subscription_in_error_raises_alert_and_is_reactivated(hub: Hub) -> None:
    sid = hub.ehr.subscribe(hub.url, [f"Authorization: Bearer {SECRET}"])
    hub.ehr.status_override = "error"
    hub.ehr.require_token = "the-hub-cannot-reach-the-api-yet"
    for _ in range(2):  # the second error report is not a new alert
        assert (await hub.ehr.post(sid, hub.ehr.bundle(sid, "query-status", []))).status_code == 200
        await hub.conn.settle()

    def audits(action: str) -> list[AuditRecord]:
        with Session(hub.store.engine) as s:
            return list(s.exec(select(AuditRecord).where(AuditRecord.action == action)).all())

    alerts = audits("fhir.subscription.error")
    assert len(alerts) == 1 and alerts[0].outcome == "failure"
    assert alerts[0].detail == {"errors": ["no-response"]} and alerts[0].entity == "Subscription/sub1"
    assert audits("fhir.subscription.reactivate") == []
    assert hub.conn.states()[0].status == "error"

    hub.ehr.require_token = None
    await hub.conn.check()  # the watchdog keeps asking for reactivation, without a new alert
    assert len(audits("fhir.subscription.error")) == 1
    assert len(audits("fhir.subscription.reactivate")) == 1
    assert hub.ehr.subs[sid].resource["status"] == "requested"
    assert "PUT Subscription/sub1" in hub.ehr.requests
    assert hub.conn.states()[0].status == "requested"


@pytest.mark.anyio
async def test_id_only_focus_is_fetched_and_stored_as_its_own_message(hub: Hub) -> None:
    sid = hub.ehr.subscribe(hub.url, [f"Authorization: Bearer {SECRET}"], content="id-only")
    await hub.ehr.handshake(sid)
    await hub.ehr.change(appt(7))
    await hub.conn.settle()
    assert hub.dedup_keys("fhir:Appointment") == ["res|Appointment/appt7|1"]
    assert "GET Appointment/appt7" in hub.ehr.requests
    (state,) = hub.conn.states()
    assert state.pending_fetch == []


@pytest.mark.anyio
async def test_unreachable_ehr_keeps_the_fetch_pending_and_retries(store: Store) -> None:
    ehr = LocalFhirServer()
    async with serve(ehr.app) as ehr_url:
        async for h in _hub(store, ehr, ehr_url):
            sid = ehr.subscribe(h.url, [f"Authorization: Bearer {SECRET}"], content="id-only")
            await ehr.handshake(sid)
            ehr.require_token = "nobody-has-this"  # reads now fail with 401
            await ehr.change(appt(8))
            await h.conn.settle()
            assert h.count("fhir:Appointment") == 0
            (state,) = h.conn.states()
            assert state.pending_fetch == ["1|Appointment/appt8"]
            ehr.require_token = None
            await h.conn.check()
            assert h.dedup_keys("fhir:Appointment") == ["res|Appointment/appt8|1"]
            assert h.conn.states()[0].pending_fetch == []


@pytest.mark.anyio
async def test_manager_survives_an_unreachable_ehr_then_creates_subscriptions(store: Store) -> None:
    cfg = FhirSubscriptionConfig.model_validate(
        {
            "plugin": "fhir_subscription",
            "base_url": "http://127.0.0.1:9/fhir",
            "secret": SECRET,
            "subscriptions": [
                {"name": "appts", "criteria": "Appointment?status=booked", "heartbeat_s": None}
            ],
        }
    )
    async with httpx.AsyncClient() as http:
        conn = FhirSubscriptionConnector("ehr", cfg, store=store, http=http)
        await conn.start(IngestSink(store))
        await conn.settle()
        assert conn.health().ok and "retrying in 15 s" in conn.health().detail
        await conn.check()  # within the backoff: no new attempt, no new warning
        assert conn.states() == [] and "retrying in 15 s" in conn.health().detail
        conn._manage_next = None  # the backoff has passed
        await conn.check()  # still unreachable: logs, backs off further, carries on
        assert conn.states() == [] and "retrying in 30 s" in conn.health().detail
        await conn.stop()
    assert json.dumps(conn.subscription_resource(cfg.subscriptions[0])).count(SECRET) == 1


@pytest.mark.anyio
async def test_wrong_counters_do_not_undo_what_event_numbers_prove(hub: Hub) -> None:
    sid = hub.ehr.subscribe(hub.url, [f"Authorization: Bearer {SECRET}"])
    await hub.ehr.handshake(sid)
    for i in (1, 2):
        saved = hub.ehr.write(appt(i))
        ev = hub.ehr.subs[sid]
        ev.events.append(Event(i, "2026-03-02T10:00:00Z", f"Appointment/appt{i}", saved))
        bundle = hub.ehr.bundle(sid, "event-notification", [ev.events[-1]])
        # Some servers send the counter late or as zero; the event number is what counts.
        bundle["entry"][0]["resource"]["parameter"][4]["valueString"] = "0"
        assert (await hub.ehr.post(sid, bundle)).status_code == 200
    (state,) = hub.conn.states()
    assert (state.contiguous, state.events_since_start, state.gap_since) == (2, 2, None)


@pytest.mark.anyio
async def test_criteria_ping_makes_the_hub_search_for_changes(store: Store) -> None:
    ehr = LocalFhirServer()
    async with serve(ehr.app) as ehr_url:
        subs = [{"name": "appts", "criteria": "Appointment", "payload": "empty"}]
        async for h in _hub(store, ehr, ehr_url, subscriptions=subs):
            await h.conn.settle()  # the manager created the Subscription on the EHR
            created = [v[-1] for (t, _), v in ehr.store.items() if t == "Subscription"]
            assert len(created) == 1 and created[0]["criteria"] == "Appointment"
            assert "payload" not in created[0]["channel"]  # R4: no payload means ping
            assert created[0]["channel"]["header"] == [f"Authorization: Bearer {SECRET}"]
            ehr.write(appt(9))
            assert (await post(h.url, b"", AUTH)).status_code == 200
            await h.conn.settle()
            assert h.dedup_keys("fhir:Appointment") == ["res|Appointment/appt9|1"]
            assert h.count("fhir:notification") == 1
            await h.conn.manage()  # unchanged config: nothing to update
            assert (
                sum(1 for r in ehr.requests if r.startswith(("POST Subscription", "PUT Subscription"))) == 1
            )
