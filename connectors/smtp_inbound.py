"""``smtp_inbound``: replies to our emails, received over SMTP on loopback or a relay.

A small SMTP server (aiosmtpd's protocol on this process's event loop). Each message
is stored before the server answers 250, so a message the relay was told we accepted is
never lost; a store failure answers 451 and the relay retries. Only recipients in
``reply_domain`` are accepted (550 otherwise), and messages over ``max_message_bytes`` are
refused (552) before they are stored.

Replies are authenticated by the token in the address they were sent to (our emails'
``Reply-To`` is ``<local>+<token>@<reply_domain>``, careloop/reply_token.py): the
envelope recipients are kept with the message (header ``rcpt_to``) and the
``email_reply`` mapper, given the same ``reply_secret`` as the sending channel, links a
reply with a valid token to the message it answers. Anything else is only as good as its
forgeable ``From`` header and is mapped as unverified.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping, Sequence
from email import message_from_bytes
from email.policy import default as default_policy
from typing import Any, ClassVar

from aiosmtpd.smtp import SMTP, Envelope, Session
from pydantic import Field, SecretStr

from careloop.config import AppConfig, Port
from careloop.model import RawIn
from careloop.plugins import MapperChoice, PluginConfig
from connectors.base import Health, RawSink

log = logging.getLogger("careloop.connectors.smtp_inbound")
KIND = "email:inbound"
RCPT_HEADER = "rcpt_to"  # the SMTP envelope recipients, comma-separated


class SmtpInboundConfig(PluginConfig):
    plugin: str = "smtp_inbound"
    host: str = "127.0.0.1"
    port: Port = 2526
    reply_domain: str = Field(description="the domain our Reply-To addresses use; other recipients get 550")
    max_message_bytes: int = Field(512 * 1024, ge=1024)
    reply_secret: SecretStr | None = Field(
        None,
        min_length=16,
        description="HMAC key of reply tokens: the same as the smtp_email channel's; "
        "without it every reply is unverified (only opt-outs are honoured)",
    )


class SmtpInboundConnector:
    """Receives email replies; ``accept`` takes the raw RFC 5322 bytes (replay feeds too)."""

    name: ClassVar[str] = "smtp_inbound"
    Config: ClassVar[type[SmtpInboundConfig]] = SmtpInboundConfig

    def __init__(self, id: str, config: SmtpInboundConfig) -> None:
        self.id, self.config = id, config
        self._server: asyncio.base_events.Server | None = None
        self._sink: RawSink | None = None

    def __repr__(self) -> str:
        return f"SmtpInboundConnector(id={self.id!r}, port={self.config.port})"

    @staticmethod
    def check_config(cid: str, cfg: SmtpInboundConfig, app: AppConfig) -> list[str]:
        """The smtp_email channels whose ``reply_to`` is in our domain must sign their reply
        tokens with our ``reply_secret``, or every reply would arrive unverified."""
        problems = []
        mine = cfg.reply_secret.get_secret_value() if cfg.reply_secret else None
        for chid, raw in app.channels.items():
            if not isinstance(raw, dict) or raw.get("plugin") != "smtp_email":
                continue
            reply_to = str(raw.get("reply_to") or "")
            if not reply_to.lower().endswith("@" + cfg.reply_domain.lower()):
                continue
            if mine is None:
                problems.append(f"connectors.{cid}.reply_secret: required: channel {chid} sends replies here")
            elif raw.get("reply_secret") != mine:
                problems.append(
                    f"connectors.{cid}.reply_secret: differs from channels.{chid}.reply_secret "
                    "(replies would not verify)"
                )
        return problems

    def accept(self, body: bytes, headers: Mapping[str, str]) -> Sequence[RawIn]:
        msg = message_from_bytes(body, policy=default_policy)
        mid = str(msg.get("Message-ID", "")).strip() or hashlib.sha256(body).hexdigest()
        keep = {RCPT_HEADER: headers[RCPT_HEADER][:2000]} if headers.get(RCPT_HEADER) else {}
        return [RawIn(self.id, KIND, body, "message/rfc822", dedup_key=mid[:255], headers=keep)]

    async def start(self, sink: RawSink) -> None:
        self._sink = sink
        loop = asyncio.get_running_loop()
        handler = _Handler(self)
        self._server = await loop.create_server(
            lambda: SMTP(
                handler,
                data_size_limit=self.config.max_message_bytes,
                enable_SMTPUTF8=True,
                hostname="careloop",
            ),
            self.config.host,
            self.config.port,
        )
        log.info("smtp listener started", extra={"connector": self.id, "port": self.config.port})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def health(self) -> Health:
        return Health(self._server is not None, "" if self._server else "not listening")

    def router(self) -> None:
        return None

    def mapper_choice(self) -> MapperChoice:
        options: dict[str, Any] = {}
        if self.config.reply_secret is not None:
            options["reply_secret"] = self.config.reply_secret  # a SecretStr: repr stays masked
        return MapperChoice("email_reply", options)


class _Handler:
    def __init__(self, conn: SmtpInboundConnector) -> None:
        self.conn = conn

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if not address.lower().endswith("@" + self.conn.config.reply_domain.lower()):
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        assert self.conn._sink is not None
        try:
            rcpts = {RCPT_HEADER: ", ".join(envelope.rcpt_tos)}
            await self.conn._sink.put(self.conn.accept(data, rcpts))
        except Exception as exc:  # the relay keeps the message and retries
            log.warning(
                "smtp message not stored", extra={"connector": self.conn.id, "error": type(exc).__name__}
            )
            return "451 4.3.0 not stored, try again later"
        return "250 OK stored"
