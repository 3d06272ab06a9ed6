"""FHIR rest-hook receiver and subscription manager: notifications that miss nothing.

Receives what real servers send to a rest-hook endpoint under ``path``:
- R4 criteria subscriptions: an empty POST (a ping: the hub then searches the criteria's
  resource type for changes), ``PUT {path}/{Type}/{id}`` with the resource (HAPI style), or a
  POST of the bare resource (Medplum style, signed with ``X-Signature``);
- Subscriptions Backport IG R4 notification Bundles, R4B and R5 ``subscription-notification``
  Bundles: handshake, heartbeat, event-notification, query-status and query-event, with
  empty, id-only or full-resource payloads.

Every request is authenticated *before* its body is parsed: the shared secret in a header
(what the manager puts into ``Subscription.channel.header``) or an HMAC-SHA256 signature of
the body. Every 4xx carries an OperationOutcome. The 2xx is sent only after ``sink.put``
committed; a redelivered (subscription, event number) is stored once (dedup key), and each
carried resource version is its own raw message (``fhir:<Type>``, keyed by versionId).

Missing nothing: the ``fhir_subscription_state`` row per subscription holds the event
numbers stored so far (contiguous prefix plus the ones seen above it) and the server's
counter. A gap (a number skipped, or a counter ahead of what we hold) is given ``grace_s``
to fill by itself (servers retry), then recovered through ``Subscription/$events`` where
the server has it, else by searching the subscription's resource types ``_lastUpdated``
since the last event we hold (minus an overlap); version dedup keeps that exactly-once.
A heartbeat watchdog asks ``$status`` when a subscription is silent past its heartbeat
period plus grace; a subscription in error raises an alert (audit record + log line, no
PHI) and is set back to ``requested``, which per the IG asks the server to handshake again.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar, Literal

import httpx
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from careloop import audit_log
from careloop.clock import Clock, SystemClock, utc
from careloop.config import AppConfig
from careloop.errors import CareloopError, PermanentError
from careloop.http import operation_outcome
from careloop.model import RawIn
from careloop.plugins import MapperChoice
from careloop.store import Store
from careloop.tables import FhirSubscriptionState
from connectors.base import Health, RawSink
from connectors.fhir_client import FhirClient, FhirServerConfig, SmartBackendAuth
from connectors.fhir_notify import (
    BASE_HEADER,
    FHIR_JSON,
    VERSION_HEADER,
    NotANotification,
    Notification,
    parse,
    parse_instant,
    relative_ref,
    resource_item,
)

log = logging.getLogger("careloop.connectors.fhir_subscription")

BP = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
MAX_BODY = 20 * 1024 * 1024
EVENT_TYPES = ("event-notification", "query-event")


class SubscriptionSpec(BaseModel):
    """One Subscription the hub keeps on the EHR: a backport ``topic`` or an R4 ``criteria``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    topic: str | None = Field(None, description="SubscriptionTopic canonical URL (Backport IG)")
    criteria: str | None = Field(None, description="R4 criteria, e.g. Appointment?status=booked")
    filters: list[str] = Field(default_factory=list, description="backport filter-criteria, Type?param=value")
    resource_types: list[str] = Field(
        default_factory=list, description="focus types searched when recovering a topic's gap"
    )
    payload: Literal["empty", "id-only", "full-resource"] = "full-resource"
    heartbeat_s: int | None = Field(60, ge=1)
    reason: str = "careloop journey signals"

    @model_validator(mode="after")
    def _one_of(self) -> SubscriptionSpec:
        if (self.topic is None) == (self.criteria is None):
            raise ValueError("give exactly one of topic or criteria")
        if self.criteria is not None and "?" not in self.criteria and not self.criteria.isalpha():
            raise ValueError("criteria must look like Type?param=value")
        return self

    def types(self) -> list[str]:
        if self.resource_types:
            return list(self.resource_types)
        if self.criteria:
            return [self.criteria.split("?", 1)[0]]
        return sorted({f.split("?", 1)[0] for f in self.filters if "?" in f})


class FhirSubscriptionConfig(FhirServerConfig):
    """A rest-hook endpoint at ``path`` for the FHIR server at ``base_url``."""

    plugin: str = "fhir_subscription"
    path: str = Field("/fhir/ehr", pattern=r"^/[A-Za-z0-9/_.-]*[A-Za-z0-9_.-]$")
    secret: SecretStr = Field(
        description="shared secret: sent by the server in secret_header, or used "
        "as the HMAC key of X-Signature"
    )
    secret_header: str = Field(
        "Authorization", description="header carrying the secret (Authorization: Bearer <secret>)"
    )
    signature_header: str = "X-Signature"
    endpoint_url: str | None = Field(None, description="URL the EHR posts to; default http://<server>/<path>")
    subscriptions: list[SubscriptionSpec] = Field(default_factory=list)
    grace_s: float = Field(30.0, ge=0, description="a gap may fill by itself within this time")
    check_interval_s: float = Field(15.0, gt=0)
    overlap_s: float = Field(60.0, ge=0, description="search recovery looks back this much further")
    fetch_id_only: bool = True
    default_heartbeat_s: int | None = Field(
        None,
        ge=1,
        description="heartbeat period assumed for subscriptions not created from this config (watchdog)",
    )


class FhirSubscriptionConnector:
    """FHIR rest-hook receiver + subscription manager + gap recovery (see module docstring)."""

    name: ClassVar[str] = "fhir_subscription"
    Config: ClassVar[type[FhirSubscriptionConfig]] = FhirSubscriptionConfig

    def __init__(
        self,
        id: str,
        config: FhirSubscriptionConfig,
        *,
        store: Store | None = None,
        clock: Clock | None = None,
        http: httpx.AsyncClient | None = None,
        app_config: AppConfig | None = None,
    ) -> None:
        self.id, self.config, self.store = id, config, store
        self.clock: Clock = clock or (store.clock if store else SystemClock())
        self.base = config.base_url.rstrip("/")
        self._own_http = http is None
        self.http = http or httpx.AsyncClient(timeout=config.timeout_s)
        auth = SmartBackendAuth(config.auth, self.http, id) if config.auth else None
        self.client = FhirClient(self.base, self.http, connector=id, auth=auth, timeout_s=config.timeout_s)
        server = app_config.server if app_config else None
        self.endpoint = config.endpoint_url or (
            f"http://{server.host if server else '127.0.0.1'}:{server.port if server else 8080}{config.path}"
        )
        self.sink: RawSink | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._no_events: set[str] = set()  # subscriptions whose server has no $events
        self._check_lock = asyncio.Lock()
        self._started = False
        self.manage_error: str | None = None
        self._manage_failures = 0
        self._manage_next: datetime | None = None  # no new attempt before (backoff)

    # ------------------------------------------------------------------ contract

    def accept(self, body: bytes, headers: Mapping[str, str]) -> Sequence[RawIn]:
        """Raw messages for one received payload (pure; the replay entry point)."""
        items, _ = self._read(body, headers)
        return items

    async def start(self, sink: RawSink) -> None:
        self.sink = sink
        self._started = True
        if self.config.subscriptions and self.store is not None:
            # Never block or crash the hub on an unreachable EHR: manage in the background,
            # and the periodic check retries what is not yet in place.
            self._spawn(self._manage_logged())

    async def stop(self) -> None:
        self._started = False
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._own_http:
            await self.http.aclose()

    def mapper_choice(self) -> MapperChoice:
        return self.config.mapper_choice()

    def health(self) -> Health:
        if not self._started:
            return Health(False, "not started")
        return Health(True, self.manage_error or "", degraded=bool(self.manage_error))

    def jobs(self) -> list[dict[str, Any]]:
        return [
            {
                "func": self.check,
                "trigger": "interval",
                "seconds": self.config.check_interval_s,
                "id": f"fhir_subscription:{self.id}:check",
                "max_instances": 1,
                "coalesce": True,
            }
        ]

    def router(self) -> APIRouter:
        r = APIRouter()
        path = self.config.path
        r.add_api_route(path, self._handle, methods=["POST", "PUT"], include_in_schema=False)
        r.add_api_route(
            path + "/{rtype}/{rid}", self._handle, methods=["POST", "PUT"], include_in_schema=False
        )
        return r

    async def settle(self) -> None:
        """Wait for background work (id-only fetches, ping syncs) to finish (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ------------------------------------------------------------------ authentication

    def _secrets(self) -> list[bytes]:
        return [self.config.secret.get_secret_value().encode()]

    def _authenticate(self, headers: Mapping[str, str], body: bytes) -> Response | None:
        """None when authenticated; else the 401/403 response. Reads no body content."""
        lower = {k.lower(): v for k, v in headers.items()}
        sig = lower.get(self.config.signature_header.lower())
        given = lower.get(self.config.secret_header.lower())
        if sig is None and given is None:
            return operation_outcome(
                401, "login", f"missing {self.config.secret_header} or {self.config.signature_header}"
            )
        for secret in self._secrets():
            if sig is not None:
                want = hmac.new(secret, body, hashlib.sha256).hexdigest()
                got = sig.strip().removeprefix("sha256=").lower()
                if hmac.compare_digest(want, got):
                    return None
            if given is not None:
                expected = (
                    ("Bearer " + secret.decode())
                    if self.config.secret_header.lower() == "authorization"
                    else secret.decode()
                )
                if hmac.compare_digest(given.strip().encode(), expected.encode()):
                    return None
        return operation_outcome(403, "forbidden", "credentials do not match this endpoint's secret")

    # ------------------------------------------------------------------ reading

    def _read(
        self, body: bytes, headers: Mapping[str, str], path_ref: str | None = None
    ) -> tuple[list[RawIn], Notification | None]:
        """Parse an authenticated body into raw messages and the notification status (if any).
        Raises PermanentError (-> 400) for a body that is not FHIR JSON we understand."""
        base_hdr = {BASE_HEADER: self.base}
        if not body.strip():
            # An R4 criteria ping: kept for the record; the hub goes and looks.
            ping = Notification(flavor="r4-criteria", type="ping", subscription=None)
            return [
                RawIn(
                    self.id,
                    "fhir:notification",
                    body,
                    FHIR_JSON,
                    None,
                    {**base_hdr, "x-careloop-notification": "ping"},
                )
            ], ping
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise PermanentError("body is not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("resourceType"), str):
            raise PermanentError("body is not a FHIR resource")
        rtype = doc["resourceType"]
        if path_ref is not None and f"{rtype}/{doc.get('id')}" != path_ref:
            raise PermanentError(f"resource does not match the URL ({path_ref.split('/')[0]}/...)")
        if rtype in ("Bundle", "Parameters", "SubscriptionStatus"):
            try:
                notes = parse(doc)
            except NotANotification as exc:
                raise PermanentError(f"not a subscription notification: {exc}") from None
            if len(notes) != 1:
                raise PermanentError("a $status searchset is not a notification")
            note = notes[0]
            return self._notification_items(body, note), note
        if not doc.get("id"):
            raise PermanentError(f"{rtype} has no id")
        return [resource_item(self.id, self.base, doc, None)], None

    def _notification_items(self, body: bytes, note: Notification) -> list[RawIn]:
        sid = note.subscription_id or "unknown"
        numbers = [e.number for e in note.events if e.number is not None]
        hdr = {BASE_HEADER: self.base, "x-careloop-subscription": sid, "x-careloop-notification": note.type}
        items: list[RawIn] = []
        if note.type != "heartbeat":  # heartbeats only move the state row
            key = None
            if note.type in EVENT_TYPES and numbers:
                span = str(min(numbers)) if len(numbers) == 1 else f"{min(numbers)}-{max(numbers)}"
                key = f"fhirsub|{sid}|{span}"
            items.append(RawIn(self.id, "fhir:notification", body, FHIR_JSON, key, hdr))
        res_hdr = {"x-careloop-subscription": sid}
        if note.flavor == "r5":
            res_hdr[VERSION_HEADER] = "5.0"  # R5 resources: the mapper down-converts them
        if note.type in EVENT_TYPES:
            by_ref = {f"{r['resourceType']}/{r['id']}": r for r in note.resources}
            for ev in note.events:
                for ref in ([ev.focus] if ev.focus else []) + list(ev.context):
                    res = by_ref.pop(relative_ref(ref), None)
                    if res is not None:
                        fallback = f"fhirsub|{sid}|{ev.number}|{relative_ref(ref)}"
                        items.append(resource_item(self.id, self.base, res, fallback[:255], res_hdr))
            for ref, res in by_ref.items():  # carried but not named by an event: keep it too
                extra = f"fhirsub|{sid}|extra|{ref}"[:255]
                items.append(resource_item(self.id, self.base, res, extra, res_hdr))
        return items

    # ------------------------------------------------------------------ HTTP

    async def _handle(self, request: Request, rtype: str | None = None, rid: str | None = None) -> Response:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
            return operation_outcome(413, "too-costly", "notification too large")
        body = await request.body()
        denied = self._authenticate(request.headers, body)
        if denied is not None:
            log.warning(
                "connector %s: rejected an unauthenticated notification (HTTP %s)",
                self.id,
                denied.status_code,
            )
            return denied
        if len(body) > MAX_BODY:
            return operation_outcome(413, "too-costly", "notification too large")
        if self.sink is None or self.store is None:
            return operation_outcome(503, "transient", "connector is not started")
        try:
            items, note = self._read(body, request.headers, f"{rtype}/{rid}" if rtype and rid else None)
        except PermanentError as exc:
            return operation_outcome(400, "invalid", str(exc))
        try:
            await self.sink.put(items)
        except CareloopError as exc:
            log.warning("connector %s: store did not accept a notification: %s", self.id, type(exc).__name__)
            return operation_outcome(503, "transient", "could not store the notification; retry")
        if note is not None:
            await self._after_notification(note)
        info = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "information", "code": "informational", "diagnostics": "stored"}],
        }
        return Response(json.dumps(info), status_code=200, media_type=FHIR_JSON)

    async def _after_notification(self, note: Notification) -> None:
        """Bookkeeping after the commit: state row, id-only fetches, ping sync, error alerts."""
        if note.type == "ping":
            self._spawn(self._sync_criteria())
            return
        sid = note.subscription_id
        if sid is None:
            return
        try:
            row, before = await asyncio.to_thread(self._record, sid, note)
        except Exception as exc:  # the message is stored; the next notification or check catches up
            log.warning("connector %s: subscription state not updated: %s", self.id, type(exc).__name__)
            log.debug("state update failure", exc_info=True)
            return
        if self.config.fetch_id_only and note.type in EVENT_TYPES:
            carried = {f"{r['resourceType']}/{r['id']}" for r in note.resources}
            todo = [
                f"{ev.number}|{relative_ref(ev.focus)}"
                for ev in note.events
                if ev.focus and relative_ref(ev.focus) not in carried
            ]
            if todo:
                self._spawn(self._fetch(sid, todo))
        if row.status == "error" and before != "error":  # alert on entering error, not on every repeat
            self._spawn(self._alert_and_reactivate(sid, note.errors))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ state

    def _row(self, s: Session, sid: str) -> FhirSubscriptionState | None:
        q = select(FhirSubscriptionState).where(
            FhirSubscriptionState.connector == self.id, FhirSubscriptionState.subscription == sid
        )
        return s.exec(q.with_for_update()).first()

    def _record(self, sid: str, note: Notification) -> tuple[FhirSubscriptionState, str | None]:
        """Apply a notification to the subscription's row; returns it and its status before."""
        try:
            return self._record_once(sid, note)
        except IntegrityError:
            # Two first notifications of one subscription raced to create its row: the
            # loser now finds the row (locked FOR UPDATE on PostgreSQL) and applies to it.
            return self._record_once(sid, note)

    def _record_once(self, sid: str, note: Notification) -> tuple[FhirSubscriptionState, str | None]:
        assert self.store is not None
        now = self.clock.now()
        with self.store.session() as s:
            row = self._row(s, sid)
            before = row.status if row is not None else None
            numbers = sorted({e.number for e in note.events if e.number is not None})
            if row is None:
                # First contact: we can only promise completeness from here on.
                start = (min(numbers) - 1) if numbers else (note.events_since or 0)
                row = FhirSubscriptionState(
                    connector=self.id,
                    subscription=sid,
                    contiguous=max(0, start),
                    events_since_start=max(0, start),
                    heartbeat_s=self.config.default_heartbeat_s,
                    updated_at=now,
                )
                s.add(row)
            elif (
                note.type == "handshake"
                and note.events_since is not None
                and note.events_since < row.contiguous
            ):
                # The server restarted its counter (a re-created subscription): start over.
                row.contiguous, row.seen_above, row.events_since_start = (
                    note.events_since,
                    [],
                    note.events_since,
                )
            self._apply(row, note, numbers, now)
            s.flush()
            return _detached(row), before

    def _apply(
        self, row: FhirSubscriptionState, note: Notification, numbers: list[int], now: datetime
    ) -> None:
        row.last_seen_at = now
        row.updated_at = now
        if note.status:
            row.status = note.status
        if note.topic and not row.topic:
            row.topic = str(note.topic)[:255]
        if note.status == "error":
            row.error = ",".join(note.errors)[:255] or "error"
        elif note.status == "active":
            row.error = None
        seen = set(row.seen_above)
        for n in numbers:
            if n > row.contiguous:
                seen.add(n)
        while row.contiguous + 1 in seen:
            row.contiguous += 1
            seen.discard(row.contiguous)
        row.seen_above = sorted(seen)
        # Counters only move forward; servers that send them wrong (late or zero) don't undo
        # what the event numbers prove.
        top = max([row.events_since_start, *numbers, note.events_since or 0])
        row.events_since_start = top
        stamps = [e.timestamp for e in note.events if e.timestamp is not None]
        if numbers and (row.last_event_at is None or (stamps and max(stamps) > utc(row.last_event_at))):
            row.last_event_at = max(stamps) if stamps else now
        types = set(row.resource_types)
        for ev in note.events:
            if ev.focus:
                types.add(relative_ref(ev.focus).split("/")[0])
        row.resource_types = sorted(types)
        gap = row.events_since_start > row.contiguous or bool(row.seen_above)
        if gap and row.gap_since is None:
            row.gap_since = now
            log.info(
                "connector %s: Subscription/%s gap after event %s (server at %s)",
                self.id,
                row.subscription,
                row.contiguous,
                row.events_since_start,
            )
        elif not gap:
            row.gap_since = None

    def states(self) -> list[FhirSubscriptionState]:
        assert self.store is not None
        with Session(self.store.engine, expire_on_commit=False) as s:
            rows = s.exec(
                select(FhirSubscriptionState).where(FhirSubscriptionState.connector == self.id)
            ).all()
            return [_detached(r) for r in rows]

    # ------------------------------------------------------------------ periodic check

    async def check(self) -> None:
        """The watchdog: recover gaps past grace, ask $status of silent subscriptions, retry
        id-only fetches and subscription management that failed before."""
        if self.store is None or self.sink is None:
            return
        async with self._check_lock:
            due = self._manage_next is None or self.clock.now() >= self._manage_next
            if due and self._needs_manage():
                await self._manage_logged()
            now = self.clock.now()
            grace = timedelta(seconds=self.config.grace_s)
            for row in self.states():
                if row.subscription.startswith("config:"):
                    continue
                try:
                    if row.pending_fetch:
                        await self._fetch(row.subscription, list(row.pending_fetch))
                    if row.gap_since is not None and now - utc(row.gap_since) >= grace:
                        await self.recover(row.subscription)
                    elif row.status == "error":
                        await self._reactivate(row.subscription)  # alerted already; keep asking
                    elif row.heartbeat_s and row.status in ("active", "requested", "unknown"):
                        last = utc(row.last_seen_at or row.updated_at)
                        if now - last > timedelta(seconds=row.heartbeat_s) + grace:
                            await self._silent(row)
                except CareloopError as exc:
                    log.warning(
                        "connector %s: check of Subscription/%s failed: %s", self.id, row.subscription, exc
                    )

    def _needs_manage(self) -> bool:
        placed = {r.name for r in self.states() if r.name and not r.subscription.startswith("config:")}
        return any(spec.name not in placed for spec in self.config.subscriptions)

    async def _silent(self, row: FhirSubscriptionState) -> None:
        log.info(
            "connector %s: Subscription/%s silent past heartbeat + grace; asking $status",
            self.id,
            row.subscription,
        )
        doc = await self.client.status(row.subscription)
        await asyncio.to_thread(self._touch, row.subscription)
        if doc is None:
            log.warning(
                "connector %s: Subscription/%s is silent and the server has no $status",
                self.id,
                row.subscription,
            )
            return
        try:
            notes = [n for n in parse(doc) if n.subscription_id in (None, row.subscription)]
        except NotANotification:
            log.warning("connector %s: $status answer is not a subscription status", self.id)
            return
        for note in notes:
            note.subscription = note.subscription or f"Subscription/{row.subscription}"
            state, before = await asyncio.to_thread(self._record, row.subscription, note)
            if state.status == "error" and before != "error":
                await self._alert_and_reactivate(row.subscription, note.errors)
            elif state.gap_since is not None:
                # Silence already outlasted the grace period: recover now.
                await self.recover(row.subscription)

    def _touch(self, sid: str) -> None:
        assert self.store is not None
        with self.store.session() as s:
            row = self._row(s, sid)
            if row is not None:
                row.last_seen_at = self.clock.now()

    # ------------------------------------------------------------------ recovery

    async def recover(self, sid: str) -> dict[str, int]:
        """Fill the gap of one subscription: $events, else search. Returns counts."""
        assert self.store is not None and self.sink is not None
        row = next((r for r in self.states() if r.subscription == sid), None)
        if row is None:
            return {}
        until = max([row.events_since_start, *row.seen_above])
        missing = [n for n in range(row.contiguous + 1, until + 1) if n not in set(row.seen_above)]
        stats = {"missing": len(missing), "events": 0, "searched": 0, "stored": 0}
        if missing and sid not in self._no_events:
            doc = await self.client.events(sid, min(missing), max(missing))
            if doc is None:
                self._no_events.add(sid)
            else:
                body = json.dumps(doc).encode()
                try:
                    items, note = self._read(body, {})
                except PermanentError as exc:
                    log.warning("connector %s: $events answer unusable: %s", self.id, exc)
                    items, note = [], None
                if note is not None:
                    note.subscription = note.subscription or f"Subscription/{sid}"
                    got = [e.number for e in note.events if e.number in set(missing)]
                    stats["events"] = len(got)
                    results = await self.sink.put(items)
                    stats["stored"] += sum(1 for r in results if not r.duplicate)
                    await asyncio.to_thread(self._record, sid, note)
                    await self.settle_fetches(sid, note)
        row = next((r for r in self.states() if r.subscription == sid), row)
        still = row.events_since_start > row.contiguous or bool(row.seen_above)
        if still:
            stored, searched, newest = await self._search_since(row)
            stats["searched"], stats["stored"] = searched, stats["stored"] + stored
            await asyncio.to_thread(self._close_gap, sid, newest)
        await asyncio.to_thread(self._audit, "fhir.subscription.recovered", sid, "success", stats)
        log.info("connector %s: Subscription/%s recovered: %s", self.id, sid, stats)
        return stats

    async def settle_fetches(self, sid: str, note: Notification) -> None:
        carried = {f"{r['resourceType']}/{r['id']}" for r in note.resources}
        todo = [
            f"{ev.number}|{relative_ref(ev.focus)}"
            for ev in note.events
            if ev.focus and relative_ref(ev.focus) not in carried
        ]
        if todo and self.config.fetch_id_only:
            await self._fetch(sid, todo)

    async def _search_since(self, row: FhirSubscriptionState) -> tuple[int, int, datetime | None]:
        """Search the subscription's resource types changed since the last event we hold."""
        assert self.sink is not None
        spec = next((sp for sp in self.config.subscriptions if sp.name == row.name), None)
        types = (spec.types() if spec else []) or list(row.resource_types)
        if not types:
            log.warning(
                "connector %s: Subscription/%s gap cannot be searched: no resource types known "
                "(set resource_types)",
                self.id,
                row.subscription,
            )
            return 0, 0, None
        since = utc(row.last_event_at or row.updated_at) - timedelta(seconds=self.config.overlap_s)
        stored = searched = 0
        newest: datetime | None = None
        for rtype in types:
            params: dict[str, Any] = {
                "_lastUpdated": f"ge{since.strftime('%Y-%m-%dT%H:%M:%SZ')}",
                "_count": "100",
            }
            params.update(self._criteria_params(spec, rtype))
            batch: list[RawIn] = []
            async for res in self.client.search(rtype, params):
                searched += 1
                lu = parse_instant((res.get("meta") or {}).get("lastUpdated"))
                if lu is not None and (newest is None or lu > newest):
                    newest = lu
                batch.append(
                    resource_item(
                        self.id,
                        self.base,
                        res,
                        None,
                        {"x-careloop-subscription": row.subscription, "x-careloop-recovered": "search"},
                    )
                )
                if len(batch) >= 100:
                    stored += sum(1 for r in await self.sink.put(batch) if not r.duplicate)
                    batch = []
            if batch:
                stored += sum(1 for r in await self.sink.put(batch) if not r.duplicate)
        return stored, searched, newest

    @staticmethod
    def _criteria_params(spec: SubscriptionSpec | None, rtype: str) -> dict[str, str]:
        # Search only what the subscription would have notified: its criteria or filters.
        if spec is None:
            return {}
        out: dict[str, str] = {}
        for crit in ([spec.criteria] if spec.criteria else []) + list(spec.filters):
            t, _, q = crit.partition("?")
            if t == rtype and q:
                for pair in q.split("&"):
                    k, _, v = pair.partition("=")
                    if k and not k.startswith("_"):
                        out[k] = v
        return out

    def _close_gap(self, sid: str, newest: datetime | None) -> None:
        assert self.store is not None
        with self.store.session() as s:
            row = self._row(s, sid)
            if row is None:
                return
            row.contiguous = max([row.contiguous, row.events_since_start, *row.seen_above])
            row.seen_above, row.gap_since, row.updated_at = [], None, self.clock.now()
            # The next search starts from the newest change the server showed us (its clock,
            # not ours), so clock skew between us and the EHR cannot open a hole.
            if newest is not None and (row.last_event_at is None or newest > utc(row.last_event_at)):
                row.last_event_at = newest

    async def _sync_criteria(self) -> None:
        """After a ping: search every criteria subscription's type for recent changes."""
        for row in self.states():
            spec = next((sp for sp in self.config.subscriptions if sp.name == row.name), None)
            if spec is None or spec.criteria is None or row.subscription.startswith("config:"):
                continue
            try:
                _, _, newest = await self._search_since(row)
                await asyncio.to_thread(self._mark_synced, row.subscription, newest)
            except CareloopError as exc:
                log.warning("connector %s: ping sync failed: %s", self.id, exc)

    def _mark_synced(self, sid: str, newest: datetime | None) -> None:
        assert self.store is not None
        with self.store.session() as s:
            row = self._row(s, sid)
            if row is not None:
                row.last_seen_at = self.clock.now()
                if newest is not None and (row.last_event_at is None or newest > utc(row.last_event_at)):
                    row.last_event_at = newest

    # ------------------------------------------------------------------ id-only fetches

    async def _fetch(self, sid: str, todo: list[str]) -> None:
        """Read each id-only focus (``"<event>|Type/id"``) and store it as its own raw message;
        what fails stays in ``pending_fetch`` for the next check."""
        assert self.sink is not None
        failed: list[str] = []
        done: list[str] = []
        for entry in todo:
            number, _, ref = entry.partition("|")
            try:
                res = await self.client.read(ref)
            except CareloopError as exc:
                log.warning(
                    "connector %s: fetch of an id-only %s failed: %s", self.id, ref.split("/")[0], exc
                )
                failed.append(entry)
                continue
            done.append(entry)
            if res is None:
                continue
            item = resource_item(
                self.id,
                self.base,
                res,
                f"fhirsub|{sid}|{number}|{ref}"[:255],
                {"x-careloop-subscription": sid},
            )
            try:
                await self.sink.put([item])
            except CareloopError:
                done.pop()
                failed.append(entry)
        await asyncio.to_thread(self._pending, sid, failed, done)

    def _pending(self, sid: str, failed: list[str], done: list[str]) -> None:
        assert self.store is not None
        with self.store.session() as s:
            row = self._row(s, sid)
            if row is not None:
                keep = [e for e in row.pending_fetch if e not in done]
                row.pending_fetch = keep + [e for e in failed if e not in keep]

    # ------------------------------------------------------------------ errors and alerts

    def _audit(self, action: str, sid: str, outcome: str, detail: dict[str, Any]) -> None:
        assert self.store is not None
        with self.store.session() as s:
            audit_log.append(
                s,
                at=self.clock.now(),
                actor=f"connector:{self.id}",
                action=action,
                outcome=outcome,
                entity=f"Subscription/{sid}",
                detail=detail,
            )

    async def _alert_and_reactivate(self, sid: str, errors: list[str]) -> None:
        log.error(
            "connector %s: ALERT Subscription/%s is in error (%s); requesting reactivation",
            self.id,
            sid,
            ",".join(errors) or "no code",
        )
        await asyncio.to_thread(self._audit, "fhir.subscription.error", sid, "failure", {"errors": errors})
        await self._reactivate(sid)

    async def _reactivate(self, sid: str) -> None:
        try:
            current = await self.client.read(f"Subscription/{sid}")
            if current is None:
                raise PermanentError("the Subscription no longer exists on the server")
            # Per the IG a client sets status back to "requested"; the server handshakes again.
            current["status"] = "requested"
            current.pop("error", None)
            await self.client.update(current)
            await asyncio.to_thread(self._set_status, sid, "requested", None)
            await asyncio.to_thread(self._audit, "fhir.subscription.reactivate", sid, "success", {})
        except CareloopError as exc:
            log.warning("connector %s: reactivation of Subscription/%s failed: %s", self.id, sid, exc)

    def _set_status(self, sid: str, status: str, error: str | None) -> None:
        assert self.store is not None
        with self.store.session() as s:
            row = self._row(s, sid)
            if row is not None:
                row.status, row.error, row.updated_at = status, error, self.clock.now()

    # ------------------------------------------------------------------ subscription manager

    def subscription_resource(self, spec: SubscriptionSpec) -> dict[str, Any]:
        """The R4 Subscription for ``spec``: criteria-based, or Backport IG topic-based."""
        secret = self.config.secret.get_secret_value()
        header = (
            f"Authorization: Bearer {secret}"
            if self.config.secret_header.lower() == "authorization"
            else f"{self.config.secret_header}: {secret}"
        )
        channel: dict[str, Any] = {"type": "rest-hook", "endpoint": self.endpoint, "header": [header]}
        sub: dict[str, Any] = {"resourceType": "Subscription", "status": "requested", "reason": spec.reason}
        if spec.criteria:
            sub["criteria"] = spec.criteria
            if spec.payload != "empty":
                channel["payload"] = FHIR_JSON  # R4 criteria: a payload means the full resource
        else:
            sub["meta"] = {"profile": [f"{BP}/backport-subscription"]}
            sub["criteria"] = spec.topic
            if spec.filters:
                sub["_criteria"] = {
                    "extension": [
                        {"url": f"{BP}/backport-filter-criteria", "valueString": f} for f in spec.filters
                    ]
                }
            channel["payload"] = FHIR_JSON
            channel["_payload"] = {
                "extension": [{"url": f"{BP}/backport-payload-content", "valueCode": spec.payload}]
            }
            if spec.heartbeat_s:
                channel["extension"] = [
                    {"url": f"{BP}/backport-heartbeat-period", "valueUnsignedInt": spec.heartbeat_s}
                ]
        sub["channel"] = channel
        return sub

    async def _manage_logged(self) -> None:
        try:
            await self.manage()
            self.manage_error, self._manage_failures, self._manage_next = None, 0, None
        except CareloopError as exc:
            # Retried with backoff (15 s doubling to 15 min): an EHR that is down for hours
            # must not fill the log, and readiness shows why (``health``).
            self._manage_failures += 1
            wait = min(900.0, 15.0 * 2 ** (self._manage_failures - 1))
            self._manage_next = self.clock.now() + timedelta(seconds=wait)
            self.manage_error = f"subscriptions not in place ({exc}); retrying in {wait:.0f} s"
            log.warning(
                "connector %s: could not place subscriptions on the EHR (attempt %d), retry in %.0f s: %s",
                self.id,
                self._manage_failures,
                wait,
                exc,
            )

    async def manage(self) -> list[str]:
        """Create or update every configured Subscription on the EHR; returns their server ids."""
        ids = []
        for spec in self.config.subscriptions:
            want = self.subscription_resource(spec)
            row = await asyncio.to_thread(self._named, spec)
            current = None
            if row is not None and not row.subscription.startswith("config:"):
                current = await self.client.read(f"Subscription/{row.subscription}")
            if current is not None:
                want["id"] = current["id"]
                if _same(current, want) and current.get("status") in ("active", "requested"):
                    ids.append(current["id"])
                    continue
                saved = await self.client.update(want)
            else:
                saved = await self.client.create(want)
            sid = str(saved.get("id") or want.get("id"))
            await asyncio.to_thread(self._adopt, spec, sid, str(saved.get("status") or "requested"))
            await asyncio.to_thread(
                self._audit,
                "fhir.subscription.manage",
                sid,
                "success",
                {"name": spec.name, "created": current is None},
            )
            log.info("connector %s: Subscription %s is Subscription/%s on the EHR", self.id, spec.name, sid)
            ids.append(sid)
        return ids

    def _named(self, spec: SubscriptionSpec) -> FhirSubscriptionState | None:
        assert self.store is not None
        with self.store.session() as s:
            q = select(FhirSubscriptionState).where(
                FhirSubscriptionState.connector == self.id, FhirSubscriptionState.name == spec.name
            )
            row = s.exec(q).first()
            return _detached(row) if row is not None else None

    def _adopt(self, spec: SubscriptionSpec, sid: str, status: str) -> None:
        """Tie config entry ``spec`` to server id ``sid`` (the handshake may have come first)."""
        assert self.store is not None
        now = self.clock.now()
        with self.store.session() as s:
            for old in s.exec(
                select(FhirSubscriptionState).where(
                    FhirSubscriptionState.connector == self.id,
                    FhirSubscriptionState.name == spec.name,
                    FhirSubscriptionState.subscription != sid,
                )
            ).all():
                s.delete(old)
            s.flush()
            row = self._row(s, sid)
            if row is None:
                # A subscription we just created starts at event 0: everything after is ours to hold.
                row = FhirSubscriptionState(
                    connector=self.id, subscription=sid, updated_at=now, last_seen_at=now, last_event_at=now
                )
                s.add(row)
            # R4 criteria subscriptions have no heartbeat: the watchdog only watches topic ones.
            row.name, row.topic = spec.name, (spec.topic or spec.criteria)
            row.heartbeat_s = spec.heartbeat_s if spec.topic else None
            row.resource_types = sorted(set(row.resource_types) | set(spec.types()))
            if row.status in ("unknown", "error", "off"):
                row.status = status
            row.updated_at = now


def _same(current: dict[str, Any], want: dict[str, Any]) -> bool:
    keys = ("criteria", "_criteria", "channel")
    return all(current.get(k) == want.get(k) for k in keys)


def _detached(row: FhirSubscriptionState) -> FhirSubscriptionState:
    # A copy that outlives its session; timestamp columns never set are None.
    return FhirSubscriptionState.model_validate(
        {k: getattr(row, k, None) for k in FhirSubscriptionState.model_fields}
    )
