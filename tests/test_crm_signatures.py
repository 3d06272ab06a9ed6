"""Webhook signature schemes over HTTP: authentic requests are stored and answered 2xx;
tampered, replayed, expired and unsigned ones are not. Standard Webhooks and Stripe
vectors come from the schemes' own reference libraries; HubSpot v3 and plain HMAC
vectors are computed here from their documentation, independently of the connector."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import timedelta
from typing import Any

import pytest
import stripe
from standardwebhooks.webhooks import Webhook

from careloop.clock import VirtualClock
from careloop.store import Store
from tests.crm_support import body, client, connector, is_outcome, raws

WHSEC = "whsec_" + base64.b64encode(b"test-only-standard-webhooks-key!").decode()
STRIPE_SECRET = "whsec_test_only_stripe_endpoint_secret"
HUBSPOT_SECRET = "test-only-hubspot-client-secret"
HMAC_SECRET = "test-only-hmac-secret"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --------------------------------------------------------------------------- Standard Webhooks


def sw_headers(
    data: bytes,
    clock: VirtualClock,
    *,
    msg_id: str = "msg_2Lh9",
    skew: timedelta = timedelta(0),
    secret: str = WHSEC,
) -> dict[str, str]:
    at = clock.now() + skew
    sig = Webhook(secret).sign(msg_id, at, data.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": sig,
        "content-type": "application/json",
    }


@pytest.mark.anyio
async def test_standard_webhooks_signed_by_reference_library_is_stored(
    store: Store, clock: VirtualClock
) -> None:
    conn = await connector(store, signature="standard-webhooks", secret=WHSEC)
    data = body()
    async with client(conn) as c:
        resp = await c.post("/webhooks/crm", content=data, headers=sw_headers(data, clock))
    assert resp.status_code == 200, resp.text
    assert resp.json()["duplicates"] == 0
    [raw] = raws(store)
    assert (raw.kind, raw.dedup_key, raw.body) == ("webhook:refund.initiated", "event|evt_1001", data)


@pytest.mark.anyio
@pytest.mark.parametrize("case", ["tampered", "wrong-secret", "unsigned", "expired", "future", "id-swapped"])
async def test_standard_webhooks_rejects_inauthentic_requests(
    store: Store, clock: VirtualClock, case: str
) -> None:
    conn = await connector(store, signature="standard-webhooks", secret=WHSEC)
    data = body()
    headers = sw_headers(data, clock)
    if case == "tampered":
        data = body(data={"product": "other-plan"})
    elif case == "wrong-secret":
        headers = sw_headers(
            data, clock, secret="whsec_" + base64.b64encode(b"another-key-entirely-000").decode()
        )
    elif case == "unsigned":
        headers = {"content-type": "application/json"}
    elif case == "expired":
        headers = sw_headers(data, clock, skew=-timedelta(minutes=6))
    elif case == "future":
        headers = sw_headers(data, clock, skew=timedelta(minutes=6))
    elif case == "id-swapped":  # the id is part of what is signed
        headers = {**headers, "webhook-id": "msg_other"}
    async with client(conn) as c:
        resp = await c.post("/webhooks/crm", content=data, headers=headers)
    assert is_outcome(resp, 401)
    assert raws(store) == []
    assert conn.stats.rejected == 1


@pytest.mark.anyio
async def test_standard_webhooks_replay_is_acknowledged_but_not_stored_twice(
    store: Store, clock: VirtualClock
) -> None:
    conn = await connector(store, signature="standard-webhooks", secret=WHSEC)
    data = body()
    headers = sw_headers(data, clock)
    async with client(conn) as c:
        first = await c.post("/webhooks/crm", content=data, headers=headers)
        clock.set(clock.now() + timedelta(minutes=2))  # still inside the window: only dedup stops it
        again = await c.post("/webhooks/crm", content=data, headers=headers)
        clock.set(clock.now() + timedelta(minutes=4))  # now outside the window: rejected outright
        late = await c.post("/webhooks/crm", content=data, headers=headers)
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json()["duplicates"] == 1 and again.json()["raw_ids"] == first.json()["raw_ids"]
    assert is_outcome(late, 401)
    assert len(raws(store)) == 1


@pytest.mark.anyio
async def test_standard_webhooks_accepts_any_matching_signature_during_rotation(
    store: Store, clock: VirtualClock
) -> None:
    conn = await connector(store, signature="standard-webhooks", secret=WHSEC)
    data = body()
    headers = sw_headers(data, clock)
    old = sw_headers(data, clock, secret="whsec_" + base64.b64encode(b"retired-key-000000000000").decode())
    headers["webhook-signature"] = (
        f"{old['webhook-signature']} v1a,bm90LWVkMjU1MTk= {headers['webhook-signature']}"
    )
    async with client(conn) as c:
        resp = await c.post("/webhooks/crm", content=data, headers=headers)
    assert resp.status_code == 200


# --------------------------------------------------------------------------- Stripe-style


def stripe_header(
    data: bytes, clock: VirtualClock, skew: timedelta = timedelta(0), secret: str = STRIPE_SECRET
) -> dict[str, str]:
    ts = int((clock.now() + skew).timestamp())
    return {"Stripe-Signature": stripe.WebhookSignature.generate_signature_header(data.decode(), secret, ts)}


@pytest.mark.anyio
@pytest.mark.parametrize(
    "case,status",
    [
        ("valid", 200),
        ("tampered", 401),
        ("wrong-secret", 401),
        ("unsigned", 401),
        ("expired", 401),
        ("no-v1", 401),
    ],
)
async def test_stripe_style_signature(store: Store, clock: VirtualClock, case: str, status: int) -> None:
    conn = await connector(store, signature="stripe", secret=STRIPE_SECRET)
    data = body()
    headers = stripe_header(data, clock)
    if case == "tampered":
        data = data.replace(b"NW900001", b"NW900002")
    elif case == "wrong-secret":
        headers = stripe_header(data, clock, secret="whsec_not_ours")
    elif case == "unsigned":
        headers = {}
    elif case == "expired":
        headers = stripe_header(data, clock, skew=-timedelta(seconds=301))
    elif case == "no-v1":
        headers = {"Stripe-Signature": headers["Stripe-Signature"].replace("v1=", "v0=")}
    async with client(conn) as c:
        resp = await c.post("/webhooks/crm", content=data, headers=headers)
    assert resp.status_code == status, resp.text
    assert len(raws(store)) == (1 if status == 200 else 0)
    if case == "valid":
        # The reference library verifies our accepted vector too.
        assert stripe.WebhookSignature.verify_header(
            data.decode(), headers["Stripe-Signature"], STRIPE_SECRET
        )
    else:
        assert is_outcome(resp, 401)


@pytest.mark.anyio
async def test_stripe_style_replay_is_stored_once(store: Store, clock: VirtualClock) -> None:
    conn = await connector(store, signature="stripe", secret=STRIPE_SECRET)
    data = body()
    async with client(conn) as c:
        codes = [
            (await c.post("/webhooks/crm", content=data, headers=stripe_header(data, clock))).status_code
            for _ in range(3)
        ]
    assert codes == [200, 200, 200]
    assert len(raws(store)) == 1


# --------------------------------------------------------------------------- HubSpot v3

HUBSPOT_BATCH = (
    b'[{"eventId":101,"subscriptionType":"contact.propertyChange","objectId":9001,'
    b'"occurredAt":1772460900000,"propertyName":"lifecyclestage"},'
    b'{"eventId":102,"subscriptionType":"contact.creation","objectId":9002,'
    b'"occurredAt":1772460901000}]'
)


def hubspot_headers(
    method: str, uri: str, data: bytes, ts_ms: int, secret: str = HUBSPOT_SECRET
) -> dict[str, str]:
    # HubSpot's documentation: HMAC-SHA256(client secret, method + URI + body + timestamp), base64;
    # written out here, independently of connectors/signatures/hubspot_v3.py.
    source = f"{method}{uri}".encode() + data + str(ts_ms).encode()
    sig = base64.b64encode(hmac.new(secret.encode(), source, hashlib.sha256).digest()).decode()
    return {
        "X-HubSpot-Signature-v3": sig,
        "X-HubSpot-Request-Timestamp": str(ts_ms),
        "Content-Type": "application/json",
    }


HS_CFG: dict[str, Any] = {
    "signature": "hubspot-v3",
    "secret": HUBSPOT_SECRET,
    "event_id": "eventId",
    "event_type": "subscriptionType",
    "public_url": "https://hooks.example.org",
}


@pytest.mark.anyio
async def test_hubspot_v3_batch_signed_over_public_uri_is_stored_per_event(
    store: Store, clock: VirtualClock
) -> None:
    conn = await connector(store, **HS_CFG)
    now_ms = int(clock.now().timestamp() * 1000)
    # HubSpot signs the URI with %3A etc. decoded; the app receives it encoded.
    signed_uri = "https://hooks.example.org/webhooks/crm?portal=62515&since=2026-03-02T09:00"
    headers = hubspot_headers("POST", signed_uri, HUBSPOT_BATCH, now_ms)
    async with client(conn, base="http://10.0.0.7:8080") as c:  # behind a proxy: another host
        resp = await c.post(
            "/webhooks/crm?portal=62515&since=2026-03-02T09%3A00", content=HUBSPOT_BATCH, headers=headers
        )
        again = await c.post(
            "/webhooks/crm?portal=62515&since=2026-03-02T09%3A00", content=HUBSPOT_BATCH, headers=headers
        )
    assert resp.status_code == 200, resp.text
    assert again.json()["duplicates"] == 2
    rows = raws(store)
    assert [(r.kind, r.dedup_key) for r in rows] == [
        ("webhook:contact.propertyChange", "event|101"),
        ("webhook:contact.creation", "event|102"),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "case", ["tampered", "expired", "unsigned", "other-method", "other-uri", "wrong-secret"]
)
async def test_hubspot_v3_rejects_inauthentic_requests(store: Store, clock: VirtualClock, case: str) -> None:
    conn = await connector(store, **HS_CFG)
    uri = "https://hooks.example.org/webhooks/crm"
    now_ms = int(clock.now().timestamp() * 1000)
    data = HUBSPOT_BATCH
    headers = hubspot_headers("POST", uri, data, now_ms)
    path = "/webhooks/crm"
    if case == "tampered":
        data = data.replace(b"9001", b"9003")
    elif case == "expired":  # HubSpot: reject anything older than five minutes
        headers = hubspot_headers("POST", uri, data, now_ms - 5 * 60 * 1000 - 1000)
    elif case == "unsigned":
        headers = {"Content-Type": "application/json"}
    elif case == "other-method":
        headers = hubspot_headers("GET", uri, data, now_ms)
    elif case == "other-uri":
        headers = hubspot_headers("POST", uri + "?x=1", data, now_ms)
    elif case == "wrong-secret":
        headers = hubspot_headers("POST", uri, data, now_ms, secret="not-the-client-secret")
    async with client(conn) as c:
        resp = await c.post(path, content=data, headers=headers)
    assert is_outcome(resp, 401)
    assert raws(store) == []


# --------------------------------------------------------------------------- plain HMAC-SHA256


def hmac_hex(data: bytes, secret: str = HMAC_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()


HMAC_CFG: dict[str, Any] = {
    "signature": "hmac-sha256",
    "secret": HMAC_SECRET,
    "header": "X-Signature-256",
    "prefix": "sha256=",
    "id_header": "X-Delivery-Id",
}


@pytest.mark.anyio
@pytest.mark.parametrize(
    "case,status",
    [
        ("valid", 200),
        ("tampered", 401),
        ("unsigned", 401),
        ("wrong-secret", 401),
        ("truncated", 401),
        ("no-prefix", 401),
    ],
)
async def test_plain_hmac_signature(store: Store, case: str, status: int) -> None:
    conn = await connector(store, **HMAC_CFG)
    data = body()
    headers = {"X-Signature-256": hmac_hex(data), "X-Delivery-Id": "d-1"}
    if case == "tampered":
        data = body(type="offer.eligible")
    elif case == "unsigned":
        headers = {"X-Delivery-Id": "d-1"}
    elif case == "wrong-secret":
        headers["X-Signature-256"] = hmac_hex(data, "other")
    elif case == "truncated":
        headers["X-Signature-256"] = headers["X-Signature-256"][:-2]
    elif case == "no-prefix":
        headers["X-Signature-256"] = headers["X-Signature-256"].removeprefix("sha256=")
    async with client(conn) as c:
        resp = await c.post("/webhooks/crm", content=data, headers=headers)
    assert resp.status_code == status
    assert len(raws(store)) == (1 if status == 200 else 0)


@pytest.mark.anyio
async def test_plain_hmac_replay_without_event_id_is_caught_by_delivery_id(store: Store) -> None:
    # No timestamp in this scheme: the delivery id is the only replay defence.
    conn = await connector(store, **{**HMAC_CFG, "encoding": "base64", "prefix": ""})
    data = b'{"type":"offer.eligible","occurred_at":"2026-03-02T09:00:00Z","contact":{"mrn":"NW900001"}}'
    sig = base64.b64encode(hmac.new(HMAC_SECRET.encode(), data, hashlib.sha256).digest()).decode()
    async with client(conn) as c:
        for _ in range(2):
            resp = await c.post(
                "/webhooks/crm", content=data, headers={"X-Signature-256": sig, "X-Delivery-Id": "d-77"}
            )
            assert resp.status_code == 200
    [raw] = raws(store)
    assert raw.dedup_key == "delivery|d-77"
