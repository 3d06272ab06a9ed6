"""``careloop run``: one asyncio process serving HTTP, MLLP and the stage workers.

SIGTERM (or Ctrl-C) stops the listeners, lets every worker finish the batch in hand and
exits; nothing is acknowledged before it is committed, so nothing acknowledged is lost,
and work still pending in the tables resumes at the next start.
"""

from __future__ import annotations

import logging

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


async def serve(config: AppConfig) -> None:
    hub = Hub(config)
    app = create_app(hub)
    await hub.start()
    scheduler = AsyncIOScheduler(timezone="UTC")
    scheduler.add_job(lambda: log.info("backlog", extra=backlog(hub)), "interval", seconds=60, id="backlog")
    for job in hub.scheduled_jobs:
        scheduler.add_job(**job)
    scheduler.start()
    server = uvicorn.Server(uvicorn.Config(app, host=config.server.host, port=config.server.port,
                                          log_config=None, access_log=False, lifespan="off"))
    log.info("careloop listening", extra={"http": f"{config.server.host}:{config.server.port}"})
    try:
        await server.serve()  # returns on SIGTERM/SIGINT
    finally:
        log.info("draining")
        scheduler.shutdown(wait=False)
        await hub.stop()
        log.info("stopped")
