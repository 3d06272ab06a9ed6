"""CRM webhook speed on SQLite, each figure against a baseline measured in the same run:

- signature check per scheme (µs per request) against one plain HMAC-SHA256 of the body;
- declarative mapping (events/s) against ``json.loads`` of the same body;
- signed webhooks through the HTTP route, one commit each (requests/s) against
  ``IngestSink.put`` of the same messages without HTTP or signature.

    .venv/bin/python bench/crm_webhook.py [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from careloop.clock import VirtualClock
from careloop.db import make_engine, upgrade
from careloop.pipeline import IngestSink
from careloop.store import Store
from connectors.signatures import Scheme, SignedRequest
from connectors.signatures.hmac_sha256 import HmacSha256
from connectors.signatures.hubspot_v3 import HubSpotV3, signature
from connectors.signatures.standard_webhooks import StandardWebhooks
from connectors.signatures.stripe_v1 import StripeV1
from connectors.webhook import WebhookConfig, WebhookConnector
from mapping.declarative import DeclarativeMapper, load_spec

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)
WINDOW = timedelta(minutes=5)
WHSEC = "whsec_" + base64.b64encode(b"bench-only-standard-webhooks-key").decode()


def event(i: int) -> bytes:
    return json.dumps(
        {
            "id": f"evt_{i:08d}",
            "type": "offer.eligible" if i % 2 else "refund.initiated",
            "occurred_at": "2026-03-02T09:00:00-05:00",
            "contact": {
                "mrn": f"NW{i % 5000:06d}",
                "phone": f"+1555555{i % 10000:04d}",
                "email": f"person{i % 5000}@example.org",
            },
            "data": {"product": f"plan-{i % 7}"},
        }
    ).encode()


def per_call_us(fn: Callable[[], Any], n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def sw_headers(body: bytes, msg_id: str) -> dict[str, str]:
    ts = str(int(NOW.timestamp()))
    key = base64.b64decode(WHSEC.removeprefix("whsec_"))
    sig = base64.b64encode(hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()).decode()
    return {"webhook-id": msg_id, "webhook-timestamp": ts, "webhook-signature": f"v1,{sig}"}


def bench_signatures(n: int = 20000) -> None:
    body = event(1)
    base = per_call_us(lambda: hmac.new(b"k" * 32, body, hashlib.sha256).digest(), n)
    ts_ms = str(int(NOW.timestamp() * 1000))
    stripe_sig = hmac.new(b"whsec_s", f"{int(NOW.timestamp())}.".encode() + body, hashlib.sha256).hexdigest()
    cases: dict[str, tuple[Scheme, dict[str, str]]] = {
        "standard-webhooks": (StandardWebhooks(WHSEC, WINDOW), sw_headers(body, "msg_1")),
        "hubspot-v3": (
            HubSpotV3("hs-secret"),
            {
                "x-hubspot-signature-v3": signature(
                    "hs-secret", "POST", "https://h.example.org/webhooks/crm", body, ts_ms
                ),
                "x-hubspot-request-timestamp": ts_ms,
            },
        ),
        "stripe": (
            StripeV1("whsec_s", WINDOW),
            {"stripe-signature": f"t={int(NOW.timestamp())},v1={stripe_sig}"},
        ),
        "hmac-sha256": (
            HmacSha256("h", "x-sig"),
            {"x-sig": hmac.new(b"h", body, hashlib.sha256).hexdigest()},
        ),
    }
    print(f"baseline: one HMAC-SHA256 of a {len(body)}-byte body: {base:.1f} µs")
    for name, (scheme, headers) in cases.items():
        req = SignedRequest("POST", "https://h.example.org/webhooks/crm", headers, body)

        def verify(s: Scheme = scheme, r: SignedRequest = req) -> str | None:
            return s.verify(r, NOW)

        us = per_call_us(verify, n)
        print(f"verify {name:<18} {us:7.1f} µs/request  ({us / base:.1f}x baseline)")


def bench_mapping(n: int = 20000) -> None:
    mapper = DeclarativeMapper(load_spec(ROOT / "fixtures" / "mapping" / "crm.yaml", "mapping"))
    docs = [event(i) for i in range(200)]
    t = time.perf_counter()
    for i in range(n):
        json.loads(docs[i % 200])
    base = n / (time.perf_counter() - t)
    mapper.map_document(json.loads(docs[0]))  # warm: FHIR model import for the subject
    t = time.perf_counter()
    for i in range(n):
        mapper.map_document(json.loads(docs[i % 200]))
    rate = n / (time.perf_counter() - t)
    print(f"mapping: {rate:,.0f} events/s (json.loads alone: {base:,.0f}/s; {base / rate:.1f}x its cost)")


async def bench_http(requests: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(make_engine(f"sqlite:///{tmp}/bench.db"), VirtualClock(NOW))
        upgrade(store.engine)
        conn = WebhookConnector(
            "crm",
            WebhookConfig(
                plugin="webhook", path="/webhooks/crm", signature="standard-webhooks", secret=WHSEC
            ),
            clock=store.clock,
        )
        sink = IngestSink(store)
        await conn.start(sink)
        # Baseline: the same messages committed one by one, without HTTP and signatures.
        t = time.perf_counter()
        for i in range(requests):
            await sink.put(conn.accept(event(10_000_000 + i), {}))
        base = requests / (time.perf_counter() - t)
        app = FastAPI()
        app.include_router(conn.router())
        bodies = [(event(i), sw_headers(event(i), f"msg_{i}")) for i in range(requests)]
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
        ) as c:
            t = time.perf_counter()
            for body, headers in bodies:
                r = await c.post("/webhooks/crm", content=body, headers=headers)
                assert r.status_code == 200, r.text
            rate = requests / (time.perf_counter() - t)
        store.engine.dispose()
    print(
        f"http: {rate:,.0f} signed requests/s, one commit each "
        f"(sink.put alone: {base:,.0f}/s; HTTP+signature overhead {base / rate:.2f}x)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args()
    bench_signatures()
    bench_mapping()
    asyncio.run(bench_http(args.requests))


if __name__ == "__main__":
    main()
