"""connectors.fhir_poll: _lastUpdated polling with an overlap window, versionId dedup,
a persisted watermark, and the PostgreSQL advisory lock that keeps it a singleton."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import httpx
import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from careloop.clock import VirtualClock
from careloop.pipeline import IngestSink
from careloop.store import Store
from careloop.tables import FhirSubscriptionState, RawMessage
from connectors.fhir_poll import FhirPollConfig, FhirPollConnector
from tests.fhir_local_server import LocalFhirServer, serve


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def ehr() -> AsyncIterator[LocalFhirServer]:
    srv = LocalFhirServer()
    async with serve(srv.app) as url:
        srv.base = f"{url}/fhir"
        yield srv


def _keys(store: Store) -> list[str]:
    with Session(store.engine) as s:
        return sorted(k for k in s.exec(select(RawMessage.dedup_key)) if k)


def _poller(store: Store, ehr: LocalFhirServer, http: httpx.AsyncClient) -> FhirPollConnector:
    cfg = FhirPollConfig.model_validate(
        {
            "plugin": "fhir_poll",
            "base_url": ehr.base,
            "resource_types": ["Appointment"],
            "page_size": 2,
            "overlap_s": 300,
        }
    )
    return FhirPollConnector("ehrpoll", cfg, store=store, http=http)


@pytest.mark.anyio
async def test_poll_stores_each_version_once_across_overlapping_rounds(
    store: Store, ehr: LocalFhirServer
) -> None:
    async with httpx.AsyncClient() as http:
        poller = _poller(store, ehr, http)
        await poller.start(IngestSink(store))
        for i in range(3):
            ehr.write({"resourceType": "Appointment", "id": f"a{i}", "status": "booked", "participant": []})
        assert await poller.poll() == {"Appointment": 3}
        assert await poller.poll() == {"Appointment": 0}  # the overlap re-reads them; dedup drops them
        ehr.write({"resourceType": "Appointment", "id": "a1", "status": "cancelled", "participant": []})
        assert await poller.poll() == {"Appointment": 1}
        assert _keys(store) == [
            "res|Appointment/a0|1",
            "res|Appointment/a1|1",
            "res|Appointment/a1|2",
            "res|Appointment/a2|1",
        ]
        searches = [r for r in ehr.requests if r.startswith("GET Appointment?")]
        assert all("_lastUpdated=ge" in r and "_sort=_lastUpdated" in r for r in searches)
        with Session(store.engine) as s:
            mark = s.exec(
                select(FhirSubscriptionState).where(FhirSubscriptionState.subscription == "poll:Appointment")
            ).one()
        assert mark.last_event_at is not None
        await poller.stop()


@pytest.mark.anyio
async def test_watermark_survives_a_restart(store: Store, ehr: LocalFhirServer) -> None:
    saved = ehr.write({"resourceType": "Appointment", "id": "a0", "status": "booked", "participant": []})
    async with httpx.AsyncClient() as http:
        first = _poller(store, ehr, http)
        await first.start(IngestSink(store))
        await first.poll()
        assert isinstance(store.clock, VirtualClock)
        store.clock.set(store.clock.now() + timedelta(days=3))
        second = _poller(store, ehr, http)
        await second.start(IngestSink(store))
        assert await second.poll() == {"Appointment": 0}
    # The new process resumes from the stored watermark (newest lastUpdated) minus the overlap.
    lu = datetime.fromisoformat(saved["meta"]["lastUpdated"].replace("Z", "+00:00"))
    since = (lu - timedelta(seconds=300)).strftime("%Y-%m-%dT%H:%M:%SZ")
    last = [r for r in ehr.requests if r.startswith("GET Appointment?")][-1]
    assert f"_lastUpdated=ge{since}".replace(":", "%3A") in last


@pytest.mark.anyio
async def test_poll_skips_its_round_while_another_process_holds_the_lock(
    store: Store, ehr: LocalFhirServer
) -> None:
    if store.engine.dialect.name != "postgresql":
        pytest.skip("the advisory lock is PostgreSQL's; SQLite runs one process")
    ehr.write({"resourceType": "Appointment", "id": "a0", "status": "booked", "participant": []})
    async with httpx.AsyncClient() as http:
        poller = _poller(store, ehr, http)
        await poller.start(IngestSink(store))
        with store.engine.connect() as other:
            assert other.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": poller.lock_key()}).scalar()
            other.commit()
            assert await poller.poll() == {}
            assert _keys(store) == []
            other.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": poller.lock_key()})
            other.commit()
        assert await poller.poll() == {"Appointment": 1}


def test_jobs_ask_for_the_configured_interval(store: Store) -> None:
    cfg = FhirPollConfig.model_validate(
        {"plugin": "fhir_poll", "base_url": "http://127.0.0.1:1/fhir", "interval_s": 42}
    )
    (job,) = FhirPollConnector("p", cfg, store=store, http=httpx.AsyncClient()).jobs()
    assert job["seconds"] == 42 and job["max_instances"] == 1 and job["id"] == "fhir_poll:p"
