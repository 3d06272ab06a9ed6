"""smtp_email against a real aiosmtpd server: the conformance kit, STARTTLS with a
self-signed certificate, AUTH, implicit TLS, and the messages read back out of the server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import pytest

from careloop import reply_token
from careloop.errors import PermanentError
from careloop.store import Store
from careloop.tables import OutboxItem, Person
from channels.outbox import DeliverStage
from channels.smtp_email import SmtpEmailChannel, SmtpEmailConfig
from channels.testing import Behaviour, ChannelConformance, Provider
from tests.smtp_support import PASSWORD, USER, Handler, self_signed, silent_server, smtp_server

RCPT = "pat.example@example.net"
TEXT = "Your visit on March 5 is confirmed.\nReply to this email with questions."
HTML = "<p>Your visit on <b>March 5</b> is confirmed.</p>"
REPLY_SECRET = "reply-token-secret-for-channel-tests"


def email_item(key: str, to: str = RCPT, html: str | None = HTML, purpose: str = "treatment") -> OutboxItem:
    content: dict[str, Any] = {"subject": "Your upcoming visit", "text": TEXT}
    if html:
        content["html"] = html
    return OutboxItem(
        id=1,
        key=key,
        person_id=1,
        channel="email",
        template="appointment-prep",
        purpose=purpose,
        phi_class="limited",
        recipient=to,
        content=content,
        created_at=datetime.now(UTC),
    )


def config(port: int, **kw: Any) -> dict[str, Any]:
    return {
        "plugin": "smtp_email",
        "host": "127.0.0.1",
        "port": port,
        "security": "none",
        "from_address": "reminders@clinic.example.org",
        "from_name": "Example Clinic",
        "reply_to": "frontdesk@clinic.example.org",
        "reply_secret": REPLY_SECRET,
        "list_unsubscribe_url": "https://clinic.example.org/unsubscribe?key={key}",
        "list_unsubscribe_mailto": "unsubscribe@clinic.example.org",
        **kw,
    }


class TestSmtpEmailConformance(ChannelConformance):
    channel_class = SmtpEmailChannel
    secrets = (PASSWORD, REPLY_SECRET)
    provider_loggers = ("mail.log",)
    bad_configs: ClassVar[list[tuple[dict[str, Any], str]]] = [
        ({"from_address": "not-an-address"}, "from_address"),
        ({"port": 0}, "port"),
        ({"password": None}, "password"),
        ({"host": "mail.example.org"}, "security"),
        ({"security": "ssl3"}, "security"),
        ({"list_unsubscribe_url": "http://clinic.example.org/u"}, "list_unsubscribe_url"),
        ({"reply_to": "nobody"}, "reply_to"),
        ({"reply_secret": None}, "reply_secret"),
        ({"reply_secret": "too-short"}, "reply_secret"),
        ({"reply_to": "a-very-long-mailbox-name@clinic.example.org"}, "reply_to"),
    ]

    @pytest.fixture(autouse=True)
    def _tls(self, certs: Path) -> None:
        self.certs = certs

    def config(self) -> dict[str, Any]:
        return config(2525, username=USER, password=PASSWORD)

    def tls_config(self, port: int) -> dict[str, Any]:
        return config(
            port,
            security="starttls",
            username=USER,
            password=PASSWORD,
            ca_file=str(self.certs / "smtp-cert.pem"),
        )

    def item(self, key: str) -> OutboxItem:
        return email_item(key)

    @asynccontextmanager
    async def provider(self, behaviour: Behaviour) -> AsyncIterator[Provider]:
        if behaviour == "timeout":
            with silent_server() as port:
                cfg = SmtpEmailConfig.model_validate({**config(port), "timeout_seconds": 0.3})
                yield Provider(SmtpEmailChannel("email", cfg), lambda: 0)
            return
        handler = Handler(
            rcpt_reply={
                "throttled": "452 4.5.3 Too many recipients, try later",
                "rejected": "550 5.1.1 Mailbox unavailable",
            }.get(behaviour),
            data_reply="451 4.3.0 Local error in processing" if behaviour == "server_error" else None,
        )
        with smtp_server(handler, starttls=self.certs, auth=True) as port:
            cfg = SmtpEmailConfig.model_validate(self.tls_config(port))
            yield Provider(SmtpEmailChannel("email", cfg), lambda: len(handler.received))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("smtp-tls")
    self_signed(folder)
    return folder


def send_all(cfg: dict[str, Any], *items: OutboxItem) -> list[Any]:
    ch = SmtpEmailChannel("email", SmtpEmailConfig.model_validate(cfg))

    async def go() -> list[Any]:
        return [await ch.send(i) for i in items]

    return asyncio.run(go())


def test_email_over_starttls_with_auth_is_read_back_from_the_server(certs: Path) -> None:
    handler = Handler()
    with smtp_server(handler, starttls=certs, auth=True) as port:
        receipts = send_all(
            config(
                port,
                security="starttls",
                username=USER,
                password=PASSWORD,
                ca_file=str(certs / "smtp-cert.pem"),
            ),
            email_item("email-1"),
            email_item("email-2", to="sam.example@example.net", html=None),
        )
    assert [r.rcpt_tos for r in handler.received] == [[RCPT], ["sam.example@example.net"]]
    first, second = handler.received
    assert first.tls and first.authenticated and first.mail_from == "reminders@clinic.example.org"
    assert not first.bare_lf and not second.bare_lf
    msg = first.message
    assert msg["From"] == "Example Clinic <reminders@clinic.example.org>"
    assert msg["To"] == RCPT and msg["Subject"] == "Your upcoming visit"
    # Each message's Reply-To names its outbox item under the reply secret.
    tokens = [reply_token.token_of(str(r.message["Reply-To"])) for r in handler.received]
    assert str(msg["Reply-To"]).startswith("frontdesk+") and msg["Reply-To"].endswith("@clinic.example.org")
    assert [reply_token.verify(REPLY_SECRET.encode(), t or "") for t in tokens] == ["email-1", "email-2"]
    assert reply_token.verify(b"some-other-secret-value", tokens[0] or "") is None
    assert msg["Message-ID"] == receipts[0].provider_id
    assert msg["Message-ID"].startswith("<co-") and msg["Message-ID"].endswith("@clinic.example.org>")
    assert msg["List-Unsubscribe"] == (
        "<https://clinic.example.org/unsubscribe?key=email-1>, "
        "<mailto:unsubscribe@clinic.example.org?subject=unsubscribe>"
    )
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg.get_content_type() == "multipart/alternative"
    plain, html = msg.get_body(("plain",)), msg.get_body(("html",))
    assert plain is not None and plain.get_content().strip() == TEXT
    assert html is not None and html.get_content().strip() == HTML
    assert second.message.get_content_type() == "text/plain"
    assert second.message["Message-ID"] != msg["Message-ID"]


def test_implicit_tls_delivers(certs: Path) -> None:
    # aiosmtpd counts only STARTTLS as TLS when deciding to offer AUTH, so no AUTH here
    handler = Handler()
    with smtp_server(handler, implicit_tls=certs) as port:
        send_all(config(port, security="tls", ca_file=str(certs / "smtp-cert.pem")), email_item("tls-1"))
    assert len(handler.received) == 1 and handler.received[0].message["Subject"] == "Your upcoming visit"


def test_untrusted_certificate_is_permanent_and_sends_nothing(certs: Path) -> None:
    handler = Handler()
    with (
        smtp_server(handler, starttls=certs, auth=True) as port,
        pytest.raises(PermanentError, match="not trusted"),
    ):
        send_all(config(port, security="starttls", username=USER, password=PASSWORD), email_item("tls-bad"))
    assert handler.received == []


def test_wrong_password_is_permanent_and_not_echoed(certs: Path) -> None:
    handler = Handler()
    with smtp_server(handler, starttls=certs, auth=True) as port, pytest.raises(PermanentError) as err:
        send_all(
            config(
                port,
                security="starttls",
                username=USER,
                password="wrong-pw-xyz",
                ca_file=str(certs / "smtp-cert.pem"),
            ),
            email_item("auth-bad"),
        )
    assert "authentication failed (535)" in str(err.value) and "wrong-pw-xyz" not in str(err.value)
    assert handler.received == []


def test_server_without_starttls_is_refused_rather_than_sending_in_clear() -> None:
    handler = Handler()
    with smtp_server(handler) as port, pytest.raises(PermanentError, match="STARTTLS"):
        send_all(config(port, security="starttls"), email_item("no-tls"))
    assert handler.received == []


def test_a_resend_carries_the_same_message_id() -> None:
    handler = Handler()
    with smtp_server(handler) as port:
        send_all(config(port), email_item("same-key"))
        send_all(config(port), email_item("same-key"))  # a new process after a crash
    ids = {r.message["Message-ID"] for r in handler.received}
    assert len(handler.received) == 2 and len(ids) == 1


def test_content_without_subject_is_permanent() -> None:
    item = email_item("no-subject")
    item.content = {"text": "hi"}
    with pytest.raises(PermanentError, match="subject"):
        send_all(config(2525), item)


@pytest.fixture
def person(store: Store) -> Iterator[int]:
    with store.session() as s:
        p = Person(created_at=store.clock.now())
        s.add(p)
        s.flush()
        assert p.id is not None
        pid = p.id
    yield pid


def test_outbox_delivers_email_and_records_the_message_id(store: Store, person: int) -> None:
    with store.session() as s:
        for i in range(3):
            s.add(
                OutboxItem(
                    key=f"ob-email-{i}",
                    person_id=person,
                    channel="email",
                    template="appointment-prep",
                    purpose="treatment",
                    phi_class="limited",
                    recipient=f"p{i}@example.net",
                    content={"subject": "Prep", "text": "Bring your card."},
                    created_at=store.clock.now(),
                )
            )
    handler = Handler()
    with smtp_server(handler) as port:
        ch = SmtpEmailChannel("email", SmtpEmailConfig.model_validate(config(port)), clock=store.clock)
        stage = DeliverStage(store, {"email": ch})

        async def go() -> None:
            while await stage.run_once():
                pass

        asyncio.run(go())
    with store.session() as s:
        from sqlmodel import select

        rows = s.exec(select(OutboxItem)).all()
    assert {r.status for r in rows} == {"sent"}
    assert {r.provider_id for r in rows} == {h.message["Message-ID"] for h in handler.received}
    assert len(handler.received) == 3


def test_reply_token_survives_lowercasing_and_rejects_tampering() -> None:
    key = "0123456789abcdef0123456789abcdef"  # the house format: 32 hex
    secret = REPLY_SECRET.encode()
    addr = reply_token.address("reply@replies.careloop.example", secret, key)
    assert addr is not None and len(addr.split("@")[0]) <= 64
    token = reply_token.token_of(addr)
    assert token is not None
    assert reply_token.verify(secret, token.upper()) == key  # mail systems may change case
    flipped = token[:-1] + ("a" if token[-1] != "a" else "b")
    assert reply_token.verify(secret, flipped) is None
    other = reply_token.make(secret, "fedcba9876543210fedcba9876543210")
    assert reply_token.verify(secret, token[:27] + other[27:]) is None  # another item's MAC
    assert reply_token.verify(secret, "h" + "a" * 40) is None


def test_escalation_notices_to_staff_carry_no_reply_token() -> None:
    handler = Handler()
    with smtp_server(handler) as port:
        send_all(config(port), email_item("esc-1", purpose="escalation"))
    [got] = handler.received
    assert got.message["Reply-To"] == "frontdesk@clinic.example.org"
