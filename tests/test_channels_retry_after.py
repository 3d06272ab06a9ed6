"""A provider's ``Retry-After`` (RFC 9110 section 10.2.3) on a 429 or 503: the header
parser, the HTTP channels carrying it on ``TransientError``, and the deliver stage waiting
at least that long (the channel paused meanwhile) against real local servers speaking
Twilio's, Standard Webhooks' and FHIR's wire format."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from careloop.clock import VirtualClock, utc
from careloop.errors import TransientError
from careloop.store import Store
from careloop.tables import OutboxItem
from channels import _http
from channels.fhir_writeback import FhirWritebackChannel, FhirWritebackConfig
from channels.outbox import DeliverStage
from channels.twilio_loopback import FakeTwilio
from channels.twilio_loopback import _Handler as _TwilioHandler
from channels.webhook import WebhookChannel, WebhookConfig
from tests.fake_fhir import FakeFhir
from tests.fake_fhir import _Handler as _FhirHandler
from tests.test_channels_fhir_writeback import item as fhir_item
from tests.test_channels_outbox import add_items, audits, person, rows
from tests.test_channels_twilio_sms import channel
from tests.test_channels_webhook import SECRET

__all__ = ["person"]  # the fixture, used by the tests below

HeaderValue = Callable[[], str]
NOW = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)


# ---------------------------------------------------------------- local providers


class RetryAfterTwilio(FakeTwilio):
    """The loopback Twilio, answering its scripted failures (``fail_with``: 429 is Twilio's
    20429 "Too Many Requests") with a ``Retry-After`` from ``retry_after``."""

    def __init__(self) -> None:
        super().__init__()
        self.retry_after: HeaderValue | None = None

    def handler(self) -> type[_TwilioHandler]:
        """The request handler: Twilio's, with the ``Retry-After`` header on failures."""
        fake = self

        class Handler(_TwilioHandler):
            owner = fake

            def _send_raw(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                if status >= 400 and fake.retry_after is not None:
                    self.send_header("Retry-After", fake.retry_after())
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def start(self, port: int = 0) -> str:
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self.handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self.base_url


class RetryAfterFhir(FakeFhir):
    """The local FHIR server, its scripted failures carrying ``Retry-After: retry_after``."""

    retry_after = "120"

    def start(self) -> str:
        fake = self

        class Handler(_FhirHandler):
            owner = fake

            def _send(
                self, status: int, doc: dict[str, Any] | None, headers: dict[str, str] | None = None
            ) -> None:
                extra = {"Retry-After": fake.retry_after} if status >= 400 else {}
                super()._send(status, doc, {**(headers or {}), **extra})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self.base_url


class WebhookReceiver:
    """A Standard Webhooks receiver on 127.0.0.1: answers the scripted ``(status,
    Retry-After)`` pairs first, then 204; records each request's ``webhook-id``."""

    def __init__(self) -> None:
        self.script: list[tuple[int, str | None]] = []
        self.ids: list[str] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with owner.lock:
                    owner.ids.append(self.headers.get("webhook-id") or "")
                    status, wait = owner.script.pop(0) if owner.script else (204, None)
                self.send_response(status)
                if wait is not None:
                    self.send_header("Retry-After", wait)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/careloop"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def twilio() -> Iterator[RetryAfterTwilio]:
    f = RetryAfterTwilio()
    f.start()
    yield f
    f.stop()


@pytest.fixture
def ehr() -> Iterator[RetryAfterFhir]:
    f = RetryAfterFhir()
    f.start()
    yield f
    f.stop()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver()
    yield r
    r.stop()


def webhook_channel(receiver: WebhookReceiver) -> WebhookChannel:
    return WebhookChannel("sms", WebhookConfig(plugin="webhook", url=receiver.url, secret=SECRET))


def stage_for(store: Store, ch: Any, **kw: Any) -> DeliverStage:
    """The deliver stage with ``ch`` as its ``sms`` channel (``Any``: a concrete channel's
    ``Config`` is narrower than the protocol's, which mypy reads as a mismatch)."""
    return DeliverStage(store, {"sms": ch}, **kw)


def vclock(store: Store) -> VirtualClock:
    clock = store.clock
    assert isinstance(clock, VirtualClock)
    return clock


async def drain(stage: DeliverStage) -> None:
    while await stage.run_once():
        pass


def seconds_until_next(store: Store, t0: datetime, oid: int) -> float:
    [row] = [r for r in rows(store) if r.id == oid]
    assert row.next_attempt_at is not None
    return (utc(row.next_attempt_at) - t0).total_seconds()


# ---------------------------------------------------------------- the parser


def test_delay_seconds() -> None:
    assert _http.retry_after("120", NOW) == timedelta(seconds=120)
    assert _http.retry_after(" 7 ", NOW) == timedelta(seconds=7)


def test_http_date_is_relative_to_now() -> None:
    when = format_datetime(NOW + timedelta(seconds=90), usegmt=True)  # IMF-fixdate
    assert when.endswith(" GMT")
    assert _http.retry_after(when, NOW) == timedelta(seconds=90)
    # the obsolete RFC 850 form is accepted too (RFC 9110: recipients must accept it)
    assert _http.retry_after("Monday, 02-Mar-26 14:02:00 GMT", NOW) == timedelta(minutes=2)


@pytest.mark.parametrize(
    "value", [None, "", "soon", "-5", "1.5", "12abc", "+30", "0", "Mon, 99 Foo 2026 25:61:00 GMT", "١٢٠"]
)
def test_garbage_negative_and_zero_ask_for_nothing(value: str | None) -> None:
    assert _http.retry_after(value, NOW) is None


def test_a_date_already_past_asks_for_nothing() -> None:
    assert _http.retry_after(format_datetime(NOW - timedelta(minutes=1), usegmt=True), NOW) is None


def test_long_waits_are_capped_at_an_hour() -> None:
    assert timedelta(hours=1) == _http.MAX_RETRY_AFTER
    assert _http.retry_after("86400", NOW) == _http.MAX_RETRY_AFTER
    assert _http.retry_after("9" * 40, NOW) == _http.MAX_RETRY_AFTER
    far = format_datetime(NOW + timedelta(days=3), usegmt=True)
    assert _http.retry_after(far, NOW) == _http.MAX_RETRY_AFTER


def test_a_response_date_is_read_against_its_own_date_header() -> None:
    """The provider's clock is compared with itself: ours may be off by minutes."""
    resp = httpx.Response(
        503,
        headers={
            "Date": format_datetime(NOW, usegmt=True),
            "Retry-After": format_datetime(NOW + timedelta(seconds=45), usegmt=True),
        },
    )
    assert _http.response_retry_after(resp) == timedelta(seconds=45)


# ---------------------------------------------------------------- the channels


def test_each_http_channel_carries_the_providers_wait(
    twilio: RetryAfterTwilio, ehr: RetryAfterFhir, receiver: WebhookReceiver
) -> None:
    twilio.fail_with, twilio.retry_after = [429], lambda: "120"
    receiver.script = [(503, "120")]
    ehr.fail_with = [429]
    item = OutboxItem(
        id=1,
        key="k-retry-1",
        person_id=1,
        channel="sms",
        template="appointment-reminder",
        purpose="treatment",
        phi_class="none",
        recipient="+15550100001",
        content={"text": "Reminder: your visit is tomorrow."},
        created_at=NOW,
    )
    fhir = FhirWritebackChannel(
        "ehr",
        FhirWritebackConfig.model_validate(
            {"plugin": "fhir_writeback", "base_url": ehr.base_url, "sender": "Organization/clinic-1"}
        ),
    )

    async def go() -> list[BaseException]:
        errors: list[BaseException] = []
        sends: list[tuple[Any, OutboxItem]] = [
            (channel(twilio), item),
            (webhook_channel(receiver), item),
            (fhir, fhir_item("k-retry-2")),
        ]
        for ch, one in sends:
            try:
                await ch.send(one)
            except TransientError as exc:
                errors.append(exc)
            finally:
                await ch.aclose()
        return errors

    errors = asyncio.run(go())
    assert len(errors) == 3
    for exc in errors:
        assert isinstance(exc, TransientError)
        assert exc.retry_after == timedelta(seconds=120)
        assert "retry after 120 s" in str(exc)
        assert "+1555" not in str(exc)  # no address in the error
    assert "provider code 20429" in str(errors[0])


# ---------------------------------------------------------------- the deliver stage


def test_429_with_retry_after_delays_the_next_attempt(
    store: Store, person: int, twilio: RetryAfterTwilio
) -> None:
    [oid] = add_items(store, person)
    twilio.fail_with, twilio.retry_after = [429], lambda: "120"
    ch = channel(twilio)
    stage = stage_for(store, ch, rng=random.Random(7))
    clock = vclock(store)
    t0 = clock.now()

    async def go() -> None:
        await drain(stage)
        assert twilio.posts == 1
        assert seconds_until_next(store, t0, oid) >= 120  # our own backoff alone: ~2 s
        clock.set(t0 + timedelta(seconds=119))
        await drain(stage)
        assert twilio.posts == 1  # not a request before the provider's time
        clock.set(t0 + timedelta(seconds=121))
        await drain(stage)
        await ch.aclose()

    asyncio.run(go())
    assert twilio.posts == 2
    [row] = rows(store)
    assert row.status == "sent" and row.attempts == 2


def test_the_wait_is_recorded_as_the_items_last_error(
    store: Store, person: int, twilio: RetryAfterTwilio
) -> None:
    add_items(store, person)
    twilio.fail_with, twilio.retry_after = [429], lambda: "120"
    ch = channel(twilio)

    async def go() -> None:
        await drain(stage_for(store, ch))
        await ch.aclose()

    asyncio.run(go())
    [row] = rows(store)
    assert row.status == "pending"
    assert row.last_error is not None
    assert "HTTP 429 (provider code 20429)" in row.last_error
    assert "retry after 120 s" in row.last_error


def test_http_date_retry_after(store: Store, person: int, twilio: RetryAfterTwilio) -> None:
    [oid] = add_items(store, person)
    # The server's Date header is its own clock; the wait is read against it (5 minutes,
    # or 301 s if the second turned between writing the two headers).
    twilio.fail_with = [503]
    twilio.retry_after = lambda: format_datetime(datetime.now(UTC) + timedelta(minutes=5), usegmt=True)
    ch = channel(twilio)
    stage = stage_for(store, ch, rng=random.Random(7))
    clock = vclock(store)
    t0 = clock.now()

    async def go() -> None:
        await drain(stage)
        assert 299 <= seconds_until_next(store, t0, oid) <= 302
        clock.set(t0 + timedelta(seconds=200))
        await drain(stage)
        assert twilio.posts == 1
        clock.set(t0 + timedelta(seconds=303))
        await drain(stage)
        await ch.aclose()

    asyncio.run(go())
    assert twilio.posts == 2 and rows(store)[0].status == "sent"


def test_garbage_retry_after_leaves_our_own_backoff(
    store: Store, person: int, twilio: RetryAfterTwilio
) -> None:
    [oid, other] = add_items(store, person, n=2)
    twilio.fail_with, twilio.retry_after = [429], lambda: "soon, please"
    ch = channel(twilio)
    stage = stage_for(store, ch, rng=random.Random(7), backoff_base=2.0)
    t0 = vclock(store).now()

    async def go() -> None:
        await drain(stage)
        await ch.aclose()

    asyncio.run(go())
    assert 1 <= seconds_until_next(store, t0, oid) <= 2  # backoff of attempt 1, base 2 s
    assert "retry after" not in (rows(store)[0].last_error or "")
    assert {r.id: r.status for r in rows(store)}[other] == "sent"  # no pause either


def test_the_wait_is_capped(store: Store, person: int, twilio: RetryAfterTwilio) -> None:
    [oid] = add_items(store, person)
    twilio.fail_with, twilio.retry_after = [429], lambda: "604800"  # a week
    ch = channel(twilio)
    t0 = vclock(store).now()

    async def go() -> None:
        await drain(stage_for(store, ch, rng=random.Random(7)))
        await ch.aclose()

    asyncio.run(go())
    assert seconds_until_next(store, t0, oid) == pytest.approx(3600, abs=1)


def test_retry_after_beyond_not_after_expires_unsent(
    store: Store, person: int, twilio: RetryAfterTwilio
) -> None:
    t0 = vclock(store).now()
    [oid] = add_items(store, person, not_after=t0 + timedelta(seconds=60))
    twilio.fail_with, twilio.retry_after = [429], lambda: "120"
    ch = channel(twilio)
    stage = stage_for(store, ch, rng=random.Random(7))
    clock = vclock(store)

    async def go() -> None:
        await drain(stage)
        clock.set(t0 + timedelta(seconds=61))
        await drain(stage)
        assert rows(store)[0].status == "pending"  # not due yet: nothing to the provider
        clock.set(t0 + timedelta(seconds=121))
        await drain(stage)
        await ch.aclose()

    asyncio.run(go())
    assert twilio.posts == 1
    [row] = rows(store)
    assert row.status == "cancelled" and row.last_error == "expired: not_after has passed"
    assert [a.entity for a in audits(store, "outbox.expire")] == [f"outbox/{oid}"]


def test_the_retry_limit_still_applies(store: Store, person: int, twilio: RetryAfterTwilio) -> None:
    add_items(store, person)
    twilio.fail_with, twilio.retry_after = [429], lambda: "120"
    ch = channel(twilio)

    async def go() -> None:
        await drain(stage_for(store, ch, max_attempts=1))
        await ch.aclose()

    asyncio.run(go())
    assert rows(store)[0].status == "dead"


def test_the_channel_pauses_for_the_wait(store: Store, person: int, twilio: RetryAfterTwilio) -> None:
    """After a 429 with Retry-After, the channel's next items do not reach the provider
    before the wait is over: left pending, untouched (not claimed, no attempt, no record of
    their own; one ``channel.pause`` record for the channel), then sent once."""
    first, *rest = add_items(store, person, n=3)
    twilio.fail_with, twilio.retry_after = [429], lambda: "120"
    ch = channel(twilio)
    stage = stage_for(store, ch, rng=random.Random(7))
    clock = vclock(store)
    t0 = clock.now()

    async def go() -> None:
        await drain(stage)
        assert twilio.posts == 1
        by_id = {r.id: r for r in rows(store)}
        for oid in rest:
            assert by_id[oid].status == "pending" and by_id[oid].attempts == 0
            assert by_id[oid].next_attempt_at is None  # as queued
        assert audits(store, "outbox.defer") == []
        [pause] = audits(store, "channel.pause")
        assert pause.entity == "channel/sms" and pause.person_id is None
        assert pause.detail == {
            "channel": "sms",
            "reason": "provider-retry-after",
            "until": (t0 + timedelta(seconds=120)).isoformat(),
        }
        clock.set(t0 + timedelta(seconds=121))
        await drain(stage)
        await ch.aclose()

    asyncio.run(go())
    assert {r.status for r in rows(store)} == {"sent"}
    assert twilio.posts == 4 and len(twilio.messages) == 3
    assert {r.id: r.attempts for r in rows(store)} == {first: 2, rest[0]: 1, rest[1]: 1}


def test_a_deduplicating_channels_group_waits_too(
    store: Store, person: int, receiver: WebhookReceiver
) -> None:
    """Webhook items are claimed in groups: after the first answer's 503 Retry-After the
    rest of the group is not posted."""
    ids = add_items(store, person, n=4)
    receiver.script = [(503, "30")]
    ch = webhook_channel(receiver)
    stage = stage_for(store, ch, rng=random.Random(7), group=10)
    clock = vclock(store)
    t0 = clock.now()

    async def go() -> None:
        await drain(stage)
        assert len(receiver.ids) == 1
        assert all(seconds_until_next(store, t0, oid) >= 30 for oid in ids)
        clock.set(t0 + timedelta(seconds=31))
        await drain(stage)
        await ch.aclose()

    asyncio.run(go())
    assert {r.status for r in rows(store)} == {"delivered"}
    assert len(receiver.ids) == 5 and len(set(receiver.ids)) == 4
