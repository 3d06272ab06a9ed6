"""What an auditor relies on beyond the basics: a cut tail is caught even when the head row
was moved back with it, range faults are reported as ranges, paged FHIR exports stay on
the patient asked about, every exported event names its patient and recipient, and
escalations to the care team are accounted as treatment."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from joserfc.jwk import OctKey
from sqlalchemy import text
from typer.testing import CliRunner

from audit import checkpoint, disclosures, fhir_export, query
from audit.api import make_router
from audit.cli import app
from audit.records import Rec, iter_db
from audit.testing import SYNTHETIC_NAME, SYNTHETIC_PHONE, seed
from audit.verify import verify_database
from careloop import audit_log, tokens
from careloop.clock import VirtualClock
from careloop.db import make_engine, upgrade
from careloop.store import Store

START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key()


def _more(store: Store, n: int, at: datetime) -> None:
    for i in range(n):
        with store.session() as s:
            audit_log.append(
                s, at=at + timedelta(minutes=i), actor="api", action="audit.query", purpose="audit"
            )


def _cut_tail(store: Store, keep: int) -> None:
    """Delete every record after ``keep`` and move the head row back to match, as someone
    hiding recent activity with write access to the database would."""
    with store.engine.begin() as c:
        h = c.execute(text("SELECT hash FROM audit_record WHERE seq = :k"), {"k": keep}).scalar_one()
        c.execute(text("DELETE FROM audit_record WHERE seq > :k"), {"k": keep})
        c.execute(text("UPDATE audit_head SET seq = :k, hash = :h WHERE id = 1"), {"k": keep, "h": h})


def test_a_cut_tail_with_the_head_row_moved_back_is_caught_by_the_hubs_checkpoint(store: Store) -> None:
    sd = seed(store, START)
    with store.session() as s:
        cp = checkpoint.make_checkpoint(s, KEY, at=START)
        assert cp is not None and cp.tree_size == sd.total
    _more(store, 3, START + timedelta(days=1))
    assert verify_database(store.engine, public_keys=[PUB]).ok
    keep = sd.total - 5  # inside the signed range
    _cut_tail(store, keep)
    rep = verify_database(store.engine, public_keys=[PUB])
    assert not rep.ok
    assert rep.first_bad is not None and rep.first_bad.seq == keep + 1
    assert rep.first_bad.kind == "truncated", rep.faults


def test_a_wiped_log_with_its_head_row_gone_is_caught_by_the_hubs_checkpoint(store: Store) -> None:
    sd = seed(store, START)
    with store.session() as s:
        assert checkpoint.make_checkpoint(s, KEY, at=START) is not None
    with store.engine.begin() as c:
        c.execute(text("DELETE FROM audit_record"))
        c.execute(text("DELETE FROM audit_head"))
    rep = verify_database(store.engine, public_keys=[PUB])
    assert not rep.ok, f"a wiped log of {sd.total} records verified"
    assert rep.first_bad is not None and rep.first_bad.seq == 1


@pytest.fixture
def cli_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    url = f"sqlite:///{tmp_path}/cli.db"
    monkeypatch.setenv("CARELOOP_DATABASE_URL", url)
    monkeypatch.chdir(tmp_path)
    eng = make_engine(url)
    upgrade(eng)
    store = Store(eng, VirtualClock(START))
    seed(store, START)
    return store


def test_cli_reports_a_rewritten_signed_range_as_a_range_not_as_its_first_record(
    cli_db: Store, tmp_path: Path
) -> None:
    r = CliRunner()
    assert r.invoke(app, ["keygen", "--out", "var/keys/audit-signing.pem"]).exit_code == 0
    assert r.invoke(app, ["checkpoint"]).exit_code == 0
    with cli_db.engine.begin() as c:
        recs = list(iter_db(c))
        size = len(recs)
        prev = recs[3].hash
        for rec in recs[4:]:  # change record 5, re-chain everything after it
            fields: dict[str, Any] = {f: getattr(rec, f) for f in Rec.__slots__}
            if rec.seq == 5:
                fields["actor"] = "someone-else"
            fields["prev_hash"] = prev
            fields["hash"] = prev = Rec(**fields).computed_hash()
            c.execute(
                text("UPDATE audit_record SET actor=:actor, prev_hash=:prev_hash, hash=:hash WHERE seq=:seq"),
                {k: fields[k] for k in ("actor", "prev_hash", "hash", "seq")},
            )
        c.execute(text("UPDATE audit_head SET hash=:h"), {"h": prev})
    res = r.invoke(app, ["verify"])
    assert res.exit_code == 1
    assert f"FIRST BAD RECORD: somewhere in seq 1..{size} (root_mismatch)" in res.stdout, res.stdout
    res = r.invoke(app, ["verify", "--json"])
    first = json.loads(res.stdout)["first_bad"]
    assert (first["seq"], first["last"], first["kind"]) == (1, size, "root_mismatch")


class _Client:
    def __init__(self, app_: FastAPI) -> None:
        self.app = app_

    def get(self, path: str, **kw: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
                return await c.get(path, **kw)

        return asyncio.run(go())


def _patients(ev: dict[str, Any]) -> list[str]:
    return [
        e["what"]["identifier"]["value"]
        for e in ev["entity"]
        if e["what"]["identifier"]["system"] == fhir_export.PERSON_SYSTEM
    ]


def test_paging_a_patients_fhir_export_stays_on_that_patient(store: Store) -> None:
    sd = seed(store, START)
    key = OctKey.generate_key(256)
    api = FastAPI()
    api.include_router(make_router(store, key))
    c = _Client(api)
    with store.session() as s:
        before = {r.seq for r in query.iter_all(s, query.AuditQuery(person_id=sd.bob))}
    h = {"Authorization": f"Bearer {tokens.issue(key, subject='jane-auditor', roles=['auditor'])}"}
    url: str | None = f"/audit/export/fhir?person={sd.bob}&limit=2"
    seen: list[int] = []
    pages = 0
    while url is not None:
        r = c.get(url, headers=h)
        assert r.status_code == 200, r.text
        doc = r.json()
        fhir_export.validate(doc)
        seen += [int(e["resource"]["id"].removeprefix("careloop-")) for e in doc["entry"]]
        nxt = [x["url"] for x in doc.get("link", []) if x["relation"] == "next"]
        url = "/" + nxt[0] if nxt else None
        pages += 1
        assert pages < 50
    assert pages > 1  # the filter has to survive at least one next link
    with store.session() as s:  # now also the audit.query records the paging itself wrote
        after = {r.seq for r in query.iter_all(s, query.AuditQuery(person_id=sd.bob))}
    assert before <= set(seen) <= after, sorted(set(seen) - after)


def test_paging_a_filtered_fhir_export_keeps_the_action_and_the_time_range(store: Store) -> None:
    seed(store, START)
    key = OctKey.generate_key(256)
    api = FastAPI()
    api.include_router(make_router(store, key))
    c = _Client(api)
    with store.session() as s:
        shared = list(query.iter_all(s, query.AuditQuery(action="disclosure")))
    until = shared[-1].at  # exclusive: the last disclosure stays out
    want = [r.seq for r in shared if r.at < until]
    assert len(want) > 2
    h = {"Authorization": f"Bearer {tokens.issue(key, subject='jane-auditor', roles=['auditor'])}"}
    url: str | None = "/audit/export/fhir?" + urlencode(
        {"action": "disclosure", "until": until.isoformat(), "limit": 2}
    )
    seen: list[int] = []
    while url is not None and len(seen) < 100:
        doc = c.get(url, headers=h).json()
        seen += [int(e["resource"]["id"].removeprefix("careloop-")) for e in doc["entry"]]
        nxt = [x["url"] for x in doc.get("link", []) if x["relation"] == "next"]
        url = "/" + nxt[0] if nxt else None
    assert seen == want


def test_every_event_of_a_patients_fhir_export_names_that_patient(store: Store) -> None:
    sd = seed(store, START)
    with store.session() as s:
        recs = list(query.iter_all(s, query.AuditQuery(person_id=sd.alice)))
    assert any(r.person_id is None for r in recs)  # received before anyone knew whose it was
    doc = fhir_export.bundle(recs, at=START, person_id=sd.alice)
    fhir_export.validate(doc)
    assert {e["resource"]["id"] for e in doc["entry"]} == {f"careloop-{s}" for s in sd.about_alice}
    for e in doc["entry"]:
        assert _patients(e["resource"]) in ([str(sd.alice)], [str(sd.merged)]), e["resource"]["id"]
    text_ = json.dumps(doc)
    assert SYNTHETIC_NAME not in text_ and SYNTHETIC_PHONE not in text_


def _disclose(store: Store, person: int, *, purpose: str, role: str, kind: str, at: datetime) -> int:
    with store.session() as s:
        return audit_log.append(
            s,
            at=at,
            actor=f"channel:{'email' if kind == 'email' else 'sms'}",
            action="disclosure",
            person_id=person,
            entity="outbox/77",
            purpose=purpose,
            detail={
                "channel": "email" if kind == "email" else "sms",
                "template": f"{purpose}-notice",
                "phi_class": "none",
                "recipient_kind": kind,
                "recipient_role": role,
                "purpose": purpose,
                "outcome": "captured",
                "attempt": 1,
            },
        ).seq


def test_escalation_to_the_care_team_and_the_safety_reply_are_treatment_disclosures(store: Store) -> None:
    sd = seed(store, START)
    t = START + timedelta(days=2)
    esc = _disclose(store, sd.bob, purpose="escalation", role="care-team", kind="email", at=t)
    safety = _disclose(store, sd.bob, purpose="safety", role="patient", kind="phone", at=t)
    with store.session() as s:
        rep = disclosures.accounting(s, sd.bob, now=t + timedelta(days=1))
    by_seq = {e.audit_seq: e for e in rep.entries}
    assert by_seq[esc].recipient == "care-team via email"
    assert not by_seq[esc].accounting_required
    assert str(by_seq[esc].exemption).startswith("164.528(a)(1)(i):")
    assert "treatment" in by_seq[esc].purpose and "treatment" in by_seq[safety].purpose
    with store.session() as s:
        recs = list(query.iter_all(s, query.AuditQuery(action="disclosure", since=t)))
    events = {int(e["id"].removeprefix("careloop-")): e for e in map(fhir_export.audit_event, recs)}
    for seq in (esc, safety):
        codes = [c["code"] for p in events[seq]["purposeOfEvent"] for c in p.get("coding", [])]
        assert codes == ["TREAT"], events[seq]["purposeOfEvent"]


def test_an_exported_disclosure_names_whether_the_patient_or_the_care_team_received_it(
    store: Store,
) -> None:
    sd = seed(store, START)
    t = START + timedelta(days=2)
    esc = _disclose(store, sd.bob, purpose="escalation", role="care-team", kind="email", at=t)
    with store.session() as s:
        rec = query.search(s, query.AuditQuery(action="disclosure", since=t)).records[0]
    assert rec.seq == esc
    ev = fhir_export.audit_event(rec)
    dest = [a for a in ev["agent"] if a["type"]["coding"][0]["code"] == "110152"]
    assert [a["who"]["identifier"] for a in dest] == [
        {"system": fhir_export.RECIPIENT_ROLE_SYSTEM, "value": "care-team"}
    ]
    fhir_export.validate({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": ev}]})


def test_an_auditors_query_is_exported_with_the_compliance_purpose_of_use(store: Store) -> None:
    sd = seed(store, START)
    with store.session() as s:
        query.run_query(s, query.AuditQuery(person_id=sd.alice), actor="jane", at=START, via="api")
        rec = query.search(s, query.AuditQuery(action="audit.query")).records[0]
    ev = fhir_export.audit_event(rec)
    assert ev["purposeOfEvent"][0]["coding"] == [{"system": fhir_export.ACT_REASON, "code": "HCOMPL"}]
    assert _patients(ev) == [str(sd.alice)]


def test_verify_of_a_missing_export_is_a_usage_error_not_a_failed_verification(cli_db: Store) -> None:
    res = CliRunner().invoke(app, ["verify", "--export", "no-such-export.jsonl"])
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert "no-such-export.jsonl: file not found" in res.output


def test_staff_actions_are_exported_as_a_human_users_and_pipeline_work_as_the_application(
    store: Store,
) -> None:
    sd = seed(store, START)
    with store.session() as s:
        for actor, action in (("sam-nurse", "escalation.acknowledge"), ("cli:ops", "identity.assign")):
            audit_log.append(s, at=START, actor=actor, action=action, person_id=sd.bob, entity="escalation/1")
        recs = query.search(s, query.AuditQuery(person_id=sd.bob)).records

    def agent_type(r: Rec) -> str:
        ev = fhir_export.audit_event(r)
        return str(ev["agent"][0]["type"]["coding"][0]["code"])

    by_action = {r.action: agent_type(r) for r in recs}
    assert by_action["escalation.acknowledge"] == "humanuser"
    assert by_action["identity.assign"] == "humanuser"
    assert by_action["disclosure"] == "110150" and by_action["person.create"] == "110150"


def _forge_frontier(store: Store) -> None:
    with store.engine.begin() as c:
        row = c.execute(text("SELECT tree_size, frontier FROM audit_checkpoint")).one()
        frontier = row[1] if isinstance(row[1], list) else json.loads(row[1])
        frontier[0] = "00" * 32
        c.execute(
            text("UPDATE audit_checkpoint SET frontier = :f WHERE tree_size = :n"),
            {"f": json.dumps(frontier), "n": row[0]},
        )


def test_a_forged_checkpoint_frontier_is_reported_and_never_built_on(store: Store) -> None:
    from careloop.errors import PermanentError

    seed(store, START)
    with store.session() as s:
        assert checkpoint.make_checkpoint(s, KEY, at=START) is not None
    _forge_frontier(store)
    rep = verify_database(store.engine, public_keys=[PUB])
    assert [f.kind for f in rep.faults] == ["bad_frontier"], rep.faults
    _more(store, 3, START + timedelta(days=1))
    with pytest.raises(PermanentError, match="frontier"), store.session() as s:
        checkpoint.make_checkpoint(s, KEY, at=START + timedelta(days=2))
    rep = verify_database(store.engine, public_keys=[PUB])
    assert "root_mismatch" not in {f.kind for f in rep.faults}  # the records are intact
