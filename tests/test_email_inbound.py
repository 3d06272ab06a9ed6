"""Email replies over real SMTP: stored before 250, mapped to inbound messages and opt-outs."""

from __future__ import annotations

import asyncio
import smtplib
from email.message import EmailMessage

import pytest
from sqlmodel import Session, select

from careloop.pipeline import IngestSink, MapStage
from careloop.store import Store
from careloop.tables import RawMessage
from careloop.wiring import MapperRegistry
from connectors.smtp_inbound import SmtpInboundConfig, SmtpInboundConnector
from mapping.email_reply import EmailReplyMapper
from tests.test_kernel_run import free_port


def reply(body: str, subject: str = "Re: Your upcoming visit", mid: str = "<r1@example.org>") -> EmailMessage:
    m = EmailMessage()
    m["From"] = "Pat Example <Pat.Example@Example.org>"
    m["To"] = "reply@replies.careloop.example"
    m["Subject"] = subject
    m["Message-ID"] = mid
    m["Date"] = "Mon, 02 Mar 2026 10:00:00 -0500"
    m.set_content(body)
    return m


def test_reply_is_stored_before_250_and_foreign_recipients_refused(store: Store) -> None:
    port = free_port()
    conn = SmtpInboundConnector(
        "email", SmtpInboundConfig(port=port, reply_domain="replies.careloop.example")
    )

    def client() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.send_message(reply("C\n\nOn Mon, Care Team wrote:\n> You have a visit"))
            s.send_message(reply("C again", mid="<r1@example.org>"))  # a relay's retry: stored once
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                other = reply("hello")
                other.replace_header("To", "someone@elsewhere.example")
                s.send_message(other)

    async def main() -> None:
        await conn.start(IngestSink(store))
        try:
            await asyncio.to_thread(client)
        finally:
            await conn.stop()

    asyncio.run(main())
    with Session(store.engine) as s:
        raws = s.exec(select(RawMessage)).all()
    assert [r.kind for r in raws] == ["email:inbound"]


def test_reply_maps_to_inbound_message_without_quoted_history() -> None:
    raw = RawMessage(
        id=1,
        connector="email",
        kind="email:inbound",
        content_type="message/rfc822",
        received_at=__import__("datetime").datetime(2026, 3, 2, 15, 0),
        body=bytes(reply("C\n\nOn Mon, Care Team wrote:\n> You have a visit")),
        headers={},
    )
    [ev] = EmailReplyMapper().map(raw)
    assert ev.type == "message.inbound"
    assert ev.attributes["body"] == "C" and ev.attributes["keyword"] == "confirm"
    assert [(i.system, i.value, i.kind) for i in ev.identifiers] == [
        ("email", "pat.example@example.org", "email")
    ]


def test_unsubscribe_reply_revokes_email_consent(store: Store) -> None:
    conn = SmtpInboundConnector("email", SmtpInboundConfig(reply_domain="replies.careloop.example"))
    IngestSink(store).put_sync(conn.accept(bytes(reply("please take me off", subject="Unsubscribe")), {}))
    MapStage(store, MapperRegistry({"email": conn})).run_once_sync()
    with Session(store.engine) as s:
        from careloop.tables import JourneyEvent

        types = [e.type for e in s.exec(select(JourneyEvent).order_by(JourneyEvent.id)).all()]
    assert types == ["message.inbound", "consent.revoked"]
