"""FHIR polling, for servers without subscriptions.

Every ``interval_s`` the poller searches each configured resource type for
``_lastUpdated >= watermark - overlap_s`` (sorted by ``_lastUpdated``, paged through
``Bundle.link[next]``) and stores each resource version as its own raw message
(``fhir:<Type>``), keyed by versionId, so the overlap window, which guards against clock
skew and commits landing out of order on the server, never stores a version twice. The
watermark (the newest ``meta.lastUpdated`` seen per type) lives in the
``fhir_subscription_state`` table (subscription ``poll:<Type>``), so a restart resumes
where it left off.

A poller is a singleton: two processes polling the same server would only do the work
twice (dedup keeps the data right). On PostgreSQL each round holds a session advisory lock
(``pg_try_advisory_lock``) and a process that does not get it skips the round, so several
careloop processes can run the same config. SQLite means one process, so no lock is needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar

import httpx
from fastapi import APIRouter
from pydantic import Field
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlmodel import select

from careloop.clock import Clock, SystemClock, utc
from careloop.errors import CareloopError, PermanentError
from careloop.model import RawIn
from careloop.plugins import MapperChoice
from careloop.store import Store
from careloop.tables import FhirSubscriptionState
from connectors.base import Health, RawSink
from connectors.fhir_client import FhirClient, FhirServerConfig, SmartBackendAuth
from connectors.fhir_notify import parse_instant, resource_item

log = logging.getLogger("careloop.connectors.fhir_poll")


class FhirPollConfig(FhirServerConfig):
    """Poll ``base_url`` for changed resources of ``resource_types``."""

    plugin: str = "fhir_poll"
    resource_types: list[str] = Field(
        default_factory=lambda: ["Appointment", "Encounter", "Patient"], min_length=1
    )
    params: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="extra search parameters per type"
    )
    interval_s: float = Field(60.0, gt=0)
    overlap_s: float = Field(300.0, ge=0)
    initial_lookback_s: float = Field(86400.0, ge=0, description="first poll looks back this far")
    page_size: int = Field(100, ge=1, le=1000)


class FhirPollConnector:
    """Polls a FHIR server by ``_lastUpdated`` with an overlap window (see module docstring)."""

    name: ClassVar[str] = "fhir_poll"
    Config: ClassVar[type[FhirPollConfig]] = FhirPollConfig

    def __init__(
        self,
        id: str,
        config: FhirPollConfig,
        *,
        store: Store | None = None,
        clock: Clock | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.id, self.config, self.store = id, config, store
        self.clock: Clock = clock or (store.clock if store else SystemClock())
        self.base = config.base_url.rstrip("/")
        self._own_http = http is None
        self.http = http or httpx.AsyncClient(timeout=config.timeout_s)
        auth = SmartBackendAuth(config.auth, self.http, id) if config.auth else None
        self.client = FhirClient(self.base, self.http, connector=id, auth=auth, timeout_s=config.timeout_s)
        self.sink: RawSink | None = None
        self._lock = asyncio.Lock()
        self.last_error: str | None = None
        self.rounds = 0

    def accept(self, body: bytes, headers: Mapping[str, str]) -> Sequence[RawIn]:
        """A polled resource (the replay entry point): one raw message keyed by its version."""
        try:
            doc = json.loads(body)
        except ValueError:
            raise PermanentError("body is not JSON") from None
        if not isinstance(doc, dict) or not doc.get("resourceType") or not doc.get("id"):
            raise PermanentError("body is not a FHIR resource with an id")
        return [resource_item(self.id, self.base, doc, None)]

    async def start(self, sink: RawSink) -> None:
        self.sink = sink

    async def stop(self) -> None:
        self.sink = None
        if self._own_http:
            await self.http.aclose()

    def mapper_choice(self) -> MapperChoice:
        return self.config.mapper_choice()

    def health(self) -> Health:
        return Health(self.sink is not None, self.last_error or "", degraded=bool(self.last_error))

    def router(self) -> APIRouter | None:
        return None

    def jobs(self) -> list[dict[str, Any]]:
        return [
            {
                "func": self.poll,
                "trigger": "interval",
                "seconds": self.config.interval_s,
                "id": f"fhir_poll:{self.id}",
                "max_instances": 1,
                "coalesce": True,
            }
        ]

    # ------------------------------------------------------------------ polling

    def lock_key(self) -> int:
        digest = hashlib.sha256(f"careloop:fhir_poll:{self.id}".encode()).digest()
        return int.from_bytes(digest[:8], "big", signed=True)

    def _try_lock(self) -> Connection | None:
        """PostgreSQL: hold a session advisory lock on a dedicated connection for the round."""
        assert self.store is not None
        if self.store.engine.dialect.name != "postgresql":
            return None
        conn = self.store.engine.connect()
        got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.lock_key()}).scalar()
        conn.commit()
        if not got:
            conn.close()
            raise _Busy
        return conn

    def _unlock(self, conn: Connection | None) -> None:
        if conn is None:
            return
        try:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.lock_key()})
            conn.commit()
        finally:
            conn.close()

    async def poll(self) -> dict[str, int]:
        """One round over every type; returns {type: new versions stored}."""
        if self.sink is None or self.store is None:
            return {}
        async with self._lock:
            try:
                conn = await asyncio.to_thread(self._try_lock)
            except _Busy:
                log.info("connector %s: another process holds the poll lock; skipping this round", self.id)
                return {}
            try:
                out = {}
                for rtype in self.config.resource_types:
                    try:
                        out[rtype] = await self._poll_type(rtype)
                    except CareloopError as exc:
                        self.last_error = f"{rtype}: {exc}"[:200]
                        log.warning("connector %s: poll of %s failed: %s", self.id, rtype, exc)
                self.rounds += 1
                return out
            finally:
                await asyncio.to_thread(self._unlock, conn)

    async def _poll_type(self, rtype: str) -> int:
        assert self.sink is not None
        mark = await asyncio.to_thread(self._watermark, rtype)
        since = mark - timedelta(seconds=self.config.overlap_s)
        params = {
            "_lastUpdated": f"ge{since.strftime('%Y-%m-%dT%H:%M:%SZ')}",
            "_sort": "_lastUpdated",
            "_count": str(self.config.page_size),
            **self.config.params.get(rtype, {}),
        }
        stored, newest = 0, mark
        batch: list[RawIn] = []
        async for res in self.client.search(rtype, params):
            batch.append(resource_item(self.id, self.base, res, None, {"x-careloop-polled": rtype}))
            lu = parse_instant((res.get("meta") or {}).get("lastUpdated"))
            if lu is not None and lu > newest:
                newest = lu
            if len(batch) >= self.config.page_size:
                stored += sum(1 for r in await self.sink.put(batch) if not r.duplicate)
                batch = []
        if batch:
            stored += sum(1 for r in await self.sink.put(batch) if not r.duplicate)
        await asyncio.to_thread(self._advance, rtype, newest)
        self.last_error = None
        return stored

    def _watermark(self, rtype: str) -> datetime:
        assert self.store is not None
        with self.store.session() as s:
            row = s.exec(
                select(FhirSubscriptionState).where(
                    FhirSubscriptionState.connector == self.id,
                    FhirSubscriptionState.subscription == f"poll:{rtype}",
                )
            ).first()
            if row is not None and row.last_event_at is not None:
                return utc(row.last_event_at)
        return self.clock.now() - timedelta(seconds=self.config.initial_lookback_s)

    def _advance(self, rtype: str, newest: datetime) -> None:
        assert self.store is not None
        now = self.clock.now()
        with self.store.session() as s:
            row = s.exec(
                select(FhirSubscriptionState).where(
                    FhirSubscriptionState.connector == self.id,
                    FhirSubscriptionState.subscription == f"poll:{rtype}",
                )
            ).first()
            if row is None:
                row = FhirSubscriptionState(
                    connector=self.id,
                    subscription=f"poll:{rtype}",
                    name=f"poll:{rtype}",
                    status="active",
                    resource_types=[rtype],
                    updated_at=now,
                )
                s.add(row)
            if row.last_event_at is None or newest > utc(row.last_event_at):
                row.last_event_at = newest
            row.last_seen_at, row.updated_at = now, now


class _Busy(Exception):
    """Another process holds this poller's advisory lock."""
