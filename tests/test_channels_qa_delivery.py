"""Delivery defects found in a QA pass of the channels, each proven against a real local
provider where one exists (the Twilio-compatible loopback, aiosmtpd) and through the outbox:
an answer the channel cannot read after the provider accepted the message is never resent;
SMTP replies are classified by the command that drew them; a FHIR search result is only
ours when it is our resource; staff notices carry no unsubscribe link."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from aiosmtpd.smtp import Envelope, Session
from sqlmodel import select

from careloop.clock import VirtualClock
from careloop.errors import PermanentError, TransientError
from careloop.store import Store
from careloop.tables import DeadLetter, DeliveryReceipt, OutboxItem, Person
from channels.base import ABSENT, DeliveryUncertain, Receipt, SentMemory
from channels.fhir_writeback import OUTBOX_SYSTEM, FhirWritebackChannel, FhirWritebackConfig
from channels.outbox import DeliverStage
from channels.smtp_email import SmtpEmailChannel, SmtpEmailConfig
from channels.twilio_loopback import ACCOUNT_SID, AUTH_TOKEN, FakeTwilio
from channels.twilio_sms import TwilioSmsChannel, TwilioSmsConfig
from channels.webhook import WebhookChannel, WebhookConfig
from tests.smtp_support import Handler, smtp_server

PHONE = "+15550100077"
TEXT = "Reminder: visit on Mar 5. Reply C to confirm."
EMAIL = "pat.example@example.net"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"q" * 32).decode()


@pytest.fixture
def person(store: Store) -> int:
    with store.session() as s:
        p = Person(created_at=store.clock.now())
        s.add(p)
        s.flush()
        assert p.id is not None
        return p.id


@pytest.fixture
def fake(clock: VirtualClock) -> Iterator[FakeTwilio]:
    f = FakeTwilio()
    f.now = clock.now  # the provider's clock is the test's
    f.start()
    yield f
    f.stop()


def add_item(store: Store, person: int, key: str, channel: str, recipient: str, **content: Any) -> int:
    with store.session() as s:
        row = OutboxItem(
            key=key,
            person_id=person,
            channel=channel,
            template="appointment-reminder",
            playbook="appointment-reminders",
            purpose="treatment",
            phi_class="none",
            recipient=recipient,
            content=content,
            created_at=store.clock.now(),
        )
        s.add(row)
        s.flush()
        assert row.id is not None
        return row.id


def row(store: Store, item_id: int) -> OutboxItem:
    with store.session() as s:
        got = s.get(OutboxItem, item_id)
        assert got is not None
        s.expunge(got)
        return got


def twilio(base_url: str, http: httpx.AsyncClient | None = None) -> TwilioSmsChannel:
    cfg = TwilioSmsConfig(
        plugin="twilio_sms",
        base_url=base_url,
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        from_number="+15550109999",
        status_callback_url="http://127.0.0.1:8080/channels/sms",
    )
    return TwilioSmsChannel("sms", cfg, http=http)


# --------------------------------------------------------------------------- twilio_sms


def test_twilio_answer_without_json_after_acceptance_is_never_sent_again(
    store: Store, person: int, clock: VirtualClock, fake: FakeTwilio
) -> None:
    """Twilio answers 201 (the message is queued) but the body is not JSON (a proxy's page,
    a cut connection): retrying would text the patient again, dead-lettering would lose the
    receipt. The item waits in ``sending`` and recovery adopts the message Twilio has."""
    item_id = add_item(store, person, "qa-garbled", "sms", PHONE, text=TEXT)
    fake.garble_next = 1
    channel = twilio(fake.base_url)
    # cast: the Channel protocol's ClassVar ``Config`` is invariant (see the report)
    stage = DeliverStage(store, {"sms": channel}, max_attempts=4, recover_every=3600)

    async def go() -> None:
        try:
            for _ in range(6):  # every retry the stage would make, had it retried
                await stage.run_once()
                clock.set(clock.now() + timedelta(hours=2))
            await stage.recover()
        finally:
            await channel.aclose()

    asyncio.run(go())
    assert fake.keys()["qa-garbled"] == 1
    settled = row(store, item_id)
    assert settled.status == "sent" and settled.provider_id == fake.messages[0]["sid"]
    with store.session() as s:
        assert s.exec(select(DeadLetter)).all() == []
        receipts = s.exec(select(DeliveryReceipt).where(DeliveryReceipt.outbox_id == item_id)).all()
        assert [r.detail.get("recovered") for r in receipts] == [True]


def test_twilio_answer_without_a_sid_is_uncertain_not_a_dead_letter() -> None:
    posts: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        posts.append(request)
        return httpx.Response(201, json={"status": "queued"})

    async def go() -> None:
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        ch = twilio("https://api.twilio.com", http)
        item = OutboxItem(
            id=1,
            key="qa-nosid",
            person_id=1,
            channel="sms",
            template="appointment-reminder",
            purpose="treatment",
            phi_class="none",
            recipient=PHONE,
            content={"text": TEXT},
            created_at=datetime.now(UTC),
        )
        try:
            with pytest.raises(DeliveryUncertain):
                await ch.send(item)
        finally:
            await http.aclose()

    asyncio.run(go())
    assert len(posts) == 1


# --------------------------------------------------------------------------- smtp_email


class MailRefused(Handler):
    def __init__(self, reply: str) -> None:
        super().__init__()
        self.mail_reply = reply

    async def handle_MAIL(
        self, server: Any, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        return self.mail_reply


class QuitRefused(Handler):
    async def handle_QUIT(self, server: Any, session: Session, envelope: Envelope) -> str:
        return "421 4.3.2 shutting down"


def smtp_channel(port: int, **kw: Any) -> SmtpEmailChannel:
    cfg: dict[str, Any] = {
        "plugin": "smtp_email",
        "host": "127.0.0.1",
        "port": port,
        "security": "none",
        "from_address": "reminders@clinic.example.org",
        **kw,
    }
    return SmtpEmailChannel("email", SmtpEmailConfig.model_validate(cfg))


def email_item(key: str, purpose: str = "treatment") -> OutboxItem:
    return OutboxItem(
        id=1,
        key=key,
        person_id=1,
        channel="email",
        template="appointment-prep",
        purpose=purpose,
        phi_class="limited",
        recipient=EMAIL,
        content={"subject": "Your upcoming visit", "text": "Please arrive 15 minutes early."},
        created_at=datetime.now(UTC),
    )


@pytest.mark.parametrize(
    ("reply", "error"),
    [("451 4.3.0 try again later", TransientError), ("550 5.7.1 sender not allowed", PermanentError)],
)
def test_smtp_refused_mail_from_is_classified_by_its_own_reply(reply: str, error: type[Exception]) -> None:
    """smtplib returns MAIL FROM's reply instead of raising; unchecked, a busy server's 451
    came back as RCPT's 503 ("need MAIL first") and dead-lettered the message."""
    handler = MailRefused(reply)
    with smtp_server(handler) as port:
        ch = smtp_channel(port)
        with pytest.raises(error) as caught:
            asyncio.run(ch.send(email_item("qa-mail")))
    assert type(caught.value) is error
    assert f"mail refused ({reply[:3]})" in str(caught.value)
    assert handler.received == []


def test_smtp_quit_refused_after_the_message_was_taken_delivers_once(
    store: Store, person: int, clock: VirtualClock
) -> None:
    """The server answered 250 to the message, then 421 to QUIT: the message is delivered.
    Treating that as a transient failure made the outbox send the email again."""
    handler = QuitRefused()
    with smtp_server(handler) as port:
        item_id = add_item(store, person, "qa-quit", "email", EMAIL, subject="Visit", text="See you soon.")
        stage = DeliverStage(store, {"email": smtp_channel(port)}, max_attempts=3)

        async def go() -> None:
            for _ in range(4):
                await stage.run_once()
                clock.set(clock.now() + timedelta(hours=2))

        asyncio.run(go())
    assert len(handler.received) == 1
    assert row(store, item_id).status == "sent"


def test_escalation_notice_to_staff_has_no_unsubscribe_but_patient_email_does() -> None:
    """An escalation notice's outbox row belongs to the patient it is about: a one-click
    unsubscribe keyed by it, pressed by a staff member, would opt the patient out."""
    handler = Handler()
    with smtp_server(handler) as port:
        ch = smtp_channel(
            port,
            list_unsubscribe_url="https://clinic.example.org/unsubscribe?key={key}",
            list_unsubscribe_mailto="unsubscribe@clinic.example.org",
        )

        async def go() -> None:
            await ch.send(email_item("qa-patient"))
            await ch.send(email_item("qa-staff", purpose="escalation"))

        asyncio.run(go())
    patient, staff = (r.message for r in handler.received)
    assert "unsubscribe?key=qa-patient" in str(patient["List-Unsubscribe"])
    assert patient["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert staff["List-Unsubscribe"] is None and staff["List-Unsubscribe-Post"] is None
    assert staff["Message-ID"] and staff["Date"]


class RawKeeper(Handler):
    """Also keeps the bytes as they crossed the wire."""

    def __init__(self) -> None:
        super().__init__()
        self.raw: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        self.raw.append(bytes(envelope.original_content or b""))
        return await super().handle_DATA(server, session, envelope)


def test_non_ascii_email_crosses_the_wire_in_seven_bits_and_reads_back_intact() -> None:
    """A Spanish reminder went out as raw 8-bit bytes (Content-Transfer-Encoding: 8bit)
    without MAIL ... BODY=8BITMIME, which RFC 6152 forbids and strict relays refuse or
    mangle. Bodies are quoted-printable/base64 now; the text arrives unchanged."""
    text = "Tiene una cita el sáb 5 mar a las 9:00. Responda C para confirmar. ¿Preguntas? Llámenos."
    html = "<p>Tiene una cita el <b>sáb 5 mar</b>.</p>"
    handler = RawKeeper()
    with smtp_server(handler) as port:
        item = email_item("qa-es")
        item.content = {"subject": "Su próxima cita", "text": text, "html": html}
        asyncio.run(smtp_channel(port).send(item))
    (raw,) = handler.raw
    assert max(raw) < 128
    got = handler.received[0].message
    assert got["Subject"] == "Su próxima cita"
    plain, rich = got.get_body(("plain",)), got.get_body(("html",))
    assert plain is not None and rich is not None
    assert plain.get_content().strip() == text and rich.get_content().strip() == html
    assert {str(plain["Content-Transfer-Encoding"]), str(rich["Content-Transfer-Encoding"])} <= {
        "quoted-printable",
        "base64",
    }


# --------------------------------------------------------------------------- fhir_writeback


def writeback_item(key: str) -> OutboxItem:
    return OutboxItem(
        id=1,
        key=key,
        person_id=1,
        channel="ehr-writeback",
        template="appointment-reminder",
        purpose="treatment",
        phi_class="limited",
        recipient="Patient/p-1",
        content={"kind": "communication", "medium": "sms", "sent": "2026-03-02T14:00:00+00:00"},
        created_at=datetime.now(UTC),
    )


def searchset(*resources: dict[str, Any]) -> dict[str, Any]:
    entries: list[dict[str, Any]] = [{"resource": r, "search": {"mode": "match"}} for r in resources]
    entries.append(
        {
            "resource": {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "warning", "code": "processing", "diagnostics": "note"}],
            },
            "search": {"mode": "outcome"},
        }
    )
    return {"resourceType": "Bundle", "type": "searchset", "entry": entries}


def fhir_status(bundle: dict[str, Any], key: str) -> Any:
    async def go() -> Any:
        http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200, json=bundle)))
        cfg = FhirWritebackConfig(plugin="fhir_writeback", base_url="https://ehr.example.org/fhir")
        try:
            return await FhirWritebackChannel("ehr-writeback", cfg, http=http).status(writeback_item(key))
        finally:
            await http.aclose()

    return asyncio.run(go())


def test_fhir_recovery_does_not_take_an_outcome_or_a_foreign_resource_for_ours() -> None:
    """A searchset with only an OperationOutcome (HAPI adds one for warnings), or with a
    resource that lacks our identifier (a server ignoring the parameter), is no proof the
    write-back happened: answering "delivered" lost it; ABSENT resends it conditionally."""
    ours = {
        "resourceType": "Communication",
        "id": "c7",
        "identifier": [{"system": OUTBOX_SYSTEM, "value": "wb-9"}],
    }
    other = {
        "resourceType": "Communication",
        "id": "c1",
        "identifier": [{"system": OUTBOX_SYSTEM, "value": "x"}],
    }
    assert fhir_status(searchset(), "wb-9").status == ABSENT
    assert fhir_status(searchset(other), "wb-9").status == ABSENT
    found = fhir_status(searchset(other, ours), "wb-9")
    assert (found.status, found.provider_id) == ("delivered", "Communication/c7")


def test_twilio_sender_queue_full_is_transient_and_the_item_waits(
    store: Store, person: int, clock: VirtualClock
) -> None:
    """Twilio 21611 (the sender's queue is full: "slow down") comes as a 4xx; dead-lettering
    it dropped every message of a large batch. It is retried with backoff instead, while
    21610 (the recipient has opted out) stays permanent."""
    answers = [(400, 21611), (400, 21610)]

    def handler(request: httpx.Request) -> httpx.Response:
        status, code = answers.pop(0)
        return httpx.Response(status, json={"code": code, "message": "refused", "status": status})

    item_id = add_item(store, person, "qa-queue-full", "sms", PHONE, text=TEXT)

    async def go() -> None:
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        ch = twilio("https://api.twilio.com", http)
        stage = DeliverStage(store, {"sms": ch}, max_attempts=3, recover_every=3600)
        try:
            await stage.run_once()  # 21611
            first = row(store, item_id)
            assert first.status == "pending" and first.next_attempt_at is not None
            clock.set(first.next_attempt_at)
            await stage.run_once()  # 21610
        finally:
            await http.aclose()

    asyncio.run(go())
    assert answers == []
    assert row(store, item_id).status == "dead"
    assert "provider code 21610" in (row(store, item_id).last_error or "")


def test_sent_memory_is_bounded_and_an_evicted_key_is_answered_by_the_provider(fake: FakeTwilio) -> None:
    """Each channel remembered every key it ever sent (a hub running for months grows without
    end). The memory keeps the newest keys; an older one is asked of the provider, which
    still has it: adopted, never sent again."""
    built: list[Any] = [
        twilio(fake.base_url),
        smtp_channel(25),
        FhirWritebackChannel(
            "ehr", FhirWritebackConfig(plugin="fhir_writeback", base_url="https://ehr.example.org/fhir")
        ),
        WebhookChannel(
            "hook", WebhookConfig(plugin="webhook", url="https://hooks.example.org/in", secret=WEBHOOK_SECRET)
        ),
    ]
    for ch in built:
        assert isinstance(ch._sent, SentMemory) and ch._sent.capacity <= 100_000, ch.name
    asyncio.run(_close(built))
    memory = SentMemory(capacity=2)
    for k in ("a", "b", "c"):
        memory[k] = Receipt("sent", provider_id=k)
    assert len(memory) == 2 and "a" not in memory and memory.get("c") is not None

    def sms(key: str) -> OutboxItem:
        now = fake.now()
        return OutboxItem(
            id=1,
            key=key,
            person_id=1,
            channel="sms",
            template="appointment-reminder",
            purpose="treatment",
            phi_class="none",
            recipient=f"+1555010{len(key):04d}",
            content={"text": f"{TEXT} ({key})"},
            created_at=now,
            next_attempt_at=now,
        )

    async def go() -> Receipt | None:
        ch = twilio(fake.base_url)
        ch._sent = SentMemory(capacity=2)
        try:
            for key in ("m1", "m22", "m333"):
                await ch.send(sms(key))
            return await ch.status(sms("m1"))  # evicted: looked up at the provider
        finally:
            await ch.aclose()

    found = asyncio.run(go())
    assert found is not None and found.detail.get("recovered") is True
    assert found.provider_id == fake.messages[0]["sid"]
    assert fake.posts == 3


async def _close(channels: list[Any]) -> None:
    for ch in channels:
        await ch.aclose()


def test_an_internationalised_domain_is_sent_in_its_idna_form() -> None:
    """A non-ASCII domain made smtplib raise UnicodeEncodeError (a dead letter for a valid
    address); the envelope and the To header carry its xn-- form."""
    handler = Handler()
    item = email_item("qa-idna")
    item.recipient = "pat@bücher.example"
    with smtp_server(handler) as port:
        asyncio.run(smtp_channel(port).send(item))
    [got] = handler.received
    assert got.rcpt_tos == ["pat@xn--bcher-kva.example"]
    assert got.message["To"] == "pat@xn--bcher-kva.example"


def test_a_non_ascii_mailbox_name_is_refused_without_repeating_the_address() -> None:
    item = email_item("qa-utf8")
    item.recipient = "pätient@clinic.example.org"
    with pytest.raises(PermanentError, match="recipient") as caught:
        smtp_channel(2525).build(item)
    assert "pätient" not in str(caught.value)
