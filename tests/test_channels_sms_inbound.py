"""twilio_sms_inbound + the twilio_sms mapper: X-Twilio-Signature checked against the official
``twilio`` RequestValidator, 2xx only after the commit, keywords, opt-out and status events,
and delivery reports resolved to the outbox row's person."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from fastapi import FastAPI
from sqlmodel import Session, col, select
from twilio.request_validator import RequestValidator

from careloop.errors import SkipMessage
from careloop.model import Identifier, PutResult, RawIn
from careloop.pipeline import IngestSink, MapStage
from careloop.store import Store
from careloop.tables import JourneyEvent, OutboxItem, Person, PersonIdentifier, RawMessage
from connectors.twilio_sms_inbound import (
    TwilioSmsInboundConfig,
    TwilioSmsInboundConnector,
    compute_signature,
    valid_signature,
)
from mapping.twilio_sms import TwilioSmsMapper, keyword

TOKEN = "twilio-auth-token-0002"
PUBLIC = "https://hub.example.org/channels/sms"
PHONE = "+15550100077"


def inbound_form(body: str = "C", sid: str = "SM" + "1" * 32) -> dict[str, str]:
    return {
        "MessageSid": sid,
        "SmsSid": sid,
        "AccountSid": "AC" + "0" * 32,
        "From": PHONE,
        "To": "+15550109999",
        "Body": body,
        "NumMedia": "0",
        "SmsStatus": "received",
    }


def status_form(status: str = "delivered", sid: str = "SM" + "2" * 32) -> dict[str, str]:
    return {
        "MessageSid": sid,
        "SmsSid": sid,
        "MessageStatus": status,
        "SmsStatus": status,
        "To": PHONE,
        "From": "+15550109999",
        "AccountSid": "AC" + "0" * 32,
    }


# ---------------------------------------------------------------- the signature


@pytest.mark.parametrize(
    "url",
    [
        f"{PUBLIC}/inbound",
        f"{PUBLIC}/status?key=abc123",
        "https://hub.example.org:443/channels/sms/inbound",
        "http://127.0.0.1:8080/channels/sms/status?key=k%2F1",
    ],
)
def test_our_signature_matches_twilio_request_validator_both_ways(url: str) -> None:
    params = {**inbound_form("Hi, I'll be there ✓"), "MediaUrl0": "", "Extra": "a&b=c"}
    theirs = RequestValidator(TOKEN).compute_signature(url, params)
    assert valid_signature(TOKEN, url, list(params.items()), theirs)
    ours = compute_signature(TOKEN, url, list(params.items()))
    assert RequestValidator(TOKEN).validate(url, params, ours)
    assert not valid_signature("other-token", url, list(params.items()), theirs)
    assert not valid_signature(TOKEN, url, [*params.items(), ("Body2", "x")], theirs)


def test_signature_tolerates_an_explicit_default_port_like_twilio() -> None:
    params = inbound_form()
    sig = RequestValidator(TOKEN).compute_signature(
        "https://hub.example.org:443/channels/sms/inbound", params
    )
    assert valid_signature(TOKEN, f"{PUBLIC}/inbound", list(params.items()), sig)


# ---------------------------------------------------------------- the HTTP endpoint


class FailingSink:
    async def put(self, items: Sequence[RawIn]) -> list[PutResult]:
        raise RuntimeError("database is locked")


def connector(**kw: Any) -> TwilioSmsInboundConnector:
    cfg = TwilioSmsInboundConfig.model_validate(
        {"plugin": "twilio_sms_inbound", "auth_token": TOKEN, "public_url": PUBLIC, **kw}
    )
    return TwilioSmsInboundConnector("sms", cfg)


async def post(
    conn: TwilioSmsInboundConnector,
    route: str,
    form: dict[str, str],
    *,
    signature: str | None = "sign",
    query: str = "",
) -> httpx.Response:
    app = FastAPI()
    app.include_router(conn.router())
    url = f"{PUBLIC}/{route}" + (f"?{query}" if query else "")
    headers = {"content-type": "application/x-www-form-urlencoded"}
    if signature == "sign":
        headers["X-Twilio-Signature"] = RequestValidator(TOKEN).compute_signature(url, form)
    elif signature is not None:
        headers["X-Twilio-Signature"] = signature
    transport = httpx.ASGITransport(app=app)
    # The app sees http://testserver/...; the signature covers the public URL Twilio called.
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.post(
            f"/channels/sms/{route}" + (f"?{query}" if query else ""),
            content=urlencode(form),
            headers=headers,
        )


def raws(store: Store) -> list[RawMessage]:
    with Session(store.engine) as s:
        return list(s.exec(select(RawMessage).order_by(col(RawMessage.id))).all())


def test_signed_inbound_is_stored_before_the_empty_twiml_reply(store: Store) -> None:
    conn = connector()

    async def go() -> httpx.Response:
        await conn.start(IngestSink(store))
        return await post(conn, "inbound", inbound_form("Yes"))

    resp = asyncio.run(go())
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/xml")
    assert b"<Response></Response>" in resp.content
    [raw] = raws(store)
    assert raw.kind == "sms:inbound" and raw.connector == "sms" and raw.dedup_key == "SM" + "1" * 32
    assert json.loads(raw.body)["Body"] == "Yes"


@pytest.mark.parametrize("signature", [None, "bm90IGEgc2lnbmF0dXJl", ""])
def test_missing_or_wrong_signature_gets_403_operation_outcome_and_nothing_is_stored(
    store: Store, signature: str | None
) -> None:
    conn = connector()

    async def go() -> httpx.Response:
        await conn.start(IngestSink(store))
        return await post(conn, "inbound", inbound_form("STOP"), signature=signature)

    resp = asyncio.run(go())
    assert resp.status_code == 403
    doc = resp.json()
    assert doc["resourceType"] == "OperationOutcome" and doc["issue"][0]["code"] == "security"
    assert PHONE not in resp.text and raws(store) == []


def test_signature_over_the_wrong_url_is_rejected(store: Store) -> None:
    conn = connector(public_url="https://other.example.org/channels/sms")

    async def go() -> httpx.Response:
        await conn.start(IngestSink(store))
        return await post(conn, "inbound", inbound_form())

    assert asyncio.run(go()).status_code == 403


def test_status_callback_keeps_the_outbox_key_and_twilio_retries_are_stored_once(store: Store) -> None:
    conn = connector()

    async def go() -> list[httpx.Response]:
        await conn.start(IngestSink(store))
        form = status_form("delivered")
        return [await post(conn, "status", form, query="key=ob-77") for _ in range(2)]

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [204, 204]
    [raw] = raws(store)
    assert raw.kind == "sms:status" and raw.dedup_key == "delivered|SM" + "2" * 32
    assert json.loads(raw.body)["_key"] == "ob-77"


def test_store_failure_answers_503_so_twilio_retries() -> None:
    conn = connector()

    async def go() -> httpx.Response:
        await conn.start(FailingSink())
        return await post(conn, "inbound", inbound_form())

    resp = asyncio.run(go())
    assert resp.status_code == 503 and resp.json()["resourceType"] == "OperationOutcome"


def test_oversized_body_is_refused_before_anything_else(store: Store) -> None:
    conn = connector(max_body_bytes=1024)

    async def go() -> httpx.Response:
        await conn.start(IngestSink(store))
        return await post(conn, "inbound", inbound_form("x" * 2000))

    assert asyncio.run(go()).status_code == 413 and raws(store) == []


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="public_url"):
        connector(public_url="hub.example.org")
    with pytest.raises(ValueError, match="auth_token"):
        TwilioSmsInboundConfig.model_validate({"plugin": "twilio_sms_inbound"})
    assert TOKEN not in repr(connector().config) and TOKEN not in repr(connector())


def test_accept_is_the_replay_entry_and_tells_inbound_from_status() -> None:
    conn = connector()
    [inb] = conn.accept(json.dumps(inbound_form("STOP")).encode(), {})
    [st] = conn.accept(json.dumps({**status_form("sent"), "_key": "k1"}).encode(), {})
    [bare] = conn.accept(
        json.dumps({"From": PHONE, "To": "+15550109999", "Body": "hi", "MessageSid": "SM9"}).encode(), {}
    )
    assert (inb.kind, st.kind, bare.kind) == ("sms:inbound", "sms:status", "sms:inbound")
    assert st.dedup_key == "sent|SM" + "2" * 32 and bare.dedup_key == "SM9"


# ---------------------------------------------------------------- the mapper


@pytest.mark.parametrize(
    ("text", "kw"),
    [
        ("STOP", "stop"),
        ("stop", "stop"),
        (" Stop. ", "stop"),
        ("STOPALL", "stop"),
        ("unsubscribe", "stop"),
        ("CANCEL", "stop"),
        ("End", "stop"),
        ("quit", "stop"),
        ("REVOKE", "stop"),
        ("optout", "stop"),
        ("stop texting me", "stop"),
        ("START", "start"),
        ("unstop", "start"),
        ("HELP", "help"),
        ("info?", "help"),
        ("C", "confirm"),
        ("c", "confirm"),
        ("Confirm", "confirm"),
        ("YES!", "confirm"),
        ("cancel my appointment", "cancel"),
        ("Cancel appt", "cancel"),
        ("end of the day works", None),
        ("I can't make it", None),
        ("", None),
        ("yes please call me", None),
    ],
)
def test_keywords(text: str, kw: str | None) -> None:
    assert keyword(text) == kw


def raw(kind: str, fields: dict[str, Any], store: Store | None = None) -> RawMessage:
    from datetime import UTC, datetime

    return RawMessage(
        id=1,
        connector="sms",
        kind=kind,
        content_type="application/json",
        received_at=datetime(2026, 3, 2, 14, 0, tzinfo=UTC),
        body=json.dumps(fields).encode(),
    )


def test_stop_records_an_opt_out_before_the_message_event() -> None:
    revoked, msg = TwilioSmsMapper().map(raw("sms:inbound", inbound_form("STOP")))
    assert revoked.type == "consent.revoked" and revoked.attributes["channel"] == "sms"
    assert revoked.attributes["purpose"] == "*"
    assert msg.type == "message.inbound" and msg.attributes["keyword"] == "stop"
    assert revoked.identifiers == msg.identifiers == [Identifier("phone", PHONE, kind="phone")]


def test_start_opts_back_in_and_a_reply_is_a_plain_inbound_message() -> None:
    granted, _ = TwilioSmsMapper().map(raw("sms:inbound", inbound_form("START")))
    assert granted.type == "consent.granted"
    [msg] = TwilioSmsMapper().map(raw("sms:inbound", inbound_form("C")))
    assert msg.attributes == {
        "channel": "sms",
        "body": "C",
        "keyword": "confirm",
        "message_sid": "SM" + "1" * 32,
        "to": "+15550109999",
    }


@pytest.mark.parametrize(
    ("status", "etype"),
    [
        ("queued", "message.queued"),
        ("sent", "message.sent"),
        ("delivered", "message.delivered"),
        ("undelivered", "message.failed"),
        ("failed", "message.failed"),
        ("read", "message.read"),
    ],
)
def test_status_callbacks_become_message_events_for_the_outbox_row(status: str, etype: str) -> None:
    [ev] = TwilioSmsMapper().map(
        raw("sms:status", {**status_form(status), "_key": "ob-1", "ErrorCode": "30003"})
    )
    assert ev.type == etype and ev.identifiers == [Identifier("urn:careloop:outbox", "ob-1", kind="outbox")]
    assert ev.attributes["status"] == status and ev.attributes["outbox_key"] == "ob-1"


def test_unmappable_sms_is_skipped_with_a_phi_free_reason() -> None:
    with pytest.raises(SkipMessage, match="outbox key"):
        TwilioSmsMapper().map(raw("sms:status", status_form()))
    with pytest.raises(SkipMessage) as err:
        TwilioSmsMapper().map(raw("sms:inbound", {**inbound_form(), "From": "CLINIC"}))
    assert "CLINIC" not in str(err.value)


def test_delivery_report_resolves_to_the_outbox_rows_person_without_linking(store: Store) -> None:
    with store.session() as s:
        p = Person(created_at=store.clock.now())
        s.add(p)
        s.flush()
        assert p.id is not None
        pid = p.id
        s.add(PersonIdentifier(person_id=pid, kind="phone", system="phone", value=PHONE))
        s.add(
            OutboxItem(
                key="ob-9",
                person_id=pid,
                channel="sms",
                template="appointment-reminder",
                purpose="treatment",
                phi_class="none",
                recipient=PHONE,
                content={"text": "x"},
                created_at=store.clock.now(),
                status="sent",
            )
        )
    conn = connector()
    sink = IngestSink(store)
    stage = MapStage(store, lambda r: TwilioSmsMapper())

    async def go() -> None:
        await conn.start(sink)
        await post(conn, "status", status_form("delivered"), query="key=ob-9")
        await post(conn, "status", status_form("failed", sid="SM" + "3" * 32), query="key=no-such-key")
        await post(conn, "inbound", inbound_form("STOP"))
        await stage.run_once()

    asyncio.run(go())
    with Session(store.engine) as s:
        events = {e.type: e for e in s.exec(select(JourneyEvent)).all()}
        idents = s.exec(select(PersonIdentifier)).all()
    assert events["message.delivered"].person_id == pid and events["message.delivered"].status == "pending"
    assert events["message.failed"].person_id is None and events["message.failed"].status == "held"
    assert events["consent.revoked"].person_id == events["message.inbound"].person_id == pid
    assert {(i.kind, i.value) for i in idents} == {("phone", PHONE)}  # the outbox key is never linked


def test_failure_for_an_unsubscribed_recipient_records_the_opt_out() -> None:
    failed, revoked = TwilioSmsMapper().map(
        raw("sms:status", {**status_form("failed"), "_key": "ob-2", "ErrorCode": "21610"})
    )
    assert failed.type == "message.failed" and revoked.type == "consent.revoked"
    assert revoked.identifiers == [Identifier("urn:careloop:outbox", "ob-2", kind="outbox")]
    assert revoked.attributes["purpose"] == "*" and revoked.attributes["source"] == "twilio-21610"
