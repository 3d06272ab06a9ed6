"""``twilio_sms``: SMS through Twilio Programmable Messaging, over an injected httpx client.

Wire format (Twilio REST API 2010-04-01): a form POST to
``{base_url}/2010-04-01/Accounts/{AccountSid}/Messages.json`` with HTTP basic auth
(account SID, auth token) and the fields ``To``, ``From`` or ``MessagingServiceSid``,
``Body`` and ``StatusCallback``; Twilio answers 201 with the Message resource (``sid``
``SM...``, ``status`` queued/accepted). ``StatusCallback`` is
``{status_callback_url}/status?key=<outbox key>`` so each delivery report names its
outbox row (the ``twilio_sms_inbound`` connector stores it as ``_key``).

Errors: as ``channels/_http.py`` (429, 5xx, timeouts transient; other 4xx permanent), except
the Twilio codes in ``TRANSIENT_CODES`` (21611, the sender's queue is full), which are
transient whatever the HTTP status, and a rejection of the account SID and auth token (HTTP
401, or Twilio error 20003 "Authenticate" under any status: a rotated or deleted auth token,
a suspended account) and a refusal of the account itself (``ACCOUNT_REFUSED``, under any
status: 20403 "403 Forbidden", the account suspended or closed; 20005 and 10001, the account
not active), which are ``ChannelUnavailable``: every pending message waits, uncounted,
instead of each being dead-lettered, and ``health()`` reports the channel degraded until a
request succeeds. A 403 with any other code stays permanent: Twilio answers 403 for things
that concern one message (a destination region not enabled, 21408), which must not hold
every other message back; so do the other per-message errors (21211, an invalid 'To').
Once Twilio has answered 2xx the message exists: an answer that cannot be read (not JSON, no
sid) is ``DeliveryUncertain``, settled by the lookup below, never retried blindly.

Idempotency and crash recovery, honestly: Twilio's Messages API has no idempotency key,
and the message SID is only known once Twilio answers, so it cannot be committed before
the call. Within one process the channel remembers the keys it sent. After a crash the
outbox finds the item in ``sending`` and calls ``status()``, which lists the messages
sent to the item's ``To`` (and from its ``From``) and looks for one created since the
attempt started whose body equals the item's text:

- exactly one match: that is our message; its SID and status are adopted (no resend);
- several matches: we cannot tell which is ours, so ``None`` (the outbox marks the item
  ``unknown`` for staff review);
- no match: by default also ``None`` -> ``unknown``, because a missing match is not
  proof of absence (Smart Encoding may rewrite the stored body, the list may lag, the
  message may be past ``lookup_pages``). With ``resend_if_absent: true`` the channel
  answers ``ABSENT`` instead and the outbox sends again: choose it only where a rare
  duplicate is better than a rare missed reminder.

A match by content is not proof of ownership: another outbox item may have sent the same
text to the same phone within the window (a second reminder with the same wording, one
message each to two people sharing a phone). The outbox therefore does not adopt a SID
that another outbox row already holds, nor one that the lookup of another item in the
same recovery pass also found (both crashed): that item becomes ``unknown`` for staff
review, even with ``resend_if_absent``, since the lookup did not find nothing but an
identical text already on that phone, which a resend would duplicate. A twin still in
flight in a live worker (no SID yet) is not seen by that check.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
from pydantic import Field, SecretStr, field_validator, model_validator

from careloop.clock import utc
from careloop.errors import PermanentError, RecipientOptedOut, TransientError
from careloop.plugins import Health
from careloop.tables import OutboxItem
from channels import _http
from channels.base import ABSENT, ChannelCaps, ChannelConfig, DeliveryUncertain, Receipt, SentMemory
from channels.sms_encoding import DEFAULT_MAX_SEGMENTS, check_sms_length, measure, template_estimate

log = logging.getLogger("careloop.channels.twilio_sms")

E164 = re.compile(r"^\+[1-9]\d{6,14}$")
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})

# Twilio message statuses -> the receipt statuses the outbox knows.
STATUS_MAP = {
    "accepted": "queued",
    "scheduled": "queued",
    "queued": "queued",
    "sending": "queued",
    "sent": "sent",
    "delivered": "delivered",
    "read": "delivered",
    "undelivered": "failed",
    "failed": "failed",
    "canceled": "failed",
}


# Twilio error codes that a 4xx carries for a condition that passes: 21611, the sender's
# queue holds more than its validity period of messages ("slow down your sending rate";
# https://www.twilio.com/docs/api/errors/21611). Dead-lettering would drop every message
# of a large batch; retrying with backoff lets the queue drain first.
TRANSIENT_CODES = frozenset({"21611"})
# "Attempt to send to unsubscribed recipient": a STOP held by Twilio or the carrier.
UNSUBSCRIBED_RECIPIENT = "21610"
# "Authenticate" / "Permission Denied": the account SID and auth token were not accepted
# (https://www.twilio.com/docs/api/errors/20003); Twilio sends it with HTTP 401.
AUTHENTICATE = "20003"
# Twilio REST API errors that refuse the account itself, whatever the message: the account
# may not use the API at all, so every message would get the same answer. Matched by code
# under any HTTP status: Twilio's pages name the status of 20403 only ("403 Forbidden").
# https://www.twilio.com/docs/api/errors/20403
# https://www.twilio.com/docs/api/errors/20005
# https://www.twilio.com/docs/api/errors/10001
ACCOUNT_REFUSED = {
    "20403": "account suspended or closed",  # "403 Forbidden": lacks permission to use the API
    "20005": "account not active",  # out of funds, or a free trial not activated
    "10001": "account not active",  # suspended: balance at or below 0, policy, parent account
}


def check_url(v: str, *, loopback_http: bool = True) -> str:
    """An absolute http(s) URL; plain http only towards this machine (secrets travel on it)."""
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http(s) URL")
    if parts.scheme == "http" and not (loopback_http and parts.hostname in LOOPBACK):
        raise ValueError("must use https (plain http is allowed only to 127.0.0.1/localhost)")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    return v.rstrip("/")


class TwilioSmsConfig(ChannelConfig):
    base_url: str = Field("https://api.twilio.com", description="Twilio API root (loopback in tests)")
    account_sid: str = Field(pattern=r"^AC[0-9a-fA-F]{32}$", description="Twilio account SID (AC...)")
    auth_token: SecretStr = Field(description="Twilio auth token")
    from_number: str | None = Field(None, description="sender in E.164; or messaging_service_sid")
    messaging_service_sid: str | None = Field(None, pattern=r"^MG[0-9a-fA-F]{32}$")
    status_callback_url: str | None = Field(
        None, description="public URL of the twilio_sms_inbound connector; '/status?key=...' is appended"
    )
    max_segments: int = Field(DEFAULT_MAX_SEGMENTS, ge=1, le=10)
    timeout_seconds: float = Field(10.0, gt=0, le=120)
    lookup_pages: int = Field(5, ge=1, le=50, description="pages of 50 read when looking a message up")
    resend_if_absent: bool = Field(False, description="after a crash, resend when the lookup finds nothing")

    @field_validator("auth_token")
    @classmethod
    def _token(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value():
            raise ValueError("must not be empty")
        return v

    @field_validator("from_number")
    @classmethod
    def _e164(cls, v: str | None) -> str | None:
        if v is not None and not E164.match(v):
            raise ValueError("must be an E.164 phone number like +15550100000")
        return v

    @field_validator("base_url")
    @classmethod
    def _base(cls, v: str) -> str:
        return check_url(v)

    @field_validator("status_callback_url")
    @classmethod
    def _callback(cls, v: str | None) -> str | None:
        return None if v is None else check_url(v)

    @model_validator(mode="after")
    def _one_sender(self) -> TwilioSmsConfig:
        if (self.from_number is None) == (self.messaging_service_sid is None):
            raise ValueError("from_number, messaging_service_sid: set exactly one of them")
        return self


class TwilioSmsChannel:
    """Sends SMS through Twilio's Messages API; recovers by listing messages (see module doc)."""

    name: ClassVar[str] = "twilio_sms"
    Config: ClassVar[type[TwilioSmsConfig]] = TwilioSmsConfig
    capabilities: ClassVar[ChannelCaps] = ChannelCaps(
        template_kind="sms",
        address_kind="phone",
        max_phi="none",
        max_length=None,
        receipts=True,
        can_query_status=True,
    )

    def __init__(self, id: str, config: TwilioSmsConfig, http: httpx.AsyncClient | None = None) -> None:
        self.id, self.config = id, config
        self._own_http = http is None
        self._http = http or _http.new_client()
        self._auth = httpx.BasicAuth(config.account_sid, config.auth_token.get_secret_value())
        self._sent = SentMemory()
        self._messages = f"{config.base_url}/2010-04-01/Accounts/{config.account_sid}/Messages"
        self._credentials = _http.Credentials(frozenset({401}), frozenset({AUTHENTICATE}), ACCOUNT_REFUSED)

    def __repr__(self) -> str:
        return f"TwilioSmsChannel(id={self.id!r}, account_sid={self.config.account_sid!r})"

    @classmethod
    def check_template(cls, template: Any, config: TwilioSmsConfig | None = None) -> list[str]:
        """Config-check hook (``careloop.wiring.check`` calls it for every template): an SMS
        body that would exceed ``max_segments`` is a problem. ``template`` is a template
        config (its ``sms`` bodies per language are checked) or one body as a string;
        placeholders are counted at ``PLACEHOLDER_WIDTH`` characters each."""
        limit = config.max_segments if config is not None else DEFAULT_MAX_SEGMENTS
        if isinstance(template, str):
            bodies = {"": template}
        else:
            bodies = {
                str(k): v for k, v in (getattr(template, "sms", None) or {}).items() if isinstance(v, str)
            }
        problems = []
        for lang, text in bodies.items():
            for p in check_sms_length(template_estimate(text), limit):
                problems.append(f"sms.{lang} {p}" if lang else p)
        return problems

    def health(self) -> Health:
        """Degraded, with the reason, while Twilio rejects the account's credentials or
        refuses the account (suspended, closed, not active)."""
        return self._credentials.health()

    def _what(self, op: str) -> str:
        return f"channel {self.id}: twilio {op}"

    async def send(self, item: OutboxItem) -> Receipt:
        prior = self._sent.get(item.key)
        if prior is not None:
            return prior
        text = item.content.get("text")
        if not isinstance(text, str) or not text:
            raise PermanentError(f"{self._what('send')}: outbox content has no 'text'")
        if not E164.match(item.recipient):
            raise PermanentError(f"{self._what('send')}: recipient is not an E.164 phone number")
        size = measure(text)
        if size.segments > self.config.max_segments:
            raise PermanentError(
                f"{self._what('send')}: message is {size.segments} segments ({size.encoding}), "
                f"more than max_segments {self.config.max_segments}"
            )
        form: dict[str, str] = {"To": item.recipient, "Body": text}
        if self.config.messaging_service_sid:
            form["MessagingServiceSid"] = self.config.messaging_service_sid
        else:
            assert self.config.from_number is not None
            form["From"] = self.config.from_number
        if self.config.status_callback_url:
            callback = httpx.URL(f"{self.config.status_callback_url}/status", params={"key": item.key})
            form["StatusCallback"] = str(callback)
        what = self._what("send")
        resp = await _http.call(
            self._http,
            what,
            "POST",
            f"{self._messages}.json",
            data=form,
            auth=self._auth,
            timeout=self.config.timeout_seconds,
            uncertain=True,
        )
        code = None if resp.is_success else _http.provider_code(resp)
        if code in TRANSIENT_CODES:
            raise _http.transient(resp, f"{what}: HTTP {resp.status_code} (provider code {code})")
        if code == UNSUBSCRIBED_RECIPIENT:
            raise RecipientOptedOut(
                f"{what}: HTTP {resp.status_code} (provider code {code}: recipient opted out)"
            )
        _http.check(resp, what, self._credentials)
        # From here on Twilio has accepted the message: an answer we cannot read (a proxy's
        # page, a truncated body, no sid) must not be retried as if nothing had been sent,
        # nor dead-lettered (a dead letter's retry sends again). ``DeliveryUncertain`` keeps
        # the item ``sending`` and recovery's lookup adopts the message or marks it unknown.
        try:
            msg = _http.json_body(resp, what)
        except TransientError:
            raise DeliveryUncertain(f"{what}: provider answered {resp.status_code} without JSON") from None
        sid = msg.get("sid")
        if not isinstance(sid, str) or not sid.startswith(("SM", "MM")):
            raise DeliveryUncertain(f"{what}: provider answered {resp.status_code} without a message sid")
        receipt = Receipt(
            STATUS_MAP.get(str(msg.get("status")), "queued"),
            provider_id=sid,
            detail={
                "segments": size.segments,
                "encoding": size.encoding,
                "provider_status": msg.get("status"),
            },
        )
        self._sent[item.key] = receipt
        log.debug("channel %s sent outbox key %s as %s", self.id, item.key, sid)
        return receipt

    async def status(self, item: OutboxItem) -> Receipt | None:
        prior = self._sent.get(item.key)
        if prior is not None:
            return prior
        if item.provider_id:  # known sid: ask for it directly
            return await self._fetch(item.provider_id)
        started = item.next_attempt_at  # the outbox records the attempt's start here
        text = item.content.get("text")
        if started is None or not isinstance(text, str):
            return None
        lo = utc(started) - timedelta(minutes=2)  # our clock and Twilio's may differ a little
        matches = await self._find(item.recipient, text, lo)
        if matches is None or len(matches) > 1:
            log.info("channel %s: outbox key %s: lookup inconclusive", self.id, item.key)
            return None
        if not matches:
            return Receipt(ABSENT) if self.config.resend_if_absent else None
        return self._receipt(matches[0], recovered=True)

    async def _fetch(self, sid: str) -> Receipt | None:
        what = self._what("fetch")
        resp = await _http.call(
            self._http,
            what,
            "GET",
            f"{self._messages}/{sid}.json",
            auth=self._auth,
            timeout=self.config.timeout_seconds,
        )
        if resp.status_code == 404:
            return None
        _http.check(resp, what, self._credentials)
        return self._receipt(_http.json_body(resp, what), recovered=True)

    async def _find(self, to: str, text: str, since: datetime) -> list[dict[str, Any]] | None:
        """Messages to ``to`` with body ``text`` created at or after ``since``; None if the
        lookup could not cover the whole window."""
        what = self._what("lookup")
        params: dict[str, str] | None = {"To": to, "PageSize": "50"}
        if self.config.from_number:
            params["From"] = self.config.from_number  # type: ignore[index]
        url: str | None = f"{self._messages}.json"
        found: list[dict[str, Any]] = []
        origin = urlsplit(self.config.base_url)
        for _ in range(self.config.lookup_pages):
            assert url is not None
            resp = await _http.call(
                self._http,
                what,
                "GET",
                url,
                params=params,
                auth=self._auth,
                timeout=self.config.timeout_seconds,
            )
            _http.check(resp, what, self._credentials)
            page = _http.json_body(resp, what)
            reached_older = False
            for m in page.get("messages") or []:
                created = _twilio_time(m.get("date_created"))
                if created is None:
                    continue
                if created < since:
                    reached_older = True  # newest first: the rest are older still
                    continue
                if m.get("to") == to and m.get("body") == text and self._ours(m):
                    found.append(m)
            nxt = page.get("next_page_uri")
            if reached_older or not nxt:
                return found
            # next_page_uri carries the query; httpx would replace it with any params given
            url, params = f"{origin.scheme}://{origin.netloc}{nxt}", None
        return None

    def _ours(self, m: dict[str, Any]) -> bool:
        if self.config.messaging_service_sid:
            return bool(m.get("messaging_service_sid") == self.config.messaging_service_sid)
        return bool(m.get("from") == self.config.from_number)

    @staticmethod
    def _receipt(m: dict[str, Any], recovered: bool = False) -> Receipt:
        status = str(m.get("status"))
        detail: dict[str, Any] = {"provider_status": status}
        if recovered:
            detail["recovered"] = True
            created = _twilio_time(m.get("date_created"))
            if created is not None:  # lets recovery tell which attempt could have made it
                detail["provider_created"] = created.isoformat()
        if m.get("error_code"):
            detail["error_code"] = m.get("error_code")
        return Receipt(STATUS_MAP.get(status, "queued"), provider_id=str(m.get("sid")), detail=detail)

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()


def _twilio_time(v: Any) -> datetime | None:
    """Twilio dates are RFC 2822 (``Mon, 02 Mar 2026 14:00:00 +0000``)."""
    if not isinstance(v, str):
        return None
    try:
        dt = parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)
