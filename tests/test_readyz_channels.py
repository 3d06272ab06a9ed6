"""``/readyz`` lists each channel that reports its health: a channel whose credentials the
provider rejected shows as degraded with the reason (as a degraded connector does) without
making the hub unready; a channel without ``health()`` is not listed. A hub wired from its
config, a deliver stage over its channels sending through the real Twilio channel to the local Twilio
wire-format server, read through the app."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import httpx

from careloop.app import create_app
from careloop.clock import VirtualClock
from careloop.config import AppConfig
from careloop.hub import Hub
from careloop.store import Store
from channels.outbox import DeliverStage
from channels.twilio_loopback import ACCOUNT_SID, AUTH_TOKEN, FakeTwilio
from tests.test_channels_outbox import add_items, person, rows
from tests.test_channels_retry_after import WebhookReceiver, receiver
from tests.test_channels_twilio_sms import fake
from tests.test_channels_webhook import SECRET

__all__ = ["fake", "person", "receiver"]  # the fixtures, used by the tests below


def hub_config(twilio: FakeTwilio, receiver: WebhookReceiver) -> AppConfig:
    return AppConfig.model_validate(
        {
            "site": {"channels": ["sms"]},
            "channels": {
                "sms": {
                    "plugin": "twilio_sms",
                    "base_url": twilio.base_url,
                    "account_sid": ACCOUNT_SID,
                    "auth_token": AUTH_TOKEN,
                    "from_number": "+15550109999",
                },
                "hook": {"plugin": "webhook", "url": receiver.url, "secret": SECRET},
                "log": {"plugin": "console"},  # no health(): not listed
            },
        }
    )


async def readyz(hub: Hub) -> tuple[int, dict[str, Any]]:
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.get("/readyz")
    return r.status_code, r.json()


def test_readyz_shows_a_channel_whose_credentials_were_rejected(
    store: Store,
    clock: VirtualClock,
    person: int,
    fake: FakeTwilio,
    receiver: WebhookReceiver,
) -> None:
    hub = Hub(hub_config(fake, receiver), store=store, migrate=False)
    hub.started = True  # ready() reports a started hub; its workers are not needed here
    add_items(store, person)  # one message on "sms"
    fake.auth_token = "rotated-on-twilio-0002"  # careloop still sends AUTH_TOKEN

    # The hub's channels, without its compliance gate (this synthetic person has no contacts).
    deliver = DeliverStage(store, hub.channels)

    async def go() -> list[tuple[int, dict[str, Any]]]:
        try:
            seen = [await readyz(hub)]
            await deliver.run_once()  # Twilio answers 401
            seen.append(await readyz(hub))
            fake.auth_token = AUTH_TOKEN
            clock.set(clock.now() + timedelta(minutes=6))  # past the channel's 5 min hold
            await deliver.run_once()  # sent
            seen.append(await readyz(hub))
            return seen
        finally:
            await hub.stop()  # in this loop: the channels share the hub's HTTP client

    (s0, before), (s1, rejected), (s2, after) = asyncio.run(go())
    assert (s0, before["ready"], before["channel:sms"], before["channel:hook"]) == (200, True, "ok", "ok")
    assert "channel:log" not in before  # the console channel reports no health

    assert s1 == 200 and rejected["ready"] is True  # degraded, as a degraded connector: still ready
    sms = rejected["channel:sms"]
    assert sms.startswith(
        "degraded: channel sms: twilio send: the provider rejected the channel's credentials"
    )
    assert "HTTP 401, provider code 20003" in sms
    assert AUTH_TOKEN not in sms and "rotated" not in sms and "+1555" not in sms
    assert rejected["channel:hook"] == "ok"  # the other channel is not affected

    assert (s2, after["ready"], after["channel:sms"]) == (200, True, "ok")
    assert [r.status for r in rows(store)] == ["sent"]
