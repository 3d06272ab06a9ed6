"""``careloop hl7 send`` and ``careloop messages list|show|reprocess``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from careloop.clock import SystemClock
from careloop.db import make_engine, upgrade
from careloop.ingest import IngestSink
from careloop.store import Store
from careloop.tables import AuditRecord, RawMessage
from connectors import hl7_cli, messages_cli
from connectors.hl7v2_mllp import MLLPConfig, MLLPConnector
from tests.hl7_support import HL7_FIXTURES, BackgroundListener, adt

runner = CliRunner()


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    url = f"sqlite:///{tmp_path}/cli.db"
    monkeypatch.setenv("CARELOOP_DATABASE_URL", url)
    engine = make_engine(url)
    upgrade(engine)
    yield Store(engine, SystemClock())
    engine.dispose()


def test_send_prints_each_ack_and_exits_zero_when_all_accepted(db: Store) -> None:
    srv = BackgroundListener(IngestSink(db))
    try:
        res = runner.invoke(
            hl7_cli.app, ["send", str(HL7_FIXTURES / "siu_s12_booked.hl7"), "--port", str(srv.port)]
        )
    finally:
        srv.close()
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == ["NW-SIU-0001\tAA", "NW-SIU-0002\tAA"]


def test_send_exits_non_zero_on_an_error_ack(tmp_path: Path) -> None:
    broken = make_engine(f"sqlite:///{tmp_path}/broken.db")  # no schema: the store fails
    srv = BackgroundListener(IngestSink(Store(broken, SystemClock())))
    try:
        res = runner.invoke(
            hl7_cli.app, ["send", str(HL7_FIXTURES / "adt_a01_admit.hl7"), "--port", str(srv.port)]
        )
    finally:
        srv.close()
        broken.dispose()
    assert res.exit_code == 1
    assert res.output.startswith("NW-ADT-0001\tAE\t207 the message could not be stored")


def test_send_refuses_a_file_that_is_not_hl7(tmp_path: Path) -> None:
    f = tmp_path / "x.hl7"
    f.write_text("hello")
    res = runner.invoke(hl7_cli.app, ["send", str(f), "--port", "9"])
    assert res.exit_code == 2


def _store_samples(store: Store) -> list[int]:
    c = MLLPConnector("adt", MLLPConfig(plugin="hl7v2_mllp"))
    items = c.accept((HL7_FIXTURES / "adt_a01_admit.hl7").read_bytes(), {}) + c.accept(adt("A01", "M2"), {})
    return [r.raw_id for r in IngestSink(store).put_sync(items)]


def test_messages_list_and_show_mask_phi_unless_unmasked(db: Store) -> None:
    first, _ = _store_samples(db)
    listed = runner.invoke(messages_cli.app, ["list"])
    assert listed.exit_code == 0 and "NW-ADT-0001" in listed.output and "hl7v2:ADT^A01" in listed.output
    assert "Fictivo" not in listed.output
    masked = runner.invoke(messages_cli.app, ["show", str(first)])
    assert masked.exit_code == 0
    assert (
        "Fictivo" not in masked.output and "NW100003" not in masked.output and "5550103" not in masked.output
    )
    assert (
        "PID|1||***||***" in masked.output
        and "MSH|^~\\&|NWADT" in masked.output
        and "MSA|AA|NW-ADT-0001" in masked.output
    )
    clear = runner.invoke(messages_cli.app, ["show", str(first), "--unmask"])
    assert "Fictivo^Carla" in clear.output
    with Session(db.engine) as s:
        views = s.exec(select(AuditRecord).where(AuditRecord.action == "message.view")).all()
    assert [v.entity for v in views] == [f"raw_message/{first}"]


def test_reprocess_requeues_dead_and_skipped_but_refuses_mapped(db: Store) -> None:
    a, b = _store_samples(db)
    with Session(db.engine) as s:
        ra, rb = s.get(RawMessage, a), s.get(RawMessage, b)
        assert ra and rb
        ra.status, ra.status_reason = "dead", "PermanentError: x"
        rb.status = "mapped"
        s.commit()
    res = runner.invoke(messages_cli.app, ["reprocess", str(a)])
    assert res.exit_code == 0 and f"{a}\tpending (was dead)" in res.output
    res2 = runner.invoke(messages_cli.app, ["reprocess", str(b), "999"])
    assert res2.exit_code == 1
    with Session(db.engine) as s:
        ra, rb = s.get(RawMessage, a), s.get(RawMessage, b)
        assert ra and rb and ra.status == "pending" and ra.status_reason is None and rb.status == "mapped"
        assert (
            s.exec(select(AuditRecord).where(AuditRecord.action == "message.reprocess")).first() is not None
        )
