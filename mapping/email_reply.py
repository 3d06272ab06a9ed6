"""Email replies -> ``message.inbound`` (and opt-out/opt-in) events. Pure.

Who wrote is decided by the reply token, never by ``From`` (anyone can write any From):
a reply addressed (SMTP envelope recipient, ``To``, ``Cc``, ``Delivered-To`` or
``X-Original-To``) to ``<local>+<token>@...`` with a token valid under ``reply_secret``
(careloop/reply_token.py) names the outbox item it answers, and identity resolution
links it to that item's person (``kind="outbox"``), even when ``From`` differs (a
forwarded message). Without a valid token the reply is *unverified*: it is mapped for
staff to see (``message.inbound`` with ``unverified: true``, identified by its From
address, which may match an existing person but never creates one) and only an opt-out
is acted on, since honouring a STOP is always safe; START, confirmations and cancels
are not (the orchestrator checks ``unverified`` too).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from email.utils import getaddresses, parseaddr, parsedate_to_datetime
from typing import Any, ClassVar

from pydantic import SecretStr

from careloop import reply_token
from careloop.clock import utc
from careloop.errors import ConfigError, PermanentError
from careloop.model import Identifier, MappedEvent
from careloop.tables import RawMessage

MAX_BODY = 2000
OUTBOX_SYSTEM = "urn:careloop:outbox"  # careloop/identity.py OUTBOX_KIND
RCPT_HEADER = "rcpt_to"  # connectors/smtp_inbound.py: the SMTP envelope recipients
_ADDRESS_HEADERS = ("To", "Cc", "Delivered-To", "X-Original-To")
_QUOTE_INTRO = re.compile(r"^(on .+ wrote:|el .+ escribió:|-----original message-----)\s*$", re.I)


def reply_text(msg: EmailMessage) -> str:
    """The new text of a reply: the plain-text part without quoted history or signature."""
    part = msg.get_body(preferencelist=("plain",))
    text = part.get_content() if part is not None else ""
    lines = []
    for line in str(text).splitlines():
        if line.startswith(">") or _QUOTE_INTRO.match(line.strip()) or line.strip() == "--":
            break
        lines.append(line)
    return "\n".join(lines).strip()[:MAX_BODY]


def keyword(subject: str, text: str) -> str | None:
    first = (text.split() or [""])[0].strip(".!").upper()
    words = (subject + " " + text).upper()
    if first in ("STOP", "UNSUBSCRIBE") or re.search(r"\bUNSUBSCRIBE\b", subject.upper()):
        return "stop"
    if first in ("START", "SUBSCRIBE"):
        return "start"
    if first in ("C", "CONFIRM", "YES") and len(text.split()) <= 3:
        return "confirm"
    if first == "HELP" and "HELP" in words:
        return "help"
    return None


def recipients(msg: EmailMessage, headers: dict[str, Any]) -> list[str]:
    """Every address the message was delivered to: the envelope first, then the headers."""
    fields = [str(headers.get(RCPT_HEADER) or "")]
    for name in _ADDRESS_HEADERS:
        fields.extend(str(v) for v in msg.get_all(name, []))
    return [addr for _, addr in getaddresses(fields) if "@" in addr]


class EmailReplyMapper:
    """Maps replies to our emails; ``reply_secret`` (the connector's) verifies reply tokens."""

    name: ClassVar[str] = "email_reply"
    accepts: ClassVar[frozenset[str]] = frozenset({"email:*"})

    def __init__(self, reply_secret: SecretStr | str | None = None) -> None:
        if isinstance(reply_secret, SecretStr):
            reply_secret = reply_secret.get_secret_value()
        if reply_secret is not None and len(reply_secret) < 16:
            raise ConfigError(["email_reply.reply_secret: at least 16 characters"])
        self._secret = reply_secret.encode() if reply_secret else None

    def __repr__(self) -> str:
        return f"EmailReplyMapper(verifies_tokens={self._secret is not None})"

    def outbox_key(self, msg: EmailMessage, headers: dict[str, Any]) -> tuple[str | None, bool]:
        """(the outbox key a valid reply token names, whether some token failed to verify)."""
        bad = False
        for addr in recipients(msg, headers):
            token = reply_token.token_of(addr)
            if token is None:
                continue
            key = reply_token.verify(self._secret, token) if self._secret else None
            if key is not None:
                return key, False
            bad = True
        return None, bad

    def map(self, raw: RawMessage) -> Sequence[MappedEvent]:
        msg = message_from_bytes(raw.body, policy=default_policy)
        assert isinstance(msg, EmailMessage)
        key, bad_token = self.outbox_key(msg, dict(raw.headers or {}))
        _, sender = parseaddr(str(msg.get("From", "")))
        if key is None and "@" not in sender:
            raise PermanentError("email reply has no usable From address")
        try:
            at = utc(parsedate_to_datetime(str(msg["Date"]))) if msg["Date"] else utc(raw.received_at)
        except (TypeError, ValueError):
            at = utc(raw.received_at)
        if at.tzinfo is None:
            at = utc(raw.received_at)
        subject = str(msg.get("Subject", ""))
        text = reply_text(msg)
        kw = keyword(subject, text)
        attrs: dict[str, Any] = {
            "channel": "email",
            "body": text,
            "keyword": kw,
            "in_reply_to": str(msg.get("In-Reply-To", "")).strip() or None,
        }
        if key is not None:
            who = [Identifier(OUTBOX_SYSTEM, key, kind="outbox")]
            attrs["reply_to_outbox"] = key
            extra: dict[str, Any] = {}
        else:
            who = [Identifier("email", sender.lower(), kind="email")]
            # Kept for staff: what the message asked for, which is not acted on.
            attrs.update(unverified=True, keyword=kw if kw == "stop" else None, claimed_keyword=kw)
            attrs["reply_token"] = "invalid" if bad_token else "missing"
            extra = {"unverified": True}
        events = [MappedEvent("message.inbound", at, who, attributes=attrs)]
        consent = {"channel": "email", "purpose": "*", "source": "email-reply", **extra}
        if kw == "stop":
            events.append(MappedEvent("consent.revoked", at, who, attributes=consent))
        elif kw == "start" and key is not None:
            events.append(MappedEvent("consent.granted", at, who, attributes=consent))
        return events
