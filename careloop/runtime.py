"""``careloop run``: one asyncio process serving HTTP, MLLP and the stage workers.

SIGTERM (or Ctrl-C) stops the listeners, lets every worker finish the batch in hand and
exits; nothing is acknowledged before it is committed, so nothing acknowledged is lost,
and work still pending in the tables resumes at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Iterator
from typing import Any

import uvicorn
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import func
from sqlmodel import Session, select

from careloop.app import create_app
from careloop.config import AppConfig
from careloop.hub import Hub
from careloop.tables import JourneyEvent, OutboxItem, RawMessage

log = logging.getLogger("careloop.runtime")


def backlog(hub: Hub) -> dict[str, int]:
    """Pending work per stage (for the periodic log line and the status page)."""
    with Session(hub.store.engine) as s:
        return {
            "raw_pending": s.exec(select(func.count()).where(RawMessage.status == "pending")).one(),
            "events_pending": s.exec(select(func.count()).where(JourneyEvent.status == "pending")).one(),
            "outbox_pending": s.exec(select(func.count()).where(OutboxItem.status == "pending")).one(),
        }


def ensure_keys(config: AppConfig) -> None:
    """A first start creates the audit keys it needs (0600) and says so; production
    deployments provision them (``careloop audit keygen``, ``careloop token keygen``)."""
    from audit import checkpoint
    from careloop import tokens

    signing = tokens.signing_key_path(config)
    if not signing.exists():
        checkpoint.generate_key(signing)
        log.warning("created a new audit checkpoint signing key", extra={"path": str(signing)})
    token = tokens.token_key_path(config)
    if not token.exists():
        tokens.generate_token_key(token)
        log.warning("created a new API token key", extra={"path": str(token)})


def audit_jobs(hub: Hub) -> list[dict[str, Any]]:
    """Checkpoints every minute (cheap when none is due) and raw-message retention daily."""
    from audit import checkpoint, retention

    cfg = hub.config
    run_checkpoint = checkpoint.job_from_config(hub.store, cfg)

    jobs: list[dict[str, Any]] = [
        {"func": run_checkpoint, "trigger": "interval", "seconds": 60, "id": "audit-checkpoint"}
    ]
    days = cfg.audit.raw_retention_days
    if days is not None:  # raw messages are kept for good unless a retention is configured

        def prune() -> None:
            with hub.store.session() as s:
                n = retention.prune_raw_messages(s, older_than_days=days, now=hub.store.clock.now())
            log.info("raw message retention", extra={"pruned": n})

        jobs.append({"func": prune, "trigger": "interval", "hours": 24, "id": "raw-retention"})
    return jobs


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: it re-raises SIGTERM once it has stopped,
    which would kill the process before the workers drain. The hub handles the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def request_exit(self) -> None:
        log.info("signal received: stopping")
        self.should_exit = True


def settle_heap(young: int = 10_000) -> None:
    """Tune the cyclic garbage collector for a long-running hub, once startup is done.

    Everything alive after startup (modules, config, plugins, compiled SQL, templates)
    lives as long as the process: it is collected once and frozen, so full collections no
    longer walk it. A batch of a few hundred events allocates hundreds of thousands of
    short-lived objects (rows, dicts, JSON documents); the young generation is collected
    every ``young`` allocations instead of CPython's 700, which on the orchestrator
    benchmark took the collector's share of a stage from about a fifth to a few percent
    (bench/orchestrator.py measures with and without). Memory stays bounded: garbage in
    cycles is still collected, a little later."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young, older, oldest)


async def serve(config: AppConfig) -> None:
    ensure_keys(config)
    hub = Hub(config)
    app = create_app(hub)
    await hub.start()
    scheduler = AsyncIOScheduler(timezone="UTC")
    scheduler.add_job(lambda: log.info("backlog", extra=backlog(hub)), "interval", seconds=60, id="backlog")
    for job in audit_jobs(hub):
        scheduler.add_job(**job)
    for job in hub.scheduled_jobs:
        scheduler.add_job(**job)
    scheduler.start()
    server = _Server(
        uvicorn.Config(
            app,
            host=config.server.host,
            port=config.server.port,
            log_config=None,
            access_log=False,
            lifespan="off",
        )
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_exit)
    settle_heap()
    log.info("careloop listening", extra={"http": f"{config.server.host}:{config.server.port}"})
    try:
        await server.serve()  # returns on SIGTERM/SIGINT
    finally:
        log.info("draining")
        scheduler.shutdown(wait=False)
        await hub.stop()
        log.info("stopped")
