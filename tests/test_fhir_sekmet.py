"""End to end against a real FHIR server from PyPI: sekmet-fhir (R4, criteria rest-hook and
Subscriptions Backport IG topic subscriptions) on 127.0.0.1.

The hub's subscription manager creates one criteria and one topic Subscription on it; the
test creates and updates an Appointment there and sees the journey events arrive, each
resource version stored once although both subscriptions deliver it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlmodel import Session, col, select

from careloop.pipeline import IngestSink, MapStage
from careloop.store import Store
from careloop.tables import JourneyEvent, RawMessage
from careloop.wiring import MapperRegistry
from connectors.fhir_subscription import FhirSubscriptionConfig, FhirSubscriptionConnector

sekmet_config = pytest.importorskip("sekmet.config", reason="sekmet-fhir is in the dev extra")
sekmet_main = pytest.importorskip("sekmet.main")

SECRET = "sekmet-hook-secret"
TOPIC = "http://sekmet.dev/fhir/SubscriptionTopic/appointment-booked"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def sekmet(tmp_path: Path) -> AsyncIterator[str]:
    port = _free_port()
    settings = sekmet_config.Settings(
        base_url=f"http://127.0.0.1:{port}/fhir",
        host="127.0.0.1",
        port=port,
        data_dir=str(tmp_path / "sekmet"),
        simulator={"enabled": False},
        validation={"inbound": "warn"},
        log_inbound=False,
        subscriptions={"notify_method": "put-resource", "retries": 2},
    )
    (tmp_path / "sekmet").mkdir()
    sekmet_config.set_settings(settings)
    app = sekmet_main.create_app(settings)
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield settings.base_url
    finally:
        server.should_exit = True
        await task
        app.state.ctx.subscriptions.pool.shutdown(wait=False, cancel_futures=True)


async def _until(pred: Any, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.1)):
        if await asyncio.to_thread(pred):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


@pytest.mark.anyio
async def test_sekmet_subscriptions_deliver_appointment_journey_end_to_end(sekmet: str, store: Store) -> None:
    hub_port = _free_port()
    cfg = FhirSubscriptionConfig.model_validate(
        {
            "plugin": "fhir_subscription",
            "path": "/fhir/ehr",
            "base_url": sekmet,
            "secret": SECRET,
            "endpoint_url": f"http://127.0.0.1:{hub_port}/fhir/ehr",
            "subscriptions": [
                {"name": "appointments", "criteria": "Appointment", "heartbeat_s": None},
                {"name": "booked", "topic": TOPIC, "payload": "full-resource", "heartbeat_s": 3600},
            ],
        }
    )
    async with httpx.AsyncClient() as http:
        conn = FhirSubscriptionConnector("ehr", cfg, store=store, http=http)
        app = FastAPI()
        app.include_router(conn.router())
        import uvicorn

        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=hub_port, log_level="warning", lifespan="off")
        )
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        try:
            await conn.start(IngestSink(store))
            await conn.settle()
            assert conn.manage_error is None
            states = {s.name: s for s in conn.states()}
            assert set(states) == {"appointments", "booked"}
            subs = (await http.get(f"{sekmet}/Subscription")).json()
            assert {e["resource"]["id"] for e in subs["entry"]} == {s.subscription for s in states.values()}
            # The backport topic subscription is active only after our endpoint accepted the handshake.
            booked_id = states["booked"].subscription
            await _until(lambda: _notes(store, "handshake") >= 1)
            for _ in range(200):  # sekmet marks it active once our 200 to the handshake is back
                if (await http.get(f"{sekmet}/Subscription/{booked_id}")).json().get("status") == "active":
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("backport subscription never became active")

            appt = {
                "resourceType": "Appointment",
                "status": "booked",
                "start": "2026-04-01T09:00:00Z",
                "end": "2026-04-01T09:30:00Z",
                "participant": [
                    {"actor": {"reference": "Patient/e2e-pat"}, "status": "needs-action"},
                    {"actor": {"reference": "Practitioner/e2e-doc"}, "status": "accepted"},
                ],
            }
            r = await http.post(
                f"{sekmet}/Appointment", json=appt, headers={"Prefer": "return=representation"}
            )
            assert r.status_code == 201, r.text
            aid = r.json()["id"]
            await _until(lambda: _versions(store, aid) == {"1"})
            await _until(lambda: _notes(store, "event-notification") >= 1)

            appt2 = {**r.json()}
            appt2["participant"][0]["status"] = "accepted"
            assert (await http.put(f"{sekmet}/Appointment/{aid}", json=appt2)).status_code == 200
            await _until(lambda: _versions(store, aid) == {"1", "2"})
            appt3 = {**appt2, "status": "cancelled"}
            assert (await http.put(f"{sekmet}/Appointment/{aid}", json=appt3)).status_code == 200
            await _until(lambda: _versions(store, aid) == {"1", "2", "3"})
            await conn.settle()

            stage = MapStage(store, MapperRegistry({}))
            while await stage.run_once():
                pass
            with Session(store.engine) as s:
                events = s.exec(
                    select(JourneyEvent.type)
                    .where(JourneyEvent.subject_ref == f"Appointment/{aid}")
                    .order_by(col(JourneyEvent.id))
                ).all()
            assert events == [
                "appointment.booked",
                "appointment.booked",
                "appointment.confirmed",
                "appointment.cancelled",
            ]
            (booked,) = [s for s in conn.states() if s.subscription == booked_id]
            assert booked.contiguous == booked.events_since_start == 1 and booked.gap_since is None
        finally:
            await conn.stop()
            server.should_exit = True
            await task


def _versions(store: Store, aid: str) -> set[str]:
    with Session(store.engine) as s:
        keys = s.exec(select(RawMessage.dedup_key).where(RawMessage.kind == "fhir:Appointment")).all()
    return {k.rsplit("|", 1)[1] for k in keys if k and k.startswith(f"res|Appointment/{aid}|")}


def _notes(store: Store, ntype: str) -> int:
    with Session(store.engine) as s:
        rows = s.exec(select(RawMessage.headers).where(RawMessage.kind == "fhir:notification")).all()
    return sum(1 for h in rows if h.get("x-careloop-notification") == ntype)
