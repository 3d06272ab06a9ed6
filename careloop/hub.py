"""The hub: one process's worth of connectors, stages and channels over one store."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
from sqlalchemy import text

from careloop.clock import Clock, SystemClock
from careloop.config import AppConfig
from careloop.db import database_url, make_engine, upgrade
from careloop.ingest import IngestSink
from careloop.pipeline import MapStage, Stage, drain, run_stage
from careloop.plugins import Health
from careloop.store import Store
from careloop.wiring import MapperRegistry, build_channels, build_connectors, channel_facts, check
from channels.base import Channel
from channels.outbox import DeliverStage
from orchestrator.engine import Orchestrator

log = logging.getLogger("careloop.hub")


class Hub:
    """Everything a config enables, wired over one store.

    ``capture=True`` (replay, demo) swaps every channel for a capture channel with the
    same capabilities and starts no network listeners.
    """

    def __init__(
        self,
        config: AppConfig,
        *,
        store: Store | None = None,
        clock: Clock | None = None,
        capture: bool = False,
        migrate: bool = True,
    ) -> None:
        self.config = config
        self.checked = check(config)
        if store is None:
            engine = make_engine(database_url(config.database.url))
            store = Store(engine, clock or SystemClock())
        self.store = store
        if migrate:
            upgrade(store.engine)
        self.capture = capture
        self.http = httpx.AsyncClient(timeout=10.0)
        deps: dict[str, Any] = {"store": store, "clock": store.clock, "http": self.http, "app_config": config}
        self.sink = IngestSink(store)
        self.connectors = build_connectors(self.checked, **deps)
        self.channels: dict[str, Channel] = build_channels(self.checked, capture=capture, **deps)
        self.mappers = MapperRegistry(self.connectors)
        self.orchestrator = Orchestrator(
            store, config, self.checked.playbooks, self.checked.templates, channel_facts(self.channels)
        )
        retry = config.delivery
        self.deliver = DeliverStage(
            store,
            self.channels,
            max_attempts=retry.max_attempts,
            backoff_base=retry.retry_base_seconds,
            backoff_cap=retry.retry_cap_seconds,
            check=self.orchestrator.send_check,
        )
        self.stages: list[Stage] = [MapStage(store, self.mappers), self.orchestrator, self.deliver]
        # Periodic work the plugins ask for (pollers, heartbeat watchdogs): APScheduler
        # add_job keyword arguments, e.g. {"func": ..., "trigger": "interval", "seconds": 30, "id": ...}.
        self.scheduled_jobs: list[dict[str, Any]] = [
            job for conn in self.connectors.values() for job in (conn.jobs() if hasattr(conn, "jobs") else [])
        ]
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.started = False

    async def drain(self) -> None:
        await drain(self.stages)

    async def start(self) -> None:
        """Start the connectors (listeners) and the stage workers."""
        recover = getattr(self.deliver, "recover", None)
        if recover is not None:
            await recover()
        for cid, conn in self.connectors.items():
            await conn.start(self.sink)
            log.info("connector %s started", cid)
        # Each stage wakes the next when it produced work; the sink wakes the first.
        wakes = [asyncio.Event() for _ in self.stages]
        loop = asyncio.get_running_loop()

        def nudge() -> None:
            loop.call_soon_threadsafe(wakes[0].set)

        self.sink.on_commit = nudge
        self._tasks = [
            asyncio.create_task(
                run_stage(st, self._stop, wake=wakes[i], then=wakes[i + 1] if i + 1 < len(wakes) else None),
                name=f"stage:{st.name}",
            )
            for i, st in enumerate(self.stages)
        ]
        self.started = True

    async def stop(self) -> None:
        """Stop taking input, let the workers finish the batch in hand, then close."""
        for conn in self.connectors.values():
            await conn.stop()
        self.sink.on_commit = None
        self._stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for ch in self.channels.values():
            await ch.aclose()
        await self.http.aclose()
        self.sink.close()
        self.started = False

    def ready(self) -> tuple[bool, dict[str, Any]]:
        detail: dict[str, Any] = {}
        try:
            with self.store.engine.connect() as c:
                c.execute(text("SELECT 1"))
            detail["database"] = "ok"
        except Exception as exc:  # readiness reports, it does not raise
            detail["database"] = type(exc).__name__
        down = detail["database"] != "ok"
        plugins: list[tuple[str, Health]] = [
            (f"connector:{cid}", c.health()) for cid, c in self.connectors.items()
        ]
        # Channels may report health (optional: see channels.base.Channel); those without are not listed.
        for chid, ch in self.channels.items():
            health = getattr(ch, "health", None)
            if health is not None:
                plugins.append((f"channel:{chid}", health()))
        for key, h in plugins:
            # A plugin that works but is degraded (a connector's EHR subscriptions not in place
            # yet, a channel's credentials rejected) says why without failing readiness: the
            # hub still takes everything in, and a channel's items wait in the outbox.
            if h.ok:
                state = "degraded" if h.degraded else "ok"
                detail[key] = f"{state}: {h.detail}" if h.detail else state
            else:
                detail[key] = h.detail or "down"
                down = True
        return self.started and not down, detail
