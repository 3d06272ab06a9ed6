"""Helpers for the CRM webhook tests: a webhook connector mounted on a FastAPI app over a
real store, driven through httpx's ASGI transport (the app's own request path)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import httpx
from fastapi import FastAPI
from sqlmodel import Session, col, select

from careloop.pipeline import IngestSink
from careloop.store import Store
from careloop.tables import RawMessage
from connectors.webhook import WebhookConfig, WebhookConnector

# Synthetic contact: invented name-free data, +1555 number, example.org mail.
EVENT: dict[str, Any] = {
    "id": "evt_1001",
    "type": "refund.initiated",
    "occurred_at": "2026-03-02T09:15:00-05:00",
    "contact": {"email": "pat.sample@example.org", "phone": "+15555550199", "mrn": "NW900001"},
    "data": {"product": "dental-plan"},
}


def body(**changes: Any) -> bytes:
    return json.dumps({**EVENT, **changes}, separators=(",", ":")).encode()


async def connector(store: Store, **cfg: Any) -> WebhookConnector:
    conn = WebhookConnector(
        "crm",
        WebhookConfig.model_validate({"plugin": "webhook", "path": "/webhooks/crm", **cfg}),
        clock=store.clock,
    )
    await conn.start(IngestSink(store))
    return conn


def client(
    conn: WebhookConnector, ip: str = "127.0.0.1", base: str = "http://127.0.0.1:8080"
) -> httpx.AsyncClient:
    app = FastAPI()
    app.include_router(conn.router())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(ip, 40000)), base_url=base)


def raws(store: Store) -> Sequence[RawMessage]:
    with Session(store.engine) as s:
        return s.exec(select(RawMessage).order_by(col(RawMessage.id))).all()


def is_outcome(resp: httpx.Response, status: int) -> bool:
    doc = resp.json()
    return resp.status_code == status and doc["resourceType"] == "OperationOutcome" and bool(doc["issue"])
