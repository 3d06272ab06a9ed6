"""``careloop audit ...`` and ``careloop token ...`` end to end on a SQLite file."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from audit.cli import app, token_app
from audit.testing import SYNTHETIC_NAME, seed
from careloop.clock import VirtualClock
from careloop.db import make_engine, upgrade
from careloop.store import Store
from careloop.tokens import authenticate, load_token_key

START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    url = f"sqlite:///{tmp_path}/cli.db"
    monkeypatch.setenv("CARELOOP_DATABASE_URL", url)
    monkeypatch.chdir(tmp_path)  # default key paths (var/keys/...) land in the test folder
    eng = make_engine(url)
    upgrade(eng)
    store = Store(eng, VirtualClock(START))
    seed(store, START)
    return store


def test_keygen_checkpoint_export_and_offline_verify(db: Store, tmp_path: Path) -> None:
    r = CliRunner()
    res = r.invoke(app, ["keygen", "--out", "var/keys/audit-signing.pem"])
    assert res.exit_code == 0 and "BEGIN PUBLIC KEY" in res.output
    assert stat.S_IMODE((tmp_path / "var/keys/audit-signing.pem").stat().st_mode) == 0o600
    (tmp_path / "pub.pem").write_text(
        res.output[res.output.index("-----BEGIN") : res.output.index("END PUBLIC KEY-----") + 19] + "\n"
    )
    assert r.invoke(app, ["checkpoint"]).exit_code == 0
    assert r.invoke(app, ["export", "--format", "checkpoints", "--out", "cps.json"]).exit_code == 0
    assert r.invoke(app, ["export", "--format", "jsonl", "--out", "log.jsonl"]).exit_code == 0
    res = r.invoke(app, ["export", "--format", "fhir", "--out", "bundle.json"])
    assert res.exit_code == 0, res.output
    assert SYNTHETIC_NAME not in (tmp_path / "bundle.json").read_text()
    args = ["--checkpoint", "cps.json", "--public-key", "pub.pem"]
    res = r.invoke(app, ["verify", "--export", "log.jsonl", *args])
    assert res.exit_code == 0 and "OK" in res.output, res.output
    res = r.invoke(app, ["verify", *args, "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["ok"], res.output
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    del lines[6]  # record 7
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    res = r.invoke(app, ["verify", "--export", "log.jsonl", *args])
    assert res.exit_code == 1 and "FIRST BAD RECORD: seq 7" in res.output
    with db.engine.begin() as c:
        c.execute(text("UPDATE audit_record SET outcome='failure' WHERE seq=4"))
    res = r.invoke(app, ["verify", *args])
    assert res.exit_code == 1 and "FIRST BAD RECORD: seq 4 (modified)" in res.output


def test_query_and_disclosures_print_and_are_audited(db: Store) -> None:
    r = CliRunner()
    res = r.invoke(app, ["query", "--action", "disclosure", "--format", "csv"])
    assert res.exit_code == 0 and res.output.startswith("seq,at,actor")
    res = r.invoke(app, ["disclosures", "1", "--until", "2026-03-03"])
    assert res.exit_code == 0 and json.loads(res.output)["regulation"] == "45 CFR 164.528"
    res = r.invoke(app, ["query", "--action", "audit.query"])
    recs = json.loads(res.output)["records"]
    assert [x["entity"] for x in recs] == ["audit/records", "audit/disclosures"]
    assert all(x["actor"].startswith("cli:") for x in recs)


def test_token_keygen_and_issue(db: Store, tmp_path: Path) -> None:
    r = CliRunner()
    assert r.invoke(token_app, ["keygen"]).exit_code == 0
    assert stat.S_IMODE((tmp_path / "var/keys/audit-token.key").stat().st_mode) == 0o600
    res = r.invoke(token_app, ["issue", "--role", "auditor", "--subject", "jane", "--ttl", "600"])
    assert res.exit_code == 0, res.output
    token = res.stdout.strip().splitlines()[0]
    who = authenticate(token, load_token_key(tmp_path / "var/keys/audit-token.key"), role="auditor")
    assert who.subject == "jane"
    res = r.invoke(token_app, ["issue", "--role", "wizard"])
    assert res.exit_code == 2 and "unknown role(s) wizard (known: auditor, staff)" in res.output
