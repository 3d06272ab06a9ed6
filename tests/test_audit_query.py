"""Auditor queries, accounting of disclosures, FHIR AuditEvent export, checkpoints, retention."""

from __future__ import annotations

import csv
import io
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fhir.resources.R4B.bundle import Bundle
from sqlmodel import select

from audit import checkpoint, disclosures, fhir_export, query, retention
from audit.testing import SYNTHETIC_NAME, SYNTHETIC_PHONE, seed
from audit.verify import verify_database
from careloop.clock import VirtualClock
from careloop.store import Store
from careloop.tables import RawMessage

START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def test_per_patient_query_returns_every_access_and_disclosure_including_merged_records(store: Store) -> None:
    sd = seed(store, START)
    with store.session() as s:
        got = {r.seq for r in query.iter_all(s, query.AuditQuery(person_id=sd.alice))}
    assert got == sd.about_alice
    with store.session() as s:
        page = query.search(s, query.AuditQuery(person_id=sd.alice, action="disclosure"))
    assert {r.seq for r in page.records} == sd.disclosures_alice


def test_queries_page_and_filter_and_are_themselves_audited(store: Store) -> None:
    sd = seed(store, START)
    seen: list[int] = []
    after = 0
    with store.session() as s:
        while True:
            page = query.run_query(
                s,
                query.AuditQuery(action="message.*", after=after, limit=2),
                actor="jane-auditor",
                at=START + timedelta(days=1),
                via="test",
            )
            seen += [r.seq for r in page.records]
            assert all(r.action.startswith("message.") for r in page.records)
            if page.next_after is None:
                break
            after = page.next_after
    assert len(seen) == 6 and seen == sorted(seen)
    with store.session() as s:
        audits = query.search(s, query.AuditQuery(action="audit.query", actor="jane-auditor")).records
        failures = query.search(s, query.AuditQuery(outcome="failure")).records
        late = query.search(s, query.AuditQuery(since=START + timedelta(minutes=7 * sd.total))).records
    assert len(audits) == 3 and audits[0].detail["filters"] == {"action": "message.*"}
    assert [r.action for r in failures] == ["item.dead_letter"]
    assert [r.seq for r in late] == [sd.total] + [r.seq for r in audits]
    buf = io.StringIO()
    query.write_csv(failures, buf)
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert rows[0]["action"] == "item.dead_letter" and json.loads(rows[0]["detail"])["error"]


def test_accounting_of_disclosures_has_the_164_528_elements(store: Store) -> None:
    sd = seed(store, START)
    with store.session() as s:
        rep = disclosures.accounting(s, sd.alice, now=START + timedelta(days=1))
    assert {e.audit_seq for e in rep.entries} == sd.disclosures_alice
    for e in rep.entries:
        assert e.date and e.recipient and e.description and e.purpose
    to_patient = [e for e in rep.entries if e.recipient == "the patient via sms"]
    to_caregiver = [e for e in rep.entries if e.recipient == "caregiver via email"]
    assert to_patient and all(not e.accounting_required for e in to_patient)  # (a)(1)(ii)
    assert to_caregiver and all(e.accounting_required for e in to_caregiver)  # marketing: not exempt
    with store.session() as s:
        none = disclosures.accounting(
            s, sd.alice, since=START - timedelta(days=30), until=START, now=START + timedelta(days=1)
        )
    assert none.entries == []


def test_fhir_export_validates_and_holds_no_names_or_phones(store: Store) -> None:
    sd = seed(store, START)
    with store.session() as s:
        recs = list(query.iter_all(s, query.AuditQuery()))
    doc = fhir_export.bundle(recs, at=START)
    Bundle.model_validate(doc)  # R4B models
    fhir_export.validate(doc)
    text_ = json.dumps(doc)
    assert SYNTHETIC_NAME not in text_ and SYNTHETIC_PHONE not in text_
    assert len(doc["entry"]) == sd.total
    patients = [en for e in doc["entry"] for en in e["resource"]["entity"] if en["role"]["code"] == "1"]
    assert {p["what"]["identifier"]["value"] for p in patients} == {
        str(sd.alice),
        str(sd.bob),
        str(sd.merged),
    }
    disclosure = next(
        e["resource"] for e in doc["entry"] if e["resource"]["subtype"][0]["code"] == "disclosure"
    )
    assert disclosure["type"]["code"] == "110106"
    assert any(a["type"]["coding"][0]["code"] == "110152" for a in disclosure["agent"])


def test_checkpoints_every_n_records_and_keys_are_private(store: Store, tmp_path: Path) -> None:
    key = checkpoint.generate_key(tmp_path / "k.pem")
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        checkpoint.generate_key(tmp_path / "k.pem")
    assert checkpoint.run_checkpoint_job(store, key, every=5) is None  # empty log
    sd = seed(store, START)
    cp = checkpoint.run_checkpoint_job(store, key, every=5)
    assert cp is not None and cp.tree_size == sd.total
    assert checkpoint.run_checkpoint_job(store, key, every=5) is None  # not due
    with store.session() as s:
        doc = checkpoint.export(s, key.public_key())
    (tmp_path / "cps.json").write_text(json.dumps(doc))
    loaded = checkpoint.load_file(tmp_path / "cps.json")
    assert loaded[0].signature_ok(key.public_key()) and loaded[0].frontier_ok()
    assert not loaded[0].signature_ok(Ed25519PrivateKey.generate().public_key())


def test_a_checkpoint_is_never_signed_over_a_tampered_record(store: Store) -> None:
    seed(store, START)
    from sqlalchemy import text

    with store.engine.begin() as c:
        c.execute(text("UPDATE audit_record SET actor='x' WHERE seq=3"))
    from careloop.errors import PermanentError

    with pytest.raises(PermanentError, match="record 3"), store.session() as s:
        checkpoint.make_checkpoint(s, Ed25519PrivateKey.generate(), at=START)


def test_pruning_raw_bodies_and_expired_audit_records_leaves_the_chain_verifiable(store: Store) -> None:
    key = Ed25519PrivateKey.generate()
    sd = seed(store, START)
    with store.session() as s:
        checkpoint.make_checkpoint(s, key, at=START)
    later = START + timedelta(days=40)
    with store.session() as s:
        assert retention.prune_raw_messages(s, older_than_days=30, now=later) == 3
    with store.session() as s:
        bodies = {r.body for r in s.exec(select(RawMessage)).all()}
        # young audit records are never pruned, whatever is asked
        assert retention.prune_audit_records(s, retention_days=2190, now=later) == 0
        with pytest.raises(Exception, match="six years"):
            retention.prune_audit_records(s, retention_days=365, now=later)
    assert bodies == {b""}
    assert verify_database(store.engine, public_keys=[key.public_key()]).ok
    much_later = START + timedelta(days=2200)
    with store.session() as s:
        assert retention.prune_audit_records(s, retention_days=2190, now=much_later) == sd.total
    with store.session() as s:
        checkpoint.make_checkpoint(s, key, at=much_later)
    rep = verify_database(store.engine, public_keys=[key.public_key()])
    assert rep.ok, rep.faults
    assert rep.first_seq == sd.total + 1 and rep.records == 2


def test_log_capture_sees_every_logger_and_names_no_phi_in_its_failure() -> None:
    import logging

    from audit.testing import capture_all_logs

    with capture_all_logs() as logs:
        logging.getLogger("careloop.somewhere.deep").debug("sent outbox item %s", 7)
    assert "sent outbox item 7" in logs.text
    logs.assert_free_of(SYNTHETIC_NAME, SYNTHETIC_PHONE)
    with capture_all_logs() as logs:
        logging.getLogger("x").warning("to %s", SYNTHETIC_PHONE)
    with pytest.raises(AssertionError) as err:
        logs.assert_free_of(SYNTHETIC_NAME, SYNTHETIC_PHONE)
    assert SYNTHETIC_PHONE not in str(err.value)


def test_the_scheduled_job_checkpoints_after_n_records_or_after_the_interval(
    store: Store, tmp_path: Path
) -> None:
    from careloop.config import AppConfig

    checkpoint.generate_key(tmp_path / "sign.pem")
    cfg = AppConfig.model_validate(
        {
            "audit": {
                "signing_key": str(tmp_path / "sign.pem"),
                "checkpoint_every": 100,
                "checkpoint_minutes": 30,
            }
        }
    )
    job = checkpoint.job_from_config(store, cfg)
    sd = seed(store, START)
    cp = job()  # first checkpoint: nothing signed yet, fewer than 100 records -> not due
    assert cp is None
    with store.session() as s:
        first = checkpoint.make_checkpoint(
            s, checkpoint.load_private_key(tmp_path / "sign.pem"), at=store.clock.now()
        )
        assert first is not None and first.tree_size == sd.total
    from careloop import audit_log

    with store.session() as s:
        audit_log.append(s, at=START, actor="t", action="t")
    assert job() is None  # one new record, interval not over
    assert isinstance(store.clock, VirtualClock)
    store.clock.set(store.clock.now() + timedelta(minutes=31))
    cp = job()
    assert cp is not None and cp.tree_size == sd.total + 1


def test_after_pruning_a_forged_anchor_checkpoint_is_refused(store: Store) -> None:
    key = Ed25519PrivateKey.generate()
    seed(store, START)
    with store.session() as s:
        checkpoint.make_checkpoint(s, key, at=START)
    with store.session() as s:
        retention.prune_audit_records(s, retention_days=2190, now=START + timedelta(days=2200))
    from sqlalchemy import text

    with store.engine.begin() as c:
        c.execute(text("UPDATE audit_checkpoint SET head_hash=:h"), {"h": "ab" * 32})
    rep = verify_database(store.engine, public_keys=[key.public_key()])
    assert not rep.ok and [f.kind for f in rep.faults] == ["bad_signature"]
