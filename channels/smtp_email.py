"""``smtp_email``: email over SMTP (STARTTLS or implicit TLS, AUTH), stdlib smtplib in a thread.

Each item becomes one MIME message: ``multipart/alternative`` with the text and, when the
template has one, the HTML body; ``From``/``Reply-To`` from config; ``List-Unsubscribe``
(an https URL, with ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` per RFC 8058,
and/or a mailto) so mailbox providers show an unsubscribe button; ``Auto-Submitted:
auto-generated`` (RFC 3834) so auto-responders stay quiet. Escalation notices to staff carry
neither a reply token nor List-Unsubscribe: their outbox row is the patient's, and a staff
member's reply or unsubscribe must not act for the patient. With ``reply_to`` set, the
``Reply-To`` is ``<local>+<token>@<domain>`` where the token names this outbox item under
an HMAC keyed by ``reply_secret`` (careloop/reply_token.py): the inbound connector, given
the same secret, links a reply to the person the message went to rather than to whoever
its forgeable ``From`` header claims. The ``Message-ID`` is derived
from the outbox key (``<co-<sha256(key)[:32]>@domain>``), so a resend after a crash carries
the same id and is recognizable (and collapsed by providers that de-duplicate on it).

SMTP cannot be asked afterwards whether a message went out: ``status()`` answers None and
an interrupted send becomes ``unknown`` for staff review (see channels/outbox.py). A
connection dropped or timing out after the DATA command started is ``DeliveryUncertain``
for the same reason; failures before it are plain transient errors. SMTP replies map by
class: 4xx transient, 5xx permanent, each by the command that drew it (MAIL's reply is
checked, not left to surface as RCPT's "503 need MAIL"); once the server has answered 250
to the message, nothing after it (a QUIT refused or dropped) is a failure. Errors carry
the reply code only: servers often echo the address in their text.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import smtplib
import socket
import ssl
from email import policy as email_policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, formataddr
from typing import ClassVar, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from careloop import reply_token
from careloop.clock import Clock, SystemClock
from careloop.errors import PermanentError, TransientError
from careloop.tables import OutboxItem
from channels.base import ChannelCaps, ChannelConfig, DeliveryUncertain, Receipt, SentMemory
from channels.twilio_sms import LOOPBACK, check_url

log = logging.getLogger("careloop.channels.smtp_email")

Security = Literal["starttls", "tls", "none"]
ESCALATION_PURPOSE = "escalation"  # orchestrator/escalation.py: notices to staff
# Bodies in 7-bit transfer encodings (quoted-printable or base64 for non-ASCII text, such as
# the Spanish templates): the default policy would send raw 8-bit bytes, which RFC 6152
# allows only to a server that advertises 8BITMIME and with MAIL ... BODY=8BITMIME.
MIME_POLICY = email_policy.default.clone(cte_type="7bit")


def _email(v: str) -> str:
    try:
        addr = Address(addr_spec=v)
    except (ValueError, IndexError):
        raise ValueError("must be an email address like clinic@example.org") from None
    if not addr.domain or not addr.username:
        raise ValueError("must be an email address like clinic@example.org")
    return v


class SmtpEmailConfig(ChannelConfig):
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(587, ge=1, le=65535)
    security: Security = Field("starttls", description="starttls (587), tls (465) or none (loopback)")
    username: str | None = None
    password: SecretStr | None = None
    ca_file: str | None = Field(None, description="PEM file of CAs to trust (private CA)")
    from_address: str = Field(description="envelope and header sender")
    from_name: str | None = None
    reply_to: str | None = Field(None, description="reply address; each message gets its own +token")
    reply_secret: SecretStr | None = Field(
        None, min_length=16, description="HMAC key of reply tokens; the inbound connector's reply_secret"
    )
    message_id_domain: str | None = Field(None, description="right side of Message-ID; default: from domain")
    list_unsubscribe_url: str | None = Field(None, description="https URL; '{key}' -> outbox key")
    list_unsubscribe_mailto: str | None = None
    timeout_seconds: float = Field(30.0, gt=0, le=300)

    @field_validator("from_address", "reply_to", "list_unsubscribe_mailto")
    @classmethod
    def _emails(cls, v: str | None) -> str | None:
        return None if v is None else _email(v)

    @field_validator("list_unsubscribe_url")
    @classmethod
    def _unsub_url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        check_url(v.replace("{key}", "k").split("?", 1)[0], loopback_http=True)
        if not v.startswith("https://"):
            raise ValueError("must be an https URL (RFC 8058 one-click unsubscribe)")
        return v

    @model_validator(mode="after")
    def _credentials(self) -> SmtpEmailConfig:
        if (self.username is None) != (self.password is None):
            raise ValueError("username, password: set both or neither")
        if self.username and self.security == "none" and self.host not in LOOPBACK:
            raise ValueError("security: refusing to send the password unencrypted; use starttls or tls")
        if self.security == "none" and self.host not in LOOPBACK:
            raise ValueError("security: 'none' is allowed only towards 127.0.0.1/localhost")
        if self.reply_to and self.reply_secret is None:
            raise ValueError("reply_secret: required with reply_to (replies are verified by their token)")
        room = reply_token.MAX_LOCAL_PART - 1 - reply_token.HEX_KEY_TOKEN_CHARS
        if self.reply_to and len(self.reply_to.rsplit("@", 1)[0]) > room:
            raise ValueError("reply_to: local part too long to carry a reply token")
        return self


class SmtpEmailChannel:
    """Sends one MIME message per outbox item through an SMTP submission server."""

    name: ClassVar[str] = "smtp_email"
    Config: ClassVar[type[SmtpEmailConfig]] = SmtpEmailConfig
    capabilities: ClassVar[ChannelCaps] = ChannelCaps(
        template_kind="email", address_kind="email", max_phi="limited", receipts=False, can_query_status=False
    )

    def __init__(self, id: str, config: SmtpEmailConfig, clock: Clock | None = None) -> None:
        self.id, self.config = id, config
        self.clock = clock or SystemClock()
        self._sent = SentMemory()
        self._domain = config.message_id_domain or config.from_address.rsplit("@", 1)[1]

    def __repr__(self) -> str:
        return f"SmtpEmailChannel(id={self.id!r}, host={self.config.host!r}, port={self.config.port})"

    def message_id(self, key: str) -> str:
        return f"<co-{hashlib.sha256(key.encode()).hexdigest()[:32]}@{self._domain}>"

    def reply_address(self, key: str) -> str:
        """``reply_to`` tagged with the reply token of outbox ``key``."""
        cfg = self.config
        assert cfg.reply_to and cfg.reply_secret
        tagged = reply_token.address(cfg.reply_to, cfg.reply_secret.get_secret_value().encode(), key)
        if tagged is None:  # a key too long for a local part (house keys are 32 hex: never)
            raise PermanentError(f"channel {self.id}: outbox key too long for a reply token")
        return tagged

    def build(self, item: OutboxItem) -> EmailMessage:
        """The MIME message for ``item`` (pure; no I/O)."""
        c = item.content
        subject, text, html = c.get("subject"), c.get("text"), c.get("html")
        if not isinstance(subject, str) or not isinstance(text, str) or not text:
            raise PermanentError(f"channel {self.id}: outbox content needs 'subject' and 'text'")
        try:
            _email(item.recipient)
        except ValueError:
            raise PermanentError(f"channel {self.id}: recipient is not an email address") from None
        cfg = self.config
        msg = EmailMessage(policy=MIME_POLICY)
        msg["From"] = formataddr((cfg.from_name, cfg.from_address)) if cfg.from_name else cfg.from_address
        msg["To"] = self._ascii(item.recipient)
        msg["Subject"] = subject
        msg["Date"] = format_datetime(self.clock.now())
        msg["Message-ID"] = self.message_id(item.key)
        # An escalation notice goes to staff about a patient: a staff reply must not act as
        # the patient's, so it carries no token (its replies arrive unverified); nor may a
        # staff member's unsubscribe button (one-click, keyed by this outbox item, whose
        # person is the patient) opt the patient out. Staff notices are no mailing list.
        to_staff = item.purpose == ESCALATION_PURPOSE
        if cfg.reply_to and cfg.reply_secret:
            msg["Reply-To"] = cfg.reply_to if to_staff else self.reply_address(item.key)
        unsub = []
        if cfg.list_unsubscribe_url and not to_staff:
            unsub.append(f"<{cfg.list_unsubscribe_url.replace('{key}', item.key)}>")
        if cfg.list_unsubscribe_mailto and not to_staff:
            unsub.append(f"<mailto:{cfg.list_unsubscribe_mailto}?subject=unsubscribe>")
        if unsub:
            msg["List-Unsubscribe"] = ", ".join(unsub)
            if cfg.list_unsubscribe_url:
                msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(text)
        if isinstance(html, str) and html:
            msg.add_alternative(html, subtype="html")
        return msg

    async def send(self, item: OutboxItem) -> Receipt:
        prior = self._sent.get(item.key)
        if prior is not None:
            return prior
        msg = self.build(item)
        await asyncio.to_thread(self._submit, msg, self._ascii(item.recipient))
        receipt = Receipt("sent", provider_id=str(msg["Message-ID"]))
        self._sent[item.key] = receipt
        log.debug("channel %s sent outbox key %s", self.id, item.key)
        return receipt

    def _ascii(self, address: str) -> str:
        """``address`` as plain SMTP carries it: an internationalised domain in its IDNA
        (xn--) form. A non-ASCII mailbox name would need SMTPUTF8, which is not used here:
        a permanent error that does not repeat the address (PHI)."""
        local, _, domain = address.rpartition("@")
        if not local.isascii():
            raise PermanentError(f"channel {self.id}: recipient's mailbox name is not ASCII (no SMTPUTF8)")
        if domain.isascii():
            return address
        try:
            return f"{local}@{domain.encode('idna').decode('ascii')}"
        except UnicodeError:
            raise PermanentError(f"channel {self.id}: recipient's domain is not a valid IDNA name") from None

    def _tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.config.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def _submit(self, msg: EmailMessage, rcpt: str) -> None:
        cfg, what = self.config, f"channel {self.id}: smtp"
        phase = "connect"
        try:
            smtp: smtplib.SMTP
            if cfg.security == "tls":
                smtp = smtplib.SMTP_SSL(cfg.host, cfg.port, timeout=cfg.timeout_seconds, context=self._tls())
            else:
                smtp = smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout_seconds)
            with smtp:
                phase = "ehlo"
                smtp.ehlo()
                if cfg.security == "starttls":
                    phase = "starttls"
                    smtp.starttls(context=self._tls())
                    smtp.ehlo()
                if cfg.username and cfg.password:
                    phase = "auth"
                    smtp.login(cfg.username, cfg.password.get_secret_value())
                phase = "mail"
                # smtplib returns MAIL's reply instead of raising: a refused MAIL (451 while
                # the server is busy) would otherwise surface as RCPT's "503 need MAIL
                # first", a permanent error, and the message be dead-lettered.
                code, _ = smtp.mail(cfg.from_address)
                if code != 250:
                    raise smtplib.SMTPSenderRefused(code, b"", cfg.from_address)
                phase = "rcpt"
                code, _ = smtp.rcpt(rcpt)
                if code not in (250, 251):
                    raise smtplib.SMTPRecipientsRefused({rcpt: (code, b"")})
                phase = "data"  # from here on the server may have the message
                # CRLF line ends: smtplib sends bytes as given, and bare LFs are refused by
                # strict servers (RFC 5321 2.3.8) or read as one over-long line.
                code, _ = smtp.data(msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))
                if code != 250:  # smtplib returns the final reply instead of raising
                    raise smtplib.SMTPDataError(code, b"")
                phase = "quit"
        except smtplib.SMTPAuthenticationError as exc:
            raise PermanentError(f"{what}: authentication failed ({exc.smtp_code})") from None
        except smtplib.SMTPNotSupportedError:
            raise PermanentError(f"{what}: the server does not support {phase.upper()}") from None
        except smtplib.SMTPRecipientsRefused as exc:
            code = next(iter(exc.recipients.values()))[0]
            raise _by_code(code, f"{what}: recipient refused ({code})") from None
        except smtplib.SMTPResponseException as exc:
            if phase == "quit":
                # The server took the message (250 after DATA); a QUIT answered with
                # anything but 221 is no failure, and a retry would deliver it twice.
                return
            raise _by_code(exc.smtp_code, f"{what}: {phase} refused ({exc.smtp_code})") from None
        except ssl.SSLCertVerificationError:
            raise PermanentError(f"{what}: server TLS certificate not trusted (see ca_file)") from None
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            if phase == "quit":
                return  # QUIT failing after the server took the message is no failure
            err = DeliveryUncertain if phase == "data" else TransientError
            kind = "timed out" if isinstance(exc, socket.timeout | TimeoutError) else type(exc).__name__
            raise err(f"{what}: connection lost during {phase} ({kind})") from None

    async def status(self, item: OutboxItem) -> Receipt | None:
        return self._sent.get(item.key)  # SMTP has no way to ask

    async def aclose(self) -> None:
        return None


def _by_code(code: int, message: str) -> TransientError | PermanentError:
    return TransientError(message) if 400 <= code < 500 else PermanentError(message)
