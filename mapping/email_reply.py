"""Email replies -> ``message.inbound`` (and opt-out/opt-in) events. Pure."""

from __future__ import annotations

import re
from collections.abc import Sequence
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from email.utils import parseaddr, parsedate_to_datetime
from typing import ClassVar

from careloop.clock import utc
from careloop.errors import PermanentError
from careloop.model import Identifier, MappedEvent
from careloop.tables import RawMessage

MAX_BODY = 2000
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


class EmailReplyMapper:
    name: ClassVar[str] = "email_reply"
    accepts: ClassVar[frozenset[str]] = frozenset({"email:*"})

    def map(self, raw: RawMessage) -> Sequence[MappedEvent]:
        msg = message_from_bytes(raw.body, policy=default_policy)
        assert isinstance(msg, EmailMessage)
        _, sender = parseaddr(str(msg.get("From", "")))
        if "@" not in sender:
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
        who = [Identifier("email", sender.lower(), kind="email")]
        attrs = {
            "channel": "email",
            "body": text,
            "keyword": kw,
            "in_reply_to": str(msg.get("In-Reply-To", "")).strip() or None,
        }
        events = [MappedEvent("message.inbound", at, who, attributes=attrs)]
        if kw == "stop":
            events.append(
                MappedEvent(
                    "consent.revoked",
                    at,
                    who,
                    attributes={"channel": "email", "purpose": "*", "source": "email-reply"},
                )
            )
        elif kw == "start":
            events.append(
                MappedEvent(
                    "consent.granted",
                    at,
                    who,
                    attributes={"channel": "email", "purpose": "*", "source": "email-reply"},
                )
            )
        return events
