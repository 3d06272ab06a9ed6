"""The CLI as an operator uses it: config check, replay, explain, dead letters."""

from __future__ import annotations

import json
import os
from pathlib import Path

from typer.testing import CliRunner

from careloop.cli import app
from tests.conftest import FIXTURES
from tests.kernel_plugins import register

register()
runner = CliRunner()

BROKEN = """
site: {timezone: Mars/Olympus, quiet_hours: "8am-9pm"}
server: {port: 70000}
connectors:
  feed: {plugin: test_json, colour: blue}
  bogus: {plugin: no_such_plugin}
channels:
  sms: {plugin: test_sms, phi_class: secret}
templates:
  t1: {sms: {en: "Hi {{ nickname }}"}}
playbooks:
  p1:
    on: [appointment.booked, appointment.teleported]
    steps: [{send: missing-template, at: "appointment.start - 3 fortnights"}]
"""


def test_config_check_names_every_bad_field_and_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.yaml"
    cfg.write_text(BROKEN)
    res = runner.invoke(app, ["config", "check", str(cfg)])
    assert res.exit_code == 2
    text = res.output
    for path in ["site.timezone", "site.quiet_hours", "server.port: must be between 1 and 65535"]:
        assert path in text
    # the kernel sections fail first; fix them and the plugin sections are checked too
    cfg.write_text(
        BROKEN.replace("Mars/Olympus", "UTC").replace("8am-9pm", "08:00-21:00").replace("70000", "8080")
    )
    res = runner.invoke(app, ["config", "check", str(cfg)])
    assert res.exit_code == 2
    for fragment in [
        "connectors.feed.colour: unknown key",
        "connectors.bogus.plugin: unknown plugin 'no_such_plugin' (known:",
        "channels.sms.phi_class",
        "templates.t1.sms.en: unknown variable 'nickname'",
        "playbooks.p1.on.1",
        "playbooks.p1.steps.0.at",
    ]:
        assert fragment in text or fragment in res.output, fragment


def test_config_check_accepts_the_kernel_test_config() -> None:
    res = runner.invoke(app, ["config", "check", str(FIXTURES / "config" / "kernel-test.yaml")])
    assert res.exit_code == 0, res.output


def test_replay_cli_writes_contract_report(tmp_path: Path) -> None:
    feed = tmp_path / "f.jsonl"
    body = {
        "at": "2026-03-01T14:00:00+00:00",
        "id": "m1",
        "type": "appointment.booked",
        "mrn": "M1",
        "phone": "+15555550101",
        "appointment": {"id": "a1", "start": "2026-03-10T15:00:00+00:00"},
    }
    feed.write_text(json.dumps({"at": body["at"], "connector": "feed", "body": body}) + "\n")
    out = tmp_path / "r.json"
    res = runner.invoke(
        app,
        [
            "replay",
            str(feed),
            "--config",
            str(FIXTURES / "config" / "kernel-test.yaml"),
            "--report",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert set(rep) >= {"deliveries", "suppressed", "escalations", "events", "people"}
    d = rep["deliveries"][0]
    assert set(d) >= {"at", "person", "channel", "template", "playbook"} and d["at"].endswith("+00:00")


def test_replay_rejects_unknown_connector_naming_it(tmp_path: Path) -> None:
    feed = tmp_path / "f.jsonl"
    feed.write_text(json.dumps({"at": "2026-03-01T14:00:00+00:00", "connector": "nope", "body": "x"}) + "\n")
    res = runner.invoke(
        app,
        [
            "replay",
            str(feed),
            "--config",
            str(FIXTURES / "config" / "kernel-test.yaml"),
            "--report",
            str(tmp_path / "r.json"),
        ],
    )
    assert res.exit_code == 2 and "unknown connector 'nope'" in res.output


def test_explain_and_deadletters_against_a_database(tmp_path: Path, monkeypatch: object) -> None:
    import asyncio

    from careloop import config as cfgmod
    from careloop.replay import Replayer, read_feed

    db = f"sqlite:///{tmp_path}/x.db"
    feed = tmp_path / "f.jsonl"
    rows: list[dict[str, str | dict[str, str]]] = [
        {"at": "2026-03-01T14:00:00+00:00", "id": "m0", "type": "boom", "mrn": "M1"},
        {
            "at": "2026-03-01T14:00:01+00:00",
            "id": "m1",
            "type": "appointment.booked",
            "mrn": "M1",
            "phone": "+15555550101",
            "appointment": {"id": "a1", "start": "2026-03-10T15:00:00+00:00"},
        },
    ]
    feed.write_text("".join(json.dumps({"at": r["at"], "connector": "feed", "body": r}) + "\n" for r in rows))
    lines = read_feed(feed)
    rp = Replayer(cfgmod.load(FIXTURES / "config" / "kernel-test.yaml"), database_url=db, start=lines[0].at)
    asyncio.run(rp.feed(lines))
    rp.close()
    env = {"CARELOOP_DATABASE_URL": db, "COLUMNS": "200"}
    res = runner.invoke(app, ["explain", "1"], env=env)
    assert res.exit_code == 0
    assert (
        "appointment.booked" in res.output
        and "appointment-reminder" in res.output
        and "allowed" in res.output
    )
    assert "+1555" not in res.output  # explain shows codes, not contact details
    by_mrn = runner.invoke(app, ["explain", "urn:test:mrn|M1"], env=env)
    assert by_mrn.exit_code == 0 and by_mrn.output == res.output
    missing = runner.invoke(app, ["explain", "urn:test:mrn|NOPE"], env=env)
    assert missing.exit_code == 1 and "NOPE" not in missing.output
    # Each showing is an access to the record, audited (the miss showed nothing).
    from sqlmodel import Session, select

    from careloop.db import make_engine
    from careloop.tables import AuditRecord

    engine = make_engine(db)
    with Session(engine) as s:
        views = s.exec(select(AuditRecord).where(AuditRecord.action == "person.view")).all()
    engine.dispose()
    assert [(v.person_id, v.entity, v.actor.startswith("cli:")) for v in views] == [(1, "person/1", True)] * 2
    res = runner.invoke(app, ["deadletters", "list"], env=env)
    assert res.exit_code == 0 and "PermanentError" in res.output
    res = runner.invoke(app, ["deadletters", "retry", "1"], env=env)
    assert res.exit_code == 0
    res = runner.invoke(app, ["deadletters", "retry", "1"], env=env)
    assert res.exit_code == 1 and "already retried" in res.output


def _careloop(*args: str, cwd: Path) -> tuple[int, str, str]:
    """The installed command, as an operator runs it (main() and its error handling)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CARELOOP_DATABASE_URL"}
    proc = subprocess.run(
        [sys.executable, "-m", "careloop.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_read_commands_refuse_a_missing_database_instead_of_creating_one(tmp_path: Path) -> None:
    for args in (["audit", "verify"], ["messages", "list"], ["explain", "1"], ["deadletters", "list"]):
        code, out, err = _careloop(*args, cwd=tmp_path)
        assert code == 2, (args, out, err)
        assert "no careloop database at var/careloop.db" in err
        assert "Traceback" not in err and "OK" not in out
    assert not (tmp_path / "var").exists()


def test_operator_errors_are_one_line_not_a_traceback(tmp_path: Path) -> None:
    code, _, err = _careloop(
        "hl7", "send", str(FIXTURES / "hl7" / "adt_a01_admit.hl7"), "--port", "1", cwd=tmp_path
    )
    assert code == 1 and "cannot reach an MLLP listener at 127.0.0.1:1" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    cfg = tmp_path / "c.yaml"
    cfg.write_text("templates:\n  t1: {text: {en: 'Visit {{ appointment.start | nosuchfilter }}'}}\n")
    code, _, err = _careloop("config", "check", str(cfg), cwd=tmp_path)
    assert code == 2 and "templates.t1.text.en: No filter named 'nosuchfilter'" in err
    assert "Traceback" not in err


def test_a_misspelt_filter_is_refused_rather_than_showing_an_empty_queue(tmp_path: Path) -> None:
    for args, allowed in (
        (["escalations", "list", "--status", "Resolved"], "open, acknowledged, resolved"),
        (["escalations", "list", "--severity", "Emergency"], "emergency, urgent, routine"),
        (["messages", "list", "--status", "bogus"], "pending, mapped, skipped, error, dead"),
    ):
        code, _, err = _careloop(*args, cwd=tmp_path)
        assert code == 2 and allowed in err, (args, err)


def test_the_database_and_exports_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    code, _, err = _careloop("db", "upgrade", cwd=tmp_path)
    assert code == 0, err
    assert (tmp_path / "var" / "careloop.db").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "var").stat().st_mode & 0o777 == 0o700
    code, _, err = _careloop("audit", "export", "--out", "records.jsonl", cwd=tmp_path)
    assert code == 0, err
    assert (tmp_path / "records.jsonl").stat().st_mode & 0o777 == 0o600
    code, _, err = _careloop("audit", "export", "--out", "no/such/dir/x.jsonl", cwd=tmp_path)
    assert code == 1 and "No such file or directory" in err and "Traceback" not in err


def test_json_logs_carry_no_terminal_colour_codes() -> None:
    import logging

    from careloop.logs import JsonFormatter

    rec = logging.makeLogRecord(
        {"msg": "Started server", "color_message": "\x1b[32mStarted\x1b[0m", "stage": "map"}
    )
    doc = json.loads(JsonFormatter().format(rec))
    assert doc["msg"] == "Started server" and doc["stage"] == "map" and "color_message" not in doc


def test_config_check_names_impossible_caps_and_retry_settings(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "compliance: {frequency_caps: {sms: {per_day: 5, per_week: 2}}}\n"
        "delivery: {retry_base_seconds: 600, retry_cap_seconds: 60, max_attempts: 0}\n"
    )
    res = runner.invoke(app, ["config", "check", str(cfg)])
    assert res.exit_code == 2
    for fragment in (
        "compliance.frequency_caps.sms: per_day (5) cannot exceed per_week (2)",
        "delivery.max_attempts",
    ):
        assert fragment in res.output, (fragment, res.output)
    cfg.write_text("delivery: {retry_base_seconds: 600, retry_cap_seconds: 60}\n")
    res = runner.invoke(app, ["config", "check", str(cfg)])
    assert (
        res.exit_code == 2
        and "delivery: retry_cap_seconds cannot be less than retry_base_seconds" in res.output
    )


def test_the_hub_retries_deliveries_as_configured(tmp_path: Path) -> None:
    from careloop.clock import SystemClock
    from careloop.config import AppConfig
    from careloop.db import make_engine
    from careloop.hub import Hub
    from careloop.store import Store

    store = Store(make_engine(f"sqlite:///{tmp_path}/h.db"), SystemClock())
    bare: dict[str, dict[str, list[str]]] = {"site": {"channels": []}}
    hub = Hub(AppConfig.model_validate(bare), store=store)
    assert (hub.deliver.max_attempts, hub.deliver.backoff_base, hub.deliver.backoff_cap) == (10, 30.0, 3600.0)
    cfg = {**bare, "delivery": {"max_attempts": 4, "retry_base_seconds": 5, "retry_cap_seconds": 50}}
    hub = Hub(AppConfig.model_validate(cfg), store=store)
    assert (hub.deliver.max_attempts, hub.deliver.backoff_base, hub.deliver.backoff_cap) == (4, 5.0, 50.0)


def test_config_check_names_two_listeners_on_one_port(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "server: {port: 2575}\nsite: {channels: []}\nconnectors:\n"
        "  adt: {plugin: hl7v2_mllp, port: 2575}\n  lab: {plugin: hl7v2_mllp, port: 2577}\n"
        "  rad: {plugin: hl7v2_mllp, port: 2577}\n"
    )
    res = runner.invoke(app, ["config", "check", str(cfg)])
    assert res.exit_code == 2
    assert "connectors.adt.port: 2575 is already server.port" in res.output
    assert "connectors.rad.port: 2577 is already connectors.lab.port" in res.output
    assert "connectors.lab" not in res.output.replace("already connectors.lab", "")


def test_error_text_with_brackets_is_printed_as_is(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("templates:\n  'r[/x]': {text: {en: 'Hi {{ nickname }}'}}\n")
    code, _, err = _careloop("config", "check", str(cfg), cwd=tmp_path)
    assert code == 2 and "templates.r[/x].text.en: unknown variable 'nickname'" in err
    assert "Traceback" not in err
