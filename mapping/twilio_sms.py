"""``twilio_sms``: Twilio SMS webhooks (stored by ``twilio_sms_inbound``) -> journey events.

``sms:inbound`` -> ``message.inbound`` for the sender's phone (``Identifier("phone",
<E.164>, kind="phone")``) with attributes ``channel``, ``body``, ``keyword``,
``message_sid``, ``to``. Keywords (case, spaces and punctuation ignored):

- opt-out, the carriers' list: STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT, REVOKE,
  OPTOUT as the whole message, or STOP/STOPALL/UNSUBSCRIBE/OPTOUT as its first word ->
  keyword ``stop`` and a ``consent.revoked`` event (channel sms, purpose ``*``) before the
  message event, so the opt-out is on record before anything reacts to the message;
- opt-in: START, UNSTOP -> ``start`` and ``consent.granted``;
- HELP, INFO -> ``help`` (the help reply is the orchestrator's decision);
- C, CONFIRM, YES -> ``confirm``;
- a longer message starting with CANCEL ("cancel my appointment") -> ``cancel``. The bare
  word CANCEL is an opt-out for carriers (they stop delivering our messages), so it never
  means "cancel the appointment".

``sms:status`` -> ``message.queued|sent|delivered|failed|read`` for the outbox row named by
``_key`` (``Identifier("urn:careloop:outbox", key, kind="outbox")``; identity resolution
maps it to the row's person). Twilio's ``undelivered`` and ``canceled`` are
``message.failed`` with the original status in ``attributes.status``; a failure with
Twilio error 21610 (the recipient has opted out at Twilio or the carrier) also records a
``consent.revoked`` for the person.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, ClassVar

from careloop.clock import utc
from careloop.errors import PermanentError, SkipMessage
from careloop.model import Identifier, MappedEvent
from careloop.tables import RawMessage

E164 = re.compile(r"^\+[1-9]\d{6,14}$")
OPT_OUT = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"})
OPT_OUT_FIRST_WORD = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "OPTOUT"})
OPT_IN = frozenset({"START", "UNSTOP"})
HELP = frozenset({"HELP", "INFO"})
CONFIRM = frozenset({"C", "CONFIRM", "YES"})
STATUS_EVENTS = {
    "accepted": "message.queued",
    "scheduled": "message.queued",
    "queued": "message.queued",
    "sending": "message.queued",
    "sent": "message.sent",
    "delivered": "message.delivered",
    "read": "message.read",
    "undelivered": "message.failed",
    "failed": "message.failed",
    "canceled": "message.failed",
}
OUTBOX_SYSTEM = "urn:careloop:outbox"
UNSUBSCRIBED_RECIPIENT = "21610"  # Twilio: "Attempt to send to unsubscribed recipient"


def keyword(body: str) -> str | None:
    """The keyword an SMS reply carries: stop|start|help|confirm|cancel, or None."""
    words = re.sub(r"[^\w\s]", " ", body).upper().split()
    if not words:
        return None
    if len(words) == 1:
        w = words[0]
        if w in OPT_OUT:
            return "stop"
        if w in OPT_IN:
            return "start"
        if w in HELP:
            return "help"
        if w in CONFIRM:
            return "confirm"
        return None
    if words[0] in OPT_OUT_FIRST_WORD:
        return "stop"
    if words[0] == "CANCEL":
        return "cancel"
    return None


class TwilioSmsMapper:
    """Pure mapping of stored Twilio webhooks to journey events."""

    name: ClassVar[str] = "twilio_sms"
    accepts: ClassVar[frozenset[str]] = frozenset({"sms:*"})

    def map(self, raw: RawMessage) -> Sequence[MappedEvent]:
        try:
            fields: Any = json.loads(raw.body)
        except ValueError:
            raise PermanentError("sms message body is not JSON") from None
        if not isinstance(fields, dict):
            raise PermanentError("sms message body is not a JSON object")
        at = utc(raw.received_at)
        if raw.kind == "sms:status":
            return self._status(fields, at)
        if raw.kind == "sms:inbound":
            return self._inbound(fields, at)
        raise SkipMessage(f"nothing to map for {raw.kind}")

    def _inbound(self, f: dict[str, Any], at: Any) -> list[MappedEvent]:
        sender = str(f.get("From") or "")
        if not E164.match(sender):
            raise SkipMessage("sender is not an E.164 phone number (short code or alphanumeric)")
        body = str(f.get("Body") or "")
        kw = keyword(body)
        who = [Identifier("phone", sender, kind="phone")]
        events: list[MappedEvent] = []
        if kw == "stop":
            events.append(
                MappedEvent(
                    "consent.revoked",
                    at,
                    list(who),
                    attributes={"channel": "sms", "purpose": "*", "keyword": kw},
                )
            )
        elif kw == "start":
            events.append(
                MappedEvent(
                    "consent.granted",
                    at,
                    list(who),
                    attributes={"channel": "sms", "purpose": "*", "keyword": kw},
                )
            )
        events.append(
            MappedEvent(
                "message.inbound",
                at,
                list(who),
                attributes={
                    "channel": "sms",
                    "body": body,
                    "keyword": kw,
                    "message_sid": f.get("MessageSid") or f.get("SmsSid"),
                    "to": f.get("To"),
                },
            )
        )
        return events

    def _status(self, f: dict[str, Any], at: Any) -> list[MappedEvent]:
        status = str(f.get("MessageStatus") or f.get("SmsStatus") or "")
        etype = STATUS_EVENTS.get(status)
        if etype is None:
            raise SkipMessage(f"status {status!r} is not a delivery status")
        key = f.get("_key")
        if not isinstance(key, str) or not key:
            raise SkipMessage("status callback without an outbox key")
        attrs = {
            "channel": "sms",
            "status": status,
            "message_sid": f.get("MessageSid") or f.get("SmsSid"),
            "outbox_key": key,
            "error_code": f.get("ErrorCode"),
        }
        who = [Identifier(OUTBOX_SYSTEM, key, kind="outbox")]
        events = [MappedEvent(etype, at, who, attributes=attrs)]
        if str(f.get("ErrorCode") or "") == UNSUBSCRIBED_RECIPIENT:
            # the carrier or Twilio holds an opt-out we never saw (a STOP sent before we
            # were listening): record it so the next message is suppressed, not refused
            events.append(
                MappedEvent(
                    "consent.revoked",
                    at,
                    list(who),
                    attributes={
                        "channel": "sms",
                        "purpose": "*",
                        "keyword": None,
                        "source": f"twilio-{UNSUBSCRIBED_RECIPIENT}",
                    },
                )
            )
        return events
