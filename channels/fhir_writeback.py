"""``fhir_writeback``: records outreach on the EHR as FHIR R4 Communication, escalations as Task.

Each outbox item for this channel becomes one resource, created with a FHIR conditional
create: ``POST {base_url}/Communication`` with ``If-None-Exist:
identifier=urn:careloop:outbox|<key>``. The server creates it (201) or, when a resource
with that identifier exists, returns it (200) without creating another, so a retry or a
resend after a crash never writes twice. 412 (several matches) is permanent. The
resource carries the same identifier, so ``status()`` can search for it after a crash:
found -> adopted; not found -> ``ABSENT`` (resending is safe, the create is conditional).

The outbox row (written by the orchestrator) names the person's FHIR Patient reference as
``recipient`` and carries in ``content``:

- for a Communication (the default, ``kind: "communication"``): ``medium`` (sms, email,
  voice, letter, portal), ``sent`` (ISO-8601), optional ``category`` (reminder,
  notification, instruction, alert), optional ``text`` (written as the payload only when
  ``include_text`` is on: the EHR may not want copies of every reminder), optional
  ``about`` (defaults to the row's ``subject_ref``), optional ``outbox_key`` of the delivered
  message. ``communication_content()`` builds it from a delivered outbox row.
- for a Task (``kind: "task"``): ``reason`` (code), ``severity`` (emergency, urgent,
  routine), ``escalation_id``, optional ``description`` and ``owner`` reference.
  ``task_content()`` builds it from an ``Escalation``.

``build_communication``/``build_task`` are pure and validate against the R4B models of
``fhir.resources`` (structurally identical to R4 for these two resources).

Auth: a static ``bearer_token``, or ``auth`` for SMART Backend Services (the FHIR connectors'
``careloop.smart_auth``: a token fetched on first use, cached until shortly before
``expires_in`` on the channel's clock, refreshed then, and refreshed once on a 401 before the
request is sent once more). A 401 that survives that (a static token that expired, a client
whose registration was withdrawn), and an authorization server that refuses the client, are
the channel's problem, not the item's: ``ChannelUnavailable`` (a ``TransientError`` the
outbox does not count against the item: it stays pending, the channel held for a while,
never dead-lettered for a defect it does not have), and ``health()`` says the channel is
degraded, credentials rejected, until a request succeeds. A 403 stays the item's (permanent,
dead-lettered, ``careloop deadletters retry`` sends it again): EHRs answer 403 for one
restricted patient's compartment, and an item held as the channel's outage would hold the
channel for everyone each time it came up.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from typing import Any, ClassVar, Self
from urllib.parse import urlencode

import httpx
from fhir.resources.R4B.communication import Communication
from fhir.resources.R4B.task import Task
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator

from careloop.clock import Clock, SystemClock, utc
from careloop.errors import PermanentError
from careloop.plugins import Health
from careloop.smart_auth import SmartAuthConfig, SmartBackendAuth
from careloop.tables import Escalation, OutboxItem
from channels import _http
from channels.base import ABSENT, ChannelCaps, ChannelConfig, Receipt, SentMemory
from channels.twilio_sms import check_url

log = logging.getLogger("careloop.channels.fhir_writeback")

OUTBOX_SYSTEM = "urn:careloop:outbox"
ESCALATION_SYSTEM = "urn:careloop:escalation"
MEDIUM = {  # HL7 v3 ParticipationMode
    "sms": ("SMSWRIT", "SMS message"),
    "email": ("EMAILWRIT", "email"),
    "voice": ("PHONE", "telephone"),
    "letter": ("MAILWRIT", "mail"),
    "portal": ("ELECTRONIC", "electronic data"),
}
CATEGORIES = frozenset({"reminder", "notification", "instruction", "alert"})
PRIORITY = {"emergency": "stat", "urgent": "urgent", "routine": "routine"}
REFERENCE = re.compile(r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")
FHIR_JSON = "application/fhir+json"
# What the channel asks for when ``auth.scope`` is not given (the connectors' default is
# read + Subscription.write): create the two resource types and search them (``status``).
WRITEBACK_SCOPE = "system/Communication.write system/Task.write system/Communication.read system/Task.read"


def _token_value(v: str) -> str:
    # FHIR search escaping: \ , $ | in a token value are escaped with a backslash
    return re.sub(r"([\\,$|])", r"\\\1", v)


def condition(system: str, value: str) -> str:
    """The ``If-None-Exist`` header value (a query string) for one identifier."""
    return urlencode({"identifier": f"{system}|{_token_value(value)}"})


def communication_content(
    delivered: OutboxItem, medium: str, sent: datetime, *, category: str = "reminder"
) -> dict[str, Any]:
    """``content`` for a write-back outbox row recording that ``delivered`` went out."""
    return {
        "kind": "communication",
        "medium": medium,
        "sent": utc(sent).isoformat(),
        "category": category,
        "about": delivered.subject_ref,
        "outbox_key": delivered.key,
        "text": delivered.content.get("text"),
    }


def task_content(escalation: Escalation, description: str | None = None) -> dict[str, Any]:
    """``content`` for a write-back outbox row asking staff to act on ``escalation``."""
    return {
        "kind": "task",
        "reason": escalation.reason,
        "severity": escalation.severity,
        "escalation_id": escalation.id,
        "description": description,
        "created": utc(escalation.created_at).isoformat(),
        "due": utc(escalation.due_at).isoformat() if escalation.due_at else None,
    }


def build_communication(
    item: OutboxItem, *, include_text: bool = False, sender: str | None = None, now: datetime | None = None
) -> dict[str, Any]:
    """The FHIR R4 Communication recording ``item`` (pure; PermanentError if invalid)."""
    c = item.content
    medium = MEDIUM.get(str(c.get("medium", "")))
    if medium is None:
        raise PermanentError(f"outbox content 'medium' must be one of {sorted(MEDIUM)}")
    category = str(c.get("category") or "reminder")
    if category not in CATEGORIES:
        raise PermanentError(f"outbox content 'category' must be one of {sorted(CATEGORIES)}")
    res: dict[str, Any] = {
        "resourceType": "Communication",
        "identifier": [{"system": OUTBOX_SYSTEM, "value": item.key}],
        "status": "completed",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/communication-category",
                        "code": category,
                    }
                ]
            }
        ],
        "medium": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode",
                        "code": medium[0],
                        "display": medium[1],
                    }
                ]
            }
        ],
        "subject": {"reference": item.recipient},
        "recipient": [{"reference": item.recipient}],
        "topic": {"text": item.template},
    }
    about = c.get("about") or item.subject_ref
    if about:
        res["about"] = [{"reference": about}]
    sent = c.get("sent") or (now.isoformat() if now else None)
    if sent:
        res["sent"] = sent
    if sender:
        res["sender"] = {"reference": sender}
    if c.get("outbox_key"):
        res["identifier"].append({"system": f"{OUTBOX_SYSTEM}:delivered", "value": str(c["outbox_key"])})
    if include_text and isinstance(c.get("text"), str):
        res["payload"] = [{"contentString": c["text"]}]
    _validate(Communication, res)
    return res


def build_task(item: OutboxItem, *, now: datetime | None = None) -> dict[str, Any]:
    """The FHIR R4 Task asking staff to act on an escalation (pure; PermanentError if invalid)."""
    c = item.content
    severity = str(c.get("severity", ""))
    if severity not in PRIORITY or not c.get("reason"):
        raise PermanentError(
            "outbox content for a task needs 'reason' and 'severity' (emergency|urgent|routine)"
        )
    res: dict[str, Any] = {
        "resourceType": "Task",
        "identifier": [{"system": OUTBOX_SYSTEM, "value": item.key}],
        "status": "requested",
        "intent": "order",
        "priority": PRIORITY[severity],
        "code": {"coding": [{"system": "urn:careloop:escalation-reason", "code": str(c["reason"])}]},
        "for": {"reference": item.recipient},
        "authoredOn": c.get("created") or (now.isoformat() if now else None),
    }
    if c.get("escalation_id") is not None:
        res["identifier"].append({"system": ESCALATION_SYSTEM, "value": str(c["escalation_id"])})
    if c.get("description"):
        res["description"] = str(c["description"])
    if c.get("owner"):
        res["owner"] = {"reference": str(c["owner"])}
    if item.subject_ref:
        res["focus"] = {"reference": item.subject_ref}
    if c.get("due"):
        res["restriction"] = {"period": {"end": c["due"]}}
    if res["authoredOn"] is None:
        del res["authoredOn"]
    _validate(Task, res)
    return res


def _validate(model: Any, res: dict[str, Any]) -> None:
    try:
        model.model_validate(res)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})[:5]
        raise PermanentError(f"{res['resourceType']} is not valid FHIR: {', '.join(fields)}") from None


class FhirWritebackConfig(ChannelConfig):
    base_url: str = Field(description="FHIR R4 base, e.g. https://ehr.example.org/fhir")
    bearer_token: SecretStr | None = Field(None, description="static OAuth2 access token")
    auth: SmartAuthConfig | None = Field(
        None, description="SMART Backend Services credentials, as the FHIR connectors take them"
    )
    sender: str | None = Field(None, description="Communication.sender reference, e.g. Organization/clinic")
    include_text: bool = Field(False, description="copy the message text into Communication.payload")
    timeout_seconds: float = Field(15.0, gt=0, le=120)

    @field_validator("base_url")
    @classmethod
    def _base(cls, v: str) -> str:
        return check_url(v)

    @field_validator("sender")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        if v is not None and not REFERENCE.match(v):
            raise ValueError("must be a relative reference like Organization/clinic-1")
        return v

    @field_validator("auth")
    @classmethod
    def _auth(cls, v: SmartAuthConfig | None) -> SmartAuthConfig | None:
        if v is None:
            return None
        if (v.private_key is None) == (v.private_key_file is None):
            raise ValueError("set exactly one of auth.private_key and auth.private_key_file")
        try:
            token_url = check_url(v.token_url)
        except ValueError as exc:
            raise ValueError(f"auth.token_url {exc}") from None
        if not v.client_id.strip():
            raise ValueError("auth.client_id must not be empty")
        if "scope" not in v.model_fields_set:
            return v.model_copy(update={"token_url": token_url, "scope": WRITEBACK_SCOPE})
        return v.model_copy(update={"token_url": token_url})

    @model_validator(mode="after")
    def _one_auth(self) -> Self:
        if self.bearer_token is not None and self.auth is not None:
            raise ValueError("bearer_token and auth are both set: use one (auth refreshes its own tokens)")
        return self


class FhirWritebackChannel:
    """Writes Communication/Task resources to the EHR with conditional create."""

    name: ClassVar[str] = "fhir_writeback"
    Config: ClassVar[type[FhirWritebackConfig]] = FhirWritebackConfig
    capabilities: ClassVar[ChannelCaps] = ChannelCaps(
        template_kind="fhir",
        address_kind="fhir",
        max_phi="full",
        receipts=False,
        can_query_status=True,
        idempotent_key=True,
    )

    def __init__(
        self,
        id: str,
        config: FhirWritebackConfig,
        http: httpx.AsyncClient | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.id, self.config = id, config
        self.clock = clock or SystemClock()
        self._own_http = http is None
        self._http = http or _http.new_client()
        self._sent = SentMemory()
        self._smart = (
            SmartBackendAuth(
                config.auth,
                self._http,
                id,
                kind="channel",
                monotonic=lambda: self.clock.now().timestamp(),
            )
            if config.auth is not None
            else None
        )
        # 401 (what remains after a SMART refresh) rejects the credentials; a 403 does not:
        # see the module docstring. The authorization server's refusal is recorded there too.
        self._credentials = _http.Credentials(frozenset({401}))

    def __repr__(self) -> str:
        return f"FhirWritebackChannel(id={self.id!r}, base_url={self.config.base_url!r})"

    def health(self) -> Health:
        """Degraded, with the reason, while the EHR or its authorization server rejects the
        channel's credentials."""
        return self._credentials.health()

    async def _request(self, what: str, method: str, url: str, **kw: Any) -> httpx.Response:
        """One FHIR interaction with this channel's credentials (a SMART token is refreshed
        once on a 401). An authorization server that refuses the client is
        ``ChannelUnavailable``: the channel's credentials, not the item, are at fault; so is a
        401 that remains, which the caller's ``_http.check(..., self._credentials)`` raises."""
        headers: dict[str, str] = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON, **kw.pop("headers", {})}

        async def send(authorization: str | None) -> httpx.Response:
            h = headers if authorization is None else {**headers, "Authorization": authorization}
            return await _http.call(
                self._http, what, method, url, headers=h, timeout=self.config.timeout_seconds, **kw
            )

        if self._smart is not None:
            try:
                return await self._smart.authorized(send)
            except PermanentError as exc:  # the token endpoint refused us, or the key is unusable
                raise self._credentials.refused(str(exc)) from None
        if self.config.bearer_token is not None:
            return await send(f"Bearer {self.config.bearer_token.get_secret_value()}")
        return await send(None)

    def resource(self, item: OutboxItem) -> dict[str, Any]:
        if not REFERENCE.match(item.recipient) or not item.recipient.startswith("Patient/"):
            raise PermanentError(f"channel {self.id}: recipient must be a Patient reference")
        if item.content.get("kind") == "task":
            return build_task(item, now=self.clock.now())
        return build_communication(
            item, include_text=self.config.include_text, sender=self.config.sender, now=self.clock.now()
        )

    async def send(self, item: OutboxItem) -> Receipt:
        prior = self._sent.get(item.key)
        if prior is not None:
            return prior
        res = self.resource(item)
        rtype, what = res["resourceType"], f"channel {self.id}: fhir create"
        resp = await self._request(
            what,
            "POST",
            f"{self.config.base_url}/{rtype}",
            json=res,
            headers={"If-None-Exist": condition(OUTBOX_SYSTEM, item.key)},
        )
        if resp.status_code == 412:
            raise PermanentError(f"{what}: several {rtype} resources carry this outbox identifier (412)")
        _http.check(resp, what, self._credentials)
        rid = _created_id(resp, rtype)
        receipt = Receipt(
            "delivered",
            provider_id=f"{rtype}/{rid}" if rid else None,
            detail={"created": resp.status_code == 201},
        )
        self._sent[item.key] = receipt
        log.debug(
            "channel %s wrote %s for outbox key %s (HTTP %s)", self.id, rtype, item.key, resp.status_code
        )
        return receipt

    async def status(self, item: OutboxItem) -> Receipt | None:
        prior = self._sent.get(item.key)
        if prior is not None:
            return prior
        rtype = "Task" if item.content.get("kind") == "task" else "Communication"
        what = f"channel {self.id}: fhir search"
        resp = await self._request(
            what,
            "GET",
            f"{self.config.base_url}/{rtype}",
            params={"identifier": f"{OUTBOX_SYSTEM}|{_token_value(item.key)}"},
        )
        _http.check(resp, what, self._credentials)
        bundle = _http.json_body(resp, what)
        # Only a resource of ours counts: a searchset may also carry OperationOutcome entries
        # (search mode "outcome", e.g. a warning), and a server that ignores the identifier
        # parameter answers with unrelated resources. Taking either for ours would mark a
        # write-back that never happened as delivered.
        entries = [
            r
            for e in bundle.get("entry") or []
            if isinstance(e, dict)
            and isinstance(r := e.get("resource"), dict)
            and r.get("resourceType") == rtype
            and _has_identifier(r, OUTBOX_SYSTEM, item.key)
        ]
        if not entries:
            return Receipt(ABSENT)  # conditional create makes a resend safe
        rid = entries[0].get("id")
        return Receipt("delivered", provider_id=f"{rtype}/{rid}" if rid else None, detail={"recovered": True})

    async def record_escalation(self, escalation: Escalation, patient_ref: str) -> Receipt:
        """Write a Task for ``escalation`` now, outside the outbox (idempotent per escalation id)."""
        item = OutboxItem(
            id=None,
            key=f"escalation:{escalation.id}",
            person_id=escalation.person_id,
            channel=self.id,
            template="escalation",
            purpose="treatment",
            phi_class="limited",
            recipient=patient_ref,
            content=task_content(escalation),
            created_at=self.clock.now(),
        )
        return await self.send(item)

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()


def _has_identifier(resource: dict[str, Any], system: str, value: str) -> bool:
    return any(
        isinstance(i, dict) and i.get("system") == system and i.get("value") == value
        for i in resource.get("identifier") or []
    )


def _created_id(resp: httpx.Response, rtype: str) -> str | None:
    loc = resp.headers.get("Location") or resp.headers.get("Content-Location") or ""
    m = re.search(rf"{rtype}/([A-Za-z0-9\-.]{{1,64}})", loc)
    if m:
        return m.group(1)
    try:
        body = resp.json()
    except ValueError:
        return None
    rid = body.get("id") if isinstance(body, dict) else None
    return str(rid) if rid else None
