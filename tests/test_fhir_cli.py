"""``careloop fhir subscriptions``: what the hub knows about its FHIR subscriptions."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from typer.testing import CliRunner

from careloop.cli import app as careloop_app
from careloop.clock import SystemClock
from careloop.db import make_engine, upgrade
from careloop.store import Store
from careloop.tables import FhirSubscriptionState


def test_subscriptions_command_lists_state_and_not_yet_created(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
database: {{url: "sqlite:///{db}"}}
connectors:
  ehr:
    plugin: fhir_subscription
    base_url: http://127.0.0.1:1/fhir
    secret: not-shown
    subscriptions:
      - {{name: appointments, criteria: Appointment}}
      - {{name: admissions, topic: "http://example.org/SubscriptionTopic/admission"}}
""")
    engine = make_engine(f"sqlite:///{db}")
    upgrade(engine)
    with Store(engine, SystemClock()).session() as s:
        s.add(
            FhirSubscriptionState(
                connector="ehr",
                subscription="abc",
                name="appointments",
                status="active",
                events_since_start=7,
                contiguous=5,
                seen_above=[7],
                gap_since=datetime(2026, 3, 2, tzinfo=UTC),
                updated_at=datetime.now(UTC),
            )
        )
    engine.dispose()
    res = CliRunner().invoke(careloop_app, ["fhir", "subscriptions", "--config", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert rows[0]["subscription"] == "abc" and rows[0]["status"] == "active"
    assert (rows[0]["events_since_start"], rows[0]["stored_through"], rows[0]["seen_above"]) == (7, 5, [7])
    assert rows[1] == {
        "connector": "ehr",
        "name": "admissions",
        "subscription": None,
        "status": "not created",
        "topic": "http://example.org/SubscriptionTopic/admission",
    }
    assert "not-shown" not in res.output
    table = CliRunner().invoke(
        careloop_app, ["fhir", "subscriptions", "--config", str(cfg)], env={"COLUMNS": "200"}
    )
    assert table.exit_code == 0 and "appointments" in table.output and "not created" in table.output
