"""webhook: the conformance kit, and signatures verified with the ``standardwebhooks`` package."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, ClassVar

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from careloop.tables import OutboxItem
from channels.base import ABSENT
from channels.testing import Behaviour, ChannelConformance, Provider, ScriptedHTTP
from channels.webhook import WebhookChannel, WebhookConfig, sign

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
URL = "https://crm.example.org/hooks/careloop"


def item(key: str) -> OutboxItem:
    return OutboxItem(
        id=3,
        key=key,
        person_id=7,
        channel="crm-hook",
        template="discount-offer",
        playbook="discount-offer",
        purpose="marketing",
        phi_class="none",
        recipient="crm:contact-42",
        content={"product": "p-1", "offer": "10%"},
        created_at=datetime.now(UTC),
    )


def config(**kw: Any) -> dict[str, Any]:
    return {"plugin": "webhook", "url": URL, "secret": SECRET, **kw}


def accepted(request: httpx.Request) -> httpx.Response:
    return httpx.Response(204)


class TestWebhookConformance(ChannelConformance):
    channel_class = WebhookChannel
    secrets = (SECRET, SECRET.removeprefix("whsec_"))
    bad_configs: ClassVar[list[tuple[dict[str, Any], str]]] = [
        ({"url": "ftp://crm.example.org"}, "url"),
        ({"url": "http://crm.example.org/hook"}, "url"),
        ({"secret": "plain-secret"}, "secret"),
        ({"secret": "whsec_not base64!"}, "secret"),
        ({"secret": "whsec_" + base64.b64encode(b"short").decode()}, "secret"),
        ({"secret": None}, "secret"),
    ]

    def config(self) -> dict[str, Any]:
        return config()

    def item(self, key: str) -> OutboxItem:
        return item(key)

    @asynccontextmanager
    async def provider(self, behaviour: Behaviour) -> AsyncIterator[Provider]:
        http = ScriptedHTTP(behaviour, accepted)
        ch = WebhookChannel("crm-hook", WebhookConfig.model_validate(config()), http=http.client)
        try:
            yield Provider(ch, lambda: http.accepted)
        finally:
            await http.client.aclose()


def deliver(*items: OutboxItem, **cfg: Any) -> list[httpx.Request]:
    http = ScriptedHTTP("ok", accepted)
    ch = WebhookChannel("crm-hook", WebhookConfig.model_validate(config(**cfg)), http=http.client)

    async def go() -> None:
        for i in items:
            await ch.send(i)
        await http.client.aclose()

    asyncio.run(go())
    return http.requests


def test_signature_verifies_with_the_standardwebhooks_package() -> None:
    [req] = deliver(item("out-1"))
    headers = {k: v for k, v in req.headers.items() if k.startswith("webhook-")}
    payload = Webhook(SECRET).verify(req.content, headers)
    assert headers["webhook-id"] == "out-1"
    assert payload["type"] == "careloop.outreach"
    assert payload["data"]["key"] == "out-1" and payload["data"]["content"] == {
        "product": "p-1",
        "offer": "10%",
    }
    assert req.headers["content-type"] == "application/json" and str(req.url) == URL


def test_tampered_body_or_wrong_secret_fails_verification() -> None:
    [req] = deliver(item("out-2"))
    headers = {k: v for k, v in req.headers.items() if k.startswith("webhook-")}
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(req.content.replace(b"p-1", b"p-2"), headers)
    other = "whsec_" + base64.b64encode(b"another-secret-of-32-bytes-long!").decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(req.content, headers)


def test_our_sign_matches_the_reference_implementation() -> None:
    ts = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)
    body = json.dumps({"a": 1})
    theirs = Webhook(SECRET).sign("msg_1", ts, body)
    assert sign(SECRET, "msg_1", int(ts.timestamp()), body.encode()) == theirs


def test_interrupted_webhook_is_resent_with_the_same_id_unless_disabled() -> None:
    ch = WebhookChannel("crm-hook", WebhookConfig.model_validate(config()))
    off = WebhookChannel("crm-hook", WebhookConfig.model_validate(config(resend_on_recovery=False)))

    async def go() -> tuple[Any, Any]:
        try:
            return await ch.status(item("x")), await off.status(item("x"))
        finally:
            await ch.aclose()
            await off.aclose()

    on_answer, off_answer = asyncio.run(go())
    assert on_answer.status == ABSENT and off_answer is None
