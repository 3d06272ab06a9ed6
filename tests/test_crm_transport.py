"""Transport rules of the webhook connector: Salesforce outbound messages (allowlist,
OrganizationId, SOAP ACK, defusedxml), 2xx only after the commit, limits, and the
mounting of the route in the careloop app."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from standardwebhooks.webhooks import Webhook

from careloop.clock import VirtualClock
from careloop.store import Store
from tests.crm_support import body, client, connector, is_outcome, raws

ORG = "00D5g000004XyZaEAK"
SF_CFG: dict[str, Any] = {
    "signature": "salesforce-outbound",
    "organization_id": ORG,
    "allow_ips": ["13.108.0.0/14", "127.0.0.1/32"],
    "event_type": "object_type",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def soap(org: str = ORG, notifications: int = 1, first_id: int = 1) -> bytes:
    notes = "".join(
        f"""
   <Notification>
    <Id>04l5g00000AbCd{first_id + i:04d}</Id>
    <sObject xsi:type="sf:Contact" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">
     <sf:Id>0035g00000Q{first_id + i:06d}</sf:Id>
     <sf:Email>pat.sample{i}@example.org</sf:Email>
     <sf:MobilePhone>+1555555{first_id + i:04d}</sf:MobilePhone>
     <sf:MRN__c>NW9{first_id + i:05d}</sf:MRN__c>
     <sf:HasOptedOutOfEmail>false</sf:HasOptedOutOfEmail>
     <sf:Description xsi:nil="true"/>
    </sObject>
   </Notification>"""
        for i in range(notifications)
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"
 xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
 <soapenv:Body>
  <notifications xmlns="http://soap.sforce.com/2005/09/outbound">
   <OrganizationId>{org}</OrganizationId>
   <ActionId>04k5g000000Abc1AAC</ActionId>
   <SessionId xsi:nil="true"/>
   <EnterpriseUrl>https://example.my.salesforce.com/services/Soap/c/60.0/00D5g000004XyZa</EnterpriseUrl>
   <PartnerUrl>https://example.my.salesforce.com/services/Soap/u/60.0/00D5g000004XyZa</PartnerUrl>{notes}
  </notifications>
 </soapenv:Body>
</soapenv:Envelope>""".encode()


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>
<notifications xmlns="http://soap.sforce.com/2005/09/outbound"><OrganizationId>&lol2;</OrganizationId>
</notifications></soapenv:Body></soapenv:Envelope>"""


@pytest.mark.anyio
async def test_salesforce_notifications_are_stored_then_acknowledged_in_soap(store: Store) -> None:
    conn = await connector(store, **SF_CFG)
    async with client(conn, ip="13.110.54.9") as c:
        resp = await c.post(
            "/webhooks/crm",
            content=soap(notifications=2),
            headers={"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'},
        )
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/xml")
    assert b"<Ack>true</Ack>" in resp.content and b"notificationsResponse" in resp.content
    rows = raws(store)
    assert [(r.kind, r.dedup_key) for r in rows] == [
        ("webhook:salesforce:Contact", "notification|04l5g00000AbCd0001"),
        ("webhook:salesforce:Contact", "notification|04l5g00000AbCd0002"),
    ]
    doc = json.loads(rows[0].body)
    assert doc["organization_id"] == ORG and doc["object_type"] == "Contact"
    assert doc["sobject"]["MRN__c"] == "NW900001" and doc["sobject"]["Description"] is None


@pytest.mark.anyio
async def test_salesforce_retry_of_same_notification_is_acked_and_stored_once(store: Store) -> None:
    conn = await connector(store, **SF_CFG)
    async with client(conn) as c:
        acks = [(await c.post("/webhooks/crm", content=soap())).content for _ in range(2)]
    assert all(b"<Ack>true</Ack>" in a for a in acks)
    assert len(raws(store)) == 1


@pytest.mark.anyio
async def test_salesforce_caller_outside_allowlist_is_refused_before_parsing(store: Store) -> None:
    conn = await connector(store, **SF_CFG)
    async with client(conn, ip="198.51.100.23") as c:
        resp = await c.post("/webhooks/crm", content=BILLION_LAUGHS)  # never parsed: 403, not 400
    assert is_outcome(resp, 403)
    assert "allowlist" in resp.json()["issue"][0]["diagnostics"]
    assert raws(store) == []


@pytest.mark.anyio
@pytest.mark.parametrize("org", ["00D5g000004XyZb", "00D5g000004XyZbEAK", ""])
async def test_salesforce_other_organization_is_refused(store: Store, org: str) -> None:
    conn = await connector(store, **SF_CFG)
    async with client(conn) as c:
        resp = await c.post("/webhooks/crm", content=soap(org=org))
    assert is_outcome(resp, 403)
    assert b"Ack" not in resp.content
    assert raws(store) == []


@pytest.mark.anyio
async def test_salesforce_15_character_org_id_matches_18_character_one(store: Store) -> None:
    conn = await connector(store, **{**SF_CFG, "organization_id": ORG[:15]})
    async with client(conn) as c:
        resp = await c.post("/webhooks/crm", content=soap())
    assert resp.status_code == 200


@pytest.mark.anyio
@pytest.mark.parametrize("payload", [BILLION_LAUGHS, b"<not-xml", b'{"json": true}'])
async def test_salesforce_entity_expansion_and_garbage_are_refused_unstored(
    store: Store, payload: bytes
) -> None:
    conn = await connector(store, **SF_CFG)
    async with client(conn) as c:
        resp = await c.post("/webhooks/crm", content=payload)
    assert is_outcome(resp, 400)
    assert raws(store) == []


def test_salesforce_config_requires_org_and_allowlist() -> None:
    from pydantic import ValidationError

    from connectors.webhook import WebhookConfig

    for cfg in (
        {"organization_id": ORG},
        {"allow_ips": ["10.0.0.0/8"]},
        {"organization_id": "short", "allow_ips": ["10.0.0.0/8"]},
    ):
        with pytest.raises(ValidationError):
            WebhookConfig.model_validate(
                {"plugin": "webhook", "path": "/x", "signature": "salesforce-outbound", **cfg}
            )


# --------------------------------------------------------------------------- commit, limits

WHSEC = "whsec_" + base64.b64encode(b"test-only-standard-webhooks-key!").decode()


def signed(data: bytes, clock: VirtualClock, msg_id: str = "msg_1") -> dict[str, str]:
    at = clock.now()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(WHSEC).sign(msg_id, at, data.decode()),
    }


@pytest.mark.anyio
async def test_failing_store_gets_503_and_nothing_is_acknowledged(tmp_path: Any, clock: VirtualClock) -> None:
    # A real SQLite store that refuses inserts into raw_message (as a full disk would).
    from careloop.db import make_engine, upgrade

    engine: Engine = make_engine(f"sqlite:///{tmp_path}/failing.db")
    upgrade(engine)
    with engine.begin() as c:
        c.execute(
            text(
                "CREATE TRIGGER refuse BEFORE INSERT ON raw_message BEGIN "
                "SELECT RAISE(ABORT, 'simulated storage failure'); END"
            )
        )
    store = Store(engine, clock)
    conn = await connector(store, signature="standard-webhooks", secret=WHSEC)
    data = body()
    async with client(conn) as c:
        failed = await c.post("/webhooks/crm", content=data, headers=signed(data, clock))
        assert is_outcome(failed, 503)
        assert raws(store) == [] and conn.stats.store_failures == 1
        with engine.begin() as cx:
            cx.execute(text("DROP TRIGGER refuse"))
        retried = await c.post("/webhooks/crm", content=data, headers=signed(data, clock))
    assert retried.status_code == 200
    assert len(raws(store)) == 1
    engine.dispose()


@pytest.mark.anyio
async def test_2xx_is_sent_only_after_the_commit_returned(store: Store, clock: VirtualClock) -> None:
    # The sink blocks until released; the response must not arrive before that.
    import asyncio

    from careloop.pipeline import IngestSink

    gate = asyncio.Event()
    order: list[str] = []

    class SlowSink(IngestSink):
        async def put(self, items: Any) -> Any:
            await gate.wait()
            res = await super().put(items)
            order.append("committed")
            return res

    conn = await connector(store, signature="standard-webhooks", secret=WHSEC)
    await conn.start(SlowSink(store))
    data = body()
    async with client(conn) as c:
        task = asyncio.create_task(c.post("/webhooks/crm", content=data, headers=signed(data, clock)))
        await asyncio.sleep(0.05)
        assert not task.done()
        order.append("released")
        gate.set()
        resp = await task
    order.append(f"answered {resp.status_code}")
    assert order == ["released", "committed", "answered 200"]


@pytest.mark.anyio
async def test_authentic_non_json_body_is_kept_and_answered_400(store: Store, clock: VirtualClock) -> None:
    conn = await connector(store, signature="standard-webhooks", secret=WHSEC)
    data = b"refund.initiated;NW900001"
    async with client(conn) as c:
        resp = await c.post("/webhooks/crm", content=data, headers=signed(data, clock))
    assert is_outcome(resp, 400)
    [raw] = raws(store)
    assert raw.kind == "webhook:unparseable" and raw.body == data


@pytest.mark.anyio
async def test_oversize_body_is_refused_with_413(store: Store, clock: VirtualClock) -> None:
    conn = await connector(store, signature="standard-webhooks", secret=WHSEC, max_body_bytes=2048)
    data = body(data={"product": "x" * 4096})
    async with client(conn) as c:
        resp = await c.post("/webhooks/crm", content=data, headers=signed(data, clock))
    assert is_outcome(resp, 413)
    assert raws(store) == []


@pytest.mark.anyio
async def test_allowlist_applies_to_signed_schemes_too(store: Store, clock: VirtualClock) -> None:
    conn = await connector(store, signature="standard-webhooks", secret=WHSEC, allow_ips=["10.0.0.0/8"])
    data = body()
    async with client(conn, ip="192.0.2.1") as c:
        refused = await c.post("/webhooks/crm", content=data, headers=signed(data, clock))
    async with client(conn, ip="10.1.2.3") as c:
        allowed = await c.post("/webhooks/crm", content=data, headers=signed(data, clock))
    assert is_outcome(refused, 403) and allowed.status_code == 200


@pytest.mark.anyio
async def test_stopped_connector_answers_503(store: Store, clock: VirtualClock) -> None:
    conn = await connector(store, signature="standard-webhooks", secret=WHSEC)
    await conn.stop()
    data = body()
    async with client(conn) as c:
        resp = await c.post("/webhooks/crm", content=data, headers=signed(data, clock))
    assert is_outcome(resp, 503)
    assert not conn.health().ok


@pytest.mark.anyio
async def test_route_is_mounted_by_the_careloop_app(tmp_path: Any) -> None:
    from careloop import config as cfgmod
    from careloop.app import create_app
    from careloop.db import make_engine
    from careloop.hub import Hub
    from tests.conftest import FIXTURES
    from tests.kernel_plugins import register

    register()
    full = cfgmod.load(FIXTURES / "config" / "crm-test.yaml")
    # Without the MLLP listener: this test starts the hub and must bind no TCP port.
    cfg = full.model_copy(update={"connectors": {k: v for k, v in full.connectors.items() if k != "adt"}})
    clock = VirtualClock(datetime.now(UTC))
    hub = Hub(cfg, store=Store(make_engine(f"sqlite:///{tmp_path}/app.db"), clock))
    await hub.start()
    try:
        secret = cfg.connectors["crm"]["secret"]
        data = body()
        at = clock.now()
        headers = {
            "webhook-id": "msg_app",
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": Webhook(secret).sign("msg_app", at, data.decode()),
        }
        app = create_app(hub)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
        ) as c:
            ok = await c.post("/webhooks/crm", content=data, headers=headers)
            bad = await c.post("/webhooks/crm", content=data + b" ", headers=headers)
        assert ok.status_code == 200 and is_outcome(bad, 401)
        # The library's own verifier accepts what the example secret signs (real clock).
        Webhook(secret).verify(data, headers)
    finally:
        await hub.stop()
        hub.store.engine.dispose()
