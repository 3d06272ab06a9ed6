"""``smtp_inbound``: replies to our emails, received over SMTP on loopback or a relay.

A small SMTP server (aiosmtpd's protocol on this process's event loop). Each message
is stored before the server answers 250, so a message the relay was told we accepted is
never lost; a store failure answers 451 and the relay retries. Only recipients in
``reply_domain`` are accepted (550 otherwise), and messages over ``max_message_bytes`` are
refused (552) before they are stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping, Sequence
from email import message_from_bytes
from email.policy import default as default_policy
from typing import ClassVar

from aiosmtpd.smtp import SMTP, Envelope, Session
from pydantic import Field

from careloop.config import Port
from careloop.model import RawIn
from careloop.plugins import MapperChoice, PluginConfig
from connectors.base import Health, RawSink

log = logging.getLogger("careloop.connectors.smtp_inbound")
KIND = "email:inbound"


class SmtpInboundConfig(PluginConfig):
    plugin: str = "smtp_inbound"
    host: str = "127.0.0.1"
    port: Port = 2526
    reply_domain: str = Field(description="the domain our Reply-To addresses use; other recipients get 550")
    max_message_bytes: int = Field(512 * 1024, ge=1024)


class SmtpInboundConnector:
    """Receives email replies; ``accept`` takes the raw RFC 5322 bytes (replay feeds too)."""

    name: ClassVar[str] = "smtp_inbound"
    Config: ClassVar[type[SmtpInboundConfig]] = SmtpInboundConfig

    def __init__(self, id: str, config: SmtpInboundConfig) -> None:
        self.id, self.config = id, config
        self._server: asyncio.base_events.Server | None = None
        self._sink: RawSink | None = None

    def accept(self, body: bytes, headers: Mapping[str, str]) -> Sequence[RawIn]:
        msg = message_from_bytes(body, policy=default_policy)
        mid = str(msg.get("Message-ID", "")).strip() or hashlib.sha256(body).hexdigest()
        return [RawIn(self.id, KIND, body, "message/rfc822", dedup_key=mid[:255])]

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
        return MapperChoice("email_reply")


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
            await self.conn._sink.put(self.conn.accept(data, {}))
        except Exception as exc:  # the relay keeps the message and retries
            log.warning(
                "smtp message not stored", extra={"connector": self.conn.id, "error": type(exc).__name__}
            )
            return "451 4.3.0 not stored, try again later"
        return "250 OK stored"
