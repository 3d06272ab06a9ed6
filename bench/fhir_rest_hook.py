"""FHIR rest-hook intake speed on SQLite: backport event notifications (full-resource) per
second through the real endpoint (uvicorn on 127.0.0.1: auth, parse, commit, subscription
state), against storing the same raw messages straight through ``IngestSink.put`` one at a
time in the same run (the floor: one commit per notification).

    .venv/bin/python bench/fhir_rest_hook.py [--notifications 400] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from careloop.clock import SystemClock
from careloop.db import make_engine, upgrade
from careloop.pipeline import IngestSink
from careloop.store import Store
from connectors.fhir_subscription import FhirSubscriptionConfig, FhirSubscriptionConnector

SECRET = "bench-secret"
BP = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"


def notification(n: int) -> bytes:
    ts = datetime.now(UTC).isoformat()
    appt = {
        "resourceType": "Appointment",
        "id": f"a{n}",
        "meta": {"versionId": "1", "lastUpdated": ts},
        "status": "booked",
        "start": "2026-04-01T09:00:00Z",
        "participant": [{"actor": {"reference": f"Patient/p{n % 50}"}, "status": "needs-action"}],
    }
    params = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "subscription", "valueReference": {"reference": "http://ehr/fhir/Subscription/s1"}},
            {"name": "topic", "valueCanonical": "http://example.org/topic/appointments"},
            {"name": "status", "valueCode": "active"},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "events-since-subscription-start", "valueString": str(n)},
            {
                "name": "notification-event",
                "part": [
                    {"name": "event-number", "valueString": str(n)},
                    {"name": "timestamp", "valueInstant": ts},
                    {"name": "focus", "valueReference": {"reference": f"http://ehr/fhir/Appointment/a{n}"}},
                ],
            },
        ],
    }
    return json.dumps(
        {
            "resourceType": "Bundle",
            "type": "history",
            "meta": {"profile": [f"{BP}/backport-subscription-notification-r4"]},
            "entry": [
                {"fullUrl": "urn:uuid:x", "resource": params},
                {"fullUrl": f"http://ehr/fhir/Appointment/a{n}", "resource": appt},
            ],
        }
    ).encode()


def _connector(folder: Path, name: str) -> tuple[FhirSubscriptionConnector, Store]:
    engine = make_engine(f"sqlite:///{folder}/{name}.db")
    upgrade(engine)
    store = Store(engine, SystemClock())
    cfg = FhirSubscriptionConfig.model_validate(
        {
            "plugin": "fhir_subscription",
            "base_url": "http://ehr/fhir",
            "secret": SECRET,
            "fetch_id_only": False,
        }
    )
    return FhirSubscriptionConnector("ehr", cfg, store=store), store


async def via_endpoint(folder: Path, n: int, concurrency: int) -> float:
    conn, store = _connector(folder, "endpoint")
    app = FastAPI()
    app.include_router(conn.router())
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    await conn.start(IngestSink(store))
    bodies = [notification(i) for i in range(1, n + 1)]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            r = await client.post(
                f"http://127.0.0.1:{port}/fhir/ehr",
                content=body,
                headers={"Authorization": f"Bearer {SECRET}"},
            )
            assert r.status_code == 200, r.text

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    await conn.stop()
    server.should_exit = True
    await task
    store.engine.dispose()
    return n / elapsed


def via_sink(folder: Path, n: int) -> float:
    conn, store = _connector(folder, "sink")
    sink = IngestSink(store)
    items: list[Any] = [conn.accept(notification(i), {}) for i in range(1, n + 1)]
    t0 = time.perf_counter()
    for it in items:
        sink.put_sync(it)
    elapsed = time.perf_counter() - t0
    store.engine.dispose()
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--notifications", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        floor = via_sink(folder, args.notifications)
        rate = asyncio.run(via_endpoint(folder, args.notifications, args.concurrency))
    print(
        f"fhir rest-hook: {rate:,.0f} notifications/s through the endpoint "
        f"(concurrency {args.concurrency}); sink.put alone {floor:,.0f}/s; ratio {rate / floor:.2f}"
    )


if __name__ == "__main__":
    main()
