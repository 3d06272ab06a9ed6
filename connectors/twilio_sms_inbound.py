"""``twilio_sms_inbound``: Twilio's webhooks for inbound SMS and delivery status callbacks.

Routes (under the configured ``path``, default ``/channels/sms``):

- ``POST {path}/inbound``: an incoming message (Twilio's Messaging webhook);
- ``POST {path}/status``: a delivery status callback; the ``twilio_sms`` channel sets
  ``StatusCallback`` to ``{public_url}/status?key=<outbox key>``, so the key comes back
  in the query string and is stored as ``_key``.

The order of a request is fixed, and nothing is stored or acted on before step 3:

1. the body is read up to ``max_body_bytes`` -> 413;
2. the form is split into its fields (Twilio signs the fields, not the bytes);
3. ``X-Twilio-Signature`` is checked: base64 HMAC-SHA1, keyed with the auth token, over
   the full URL Twilio called (``public_url`` + the rest of the path + the query) followed
   by every field name and value, sorted by name - the algorithm of Twilio's own
   ``RequestValidator``, including its tolerance of an explicit default port -> 403 with
   a FHIR OperationOutcome otherwise;
4. the fields become one raw message (``accept``: JSON of the fields, kind
   ``sms:inbound`` or ``sms:status``, dedup key the MessageSid, plus the status for
   callbacks, so Twilio's retries are stored once);
5. ``await sink.put`` - only then the 2xx (empty TwiML for inbound, 204 for status); a
   failing store answers 503 and Twilio retries.

``accept(body, headers)`` is also the replay entry: the body is the form fields as a JSON
object; a body with ``MessageStatus``/``SmsStatus`` and no ``Body`` is a status callback.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, SecretStr, field_validator

from careloop.model import RawIn
from careloop.plugins import PluginConfig
from connectors.base import Health, RawSink

log = logging.getLogger("careloop.connectors.twilio_sms_inbound")

TWIML_EMPTY = b'<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
INBOUND, STATUS = "sms:inbound", "sms:status"
DEFAULT_PORTS = {"https": 443, "http": 80}


def compute_signature(auth_token: str, url: str, params: Sequence[tuple[str, str]]) -> str:
    """Twilio's request signature: base64(HMAC-SHA1(token, url + name1 + value1 + ...))."""
    by_name: dict[str, set[str]] = {}
    for name, value in params:
        by_name.setdefault(name, set()).add(value)
    s = url + "".join(name + value for name in sorted(by_name) for value in sorted(by_name[name]))
    mac = hmac.new(auth_token.encode(), s.encode("utf-8"), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode()


def _with_port(url: str, add: bool) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    port = parts.port or (DEFAULT_PORTS.get(parts.scheme) if add else None)
    if not add and parts.port == DEFAULT_PORTS.get(parts.scheme):
        port = None
    netloc = host if port is None else f"{host}:{port}"
    if parts.username:
        netloc = f"{parts.username}{':' + parts.password if parts.password else ''}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def valid_signature(auth_token: str, url: str, params: Sequence[tuple[str, str]], signature: str) -> bool:
    """True if ``signature`` is Twilio's for this request. Like Twilio's validator, the URL
    is tried with and without the scheme's default port."""
    want = signature.encode()
    return any(
        hmac.compare_digest(compute_signature(auth_token, candidate, params).encode(), want)
        for candidate in {_with_port(url, add=False), _with_port(url, add=True)}
    )


def _outcome(status: int, code: str, text: str) -> JSONResponse:
    return JSONResponse(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": text}],
        },
        status_code=status,
        media_type="application/fhir+json",
    )


class TwilioSmsInboundConfig(PluginConfig):
    plugin: str = "twilio_sms_inbound"
    path: str = Field("/channels/sms", pattern=r"^/[A-Za-z0-9/_\-.]*[A-Za-z0-9_\-.]$")
    auth_token: SecretStr = Field(description="Twilio auth token: the key of X-Twilio-Signature")
    public_url: str | None = Field(
        None, description="the URL Twilio calls for 'path' (behind a proxy it differs from what we see)"
    )
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=1024 * 1024)

    @field_validator("auth_token")
    @classmethod
    def _token(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value():
            raise ValueError("must not be empty")
        return v

    @field_validator("public_url")
    @classmethod
    def _public(cls, v: str | None) -> str | None:
        if v is None:
            return None
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(
                "must be an absolute http(s) URL without query, like https://hub.example.org/channels/sms"
            )
        return v.rstrip("/")


class TwilioSmsInboundConnector:
    """Receives Twilio SMS webhooks (replies, STOP/START, delivery status)."""

    name: ClassVar[str] = "twilio_sms_inbound"
    Config: ClassVar[type[TwilioSmsInboundConfig]] = TwilioSmsInboundConfig

    def __init__(self, id: str, config: TwilioSmsInboundConfig) -> None:
        self.id, self.config = id, config
        self._sink: RawSink | None = None
        self.received = self.rejected = self.stored = 0

    def __repr__(self) -> str:
        return f"TwilioSmsInboundConnector(id={self.id!r}, path={self.config.path!r})"

    # ------------------------------------------------------------------ lifecycle

    async def start(self, sink: RawSink) -> None:
        self._sink = sink

    async def stop(self) -> None:
        self._sink = None

    def health(self) -> Health:
        return Health(self._sink is not None, f"received {self.received}, rejected {self.rejected}")

    # ------------------------------------------------------------------ accept (pure)

    def accept(self, body: bytes, headers: Mapping[str, str]) -> Sequence[RawIn]:
        try:
            fields = json.loads(body)
        except ValueError:
            fields = None
        if not isinstance(fields, dict):
            digest = hashlib.sha256(body).hexdigest()[:32]
            return [
                RawIn(
                    self.id, "sms:unparseable", body, "application/octet-stream", dedup_key=f"hash|{digest}"
                )
            ]
        fields = {
            str(k): v if isinstance(v, str) else json.dumps(v) for k, v in fields.items() if v is not None
        }
        status = fields.get("MessageStatus") or fields.get("SmsStatus")
        is_status = bool(status) and "Body" not in fields
        sid = fields.get("MessageSid") or fields.get("SmsSid") or fields.get("SmsMessageSid")
        data = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if sid:
            dedup = f"{status}|{sid}" if is_status else sid
        else:
            dedup = "hash|" + hashlib.sha256(data).hexdigest()[:32]
        return [RawIn(self.id, STATUS if is_status else INBOUND, data, "application/json", dedup_key=dedup)]

    # ------------------------------------------------------------------ HTTP

    def router(self) -> APIRouter:
        r = APIRouter()
        base = self.config.path.rstrip("/")
        r.add_api_route(f"{base}/inbound", self.inbound, methods=["POST"], include_in_schema=False)
        r.add_api_route(f"{base}/status", self.status, methods=["POST"], include_in_schema=False)
        return r

    async def inbound(self, request: Request) -> Response:
        return await self._receive(request, status_callback=False)

    async def status(self, request: Request) -> Response:
        return await self._receive(request, status_callback=True)

    def signed_url(self, request: Request) -> str:
        """The URL Twilio signed: ``public_url`` + the path below ``path`` + the query."""
        query = request.url.query
        if self.config.public_url is None:
            return str(request.url)
        rest = request.url.path[len(self.config.path.rstrip("/")) :]
        return self.config.public_url + rest + (f"?{query}" if query else "")

    def _reject(self, status: int, code: str, reason: str) -> JSONResponse:
        self.rejected += 1
        log.warning("connector %s rejected a request: %s", self.id, reason)
        return _outcome(status, code, reason)

    async def _receive(self, request: Request, status_callback: bool) -> Response:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return self._reject(413, "too-costly", f"body larger than {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return self._reject(413, "too-costly", f"body larger than {limit} bytes")
        signature = request.headers.get("x-twilio-signature")
        if not signature:
            return self._reject(403, "security", "X-Twilio-Signature is missing")
        try:
            params = parse_qsl(bytes(body).decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            return self._reject(403, "security", "X-Twilio-Signature does not match")
        token = self.config.auth_token.get_secret_value()
        if not valid_signature(token, self.signed_url(request), params, signature):
            return self._reject(403, "security", "X-Twilio-Signature does not match")
        # authentic from here on
        fields: dict[str, Any] = dict(params)
        if status_callback:
            key = request.query_params.get("key")
            if key:
                fields["_key"] = key
            if not fields.get("MessageStatus") and not fields.get("SmsStatus"):
                return self._reject(400, "required", "a status callback needs MessageStatus")
        elif "Body" not in fields:
            fields["Body"] = ""  # an MMS without text is still an inbound message
        sink = self._sink
        if sink is None:
            return _outcome(503, "transient", "the connector is not started")
        items = self.accept(json.dumps(fields).encode("utf-8"), {})
        self.received += 1
        try:
            results = await sink.put(items)
        except Exception as exc:  # acknowledge nothing that is not committed
            log.error("connector %s: the store failed (%s); Twilio will retry", self.id, type(exc).__name__)
            return _outcome(503, "transient", "the message could not be stored; retry later")
        self.stored += sum(1 for r in results if not r.duplicate)
        if status_callback:
            return Response(status_code=204)
        return Response(TWIML_EMPTY, media_type="text/xml")
