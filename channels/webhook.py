"""``webhook``: POSTs each outbox item as JSON to a configured URL, signed per Standard Webhooks.

Headers (https://www.standardwebhooks.com): ``webhook-id`` is the outbox key (stable
across retries, so the receiver de-duplicates on it), ``webhook-timestamp`` the Unix
time of this attempt, ``webhook-signature`` ``v1,<base64 HMAC-SHA256>`` over
``"{id}.{timestamp}.{body}"`` keyed with the base64 part of the ``whsec_`` secret.

Body: ``{"type": "careloop.outreach", "timestamp": ISO-8601, "data": {key, channel,
person_id, template, playbook, purpose, subject_ref, phi_class, recipient, content}}``.

Errors: as ``channels/_http.py``. A 401 rejects what authenticates every delivery alike (the
signature with the channel's one secret, its timestamp): ``ChannelUnavailable``, so a secret
rotated on the receiver but not here leaves the items pending, uncounted, instead of dead-
lettering each, and ``health()`` reports the channel degraded until a delivery succeeds. A
403 stays permanent: it is also what web application firewalls and proxies answer to a body
they refuse, which concerns one item, and as ``ChannelUnavailable`` (never counted) such an
item would hold the channel back every time it came up, for ever; a receiver that answers a
bad signature with 403 dead-letters items, which ``careloop deadletters retry`` sends again.

Because receivers de-duplicate on ``webhook-id`` (the standard's contract), a send
interrupted by a crash is resent with the same id on recovery (``status()`` answers
``ABSENT``) unless ``resend_on_recovery`` is off, in which case it becomes ``unknown``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import time
from datetime import UTC, datetime
from typing import ClassVar

import httpx
from pydantic import Field, SecretStr, field_validator

from careloop.errors import PermanentError
from careloop.plugins import Health
from careloop.tables import OutboxItem
from channels import _http
from channels.base import ABSENT, ChannelCaps, ChannelConfig, Receipt, SentMemory
from channels.twilio_sms import check_url

log = logging.getLogger("careloop.channels.webhook")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one delivery."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class WebhookConfig(ChannelConfig):
    url: str = Field(description="receiver URL (https; http only to 127.0.0.1/localhost)")
    secret: SecretStr = Field(description="Standard Webhooks signing secret, whsec_<base64>")
    timeout_seconds: float = Field(10.0, gt=0, le=120)
    event_type: str = Field("careloop.outreach", min_length=1, max_length=64)
    resend_on_recovery: bool = True

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_url(v)

    @field_validator("secret")
    @classmethod
    def _secret(cls, v: SecretStr) -> SecretStr:
        raw = v.get_secret_value()
        if not raw.startswith("whsec_"):
            raise ValueError("must start with whsec_")
        try:
            key = base64.b64decode(raw.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("must be whsec_ followed by base64") from None
        if len(key) < 24:
            raise ValueError("must hold at least 24 random bytes")
        return v


class WebhookChannel:
    """Delivers outbox items to an HTTP receiver with Standard Webhooks signatures."""

    name: ClassVar[str] = "webhook"
    Config: ClassVar[type[WebhookConfig]] = WebhookConfig
    capabilities: ClassVar[ChannelCaps] = ChannelCaps(
        template_kind="json",
        address_kind="none",
        max_phi="limited",
        receipts=False,
        can_query_status=True,
        idempotent_key=True,
    )

    def __init__(self, id: str, config: WebhookConfig, http: httpx.AsyncClient | None = None) -> None:
        self.id, self.config = id, config
        self._own_http = http is None
        self._http = http or _http.new_client()
        self._sent = SentMemory()
        self._credentials = _http.Credentials(frozenset({401}))

    def __repr__(self) -> str:
        return f"WebhookChannel(id={self.id!r})"

    def health(self) -> Health:
        """Degraded, with the reason, while the receiver rejects the channel's signature."""
        return self._credentials.health()

    def payload(self, item: OutboxItem) -> bytes:
        doc = {
            "type": self.config.event_type,
            "timestamp": datetime.now(UTC).isoformat(),
            "data": {
                "key": item.key,
                "channel": self.id,
                "person_id": item.person_id,
                "template": item.template,
                "playbook": item.playbook,
                "purpose": item.purpose,
                "subject_ref": item.subject_ref,
                "phi_class": item.phi_class,
                "recipient": item.recipient,
                "content": item.content,
            },
        }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, default=str).encode()

    async def send(self, item: OutboxItem) -> Receipt:
        prior = self._sent.get(item.key)
        if prior is not None:
            return prior
        what = f"channel {self.id}: webhook"
        if len(item.key) > 255:
            raise PermanentError(f"{what}: outbox key too long for webhook-id")
        body = self.payload(item)
        ts = int(time.time())  # the receiver checks it against its own wall clock
        headers = {
            "content-type": "application/json",
            "webhook-id": item.key,
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(self.config.secret.get_secret_value(), item.key, ts, body),
        }
        resp = await _http.call(
            self._http,
            what,
            "POST",
            self.config.url,
            content=body,
            headers=headers,
            timeout=self.config.timeout_seconds,
        )
        _http.check(resp, what, self._credentials)
        receipt = Receipt("delivered", provider_id=item.key, detail={"http_status": resp.status_code})
        self._sent[item.key] = receipt
        log.debug("channel %s delivered outbox key %s", self.id, item.key)
        return receipt

    async def status(self, item: OutboxItem) -> Receipt | None:
        prior = self._sent.get(item.key)
        if prior is not None:
            return prior
        return Receipt(ABSENT) if self.config.resend_on_recovery else None

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()
