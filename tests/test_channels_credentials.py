"""A provider that rejects an HTTP channel's credentials (a Twilio auth token or a webhook
secret rotated on the provider's side and not in careloop): ``ChannelUnavailable``, so the
deliver stage keeps the items pending without counting the attempts, holds the channel, and
the channel reports itself degraded until a request succeeds; a 403 that concerns one item
stays permanent. Against the local Twilio wire-format server and a local webhook receiver,
through the deliver stage, on each engine."""

from __future__ import annotations

import asyncio
import random
import threading
from datetime import timedelta
from http.server import ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from sqlmodel import Session, select

from careloop.clock import VirtualClock, utc
from careloop.errors import ChannelUnavailable, PermanentError
from careloop.store import Store
from careloop.tables import DeadLetter
from channels.base import ABSENT
from channels.fhir_writeback import FhirWritebackChannel, FhirWritebackConfig
from channels.outbox import DeliverStage
from channels.twilio_loopback import AUTH_TOKEN, FakeTwilio
from channels.twilio_loopback import _Handler as _TwilioHandler
from channels.twilio_sms import TwilioSmsChannel, TwilioSmsConfig
from channels.webhook import WebhookChannel, WebhookConfig
from tests.fake_fhir import FakeFhir
from tests.test_channels_fhir_writeback import TOKEN as FHIR_TOKEN
from tests.test_channels_fhir_writeback import config as fhir_config
from tests.test_channels_fhir_writeback import item as fhir_item
from tests.test_channels_outbox import PHONE, add_items, person, rows
from tests.test_channels_retry_after import WebhookReceiver, receiver
from tests.test_channels_twilio_sms import config, sms_item
from tests.test_channels_webhook import SECRET

__all__ = ["person", "receiver"]  # the fixtures, used by the tests below

ROTATED = "rotated-on-twilio-0002"  # the token the operator set on Twilio, not in careloop
MAX_ATTEMPTS = 2
ROUNDS = MAX_ATTEMPTS + 2  # an outage longer than the retry limit: not the items' fault


class ScriptedTwilio(FakeTwilio):
    """The loopback Twilio, answering the next POSTs with the scripted ``(HTTP status,
    Twilio error code)`` pairs of ``errors`` (e.g. 403 with 21408, region not enabled)."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[tuple[int, int]] = []

    def start(self, port: int = 0) -> str:
        fake = self

        class Handler(_TwilioHandler):
            owner = fake

            def do_POST(self) -> None:
                with fake.lock:
                    scripted = fake.errors.pop(0) if fake.errors else None
                if scripted is None:
                    super().do_POST()
                    return
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, code = scripted
                self._send(status, {"code": code, "message": "scripted", "status": status})

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self.base_url


@pytest.fixture
def twilio(request: pytest.FixtureRequest) -> ScriptedTwilio:
    fake = ScriptedTwilio()
    fake.start()
    request.addfinalizer(fake.stop)
    return fake


class Recorded:
    """An httpx client for the channel that records the status of every answer."""

    def __init__(self) -> None:
        self.statuses: list[int] = []

        async def record(resp: httpx.Response) -> None:
            self.statuses.append(resp.status_code)

        self.client = httpx.AsyncClient(event_hooks={"response": [record]})


def sms_channel(fake: FakeTwilio, http: httpx.AsyncClient) -> TwilioSmsChannel:
    return TwilioSmsChannel("sms", TwilioSmsConfig.model_validate(config(fake.base_url)), http=http)


def webhook_channel(receiver: WebhookReceiver) -> WebhookChannel:
    return WebhookChannel("sms", WebhookConfig(plugin="webhook", url=receiver.url, secret=SECRET))


def stage_for(store: Store, ch: Any) -> DeliverStage:
    # Any: a concrete channel's Config is narrower than the protocol's (see test_channels_retry_after)
    return DeliverStage(store, {"sms": ch}, max_attempts=MAX_ATTEMPTS, rng=random.Random(7))


async def drain(stage: DeliverStage) -> None:
    while await stage.run_once():
        pass


def after_the_hold(store: Store) -> None:
    """Move the clock past every pending item's next attempt (the channel's hold included)."""
    clock = store.clock
    assert isinstance(clock, VirtualClock)
    due = [utc(r.next_attempt_at) for r in rows(store) if r.status == "pending" and r.next_attempt_at]
    clock.set(max([clock.now(), *due]) + timedelta(seconds=1))


def dead_letters(store: Store) -> list[DeadLetter]:
    with Session(store.engine) as s:
        return list(s.exec(select(DeadLetter)).all())


def assert_waiting(store: Store, secret: str) -> None:
    """Every item pending, no attempt counted, nothing dead; the tried ones say why."""
    assert {(r.status, r.attempts) for r in rows(store)} == {("pending", 0)}
    errors = [r.last_error for r in rows(store) if r.last_error]  # a held item was not tried
    assert errors
    for error in errors:
        assert "rejected the channel's credentials" in error and "channel sms" in error
        assert secret not in error and PHONE not in error
    assert dead_letters(store) == []


# ---------------------------------------------------------------- Twilio


def test_twilio_401_keeps_items_pending_uncounted_until_the_token_is_accepted(
    store: Store, person: int, twilio: ScriptedTwilio
) -> None:
    add_items(store, person, n=2)
    twilio.auth_token = ROTATED  # rotated on Twilio; careloop still sends AUTH_TOKEN
    http = Recorded()
    ch = sms_channel(twilio, http.client)
    stage = stage_for(store, ch)

    async def go() -> None:
        for n in range(1, ROUNDS + 1):
            await drain(stage)
            # One request per round: the 401 holds the channel, the other item is not tried.
            assert http.statuses == [401] * n
            assert_waiting(store, AUTH_TOKEN)
            health = ch.health()
            assert health.ok and health.degraded
            assert "HTTP 401, provider code 20003" in health.detail and AUTH_TOKEN not in health.detail
            after_the_hold(store)
        twilio.auth_token = AUTH_TOKEN  # the operator puts the token back (or updates careloop)
        await drain(stage)
        await http.client.aclose()

    asyncio.run(go())
    assert {r.status for r in rows(store)} == {"sent"}
    assert [r.attempts for r in rows(store)] == [1, 1]
    assert len(twilio.messages) == 2 and dead_letters(store) == []
    assert ch.health().degraded is False and ch.health().detail == ""


def test_twilio_20003_is_a_credentials_rejection_whatever_the_status(twilio: ScriptedTwilio) -> None:
    twilio.errors = [(403, 20003)]
    http = Recorded()

    async def go() -> None:
        ch = sms_channel(twilio, http.client)
        with pytest.raises(ChannelUnavailable, match="HTTP 403, provider code 20003") as err:
            await ch.send(sms_item("k-20003"))
        assert "channel sms" in str(err.value) and "+1555" not in str(err.value)
        assert ch.health().degraded
        await ch.send(sms_item("k-20003"))  # the next request succeeds: healthy again
        assert ch.health().degraded is False
        await http.client.aclose()

    asyncio.run(go())


def test_twilio_403_for_one_item_stays_permanent_and_holds_nothing_back(
    store: Store, person: int, twilio: ScriptedTwilio
) -> None:
    first, second = add_items(store, person, n=2)
    # 21408: the destination's region is not enabled: this message's problem, not the channel's.
    twilio.errors = [(403, 21408)]
    http = Recorded()
    ch = sms_channel(twilio, http.client)

    async def go() -> None:
        await drain(stage_for(store, ch))
        await http.client.aclose()

    asyncio.run(go())
    by_id = {r.id: r for r in rows(store)}
    assert (by_id[first].status, by_id[first].attempts) == ("dead", 1)
    assert "HTTP 403 (provider code 21408)" in (by_id[first].last_error or "")
    assert by_id[second].status == "sent"  # not held: sent in the same drain
    assert http.statuses == [403, 201] and len(dead_letters(store)) == 1
    assert ch.health().degraded is False


# ---------------------------------------------------------------- webhook


def test_webhook_401_keeps_items_pending_uncounted_until_the_receiver_accepts(
    store: Store, person: int, receiver: WebhookReceiver
) -> None:
    add_items(store, person)
    receiver.script = [(401, None)] * ROUNDS  # the receiver's secret was rotated, ours not yet
    ch = webhook_channel(receiver)
    stage = stage_for(store, ch)

    async def go() -> None:
        for n in range(1, ROUNDS + 1):
            await drain(stage)
            assert len(receiver.ids) == n
            assert_waiting(store, SECRET.removeprefix("whsec_"))
            health = ch.health()
            assert health.ok and health.degraded and "HTTP 401" in health.detail
            after_the_hold(store)
        await drain(stage)  # the script is spent: the receiver answers 204 again
        await ch.aclose()

    asyncio.run(go())
    [row] = rows(store)
    assert (row.status, row.attempts) == ("delivered", 1)
    assert len(receiver.ids) == ROUNDS + 1 and len(set(receiver.ids)) == 1
    assert ch.health().degraded is False


def test_webhook_403_stays_permanent(receiver: WebhookReceiver) -> None:
    """A 403 is also a firewall's answer to one body: see channels/webhook.py."""
    receiver.script = [(403, None)]

    async def go() -> None:
        ch = webhook_channel(receiver)
        with pytest.raises(PermanentError, match="HTTP 403") as err:
            await ch.send(sms_item("k-403"))
        assert not isinstance(err.value, ChannelUnavailable)
        assert ch.health().degraded is False
        await ch.aclose()

    asyncio.run(go())


class OneTenantRefused(WebhookReceiver):
    """A receiver that answers 401 to one item (its ``webhook-id``) and 204 to the rest:
    a refusal that is the item's own, though it reads as the channel's credentials."""

    def __init__(self, refused: str) -> None:
        super().__init__()
        self.refused = refused
        self.script = []
        handler = self.server.RequestHandlerClass
        owner = self

        class Handler(handler):  # type: ignore[valid-type,misc]
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with owner.lock:
                    owner.ids.append(self.headers.get("webhook-id") or "")
                status = 401 if self.headers.get("webhook-id") == owner.refused else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server.RequestHandlerClass = Handler


def test_one_item_refused_401_does_not_hold_the_channel_and_is_dead_lettered(
    store: Store, person: int
) -> None:
    """One bad message never stops the pipeline: after the first hold, the channel's other
    items go first; they get through, so the refused item's next 401s count and it ends in
    the dead letters, while every other item is delivered."""
    [bad] = add_items(store, person)
    key = next(r.key for r in rows(store) if r.id == bad)
    rx = OneTenantRefused(key)
    ch = webhook_channel(rx)
    stage = stage_for(store, ch)
    try:

        async def go() -> None:
            for _ in range(3 * MAX_ATTEMPTS + 2):
                add_items(store, person)  # the day's other traffic
                await drain(stage)
                after_the_hold(store)
            await ch.aclose()

        asyncio.run(go())
    finally:
        rx.stop()
    got = {r.id: r for r in rows(store)}
    assert got[bad].status == "dead"
    assert [(d.stage, d.item_id) for d in dead_letters(store)] == [("deliver", bad)]
    assert {r.status for i, r in got.items() if i != bad} == {"delivered"}


# ---------------------------------------------------------------- FHIR write-back


def test_fhir_writeback_401_on_the_recovery_search_is_the_channels_and_names_it() -> None:
    """The write-back channel keeps its credentials' state in the shared ``Credentials``: a
    401 to the search recovery makes (``status()``) is the channel's outage, its message
    names the operation and the FHIR server's code as every HTTP channel's does, and the
    next success clears it."""
    fhir = FakeFhir(token="rotated-on-the-ehr")  # our static token is no longer accepted
    fhir.start()

    async def go() -> None:
        cfg = FhirWritebackConfig.model_validate(fhir_config(fhir.base_url))
        ch = FhirWritebackChannel("ehr-writeback", cfg)
        try:
            with pytest.raises(ChannelUnavailable) as err:
                await ch.status(fhir_item("wb-search"))
            message = str(err.value)
            assert message.startswith("channel ehr-writeback: fhir search: ")
            assert "rejected the channel's credentials (HTTP 401, provider code login)" in message
            assert FHIR_TOKEN not in message and "Patient/" not in message
            health = ch.health()
            assert health.degraded and health.detail == message
            fhir.token = FHIR_TOKEN  # the EHR accepts our token again
            answer = await ch.status(fhir_item("wb-search"))
            assert answer is not None and answer.status == ABSENT
            assert ch.health().degraded is False and ch.health().detail == ""
        finally:
            await ch.aclose()

    try:
        asyncio.run(go())
    finally:
        fhir.stop()
