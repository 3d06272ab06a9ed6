"""twilio_sms: the conformance kit, the wire format against a local Twilio-compatible
server, crash-recovery lookups and SMS segment counting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from careloop.errors import ChannelUnavailable, PermanentError
from careloop.tables import OutboxItem
from channels.base import ABSENT
from channels.sms_encoding import check_sms_length, measure
from channels.testing import Behaviour, ChannelConformance, Provider, ScriptedHTTP
from channels.twilio_loopback import ACCOUNT_SID, AUTH_TOKEN, FakeTwilio
from channels.twilio_sms import TwilioSmsChannel, TwilioSmsConfig

FROM = "+15550109999"
TEXT = "Reminder: you have a visit on Mar 5. Reply C to confirm, STOP to opt out."


def sms_item(
    key: str, to: str = "+15550100001", text: str = TEXT, started: datetime | None = None
) -> OutboxItem:
    return OutboxItem(
        id=1,
        key=key,
        person_id=1,
        channel="sms",
        template="appointment-reminder",
        purpose="treatment",
        phi_class="none",
        recipient=to,
        content={"text": text},
        created_at=datetime.now(UTC),
        next_attempt_at=started,
    )


def config(base_url: str = "https://api.twilio.com", **kw: Any) -> dict[str, Any]:
    return {
        "plugin": "twilio_sms",
        "base_url": base_url,
        "account_sid": ACCOUNT_SID,
        "auth_token": AUTH_TOKEN,
        "from_number": FROM,
        "status_callback_url": "https://hub.example.org/channels/sms",
        **kw,
    }


def twilio_created(request: httpx.Request) -> httpx.Response:
    form = parse_qs(request.content.decode())
    return httpx.Response(201, json={"sid": "SM" + "ab" * 16, "status": "queued", "to": form["To"][0]})


class TestTwilioSmsConformance(ChannelConformance):
    channel_class = TwilioSmsChannel
    secrets = (AUTH_TOKEN,)
    bad_configs: ClassVar[list[tuple[dict[str, Any], str]]] = [
        ({"account_sid": "XX123"}, "account_sid"),
        ({"auth_token": None}, "auth_token"),
        ({"from_number": "5550100"}, "from_number"),
        ({"from_number": None}, "messaging_service_sid"),
        ({"base_url": "http://api.example.org"}, "base_url"),
        ({"max_segments": 0}, "max_segments"),
        ({"unknown_key": 1}, "unknown_key"),
    ]

    def config(self) -> dict[str, Any]:
        return config()

    def item(self, key: str) -> OutboxItem:
        return sms_item(key)

    @asynccontextmanager
    async def provider(self, behaviour: Behaviour) -> AsyncIterator[Provider]:
        http = ScriptedHTTP(behaviour, twilio_created)
        ch = TwilioSmsChannel("sms", TwilioSmsConfig.model_validate(config()), http=http.client)
        try:
            yield Provider(ch, lambda: http.accepted)
        finally:
            await http.client.aclose()


@pytest.fixture
def fake() -> Iterator[FakeTwilio]:
    f = FakeTwilio()
    f.start()
    yield f
    f.stop()


def channel(fake: FakeTwilio, **kw: Any) -> TwilioSmsChannel:
    return TwilioSmsChannel("sms", TwilioSmsConfig.model_validate(config(fake.base_url, **kw)))


async def _send_and_close(ch: TwilioSmsChannel, *items: OutboxItem) -> list[Any]:
    try:
        return [await ch.send(i) for i in items]
    finally:
        await ch.aclose()


def test_send_posts_twilio_form_with_basic_auth_and_status_callback(fake: FakeTwilio) -> None:
    [receipt] = asyncio.run(_send_and_close(channel(fake), sms_item("k-1")))
    [msg] = fake.messages
    assert (msg["to"], msg["from"], msg["body"]) == ("+15550100001", FROM, TEXT)
    assert msg["_status_callback"] == "https://hub.example.org/channels/sms/status?key=k-1"
    assert receipt.provider_id == msg["sid"] and receipt.status == "queued"
    assert receipt.detail["segments"] == 1 and receipt.detail["encoding"] == "GSM-7"


def test_messaging_service_sid_replaces_from(fake: FakeTwilio) -> None:
    mg = "MG" + "1" * 32
    ch = channel(fake, from_number=None, messaging_service_sid=mg)
    asyncio.run(_send_and_close(ch, sms_item("k-mg")))
    assert fake.messages[0]["messaging_service_sid"] == mg and fake.messages[0]["from"] is None


def test_wrong_auth_token_is_the_channels_outage_and_names_no_secret(fake: FakeTwilio) -> None:
    ch = channel(fake, auth_token="wrong-token")
    with pytest.raises(ChannelUnavailable, match=r"rejected the channel.s credentials \(HTTP 401") as err:
        asyncio.run(_send_and_close(ch, sms_item("k-auth")))
    assert "wrong-token" not in str(err.value) and not fake.messages


def test_invalid_recipient_is_refused_without_calling_the_provider(fake: FakeTwilio) -> None:
    with pytest.raises(PermanentError, match=r"E\.164") as err:
        asyncio.run(_send_and_close(channel(fake), sms_item("k-bad", to="555-0100")))
    assert "555-0100" not in str(err.value) and fake.posts == 0


def test_provider_rejection_is_permanent_with_the_twilio_error_code(fake: FakeTwilio) -> None:
    fake.fail_with = [400]
    with pytest.raises(PermanentError, match="provider code 21610"):
        asyncio.run(_send_and_close(channel(fake), sms_item("k-unsub")))


def test_too_many_segments_is_refused_before_calling_the_provider(fake: FakeTwilio) -> None:
    ch = channel(fake, max_segments=1)
    with pytest.raises(PermanentError, match="2 segments"):
        asyncio.run(_send_and_close(ch, sms_item("k-long", text="x" * 161)))
    assert fake.posts == 0


def test_recovery_lookup_adopts_the_message_a_crashed_process_sent(fake: FakeTwilio) -> None:
    started = datetime.now(UTC)
    asyncio.run(_send_and_close(channel(fake), sms_item("k-r", started=started)))
    fresh = channel(fake)  # a new process knows nothing of the send
    receipt = asyncio.run(_status_and_close(fresh, sms_item("k-r", started=started)))
    assert receipt is not None and receipt.provider_id == fake.messages[0]["sid"]
    assert receipt.detail["recovered"] is True


def test_recovery_lookup_reports_the_current_provider_status(fake: FakeTwilio) -> None:
    started = datetime.now(UTC)
    asyncio.run(_send_and_close(channel(fake), sms_item("k-d", started=started)))
    fake.set_status(fake.messages[0]["sid"], "delivered")
    receipt = asyncio.run(_status_and_close(channel(fake), sms_item("k-d", started=started)))
    assert receipt is not None and receipt.status == "delivered"


def test_recovery_lookup_is_inconclusive_when_two_messages_match(fake: FakeTwilio) -> None:
    started = datetime.now(UTC)
    asyncio.run(
        _send_and_close(channel(fake), sms_item("k-1", started=started), sms_item("k-2", started=started))
    )
    assert asyncio.run(_status_and_close(channel(fake), sms_item("k-2", started=started))) is None


def test_recovery_lookup_ignores_messages_older_than_the_attempt(fake: FakeTwilio) -> None:
    asyncio.run(_send_and_close(channel(fake, resend_if_absent=True), sms_item("k-old")))
    later = datetime.now(UTC) + timedelta(minutes=10)
    receipt = asyncio.run(
        _status_and_close(channel(fake, resend_if_absent=True), sms_item("k-new", started=later))
    )
    assert receipt is not None and receipt.status == ABSENT


def test_no_match_is_unknown_by_default_and_absent_only_when_configured(fake: FakeTwilio) -> None:
    item = sms_item("k-none", started=datetime.now(UTC))
    assert asyncio.run(_status_and_close(channel(fake), item)) is None
    receipt = asyncio.run(_status_and_close(channel(fake, resend_if_absent=True), item))
    assert receipt is not None and receipt.status == ABSENT


def test_recovery_lookup_pages_through_the_list(fake: FakeTwilio) -> None:
    started = datetime.now(UTC)
    ch = channel(fake)
    asyncio.run(
        _send_and_close(
            ch,
            sms_item("k-first", started=started),
            *[sms_item(f"k-{i}", text=f"other {i}") for i in range(120)],
        )
    )
    receipt = asyncio.run(_status_and_close(channel(fake), sms_item("k-first", started=started)))
    assert receipt is not None and receipt.provider_id == fake.messages[0]["sid"]


def test_known_sid_is_fetched_directly(fake: FakeTwilio) -> None:
    asyncio.run(_send_and_close(channel(fake), sms_item("k-f")))
    item = sms_item("k-f")
    item.provider_id = fake.messages[0]["sid"]
    fake.set_status(item.provider_id, "undelivered")
    receipt = asyncio.run(_status_and_close(channel(fake), item))
    assert receipt is not None and receipt.status == "failed"


async def _status_and_close(ch: TwilioSmsChannel, item: OutboxItem) -> Any:
    try:
        return await ch.status(item)
    finally:
        await ch.aclose()


def test_status_callback_url_carries_the_outbox_key_url_encoded(fake: FakeTwilio) -> None:
    asyncio.run(_send_and_close(channel(fake), sms_item("outbox:7/a b")))
    cb = fake.messages[0]["_status_callback"]
    assert parse_qs(urlsplit(cb).query)["key"] == ["outbox:7/a b"]


# ---------------------------------------------------------------- segments


@pytest.mark.parametrize(
    ("text", "encoding", "segments"),
    [
        ("", "GSM-7", 1),
        ("a" * 160, "GSM-7", 1),
        ("a" * 161, "GSM-7", 2),
        ("a" * 306, "GSM-7", 2),
        ("a" * 307, "GSM-7", 3),
        ("€" * 80, "GSM-7", 1),  # extension characters cost two septets
        ("€" * 81, "GSM-7", 2),
        ("a" * 152 + "€" + "a" * 10, "GSM-7", 2),
        ("a" * 152 + "€" + "a" * 152, "GSM-7", 3),  # the escape pair moves to the next part
        ("é" * 160, "GSM-7", 1),  # é is in the GSM-7 default alphabet
        ("ú" * 70, "UCS-2", 1),
        ("ú" * 71, "UCS-2", 2),
        ("ú" * 134, "UCS-2", 2),
        ("ú" * 135, "UCS-2", 3),
        ("😀" * 35, "UCS-2", 1),  # surrogate pairs: two code units each
        ("a" * 66 + "😀" + "a" * 66, "UCS-2", 3),  # a surrogate pair never straddles two parts
    ],
)
def test_segments_are_counted_per_encoding(text: str, encoding: str, segments: int) -> None:
    size = measure(text)
    assert (size.encoding, size.segments) == (encoding, segments)


def test_template_too_long_is_reported_with_sizes_and_forcing_characters_only() -> None:
    text = "Hi ✓ " + "x" * 300
    [problem] = check_sms_length(text, max_segments=3)
    assert "UCS-2" in problem and "U+2713" in problem and "max_segments 3" in problem
    assert "xxx" not in problem
    assert check_sms_length("x" * 459, max_segments=3) == []
    assert check_sms_length("x" * 459, max_segments=3, reserve=1) != []


def test_channel_check_template_uses_its_max_segments() -> None:
    cfg = TwilioSmsConfig.model_validate(config(max_segments=1))
    assert TwilioSmsChannel.check_template("x" * 160, cfg) == []
    assert TwilioSmsChannel.check_template("x" * 161, cfg)


def test_check_template_reads_each_language_and_counts_placeholders_generously() -> None:
    from orchestrator.templates import TemplateConfig

    ok = "Reminder: you have a visit on {{ start | local_date }}. Reply C to confirm, STOP to opt out."
    long_es = "Recordatorio: " + "ñ" * 100 + " {{ start | local_date }} " + "ú" * 80
    tpl = TemplateConfig.model_validate({"sms": {"en": ok, "es": long_es}})
    problems = TwilioSmsChannel.check_template(tpl)
    assert len(problems) == 1 and problems[0].startswith("sms.es is 4 SMS segments (UCS-2")
    assert TwilioSmsChannel.check_template("{{ a }}" * 23) != []  # 23 placeholders x 20 > 459
