"""Signed webhooks from CRMs (and anything else that calls out with JSON or SOAP).

One connector entry is one endpoint (``path``) with one signature scheme:
``standard-webhooks``, ``hubspot-v3``, ``stripe``, ``hmac-sha256`` or
``salesforce-outbound`` (see ``connectors/signatures``). The order of a request is fixed:

1. caller address against ``allow_ips`` (if set; required for Salesforce) -> 403;
2. body read up to ``max_body_bytes`` -> 413;
3. signature and timestamp window checked over the raw bytes, nothing parsed yet -> 401
   (Salesforce: the OrganizationId, after a defusedxml parse -> 403);
4. ``accept`` splits the body into raw messages (a HubSpot batch gives several), each
   with a dedup key: the event id in the body, else the delivery id header, else a hash
   of the bytes — so a replayed delivery is never stored or acted on twice;
5. ``await sink.put`` — the 2xx (or the SOAP ``<Ack>true</Ack>``) is sent only after it
   returned; a failing store gets a 503 and the sender retries.

4xx and 5xx bodies are FHIR OperationOutcomes naming the failed check, never data.
An authentic body that is not JSON is stored (for inspection; its mapping dead-letters
it) and answered 400. Mapping is declarative (``mapping``: a YAML file, see
``mapping/declarative.py``); the connector's ``mapper()`` hands it to the pipeline.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal

import jmespath
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from jmespath.parser import ParsedResult
from pydantic import Field, SecretStr, field_validator, model_validator

from careloop.clock import Clock, SystemClock
from careloop.config import AppConfig
from careloop.errors import ConfigError
from careloop.model import RawIn
from careloop.plugins import MapperChoice, PluginConfig, build_mapper
from connectors.base import Health, RawSink
from connectors.signatures import Rejected, Scheme, SignedRequest
from connectors.signatures import salesforce as sf
from connectors.signatures.hmac_sha256 import HmacSha256
from connectors.signatures.hubspot_v3 import HubSpotV3
from connectors.signatures.standard_webhooks import StandardWebhooks, decode_secret
from connectors.signatures.stripe_v1 import StripeV1

log = logging.getLogger("careloop.connectors.webhook")

JSON_TYPE = "application/json"
UNPARSEABLE = "webhook:unparseable"
_KIND_CHARS = re.compile(r"[^A-Za-z0-9_.:\-]")
# Headers worth keeping with the raw message (delivery ids and times, never signatures).
_KEEP_HEADERS = ("content-type", "webhook-id", "webhook-timestamp", "svix-id", "x-hubspot-request-timestamp")

SchemeName = Literal["standard-webhooks", "hubspot-v3", "stripe", "hmac-sha256", "salesforce-outbound"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class WebhookConfig(PluginConfig):
    """One webhook endpoint. Secrets are SecretStr (never in repr or logs)."""

    plugin: str = "webhook"
    path: str = Field(pattern=r"^/[A-Za-z0-9/_\-.]*$", description="URL path, e.g. /webhooks/crm")
    signature: SchemeName
    secret: SecretStr | None = Field(None, description="signing secret (standard-webhooks: whsec_<base64>)")
    header: str | None = Field(
        None, description="hmac-sha256: header holding the signature; stripe: override of Stripe-Signature"
    )
    encoding: Literal["hex", "base64"] = Field("hex", description="hmac-sha256: signature encoding")
    prefix: str = Field("", description="hmac-sha256: text before the signature, e.g. 'sha256='")
    id_header: str | None = Field(None, description="hmac-sha256: header holding the delivery id")
    tolerance_s: int = Field(300, ge=1, le=3600, description="accepted clock difference of timestamps")
    public_url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="hubspot-v3: the endpoint's URL "
        "as the CRM calls it (behind a proxy); default: the URL the app sees",
    )
    allow_ips: list[Network] = Field(default_factory=list, description="caller networks (CIDR); empty: any")
    organization_id: str | None = Field(None, description="salesforce-outbound: the org id (15 or 18 chars)")
    event_id: str = Field("id", description="JMESPath to the event id in a JSON body (dedup key)")
    event_type: str = Field("type", description="JMESPath to the event type (raw message kind)")
    mapping: Path | None = Field(None, description="declarative mapping YAML; relative to the config file")
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=32 * 1024 * 1024)

    @field_validator("event_id", "event_type")
    @classmethod
    def _jmespath(cls, v: str) -> str:
        try:
            jmespath.compile(v)
        except jmespath.exceptions.JMESPathError:
            raise ValueError("not a valid JMESPath expression") from None
        return v

    @model_validator(mode="after")
    def _scheme_needs(self) -> WebhookConfig:
        secret = self.secret.get_secret_value() if self.secret else ""
        if self.signature == "salesforce-outbound":
            if not self.organization_id or not re.fullmatch(
                r"[A-Za-z0-9]{15}([A-Za-z0-9]{3})?", self.organization_id
            ):
                raise ValueError("organization_id: salesforce-outbound needs the 15- or 18-character org id")
            if not self.allow_ips:
                raise ValueError("allow_ips: salesforce-outbound is unsigned; list Salesforce's networks")
            return self
        if not secret:
            raise ValueError(f"secret: required for signature {self.signature}")
        if self.signature == "standard-webhooks":
            if not secret.startswith("whsec_"):
                raise ValueError("secret: must be whsec_ followed by base64")
            decode_secret(secret)  # raises ValueError with a field-free message
        if self.signature == "hmac-sha256" and not self.header:
            raise ValueError("header: hmac-sha256 needs the name of the signature header")
        return self


def _scheme(cfg: WebhookConfig) -> Scheme | None:
    secret = cfg.secret.get_secret_value() if cfg.secret else ""
    window = timedelta(seconds=cfg.tolerance_s)
    if cfg.signature == "standard-webhooks":
        return StandardWebhooks(secret, window)
    if cfg.signature == "hubspot-v3":
        return HubSpotV3(secret, min(window, timedelta(minutes=5)))
    if cfg.signature == "stripe":
        return StripeV1(secret, window, cfg.header or "stripe-signature")
    if cfg.signature == "hmac-sha256":
        assert cfg.header
        return HmacSha256(secret, cfg.header, cfg.encoding, cfg.prefix, cfg.id_header)
    return None  # salesforce-outbound: transport checks only


def _outcome(status: int, code: str, diagnostics: str) -> JSONResponse:
    # Imported late: careloop.app imports the hub, which loads this plugin.
    from careloop.http import operation_outcome

    return operation_outcome(status, code, diagnostics)


@dataclass
class _Stats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    store_failures: int = 0


def _mapper_choice(cid: str, config: WebhookConfig, base_dir: Path) -> MapperChoice | None:
    if config.mapping is None:
        return None
    path = config.mapping if config.mapping.is_absolute() else base_dir / config.mapping
    return MapperChoice("declarative", {"spec_file": path, "where": f"connectors.{cid}.mapping"})


class WebhookConnector:
    """Receives signed webhooks at ``path``; see the module docstring for the checks."""

    name: ClassVar[str] = "webhook"
    Config: ClassVar[type[PluginConfig]] = WebhookConfig

    def __init__(
        self, id: str, config: WebhookConfig, clock: Clock | None = None, app_config: AppConfig | None = None
    ) -> None:
        self.id, self.config = id, config
        self.clock: Clock = clock or SystemClock()
        self._scheme = _scheme(config)
        self._event_id: ParsedResult = jmespath.compile(config.event_id)
        self._event_type: ParsedResult = jmespath.compile(config.event_type)
        base = app_config.base_dir if app_config is not None else Path(".")
        self._mapper = _mapper_choice(id, config, base)
        self._sink: RawSink | None = None
        self.stats = _Stats()

    # ----------------------------------------------------------------- config check

    @staticmethod
    def check_config(cid: str, config: WebhookConfig, app: AppConfig) -> list[str]:
        """Problems found beyond the model (the mapping file), each with its dotted path."""
        choice = _mapper_choice(cid, config, app.base_dir)
        if choice is None:
            return []
        try:
            build_mapper(choice)
        except ConfigError as exc:
            return exc.problems
        return []

    # ----------------------------------------------------------------- contract

    def mapper_choice(self) -> MapperChoice | None:
        """The ``declarative`` mapper with this connector's mapping file, if it names one."""
        return self._mapper

    def accept(self, body: bytes, headers: Mapping[str, str]) -> Sequence[RawIn]:
        """Split an (already authenticated) body into raw messages. Pure; the replay entry."""
        hdrs = {k.lower(): v for k, v in headers.items()}
        kept = {k: hdrs[k] for k in _KEEP_HEADERS if k in hdrs}
        if self.config.signature == "salesforce-outbound":
            return self._accept_soap(body, kept)
        delivery = (
            hdrs.get("webhook-id")
            or hdrs.get("svix-id")
            or (hdrs.get(self.config.id_header.lower()) if self.config.id_header else None)
        )
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return [
                RawIn(
                    self.id,
                    UNPARSEABLE,
                    body,
                    hdrs.get("content-type", "application/octet-stream"),
                    "sha256:" + hashlib.sha256(body).hexdigest(),
                    kept,
                )
            ]
        if isinstance(doc, list):  # a batch (HubSpot sends up to 100 events per request)
            items = [(json.dumps(d, separators=(",", ":"), sort_keys=True).encode(), d) for d in doc]
        else:
            items = [(body, doc)]
        out: list[RawIn] = []
        for i, (raw, d) in enumerate(items):
            out.append(
                RawIn(
                    self.id, self._kind(d), raw, JSON_TYPE, self._dedup(d, raw, delivery, i, len(items)), kept
                )
            )
        return out

    def _kind(self, doc: Any) -> str:
        t = self._event_type.search(doc) if isinstance(doc, dict) else None
        if not isinstance(t, str | int) or isinstance(t, bool) or not str(t):
            return "webhook:unknown"
        return "webhook:" + _KIND_CHARS.sub("-", str(t))[:80]

    def _dedup(self, doc: Any, raw: bytes, delivery: str | None, index: int, count: int) -> str:
        eid = self._event_id.search(doc) if isinstance(doc, dict) else None
        if isinstance(eid, str | int) and not isinstance(eid, bool) and str(eid):
            return f"event|{str(eid)[:200]}"
        if delivery:
            return f"delivery|{delivery[:190]}" + (f"#{index}" if count > 1 else "")
        return "sha256|" + hashlib.sha256(raw).hexdigest()

    def _accept_soap(self, body: bytes, kept: dict[str, str]) -> list[RawIn]:
        try:
            msg = sf.parse(body)
        except sf.NotOutboundMessage:
            return [
                RawIn(
                    self.id, UNPARSEABLE, body, "text/xml", "sha256:" + hashlib.sha256(body).hexdigest(), kept
                )
            ]
        out = []
        for n in msg.notifications:
            # Each notification is stored as JSON, so the same declarative mapping applies.
            doc = {
                "organization_id": msg.organization_id,
                "action_id": msg.action_id,
                "notification_id": n.id,
                "object_type": n.object_type,
                "sobject": n.fields,
            }
            out.append(
                RawIn(
                    self.id,
                    "webhook:salesforce:" + _KIND_CHARS.sub("-", n.object_type)[:60],
                    json.dumps(doc, separators=(",", ":"), sort_keys=True).encode(),
                    JSON_TYPE,
                    f"notification|{n.id[:200]}",
                    kept,
                )
            )
        return out

    async def start(self, sink: RawSink) -> None:
        self._sink = sink

    async def stop(self) -> None:
        self._sink = None

    def health(self) -> Health:
        return Health(True) if self._sink is not None else Health(False, "not started")

    # ----------------------------------------------------------------- HTTP

    def router(self) -> APIRouter:
        r = APIRouter()
        r.add_api_route(self.config.path, self.receive, methods=["POST"], include_in_schema=False)
        return r

    def _reject(self, status: int, code: str, reason: str) -> JSONResponse:
        self.stats.rejected += 1
        log.warning("connector %s rejected a request: %s", self.id, reason)
        return _outcome(status, code, reason)

    def _url(self, request: Request) -> str:
        if self.config.public_url is None:
            return str(request.url)
        query = request.url.query
        return self.config.public_url.rstrip("/") + request.url.path + (f"?{query}" if query else "")

    async def receive(self, request: Request) -> Response:
        cfg = self.config
        client_ip = request.client.host if request.client else None
        if cfg.allow_ips and not sf.ip_allowed(client_ip, cfg.allow_ips):
            return self._reject(403, "forbidden", "caller address is not in the allowlist")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            return self._reject(413, "too-costly", f"body larger than {cfg.max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cfg.max_body_bytes:
                return self._reject(413, "too-costly", f"body larger than {cfg.max_body_bytes} bytes")
        raw = bytes(body)
        headers = {k.lower(): v for k, v in request.headers.items()}
        signed = SignedRequest(request.method, self._url(request), headers, raw, client_ip)
        try:
            if self._scheme is not None:
                self._scheme.verify(signed, self.clock.now())
            else:
                self._check_salesforce(raw)
        except Rejected as rej:
            return self._reject(rej.status, rej.code, rej.reason)
        sink = self._sink
        if sink is None:
            return self._reject(503, "transient", "the connector is not started")
        items = self.accept(raw, headers)
        self.stats.received += len(items)
        try:
            results = await sink.put(items)
        except Exception as exc:  # nothing is acknowledged unless it is committed
            self.stats.store_failures += 1
            log.error(
                "connector %s: the store failed (%s); the sender will retry", self.id, type(exc).__name__
            )
            return _outcome(503, "transient", "the message could not be stored; retry later")
        dups = sum(1 for r in results if r.duplicate)
        self.stats.stored += len(results) - dups
        self.stats.duplicates += dups
        if any(i.kind == UNPARSEABLE for i in items):
            what = "a SOAP notifications envelope" if cfg.signature == "salesforce-outbound" else "JSON"
            return _outcome(400, "invalid", f"body is not {what}; it was kept for inspection")
        if cfg.signature == "salesforce-outbound":
            return Response(sf.ACK, media_type="text/xml; charset=utf-8")
        return JSONResponse(
            {"received": len(items), "duplicates": dups, "raw_ids": [r.raw_id for r in results]}
        )

    def _check_salesforce(self, raw: bytes) -> None:
        assert self.config.organization_id is not None
        try:
            msg = sf.parse(raw)
        except sf.NotOutboundMessage as exc:
            raise Rejected(str(exc), status=400, code="invalid") from None
        sf.check_org(msg, self.config.organization_id)
