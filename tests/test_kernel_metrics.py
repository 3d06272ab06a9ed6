"""``/metrics``: the store's state in the Prometheus text format, counts and codes only."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from careloop.app import create_app
from careloop.clock import SystemClock
from careloop.config import AppConfig
from careloop.db import make_engine
from careloop.hub import Hub
from careloop.pipeline import IngestSink, MapStage
from careloop.store import Store
from careloop.wiring import MapperRegistry
from connectors.base import Health
from tests.kernel_plugins import JsonConnector, register

register()


def _sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    key = f"{name}{{{want}}}" if want else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {key}")


@pytest.mark.anyio
async def test_metrics_count_work_per_stage_and_status_without_phi(tmp_path: Path) -> None:
    store = Store(make_engine(f"sqlite:///{tmp_path}/m.db"), SystemClock())
    hub = Hub(AppConfig.model_validate({"site": {"channels": []}}), store=store)
    conn = JsonConnector("feed", JsonConnector.Config(plugin="test_json"))
    docs = [
        {
            "id": "a",
            "type": "appointment.booked",
            "at": "2026-03-02T10:00:00+00:00",
            "mrn": "M-77",
            "phone": "+15555550177",
        },
        {"id": "b", "type": "boom", "at": "2026-03-02T10:00:00+00:00", "mrn": "M-77"},
        {"id": "c", "type": "appointment.booked", "at": "2026-03-02T10:00:00+00:00", "mrn": "M-78"},
    ]
    IngestSink(store).put_sync([i for d in docs for i in conn.accept(json.dumps(d).encode(), {})])
    MapStage(store, MapperRegistry({})).run_once_sync()  # two mapped, one dead-lettered

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(hub)), base_url="http://t"
    ) as c:
        r = await c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert _sample(text, "careloop_items", table="raw_message", status="mapped") == 2
    assert _sample(text, "careloop_items", table="raw_message", status="dead") == 1
    assert _sample(text, "careloop_items", table="journey_event", status="pending") == 2
    assert _sample(text, "careloop_dead_letters", stage="map") == 1
    assert _sample(text, "careloop_audit_records") >= 4
    assert "# TYPE careloop_items gauge" in text
    assert "M-77" not in text and "5555550177" not in text
    store.engine.dispose()


def test_readiness_calls_a_connector_degraded_only_when_it_says_so(tmp_path: Path) -> None:
    store = Store(make_engine(f"sqlite:///{tmp_path}/r.db"), SystemClock())
    hub = Hub(AppConfig.model_validate({"site": {"channels": []}}), store=store)
    hub.started = True
    healthy = JsonConnector("adt", JsonConnector.Config(plugin="test_json"))
    behind = JsonConnector("ehr", JsonConnector.Config(plugin="test_json"))
    down = JsonConnector("crm", JsonConnector.Config(plugin="test_json"))
    healthy.health = lambda: Health(True, "port=2575 stored=12")  # type: ignore[method-assign]
    behind.health = lambda: Health(True, "subscription not active", degraded=True)  # type: ignore[method-assign]
    hub.connectors = {"adt": healthy, "ehr": behind}
    ready, detail = hub.ready()
    assert ready
    assert detail["connector:adt"] == "ok: port=2575 stored=12"
    assert detail["connector:ehr"] == "degraded: subscription not active"
    down.health = lambda: Health(False, "not started")  # type: ignore[method-assign]
    hub.connectors["crm"] = down
    ready, detail = hub.ready()
    assert not ready and detail["connector:crm"] == "not started"
    store.engine.dispose()
