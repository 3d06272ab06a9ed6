"""Email replies over real SMTP: stored before 250, mapped to inbound messages and opt-outs;
reply tokens decide who wrote (a forged From confirms nothing and opts no one in)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import smtplib
from datetime import datetime
from email.message import EmailMessage
from typing import Any

import pytest
from pydantic import SecretStr
from sqlmodel import Session, col, select

from careloop import reply_token
from careloop.config import AppConfig, load_raw, substitute_env
from careloop.errors import ConfigError
from careloop.hub import Hub
from careloop.pipeline import IngestSink, MapStage
from careloop.store import Store
from careloop.tables import (
    Consent,
    Escalation,
    JourneyEvent,
    OutboxItem,
    Person,
    PersonIdentifier,
    RawMessage,
)
from careloop.wiring import MapperRegistry, check
from connectors.smtp_inbound import SmtpInboundConfig, SmtpInboundConnector
from mapping.email_reply import EmailReplyMapper
from tests.conftest import FIXTURES
from tests.smtp_support import Handler, free_port, smtp_server


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


def raw_reply(msg: EmailMessage, headers: dict[str, str] | None = None) -> RawMessage:
    return RawMessage(
        id=1,
        connector="email",
        kind="email:inbound",
        content_type="message/rfc822",
        received_at=datetime(2026, 3, 2, 15, 0),
        body=bytes(msg),
        headers=headers or {},
    )


def test_reply_maps_to_inbound_message_without_quoted_history() -> None:
    raw = raw_reply(reply("C\n\nOn Mon, Care Team wrote:\n> You have a visit"))
    [ev] = EmailReplyMapper().map(raw)
    assert ev.type == "message.inbound"
    # No reply token: the sender is only what From claims, so the keyword is not acted on.
    assert ev.attributes["body"] == "C" and ev.attributes["claimed_keyword"] == "confirm"
    assert ev.attributes["unverified"] is True and ev.attributes["keyword"] is None
    assert [(i.system, i.value, i.kind) for i in ev.identifiers] == [
        ("email", "pat.example@example.org", "email")
    ]


def test_token_in_the_envelope_recipient_names_the_outbox_item_not_the_sender() -> None:
    secret = "reply-secret-for-mapper-tests"
    addr = reply_token.address("reply@replies.careloop.example", secret.encode(), "ob-email-7")
    assert addr is not None
    raw = raw_reply(reply("START"), {"rcpt_to": addr})  # the To header has no token
    events = EmailReplyMapper(reply_secret=SecretStr(secret)).map(raw)
    assert [e.type for e in events] == ["message.inbound", "consent.granted"]
    for ev in events:
        assert [(i.system, i.value, i.kind) for i in ev.identifiers] == [
            ("urn:careloop:outbox", "ob-email-7", "outbox")
        ]
        assert "unverified" not in ev.attributes
    # The same message checked under another secret: unverified, and START is not acted on.
    [ev] = EmailReplyMapper(reply_secret="another-secret-of-enough-length").map(raw)
    assert ev.attributes["unverified"] is True and ev.attributes["reply_token"] == "invalid"
    assert "another-secret" not in repr(EmailReplyMapper(reply_secret="another-secret-of-enough-length"))


def test_unsubscribe_reply_revokes_email_consent(store: Store) -> None:
    conn = SmtpInboundConnector("email", SmtpInboundConfig(reply_domain="replies.careloop.example"))
    IngestSink(store).put_sync(conn.accept(bytes(reply("please take me off", subject="Unsubscribe")), {}))
    MapStage(store, MapperRegistry({"email": conn})).run_once_sync()
    with Session(store.engine) as s:
        rows = s.exec(select(JourneyEvent).order_by(col(JourneyEvent.id))).all()
    assert [e.type for e in rows] == ["message.inbound", "consent.revoked"]
    # An unknown sender without a reply token creates no one: kept (held) for staff.
    assert {(e.status, e.status_reason) for e in rows} == {("held", "unknown-person")}


# --------------------------------------------------------------------------- reply tokens
# The shipped example deployment, with the email channel pointed at a local aiosmtpd and the
# inbound connector on a free port: outbound email, inbound reply, mapping and orchestrator
# are the real ones.

EXAMPLE = FIXTURES / "config" / "example.yaml"
SIU = json.loads((FIXTURES / "feeds" / "demo.jsonl").read_text().splitlines()[1])["body"]
ANA = "ana.testperson@example.org"  # booked for 2026-03-12 in the SIU above
SPOUSE = "sam.relative@example.net"


def example_hub(store: Store, email_port: int, inbound_port: int) -> Hub:
    data = substitute_env(load_raw(EXAMPLE))
    data["channels"]["email"]["port"] = email_port
    data["connectors"]["email"]["port"] = inbound_port
    cfg = AppConfig.model_validate({**data, "base_dir": EXAMPLE.parent.resolve()})
    return Hub(cfg, store=store, migrate=False)


def settle(hub: Hub) -> None:
    """Map and orchestrate until nothing is left (no delivery: the SMS provider is not running)."""
    map_stage = hub.stages[0]
    assert isinstance(map_stage, MapStage)
    while map_stage.run_once_sync() + hub.orchestrator.run_once_sync():
        pass


def person_of(store: Store, email: str) -> int | None:
    with Session(store.engine) as s:
        return s.exec(select(PersonIdentifier.person_id).where(PersonIdentifier.value == email)).first()


def mail(sender: str, to: str, body: str, mid: str, subject: str = "Re: Your upcoming visit") -> EmailMessage:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"], m["Message-ID"] = sender, to, subject, mid
    m["Date"] = "Mon, 02 Mar 2026 10:00:00 -0500"
    m.set_content(body + "\n\nOn Mon, Northwind Care Team wrote:\n> You have a visit")
    return m


class World:
    """Ana booked (via the SIU), one email sent to her over SMTP, the inbound listener up."""

    def __init__(self, store: Store) -> None:
        self.store, self.sent = store, Handler()
        self.inbound_port = free_port()

    def reply(self, msg: EmailMessage, rcpt: str | None = None) -> None:
        with smtplib.SMTP("127.0.0.1", self.inbound_port, timeout=10) as s:
            s.send_message(msg, to_addrs=[rcpt] if rcpt else None)


def run_world(store: Store, script: Any) -> None:
    world = World(store)
    with smtp_server(world.sent) as email_port:
        hub = example_hub(store, email_port, world.inbound_port)

        async def main() -> None:
            conn = hub.connectors["email"]
            await conn.start(hub.sink)
            try:
                IngestSink(store).put_sync(hub.connectors["adt"].accept(SIU.encode(), {}))
                await asyncio.to_thread(settle, hub)
                ana = person_of(store, ANA)
                assert ana is not None
                now = store.clock.now()
                with store.session() as s:
                    item = OutboxItem(
                        key=hashlib.sha256(b"reply-token-test").hexdigest()[:32],
                        person_id=ana,
                        channel="email",
                        template="appointment-reminder",
                        playbook="appointment-reminders",
                        purpose="appointment-reminder",
                        phi_class="none",
                        recipient=ANA,
                        content={"subject": "Your upcoming visit", "text": "Reply C to confirm."},
                        created_at=now,
                        status="sent",
                    )
                    s.add(item)
                    s.commit()
                    s.refresh(item)
                await hub.channels["email"].send(item)
                await asyncio.to_thread(script, world, hub, ana, item.key)
            finally:
                await conn.stop()
                await hub.http.aclose()

        asyncio.run(main())


def events(store: Store, person: int | None = None) -> list[JourneyEvent]:
    with Session(store.engine) as s:
        q = select(JourneyEvent).order_by(col(JourneyEvent.id))
        if person is not None:
            q = q.where(JourneyEvent.person_id == person)
        return list(s.exec(q).all())


def consent(store: Store, person: int) -> str | None:
    with Session(store.engine) as s:
        row = s.exec(select(Consent).where(Consent.person_id == person, Consent.channel == "email")).first()
        return row.status if row else None


def test_reply_token_round_trip_links_a_forwarded_reply_to_the_person_and_confirms(store: Store) -> None:
    def script(world: World, hub: Hub, ana: int, key: str) -> None:
        [sent] = world.sent.received
        reply_to = str(sent.message["Reply-To"])
        assert reply_to.startswith("reply+") and reply_to.endswith("@replies.careloop.example")
        # Forwarded to a relative who answers: From is not Ana, the token still names her
        # message; the relay lowercased the address on the way (tokens survive that).
        world.reply(mail(SPOUSE, reply_to.lower(), "C", "<fwd-1@example.net>"))
        settle(hub)
        inbound = [e for e in events(world.store) if e.type == "message.inbound"]
        assert [(e.person_id, e.status) for e in inbound] == [(ana, "processed")]
        assert inbound[0].attributes["reply_to_outbox"] == key
        assert "unverified" not in inbound[0].attributes
        confirmed = [e for e in events(world.store, ana) if e.type == "appointment.confirmed"]
        assert len(confirmed) == 1
        assert person_of(world.store, SPOUSE) is None  # the forwarder is not linked to Ana or created

    run_world(store, script)


def test_forged_from_without_token_neither_confirms_nor_opts_in_but_stop_works(store: Store) -> None:
    def script(world: World, hub: Hub, ana: int, key: str) -> None:
        plain = "reply@replies.careloop.example"
        world.reply(mail(ANA, plain, "C", "<forged-c@example.org>"))
        settle(hub)
        [ev] = [e for e in events(world.store, ana) if e.type == "message.inbound"]
        assert ev.attributes["unverified"] is True and ev.attributes["reply_token"] == "missing"
        assert ev.attributes["claimed_keyword"] == "confirm" and ev.attributes["keyword"] is None
        assert not [e for e in events(world.store, ana) if e.type == "appointment.confirmed"]

        world.reply(mail(ANA, plain, "STOP", "<stop-1@example.org>"))  # an opt-out is always honoured
        settle(hub)
        assert consent(world.store, ana) == "opt_out"
        world.reply(mail(ANA, plain, "START", "<forged-start@example.org>"))
        settle(hub)
        assert consent(world.store, ana) == "opt_out"  # a forged START does not opt her back in
        assert not [e for e in events(world.store, ana) if e.type == "consent.granted"]

        # A tampered token (another MAC) is no token: still unverified, nothing confirmed.
        [sent] = world.sent.received
        good = str(sent.message["Reply-To"])
        local, domain = good.split("@")
        tampered = f"{local[:-4]}{'aaaa' if local[-4:] != 'aaaa' else 'bbbb'}@{domain}"
        world.reply(mail(ANA, tampered, "C", "<tampered-c@example.org>"), rcpt=tampered)
        settle(hub)
        last = [e for e in events(world.store, ana) if e.type == "message.inbound"][-1]
        assert last.attributes["unverified"] is True and last.attributes["reply_token"] == "invalid"
        assert not [e for e in events(world.store, ana) if e.type == "appointment.confirmed"]

        # Ana herself, through the token, can opt back in.
        world.reply(mail(ANA, good, "START", "<start-ok@example.org>"), rcpt=good)
        settle(hub)
        assert consent(world.store, ana) == "opt_in"

    run_world(store, script)


def test_unverified_red_flag_reaches_staff_and_unknown_senders_create_no_one(store: Store) -> None:
    def script(world: World, hub: Hub, ana: int, key: str) -> None:
        plain = "reply@replies.careloop.example"
        with Session(world.store.engine) as s:
            people = len(s.exec(select(Person)).all())
        world.reply(mail(ANA, plain, "I have chest pain and can't breathe", "<rf-1@example.org>"))
        world.reply(mail("stranger@example.com", plain, "C", "<stranger-1@example.com>"))
        world.reply(mail("stranger@example.com", plain, "STOP", "<stranger-2@example.com>"))
        settle(hub)
        with Session(world.store.engine) as s:
            escalations = s.exec(select(Escalation).where(Escalation.person_id == ana)).all()
            assert len(s.exec(select(Person)).all()) == people
        assert [(e.severity, e.evidence.get("unverified")) for e in escalations] == [("emergency", True)]
        held = [e for e in events(world.store) if e.person_id is None]
        assert {(e.type, e.status, e.status_reason) for e in held} == {
            ("message.inbound", "held", "unknown-person"),
            ("consent.revoked", "held", "unknown-person"),
        }
        assert person_of(world.store, "stranger@example.com") is None

    run_world(store, script)


def test_config_check_requires_the_channel_and_connector_secrets_to_match() -> None:
    data = substitute_env(load_raw(EXAMPLE))
    check(AppConfig.model_validate({**data, "base_dir": EXAMPLE.parent.resolve()}))
    data["connectors"]["email"]["reply_secret"] = "a-different-secret-value"
    with pytest.raises(ConfigError) as err:
        check(AppConfig.model_validate({**data, "base_dir": EXAMPLE.parent.resolve()}))
    assert "connectors.email.reply_secret: differs" in str(err.value)
    assert "a-different-secret-value" not in str(err.value)
    del data["connectors"]["email"]["reply_secret"]
    with pytest.raises(ConfigError, match=r"connectors\.email\.reply_secret: required"):
        check(AppConfig.model_validate({**data, "base_dir": EXAMPLE.parent.resolve()}))
